"""Data parallelism from outside the model: DDP or FSDP2, activation checkpointing, compile.

`parallelize(model, config, info, dtype)` is the one place that decides how a plain `GPT` runs on
W processes. Every rank holds the same initial weights (same seed) and reads a disjoint share of
each step's batch (see loader.py), so the strategy changes memory and speed, never the maths:
the gradient is the mean over the global batch either way.

    none  one process; the model as it is.
    ddp   every rank keeps a full copy of weights, gradients and optimizer state; gradients are
          all-reduced (averaged) in buckets during backward.
    fsdp  FSDP2 (`fully_shard`): each rank keeps 1/W of every weight, gradient and optimizer state.
          A block's weights are all-gathered just before it runs and freed after; gradients are
          reduce-scattered. Memory per rank falls roughly W-fold for the parts that dominate it.

Everything is applied in place where possible (activation checkpointing, compile, fully_shard),
so parameter names stay those of the plain model: `model.named_parameters()` gives the same
names under every strategy, which is what keeps one checkpoint format for all of them.

Also here, because it depends on how the model was wrapped: switching gradient sync off during
accumulation (`set_gradient_sync`). Gathering and loading full (unsharded) state under any of
these wrappers is the checkpoint's (gpt/checkpoint/full_state.py).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from .config import ConfigError, TrainConfig
from .distributed import DistInfo

REDUCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_strategy(config: TrainConfig, info: DistInfo) -> str:
    """'none', 'ddp' or 'fsdp': what this run actually does on `info.world_size` processes.

    'auto' is ddp on more than one process. An explicit ddp/fsdp needs a process group, i.e.
    torchrun (even with one process); `python train.py` alone trains the plain model, so a config
    written for 8 GPUs still runs as it is for a quick check.
    """
    strategy = config.parallel
    if strategy == "auto":
        return "ddp" if info.is_distributed else "none"
    if strategy == "none" and info.is_distributed:
        # Each process would train its own copy on its share of the data, never averaging
        # gradients, while the log and checkpoints speak for rank 0's copy alone.
        raise ConfigError(
            f"parallel = 'none' but {info.world_size} processes were launched: each would train "
            f"its own unsynchronized copy of the model. Use parallel = 'ddp', 'fsdp' or 'auto', "
            f"or launch one process (torchrun --nproc_per_node=1, or plain python train.py)"
        )
    if not (info.process_group or info.is_distributed):
        return "none"
    return strategy


def autocast_dtype(strategy: str, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the training loop should autocast to, or None for no autocast.

    Under FSDP the MixedPrecisionPolicy already casts the weights to `dtype` when it gathers them,
    so every matmul runs in `dtype` while the sharded master weights stay fp32; autocast on top
    would only add casts (torchtitan does the same).
    """
    if dtype == torch.float32 or strategy == "fsdp":
        return None
    return dtype


def compile_enabled(setting: str, device: torch.device) -> bool:
    """The `compile` setting resolved: 'auto' compiles on CUDA, where fused kernels pay for the
    compile time many times over; on CPU inductor's kernels were no faster than eager (benchmarks/)."""
    return setting == "true" or (setting == "auto" and device.type == "cuda")


def chunked_loss_enabled(config: TrainConfig, strategy: str, device: torch.device) -> bool:
    """config.loss resolved. 'auto': the plain cross-entropy where the whole model (its loss
    included) is compiled on a CUDA GPU, where inductor fuses it; chunked elsewhere, including
    FSDP, whose compiled units are the blocks (the loss stays eager). Measured on an H200 for
    GPT-2 124M at batch 16 (benchmarks/bench_mfu.py): the same step time compiled (plain 34.2,
    chunked 34.1 ms), and the plain loss peaks 1.1 GB lower (9.1 vs 10.2 GB: the chunks' fp32
    weight gradient and saved input gradient are gone)."""
    if config.loss != "auto":
        return config.loss == "chunked"
    return not (compile_enabled(config.compile, device) and device.type == "cuda" and strategy != "fsdp")


def parallelize(model: nn.Module, config: TrainConfig, info: DistInfo, dtype: torch.dtype,
                log: Callable[[str], None] = lambda message: None) -> nn.Module:
    """Apply activation checkpointing, torch.compile and DDP/FSDP2 to `model` (a `GPT`), and set
    `model.chunked_loss` (config.loss, resolved by `chunked_loss_enabled`: it depends on what is
    compiled).

    Returns the module to call in the training loop. Under FSDP that is `model` itself (sharded in
    place); under DDP a wrapper around it; either way `model` keeps its parameter names, and the
    optimizer must be built from `model.parameters()` *after* this call (FSDP replaces them).
    `log` receives one line saying what was applied.
    """
    strategy = resolve_strategy(config, info)
    compiled = compile_enabled(config.compile, info.device)
    model.chunked_loss = chunked_loss_enabled(config, strategy, info.device)
    log(describe(strategy, config, info, dtype))
    if config.activation_checkpointing:
        for block in model.blocks:
            checkpoint_activations(block)
    if strategy == "fsdp":
        if compiled:
            # Per block, before sharding (as torchtitan does): each compiled graph lies between
            # FSDP's all-gather/reduce-scatter hooks, which therefore still overlap with compute.
            for block in model.blocks:
                block.compile()
        shard_model(model, config, info, dtype)
        return model
    wrapped = model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's weights here, so ranks start identical even if seeds differed.
        wrapped = DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
        settle_ddp_buckets(wrapped, info)
    if compiled:
        # In place (Module.compile), so names keep no `_orig_mod.` prefix; compiling the DDP
        # wrapper (not the inner model) lets dynamo split graphs at DDP's buckets and overlap
        # their all-reduce with the rest of backward.
        wrapped.compile()
    return wrapped


