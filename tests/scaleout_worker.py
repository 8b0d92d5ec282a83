"""Run under torchrun by tests/test_distributed.py: the same few optimizer steps under each
data-parallel strategy, recorded for comparison with one process on the whole global batch.

    torchrun --standalone --nproc_per_node=2 tests/scaleout_worker.py OUT.pt

Every rank first computes the single-process reference itself (the plain model on the whole
global batch); then each variant trains a fresh copy of the same initial model on this rank's
rows of that batch (rank r takes rows [r*B, (r+1)*B), as the loader hands them out). Rank 0
saves, per variant: the loss of each step (mean over ranks), the first step's full gradients,
each step's clipped-gradient norm and the final full weights (gathered as checkpoints are).
The loop is the trainer's: set_gradient_sync, autocast where the strategy wants it, loss / accum,
clip_grad_norm_, AdamW (or Muon + AdamW: "*_muon*" against "reference_muon").
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt import parallel  # noqa: E402
from gpt.checkpoint.full_state import full_state_dicts  # noqa: E402
from gpt.config import TrainConfig  # noqa: E402
from gpt.distributed import DistInfo, all_reduce_mean, init_distributed, shutdown  # noqa: E402
from gpt.model import GPT, GPTConfig  # noqa: E402
from gpt.optim import build_optimizer  # noqa: E402

GLOBAL_BATCH, BLOCK, VOCAB, STEPS = 8, 32, 65, 3
MODEL = GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32)
BASE = TrainConfig(device="cpu", learning_rate=3e-3, weight_decay=0.1, grad_clip=1.0)

# name: (config overrides, dtype, micro-batches per step)
VARIANTS = {
    "ddp": (dict(parallel="ddp"), torch.float32, 1),
    "ddp_accum2": (dict(parallel="ddp"), torch.float32, 2),
    "fsdp": (dict(parallel="fsdp"), torch.float32, 1),
    "fsdp_accum2": (dict(parallel="fsdp"), torch.float32, 2),
    # Memory options change where tensors live and when they are gathered, never the values.
    "fsdp_options": (dict(parallel="fsdp", activation_checkpointing=True, fsdp_cpu_offload=True,
                          fsdp_reshard_after_forward="never"), torch.float32, 1),
    "ddp_checkpointing": (dict(parallel="ddp", activation_checkpointing=True), torch.float32, 1),
    "ddp_bf16": (dict(parallel="ddp"), torch.bfloat16, 1),  # autocast
    "fsdp_bf16": (dict(parallel="fsdp"), torch.bfloat16, 1),  # MixedPrecisionPolicy
    "ddp_fp16": (dict(parallel="ddp"), torch.float16, 1),  # autocast + GradScaler
    "fsdp_fp16": (dict(parallel="fsdp"), torch.float16, 1),  # MixedPrecisionPolicy + GradScaler
    "ddp_muon": (dict(parallel="ddp", optimizer="muon"), torch.float32, 1),  # vs reference_muon
    "fsdp_muon": (dict(parallel="fsdp", optimizer="muon"), torch.float32, 1),  # gathers, then slices
    "fsdp_muon_offload": (dict(parallel="fsdp", optimizer="muon", fsdp_cpu_offload=True), torch.float32, 2),
    "fsdp_muon_bf16": (dict(parallel="fsdp", optimizer="muon"), torch.bfloat16, 1),  # the GPU default
}


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of `step`: the same on every rank and for every variant."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, BLOCK + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().float().cpu().clone()
    return grads


def run(config: TrainConfig, info: DistInfo, dtype: torch.dtype, accum: int, rows: slice) -> dict:
    torch.manual_seed(0)
    model = GPT(MODEL)
    wrapped = parallel.parallelize(model, config, info, dtype)
    optimizer = build_optimizer(model, config, info.device)
    strategy = parallel.resolve_strategy(config, info)
    compute = parallel.autocast_dtype(strategy, dtype)
    autocast = torch.autocast("cpu", dtype=compute) if compute is not None else contextlib.nullcontext()
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    record = {"losses": [], "norms": []}
    for step in range(STEPS):
        x, y = batches(step)
        x, y = x[rows], y[rows]
        micro = x.size(0) // accum
        loss_sum = torch.zeros(())
        for m in range(accum):
            parallel.set_gradient_sync(wrapped, m == accum - 1)
            with autocast:
                _, loss = wrapped(x[m * micro:(m + 1) * micro], y[m * micro:(m + 1) * micro])
            loss_sum += loss.detach()
            scaler.scale(loss / accum).backward()
        scaler.unscale_(optimizer)
        if step == 0:
            record["grads"] = full_grads(model)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        record["norms"].append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        record["losses"].append(all_reduce_mean(loss_sum / accum, info).item())
    record["weights"], _ = full_state_dicts(model, optimizer)
    return record


def overflow_on_one_rank(info: DistInfo) -> dict:
    """fp16 under FSDP: an inf in one rank's gradient shard must make *every* rank skip the step
    and halve its loss scale, or the ranks' weights and scales drift apart."""
    torch.manual_seed(0)
    model = GPT(MODEL)
    config = replace(BASE, parallel="fsdp").validate()
    wrapped = parallel.parallelize(model, config, info, torch.float16)
    optimizer = build_optimizer(model, config, info.device)
    scaler = torch.amp.GradScaler("cpu")
    before = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}
    x, y = batches(0)
    _, loss = wrapped(x, y)
    scaler.scale(loss).backward()
    if info.rank == info.world_size - 1:
        model.blocks[0].mlp.fc.weight.grad.to_local().view(-1)[0] = float("inf")
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    scales = [None] * info.world_size
    dist.all_gather_object(scales, scaler.get_scale())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach().full_tensor(), before[n])]
    return {"scales": scales, "changed": changed}


