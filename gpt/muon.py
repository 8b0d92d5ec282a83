"""Muon for the hidden weight matrices, AdamW for every other parameter, as one optimizer.

Muon (K. Jordan et al., 2024: MomentUm Orthogonalized by Newton-Schulz) keeps SGD's Nesterov
momentum of each weight matrix's gradient, but steps along the nearest semi-orthogonal matrix
instead (the momentum's U V^T, where U S V^T is its SVD): every direction the update moves in
moves by the same amount, so the rare directions that AdamW's per-coordinate scaling still
leaves small get their share. It applies to the 2-D weights inside the blocks (attention and
MLP projections). Embeddings and the head (tied to the token embedding or not: Muon takes only
the blocks' matrices), LayerNorm gains and biases keep AdamW, as in the Muon paper's recipe. The
fused qkv weight [3C, C] is orthogonalized as one matrix (its step scaled by sqrt(3), by the
tall-matrix rule below), not as three C x C ones.

Measured on configs/shakespeare_char_cpu.toml's shape (4 layers x 128, 2000 steps of 12 x 64
tokens, whole val split): AdamW at its best learning rate 1.777, Muon (lr 0.02) 1.626. Each
step costs more (five Newton-Schulz iterations per matrix, ~0.6 GFLOP per layer here), so see
benchmarks/bench_shakespeare.py for the loss per second of wall time.

Scale-out: under DDP every rank computes the same update from the same averaged gradient.
Under FSDP the orthogonalization still needs whole matrices: each rank all-gathers the momentum
of every matrix, orthogonalizes all of them and keeps its own rows. That costs each rank the
whole Newton-Schulz work and, for a moment, the whole matrices of one shape in memory; fine at
the sizes this codebase trains, and the rest of the optimizer state stays sharded.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim.adamw import adamw

# The quintic iteration's coefficients, chosen (Jordan et al.) to push every singular value in
# (0, 1] to roughly [0.7, 1.2] in a few steps rather than exactly to 1 in many.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for each matrix of `g` ([m, n] or [batch, m, n]; U S V^T its SVD)."""
    a, b, c = NEWTON_SCHULZ
    x = g if g.dim() == 3 else g.unsqueeze(0)
    # Dividing by the Frobenius norm brings every singular value to at most 1. The norm is taken
    # in float32: in float16 a matrix whose norm passes 65504 would get an infinite norm and so
    # a zero update (the division's float32 result is cast back; every entry is then <= 1).
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True, dtype=torch.float32)
    x = (x / (norm + 1e-7)).to(g.dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix x x^T
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        # x -> a x + (b gram + c gram^2) x: each singular value s -> a s + b s^3 + c s^5. baddbmm
        # folds the scalings and sums into the matmuls (a quarter less time than separate ops).
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.mT if tall else x
    return x if g.dim() == 3 else x.squeeze(0)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP DTensor (a view: writing to it writes the DTensor), else t."""
    return t.to_local() if isinstance(t, DTensor) else t


class MuonAdamW(torch.optim.Optimizer):
    """Param groups with "muon": True are stepped by Muon, the others by AdamW.

    A Muon group's step size is `lr * lr_scale` (the trainer's schedule sets every group's
    `lr`; lr_scale = muon_lr / learning_rate keeps Muon's own size under the same schedule),
    times sqrt(rows / cols) for tall matrices (so their updates are as large per entry as a
    square matrix's). Its weight decay, when a group sets one, is decoupled like AdamW's (the
    trainer sets none: gpt/optim.py). State per parameter: Muon "momentum_buffer"; AdamW "step", "exp_avg", "exp_avg_sq" (as torch.optim.AdamW names them),
    so checkpoints save and restore it like any optimizer's.
    """

    def __init__(self, params, *, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 momentum: float = 0.95, ns_steps: int = 5, fused: bool = False) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, muon=False, lr_scale=1.0,
                        momentum=momentum, ns_steps=ns_steps)
        super().__init__(params, defaults)
        # Not in `defaults`, which would copy "fused" into every param group (and checkpoint):
        # it applies to the AdamW groups only. `skips_on_device` is what the trainer asks.
        self._fused_adamw = fused

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch moves a loaded AdamW "step" onto its parameter's device only for groups marked
        # "fused" or "capturable", which these are not (see __init__); the fused kernel wants it
        # there: a Muon run resumed on a GPU failed at its first step ("state_steps is on cpu").
        if self._fused_adamw:
            for group in self.param_groups:
                for p in group["params"]:
                    step = self.state.get(p, {}).get("step")
                    if isinstance(step, torch.Tensor) and step.device != p.device:
                        self.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)

    @property
    def skips_on_device(self) -> bool:
        """Whether step() honours a `found_inf` flag set on the optimizer (GradScaler's and
        fused AdamW's mechanism): 1.0 leaves weights and state as they were, with no host sync."""
        return self._fused_adamw

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None) if self._fused_adamw else None
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group, found_inf)
            else:
                self._adamw_step(group, found_inf)
        return loss

    def _muon_step(self, group: dict, found_inf: torch.Tensor | None) -> None:
        lr = group["lr"] * group["lr_scale"]
        momentum = group["momentum"]
        # A skipped step must leave the momentum and the weight untouched, and a NaN gradient
        # makes every product NaN: select with torch.where (on the device) rather than scale.
        skip = None if found_inf is None else found_inf.to(torch.bool)
        # Matrices are orthogonalized in batches of one shape (tall ones transposed: U V^T of a
        # transpose is the transpose of U V^T), a few batched matmuls rather than many small ones.
        by_shape: dict[torch.Size, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffer = state["momentum_buffer"]
            if skip is None:
                buffer.mul_(momentum).add_(p.grad)
                nesterov = p.grad.add(buffer, alpha=momentum)
            else:
                updated = buffer.mul(momentum).add_(p.grad)
                nesterov = p.grad.add(updated, alpha=momentum)
                # skip.to: under FSDP's CPU offload the flag is on the GPU, the shards in CPU memory.
                _local(buffer).copy_(torch.where(skip.to(_local(buffer).device), _local(buffer), _local(updated)))
            if isinstance(nesterov, DTensor):
                # FSDP: the momentum is sharded like the weight (rows split across ranks), but
                # U V^T needs the whole matrix. Every rank gathers it and orthogonalizes all of
                # it, then keeps its own rows of the update (the same numbers on every rank).
                nesterov = nesterov.full_tensor()
            wide = nesterov if p.size(0) <= p.size(1) else nesterov.mT
            by_shape.setdefault(wide.shape, []).append((p, wide))
        for pairs in by_shape.values():
            updates = orthogonalize(torch.stack([g for _, g in pairs]), group["ns_steps"])
            for (p, _), update in zip(pairs, updates):
                if p.size(0) > p.size(1):
                    update = update.mT
                if isinstance(p, DTensor):
                    # src_data_rank=None: each rank cuts its shard from its own full copy, no
                    # communication. (distribute_tensor puts it on the mesh's device: under
                    # FSDP's CPU offload the shard itself is in CPU memory, hence the .to below.)
                    update = distribute_tensor(update, p.device_mesh, p.placements, src_data_rank=None).to_local()
                weight = _local(p)  # this rank's rows (a view: writing to it writes p)
                update = update.to(weight.device)
                scale = -lr * max(1.0, p.size(0) / p.size(1)) ** 0.5
                if skip is None:
                    if group["weight_decay"]:
                        weight.mul_(1.0 - lr * group["weight_decay"])
                    weight.add_(update, alpha=scale)
                else:  # the same numbers out of place, kept only if the step is not skipped
                    new = weight.mul(1.0 - lr * group["weight_decay"]).add_(update, alpha=scale)
                    weight.copy_(torch.where(skip.to(weight.device), weight, new))

    def _adamw_step(self, group: dict, found_inf: torch.Tensor | None) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            beta1, beta2 = group["betas"]
            adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=self._fused_adamw or None,
                  foreach=None if self._fused_adamw else True, amsgrad=False, beta1=beta1,
                  beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                  maximize=False, found_inf=found_inf)