def settle_ddp_buckets(wrapped: torch.nn.Module, info: DistInfo) -> None:
    """One backward of a zero loss on a one-token batch, its gradients dropped: DDP regroups its
    gradient buckets in the order the first backward made them ready, from the second forward
    on. Without this, a run's step 1 reduced with the initial buckets and every later step with
    the regrouped ones, so a run resumed at step k (whose step k+1 is its first) summed step
    k+1's gradients in another order than the run never stopped: at 3 ranks and more, where the
    order of a sum changes its last bits, the resume was not bit for bit (weights 1e-6 apart at
    once, 8e-5 after 25 steps). Now every step of every run uses the regrouped buckets. The RNG
    (dropout) is left as it was."""
    devices = [info.device.index] if info.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        x = torch.zeros(1, 1, dtype=torch.long, device=info.device)
        _, loss = wrapped(x, x, return_logits=False)
        (loss * 0).backward()
    wrapped.module.zero_grad(set_to_none=True)


def describe(strategy: str, config: TrainConfig, info: DistInfo, dtype: torch.dtype) -> str:
    """One line for the log: which strategy, and why when it is not the one asked for."""
    extras = [name for name, on in (("activation checkpointing", config.activation_checkpointing),
                                    ("compile", compile_enabled(config.compile, info.device))) if on]
    if strategy == "fsdp":
        precision = f"{str(dtype).removeprefix('torch.')} compute, {config.fsdp_reduce_dtype} reduce-scatter"
        line = (f"parallel: fsdp (FSDP2) over {info.world_size} process(es); {precision}; reshard after "
                f"forward {config.fsdp_reshard_after_forward}" + ("; CPU offload" if config.fsdp_cpu_offload else ""))
    elif strategy == "ddp":
        line = f"parallel: ddp over {info.world_size} process(es)"
    elif config.parallel in ("ddp", "fsdp"):
        line = (f"parallel: none (parallel = {config.parallel!r} needs torchrun; this is one process "
                f"without a process group, so the plain model trains)")
    else:
        line = "parallel: none (one process)"
    return line + "".join(f"; {e}" for e in extras)


def checkpoint_activations(block: nn.Module) -> None:
    """Make `block` keep only its input in forward and recompute the rest during backward.

    Trades one extra forward per block for not storing its activations (the bulk of memory at
    long context). Done by replacing the instance's forward, not by wrapping the module, so
    parameter names do not change. Non-reentrant checkpointing replays the same RNG state, so
    dropout masks match the stored-activation run.
    """
    forward = block.forward

    def checkpointed_forward(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed_forward


def shard_model(model: nn.Module, config: TrainConfig, info: DistInfo, dtype: torch.dtype) -> None:
    """FSDP2: `fully_shard` each transformer block, then the root (embeddings, final norm, head).

    One FSDP unit per block means one all-gather per block in forward and one reduce-scatter per
    block in backward, each overlapping with the neighbouring block's compute. The root unit
    holds the rest, including the tied embedding / lm_head matrix (one parameter, one shard).
    Unlike DDP, fully_shard broadcasts nothing: each rank keeps its slice of its *own* weights,
    so ranks must start identical (the trainer seeds every rank alike before building the model).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp_policy = MixedPrecisionPolicy(
        # Compute (gathered weights, activations) in `dtype`; the sharded master weights and
        # optimizer state stay fp32.
        param_dtype=None if dtype == torch.float32 else dtype,
        # Summing W gradients in bf16 loses bits the update needs; fp32 costs 2x the traffic.
        reduce_dtype=REDUCE_DTYPES[config.fsdp_reduce_dtype],
    )
    # Offload keeps sharded weights, gradients and the AdamW step on the CPU; pinned memory
    # makes the host<->GPU copies asynchronous (and only exists with a GPU).
    offload = (CPUOffloadPolicy(pin_memory=info.device.type == "cuda") if config.fsdp_cpu_offload
               else OffloadPolicy())
    n = len(model.blocks)
    for i, block in enumerate(model.blocks):
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, offload_policy=offload,
                    reshard_after_forward=reshard_after_forward(config.fsdp_reshard_after_forward, i, n))
    # The root's own parameters are needed first in backward; FSDP2 keeps them gathered anyway.
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload)


def reshard_after_forward(policy: str, index: int, n_blocks: int) -> bool:
    """Free block `index`'s gathered weights after its forward? 'always' saves the most memory
    (ZeRO-3), 'never' saves the backward all-gather (ZeRO-2-like); 'auto' frees all but the last
    block, whose weights backward needs immediately."""
    if policy == "always":
        return True
    if policy == "never":
        return False
    if policy == "auto":
        return index < n_blocks - 1
    raise ConfigError(f"fsdp_reshard_after_forward = {policy!r} is not allowed; choose auto, always or never")


# ----------------------------------------------------------------------------------------
# Gradient accumulation


def set_gradient_sync(wrapped: nn.Module, enabled: bool) -> None:
    """Whether the next backward reduces gradients across ranks.

    During gradient accumulation only the last micro-batch needs to: the others add into local
    gradients. Set before the forward (DDP decides in forward, FSDP2 in backward) and left until
    the next call. A no-op for the plain model.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapped, DistributedDataParallel):
        # What DDP's own no_sync() context manager toggles; a plain setter fits a loop whose
        # backward runs outside the forward's `with` block.
        wrapped.require_backward_grad_sync = enabled
    elif isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(enabled)