def nan_skip_with_muon(info: DistInfo) -> dict:
    """nan_policy = skip under FSDP with Muon: a NaN in one rank's gradient shard makes every
    rank skip the step on the device, leaving weights and optimizer state as they were."""
    from gpt.nonfinite import NonFiniteGuard

    torch.manual_seed(0)
    model = GPT(MODEL)
    config = replace(BASE, parallel="fsdp", optimizer="muon", nan_policy="skip").validate()
    wrapped = parallel.parallelize(model, config, info, torch.float32)
    optimizer = build_optimizer(model, config, info.device)
    guard = NonFiniteGuard(config, model, optimizer, scaler_enabled=False, info=info, out_dir=Path("."))
    x, y = batches(0)

    def step(poison: bool) -> None:
        loss_sum = torch.zeros(())
        guard.begin_step(loss_sum)
        _, loss = wrapped(x, y)
        loss.backward()
        if poison and info.rank == info.world_size - 1:
            model.blocks[0].mlp.fc.weight.grad.to_local().view(-1)[0] = float("nan")
        loss_sum += loss.detach()
        guard.end_step(1, loss_sum, torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(poison=False)  # a real step first, so that there is momentum to keep
    before = full_state_dicts(model, optimizer)
    step(poison=True)
    after = full_state_dicts(model, optimizer)

    def tensors(state) -> list[torch.Tensor]:
        if isinstance(state, dict):
            return [t for key in sorted(state, key=str) for t in tensors(state[key])]
        if isinstance(state, (list, tuple)):
            return [t for item in state for t in tensors(item)]
        return [state] if isinstance(state, torch.Tensor) else []

    return {"on_device": guard.on_device, "kept": len(tensors(before)),
            "unchanged": all(torch.equal(a, b) for a, b in zip(tensors(before), tensors(after)))}


def main(out: str) -> None:
    info = init_distributed("cpu")
    try:
        single = DistInfo(rank=0, local_rank=0, world_size=1, device=info.device)
        results = {"reference": run(BASE, single, torch.float32, 1, slice(None))}
        results["reference_bf16"] = run(BASE, single, torch.bfloat16, 1, slice(None))
        results["reference_muon"] = run(replace(BASE, optimizer="muon").validate(), single, torch.float32, 1,
                                        slice(None))
        per_rank = GLOBAL_BATCH // info.world_size
        rows = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
        for name, (overrides, dtype, accum) in VARIANTS.items():
            results[name] = run(replace(BASE, **overrides).validate(), info, dtype, accum, rows)
        results["fp16_overflow"] = overflow_on_one_rank(info)
        results["nan_skip_muon"] = nan_skip_with_muon(info)
        if info.is_main:
            torch.save(results, out)
        dist.barrier()
    finally:
        shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
