"""Cross-entropy of the output layer without materializing the [B*T, V] logits.

The plain way, `F.cross_entropy(lm_head(x), targets)`, writes a [N, V] logits tensor (N = B*T),
reads it back for log-softmax, writes that, and in backward writes a zero-filled [N, V]
gradient, scatters into it, and reads both again: six or seven passes over N*V floats, which
at a small width (C = 128, V = 4096: the default config) cost as much as the matmuls.

`linear_cross_entropy(x, weight, targets)` computes the same loss and gradients a chunk of rows
at a time, so each chunk's logits stay in cache, with one exp per logit: for rows r,

    z = x_r W^T,   p = softmax(z),   loss_r = logsumexp(z) - z[t_r],
    dloss/dz = (p - onehot(t_r)) / n_valid,   dx_r = dz W,   dW += dz^T x_r.

The gradients are formed in the forward pass (the loss is a mean, so they are known up to the
incoming scalar) and scaled in backward: no [N, V] tensor is ever kept. Targets equal to -1
are ignored (as F.cross_entropy's ignore_index=-1). Under autocast the matmuls run in the
autocast dtype and the softmax in fp32, as the plain path does; under fp16, dW's product is
formed in fp32 (fp16's range is too small for it before the division by n_valid).
"""

from __future__ import annotations

import torch

# Logit elements per chunk. CPU: 16 MB of fp32 logits, which stay in the L3 cache between the
# passes. Measured on a 2-core EPYC at N=2048, C=128, V=4096 (loss + backward of this layer):
# plain 287 ms; chunks of 256 / 1024 / 2048 rows 154 / 173 / 185 ms with one thread. Smaller
# chunks mean more ops, and on a 2-core machine shared with other jobs each multi-threaded op can
# wait milliseconds for a descheduled thread, so this errs towards few, large chunks.
# GPU: large chunks; there the gain is memory (no [N, V] fp32 logits and gradient kept).
CHUNK_ELEMENTS = {"cpu": 1 << 22}
DEFAULT_CHUNK_ELEMENTS = 1 << 28


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         n_classes: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of logits x @ weight.T ([N, V]) against targets [N], ignoring -1;
    equal to F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=-1).

    n_classes < V: only the first n_classes rows of `weight` are classes; the rest (a vocabulary
    padded for fast matmul shapes) are left out of the softmax, get zero gradient, and the loss
    equals that of the first n_classes logits alone."""
    x2 = x.reshape(-1, x.size(-1))
    targets = targets.reshape(-1)
    device = x2.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x2.dtype
    rows = max(1, CHUNK_ELEMENTS.get(device, DEFAULT_CHUNK_ELEMENTS) // weight.size(0))
    needs_grad = torch.is_grad_enabled() and (x2.requires_grad or weight.requires_grad)
    n_classes = weight.size(0) if n_classes is None else n_classes
    return _LinearCrossEntropy.apply(x2, weight, targets, compute_dtype, rows, needs_grad, n_classes)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, compute_dtype, rows, needs_grad, n_classes):
        valid = targets != -1
        safe_targets = targets.clamp(min=0)  # any real id for ignored rows; masked out below
        n_valid = valid.sum()
        xc, wc = x.to(compute_dtype), weight.to(compute_dtype)
        grad_x = torch.empty_like(x) if needs_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        loss_sum = torch.zeros((), device=x.device, dtype=torch.float32)
        with torch.autocast(x.device.type, enabled=False):  # dtypes are explicit here
            for start in range(0, x.size(0), rows):
                end = min(start + rows, x.size(0))
                z = (xc[start:end] @ wc.t()).float()  # [n, V] logits of this chunk
                z[:, n_classes:] = float("-inf")  # padding: exp gives 0, so no probability, no gradient
                t = safe_targets[start:end, None]
                keep = valid[start:end, None]
                target_logit = z.gather(1, t)
                peak = z.amax(dim=1, keepdim=True)
                # In place, one exp per logit: z <- exp(z - max), then normalised to softmax.
                z.sub_(peak).exp_()
                total = z.sum(dim=1, keepdim=True)
                # loss = logsumexp(z) - z_t = log(sum exp(z - max)) + max - z_t, from the logit
                # itself: exp(z_t - max) underflows to 0 once z_t is ~104 below the max.
                loss_sum += ((total.log() + peak - target_logit) * keep).sum()
                if needs_grad:
                    keep = keep.to(z.dtype)
                    z.mul_(keep / total)  # softmax p; ignored rows contribute nothing
                    z.scatter_add_(1, t, -keep)  # p - onehot(t)
                    dz = z.to(compute_dtype)
                    grad_x[start:end] = (dz @ wc).to(x.dtype)
                    if compute_dtype == torch.float32:
                        grad_w.addmm_(dz.t(), xc[start:end])
                    elif compute_dtype == torch.float16:
                        # dz is not yet divided by n_valid (nor scaled by GradScaler), so a
                        # column of dz^T x sums up to `rows` terms of size |x|: a frequent target
                        # overflows fp16's 65504 to inf, and since the loss scale is applied only
                        # in backward, GradScaler would skip every step. fp32 has the range.
                        grad_w.addmm_(z.t(), xc[start:end].float())
                    else:  # accumulate the chunks' bf16 products in fp32 (bf16 has fp32's range)
                        grad_w += (dz.t() @ xc[start:end]).float()
        ctx.save_for_backward(grad_x, grad_w, n_valid)
        ctx.weight_dtype = weight.dtype
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, n_valid = ctx.saved_tensors
        # Every target ignored: the loss is 0/0 (NaN, as F.cross_entropy's), but no position
        # contributes, so the gradients are zero, as the plain path's are (0 * inf was NaN).
        scale = grad_loss / n_valid.clamp(min=1)
        return (grad_x * scale.to(grad_x.dtype), (grad_w * scale).to(ctx.weight_dtype),
                None, None, None, None, None)
