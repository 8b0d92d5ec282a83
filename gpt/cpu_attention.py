"""Causal self-attention for training on a CPU: the formula, with its backward written out.

Forward, for each (batch, head), Q, K, V [T, D]:

    S = Q K^T / sqrt(D) + M        M[i, j] = 0 if j <= i else -inf   (the causal mask)
    P = softmax(S)                 row by row
    O = dropout(P) V

Backward, given dO [T, D] (P_d = dropout(P)):

    dV = P_d^T dO
    dP = dropout_backward(dO V^T)
    dS = P * (dP - rowsum(dP * P))  softmax's Jacobian; 0 wherever the mask put -inf, as P is 0 there
    dQ = dS K / sqrt(D),  dK = dS^T Q / sqrt(D)

Why not F.scaled_dot_product_attention: on a CPU its flash kernel works through the [T, T]
scores in small tiles, which suits a GPU's shared memory but leaves a CPU's big matrix units
idle. Here each product above is one batched matmul over all heads (on a CPU with AMX those run
bf16 at several times the fp32 rate), and the two softmax passes are one kernel each, with no
mask pass in the backward. Measured fwd+bwd, bf16, on an Intel Xeon with AMX (2 cores),
SDPA vs this: T 64 2.0 vs 1.4 ms, T 128 4.3 vs 2.6 ms (B 8, H 6, D 64), T 256 21.2 vs 6.8 ms,
T 512 28.3 vs 14.3 ms, T 1024 31.1 vs 29.1 ms (the [T, T] scores, kept for the backward, then
cost more memory than they save time); on an AMD EPYC with AVX512-BF16 but no AMX, T 128 15.1
vs 3.5 ms, T 256 24.2 vs 11.7 ms, T 512 40.2 vs 21.7 ms (benchmarks/results/attention_amd.json).
In fp32 the gain is smaller (T 256: 22.2 vs 20.1 ms), and none in a training step. Only first
derivatives: a double backward through it raises.

Numerically it is the formula the `attention = "explicit"` path spells out with autograd: bf16
scores from the matmul, softmax computed in fp32 inside the kernel and rounded to bf16 for the
P V product, the softmax backward also in fp32 inside its kernel (tests/test_cpu_attention.py
compares both with a float64 reference).
"""

from __future__ import annotations

import math

import torch

# Longest context this path takes: its [T, T] scores and probabilities are kept for the
# backward (B * H * T * T values, twice). At 512 positions it still runs ~1.9x SDPA's speed (Intel
# Xeon with AMX and AMD EPYC with AVX512-BF16 alike; on the AMD kind a 6 x 384 bf16 training step
# took 703 vs 861 ms, for 14% more peak RSS: 1,195 vs 1,048 MB at batch 8); at 1,024 SDPA's tiles
# come within 1.07-1.21x, not worth those scores' memory.
MAX_POSITIONS = 512


def use_cpu_attention(q: torch.Tensor, q_start: int, S: int) -> bool:
    """Whether `causal_attention` is the faster path for these queries: training or prefill
    (no cached keys before the queries) on a CPU in bf16, up to max_positions() positions."""
    return q.is_cpu and q.dtype == torch.bfloat16 and q_start == 0 and S <= max_positions()


def max_positions() -> int:
    """The longest context this path takes on this CPU: 0 where the CPU has no native bf16
    (oneDNN then emulates bf16 matmuls at ~1 GFLOP/s: SDPA keeps every length)."""
    return MAX_POSITIONS if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 0


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D) + causal mask) V for q, k, v [B, H, T, D] of one dtype -> [B, H, T, D].

    dropout_p > 0 drops attention weights (as F.scaled_dot_product_attention's dropout_p does):
    pass 0 in eval mode."""
    if not (q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must have one shape and dtype, got {q.shape}/{q.dtype}, "
                         f"{k.shape}/{k.dtype}, {v.shape}/{v.dtype}")
    return _CausalAttention.apply(q, k, v, dropout_p)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        B, H, T, D = q.shape
        scale = 1.0 / math.sqrt(D)
        # Heads become the batch of one batched matmul: [B * H, T, D] (a copy where q, k, v are
        # the strided views of the fused qkv output; they are T x D, small beside T x T).
        q3, k3, v3 = (t.reshape(B * H, T, D) for t in (q, k, v))
        # Autocast would run the softmax in fp32 and cast its [T, T] output back for the P V
        # product: two extra passes over the largest tensors here. The softmax kernel already
        # computes in fp32 for bf16 input, so nothing is lost by keeping autocast out.
        with torch.autocast(q.device.type, enabled=False):
            mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
            scores = torch.baddbmm(mask, q3, k3.transpose(1, 2), alpha=scale)  # [B*H, T, T]
            probs = torch.softmax(scores, dim=-1)
            del scores
            if dropout_p > 0:
                dropped, keep = torch.native_dropout(probs, dropout_p, True)
            else:
                dropped, keep = probs, None
            out = torch.bmm(dropped, v3)
        ctx.save_for_backward(q3, k3, v3, probs, dropped, keep)
        ctx.scale, ctx.dropout_p, ctx.shape = scale, dropout_p, (B, H, T, D)
        return out.view(B, H, T, D)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative through this raises
    def backward(ctx, d_out: torch.Tensor):
        q3, k3, v3, probs, dropped, keep = ctx.saved_tensors
        B, H, T, D = ctx.shape
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        d_out3 = d_out.reshape(B * H, T, D).to(q3.dtype)
        d_v = torch.bmm(dropped.transpose(1, 2), d_out3).view(B, H, T, D) if need_v else None
        if not (need_q or need_k):
            return None, None, d_v, None
        d_probs = torch.bmm(d_out3, v3.transpose(1, 2))
        if keep is not None:
            d_probs = torch.ops.aten.native_dropout_backward(d_probs, keep, 1.0 / (1.0 - ctx.dropout_p))
        # softmax's backward in one kernel (fp32 inside for bf16): probs * (d_probs - rowsum(d_probs * probs))
        d_scores = torch._softmax_backward_data(d_probs, probs, -1, probs.dtype)
        d_q = torch.bmm(d_scores, k3).mul_(ctx.scale).view(B, H, T, D) if need_q else None
        d_k = torch.bmm(d_scores.transpose(1, 2), q3).mul_(ctx.scale).view(B, H, T, D) if need_k else None
        return d_q, d_k, d_v, None
