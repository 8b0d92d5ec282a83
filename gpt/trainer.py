"""The training loop: data -> model -> loss -> gradients -> optimizer (AdamW or Muon), with eval, logs and checkpoints.

`train(config, tune_cpu_allocator=True)` is everything `python train.py` does (the flag: keep
freed memory for reuse on a CPU, gpt/allocator.py). The loop itself is short; the functions
around it set up each piece (the data in gpt/run_data.py; model, optimizer, resume here) with
explicit arguments.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import allocator
from . import checkpoint as ckpt
from . import hf
from . import parallel
from .config import ConfigError, TrainConfig, expand_home, grad_accum_steps, tokens_per_optimizer_step, wandb_tags
from .device import has_fast_bf16, is_out_of_memory, pick_device, resolve_dtype
from .distributed import (DistInfo, all_gather_floats, all_reduce_mean, barrier, init_distributed, log, lost_peer,
                          shutdown)
from .errors import FollowOnFailure, InterruptedAfterSave, TrainingError
from .loader import TokenLoader
from .metrics import MetricsLog, Sinks, WandbSink
from .mfu import peak_flops
from .model import GPT, GPTConfig, closed_form_num_params
from .nonfinite import NonFiniteGuard
from .optim import build_optimizer, describe_optimizer, learning_rate_at
from .run_data import ensure_dataset, open_loaders
from .resume import (check_checkpoint_fits_data, check_resumed_model, note_changed_batch, note_changed_settings,
                     note_changed_threads, note_changed_val_set)
from .run_folder import claim_out_dir, record_config
from .run_layout import CONFIG_FILE
from .shards import ShardError
from .stop import StopFlag
from .training_log import (Clock, LogInterval, carried_interval, format_duration, interval_step_time, log_record,
                           peak_at_least, run_seconds)


@dataclass
class TrainResult:
    step: int
    train_loss: float | None
    val_loss: float | None
    checkpoint: Path | None


# ----------------------------------------------------------------------------------------
# Set-up


def gpt_config_for(config: TrainConfig, vocab_size: int) -> GPTConfig:
    """The model shape a run config asks for, over a dataset of `vocab_size` ids."""
    return GPTConfig(
        vocab_size=vocab_size, block_size=config.block_size, n_layer=config.n_layer,
        n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout, bias=config.bias,
        tie_weights=config.tie_weights, attention=config.attention, vocab_multiple=config.vocab_multiple,
    )


def total_memory(device: torch.device) -> tuple[int, str] | None:
    """The memory a run on `device` allocates from, in bytes, and what to call it; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"GPU's ({torch.cuda.get_device_name(device)})"
    try:  # the CPU, and Apple's MPS, whose GPU shares the machine's RAM
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "machine's RAM"
    except (ValueError, OSError, AttributeError):
        return None


def check_model_fits(gpt_config: GPTConfig, config: TrainConfig, info: DistInfo) -> None:
    """Refuse, before building it, a model that cannot fit in memory.

    Without this, a slip such as n_layer = 100000000 builds blocks until the machine runs out of
    memory, and on Linux the kernel's OOM killer then ends the run (or another process) without a
    word. The bound is a floor, so nothing that fits is refused: every process builds the whole
    fp32 model in RAM and moves it to its device (FSDP shards it afterwards), and without FSDP
    training also holds a gradient per weight (AdamW's two moments, activations: more still).
    """
    n_params = closed_form_num_params(gpt_config)
    sharded = parallel.resolve_strategy(config, info) == "fsdp"
    needs = {torch.device("cpu"): 4 * n_params}
    needs[info.device] = max(needs.get(info.device, 0), 4 * n_params * (1 if sharded else 2))
    for device, need in needs.items():
        memory = total_memory(device)
        if memory is None or need <= memory[0]:
            continue
        what = "its fp32 weights" + ("" if sharded or device.type != info.device.type else " and gradients")
        # Rows padded onto the vocabulary tables (vocab_multiple) can be most of the model.
        padding = ((gpt_config.padded_vocab_size - gpt_config.vocab_size) * gpt_config.n_embd
                   * (1 if gpt_config.tie_weights else 2))
        fix = (f"Lower vocab_multiple ({gpt_config.vocab_multiple:,} pads the {gpt_config.vocab_size:,} ids "
               f"to {gpt_config.padded_vocab_size:,} rows; 64 is usual)" if 2 * padding > n_params
               else "Lower n_layer or n_embd")
        raise ConfigError(
            f"the model has {n_params:,} parameters (n_layer {gpt_config.n_layer}, n_embd "
            f"{gpt_config.n_embd}, vocabulary {gpt_config.padded_vocab_size:,}, block_size "
            f"{gpt_config.block_size}): {what} alone take {need / 1e9:,.1f} GB, more than this "
            f"{memory[1]} {memory[0] / 1e9:,.1f} GB. {fix}"
        )


def build_model(config: TrainConfig, info: DistInfo, meta: dict[str, Any], out_dir: Path,
                loader: TokenLoader) -> tuple[TrainConfig, GPT, Path | None]:
    """The model this run trains, on the CPU, and the checkpoint to resume from, if any.

    Its weights: GPT-2's initialisation, or init_from's (a checkpoint, or hf:DIR) on a run's
    first start (a checkpoint trained at a longer block_size is cropped to this run's: see
    GPT.crop_block_size); a resumed run loads the checkpoint's later, with the optimizer. Returns the
    config with the architecture the run really has (hf:DIR sets it), for config.json to record.
    `loader`: the run's train loader, whose fingerprint a resume compares with the checkpoint's.
    """
    # Same seed on every rank: identical initial weights without a broadcast.
    torch.manual_seed(config.seed)
    gpt_config = gpt_config_for(config, meta["vocab_size"])
    resume_from = ckpt.latest_checkpoint(out_dir) if config.resume == "auto" else None
    if resume_from is not None:
        saved = check_checkpoint_fits_data(resume_from, config, meta, resuming=True, current_model=asdict(gpt_config),
                                           fingerprint=loader.fingerprint)
        if config.init_from:
            log(info, f"out_dir holds {resume_from}: resuming from it; init_from = {config.init_from!r} "
                      f"only gives the weights of a run's first start and is not used now")
    # init_from = "hf:DIR": the architecture is the Hugging Face folder's (its context too, while
    # training windows stay block_size). On resume it is the checkpoint's, which was the folder's:
    # the folder itself is read only at the first start (moved or deleted since, a resume still works).
    hf_dir = None
    if config.init_from.startswith(hf.HF_PREFIX) and resume_from is not None:
        trained = saved["model_config"]
        gpt_config = replace(gpt_config, **{k: trained[k] for k in (*hf.ARCHITECTURE_KEYS, "block_size")
                                            if k in trained})
    elif config.init_from.startswith(hf.HF_PREFIX):
        hf_dir = hf.parse_init_from(config.init_from)
        gpt_config = hf.init_from_hf(hf_dir, gpt_config, meta["vocab_size"], lambda m: log(info, m),
                                     data_tokenizer=Path(config.data_dir) / ckpt.TOKENIZER_FILE)
    if config.init_from.startswith(hf.HF_PREFIX):
        # Record the architecture the run really has (config.json, each checkpoint's train_config).
        config = replace(config, **{k: getattr(gpt_config, k) for k in hf.ARCHITECTURE_KEYS})
    check_model_fits(gpt_config, config, info)
    if resume_from is not None:
        check_resumed_model(resume_from, saved, asdict(gpt_config), config)
        if not (out_dir / ckpt.LATEST_FILE).exists():
            log(info, f"note: {out_dir / ckpt.LATEST_FILE} is missing; resuming from the newest complete "
                      f"checkpoint, {resume_from.name} (to start over instead, use another --out_dir)")
        note_changed_settings(saved.get("train_config") or {}, config, info, step=saved["step"])
        if saved["step"] < config.max_steps:  # (a finished run rerun trains nothing: no batch to compare)
            note_changed_batch(saved, config, info)
            note_changed_val_set(saved, config, info)
            note_changed_threads(saved, info)
    model = GPT(gpt_config)
    if resume_from is None and hf_dir is not None:
        hf.load_hf_weights(model, hf_dir)
        log(info, f"initialized weights from {hf_dir} (Hugging Face GPT-2)")
    elif resume_from is None and config.init_from:
        with init_source(config.init_from, info) as source:
            ckpt.verify_checkpoint(source)  # sizes and checksums, before anything of it is read
            saved = check_checkpoint_fits_data(source, config, meta, resuming=False, current_model=asdict(gpt_config))
            trained_context = saved["model_config"].get("block_size")
            crop = isinstance(trained_context, int) and trained_context > gpt_config.block_size
            if crop:  # fine-tuning at a shorter context: load at the trained one, then crop
                model = GPT(replace(gpt_config, block_size=trained_context))
            ckpt.check_model_config(source, saved["model_config"], asdict(model.config), init_from=True)
            ckpt.load_model_weights(source, model)
            log(info, f"initialized weights from {source}")
        if crop:  # the weights are in memory: no need to keep the checkpoint pinned for this
            model.crop_block_size(gpt_config.block_size)
            log(info, f"cropped the position embeddings from block_size {trained_context} to "
                      f"{gpt_config.block_size} (the first {gpt_config.block_size} positions)")
    return config, model, resume_from


@contextlib.contextmanager
def init_source(init_from: str, info: DistInfo) -> Iterator[Path]:
    """The checkpoint `init_from` names, pinned for reading (`ckpt.reading`) on every rank. Rank 0
    resolves it and the others take its answer: with a run still saving into that folder, ranks
    resolving `latest` each for itself could get different steps, and FSDP ranks, which keep the
    shards of their own load (nothing is broadcast), a model made of two checkpoints."""
    with contextlib.ExitStack() as pinned:
        if not info.is_distributed:
            yield pinned.enter_context(ckpt.reading(init_from))
            return
        # Rank 0's outcome, a folder or an error, goes to every rank: a bad init_from raised on
        # rank 0 alone left the others in the broadcast, to die with tracebacks of their own.
        outcome: list[Any] = [None, None]
        if info.is_main:
            try:
                outcome[0] = str(pinned.enter_context(ckpt.reading(init_from)))
            except Exception as e:
                outcome[1], failure = str(e), e
        dist.broadcast_object_list(outcome, src=0)  # rank 0 holds its pin meanwhile
        if outcome[1] is not None:
            raise failure if info.is_main else ckpt.CheckpointError(outcome[1])
        source = Path(outcome[0]) if info.is_main else pinned.enter_context(ckpt.reading(outcome[0]))
        barrier(info)  # rank 0 keeps its pin until every rank holds one
        yield source


SLOW_STEP_S = 60.0  # a step longer than this at the device's peak gets a note at start


def describe_run(config: TrainConfig, info: DistInfo, model: GPT, optimizer: torch.optim.Optimizer,
                 dtype: torch.dtype, accum: int, tokens_per_step: int, flops_per_token: int, peak: float,
                 peak_source: str) -> None:
    """Log what is about to train (size, device, precision, batch, optimizer) and any setting
    that will not do what it seems to."""
    log(info, f"model: {model.num_params() / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} "
              f"MFLOP/token; device {info.device} x {info.world_size}, {str(dtype).removeprefix('torch.')}, "
              f"grad accumulation {accum}, {tokens_per_step:,} tokens/step; "
              f"peak {peak / 1e12:.2f} TFLOP/s per device ({peak_source})")
    if model.config.padded_vocab_size != model.config.vocab_size:
        log(info, f"vocabulary: {model.config.vocab_size:,} ids; embedding and output tables padded to "
                  f"{model.config.padded_vocab_size:,} rows (vocab_multiple {model.config.vocab_multiple})")
    log(info, describe_optimizer(optimizer, config))
    if config.activation_checkpointing:
        log(info, "note: MFU counts model FLOPs only: activation checkpointing's recomputed forward "
                  "(~1/3 more work per step) is not counted, so the hardware does more than MFU says")
    if config.min_lr == 0 and 0 < config.lr_decay_steps < config.max_steps:
        log(info, f"note: min_lr = 0 and lr_decay_steps = {config.lr_decay_steps} < max_steps = {config.max_steps}: "
                  f"the last {config.max_steps - config.lr_decay_steps:,} steps train at learning rate 0 and change "
                  f"nothing (set a min_lr above 0, or lr_decay_steps = max_steps)")
    if config.warmup_steps > config.max_steps:
        log(info, f"note: warmup_steps = {config.warmup_steps} is more than max_steps = {config.max_steps}: "
                  f"the learning rate stops at {learning_rate_at(config.max_steps - 1, config):.2e}, "
                  f"short of learning_rate = {config.learning_rate:.2e}")
    # Even at the peak, a step this long is a setting to look at again before waiting on it: a
    # block_size of 100,000 on a CPU took minutes per step, and a stop signal waits for the step.
    fastest_step_s = flops_per_token * tokens_per_step / (peak * info.world_size)
    if fastest_step_s > SLOW_STEP_S:
        log(info, f"note: one optimizer step takes at least {format_duration(fastest_step_s)} here "
                  f"({tokens_per_step:,} tokens x {flops_per_token / 1e6:,.1f} MFLOP/token at the "
                  f"{peak / 1e12:.2f} TFLOP/s peak per device), and a stop signal (Ctrl-C, SIGTERM) waits for "
                  f"the step to end. Lower batch_size, block_size or the model size for a quicker one")
    if info.device.type == "cpu" and dtype == torch.bfloat16 and not has_fast_bf16(info.device):
        log(info, "note: this CPU has no native bf16 matmul (AVX512-BF16/AMX); bf16 runs several "
                  "times slower than float32 here (benchmarks/: ~50x for a large matmul). Use dtype=float32")
    if info.device.type == "cpu" and dtype == torch.float32 and has_fast_bf16(info.device):
        # dtype auto stays float32 on a CPU (the same numbers on every CPU); say what it costs.
        log(info, "note: this CPU has native bf16 matmuls (AVX512-BF16/AMX): dtype=bfloat16 trains "
                  "faster here (docs/speed.md: 1.15-2.7x per step on 2-core VMs, at bf16 autocast's precision)")


# ----------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: torch.nn.Module, config: TrainConfig, info: DistInfo, autocast,
             val_loader: TokenLoader) -> float:
    """Mean loss over a fixed set of val batches (the same windows at every eval), over all ranks.

    `val_loader` (random order, seeded with config.seed) is rewound to its first window
    (`rewind()`): every eval reads the same windows."""
    val_loader.rewind()
    batches = (val_loader.next_batch() for _ in range(config.eval_iters))
    model.eval()
    total = torch.zeros((), device=info.device)
    for x, y in batches:
        with autocast:
            _, loss = model(x, y, return_logits=False)  # the loss alone (chunked: no [B, T, V] logits)
        total += loss.float()
    model.train()
    return all_reduce_mean(total / config.eval_iters, info).item()


# ----------------------------------------------------------------------------------------
# Out of memory


def out_of_memory_message(config: TrainConfig, error: BaseException) -> str:
    """What ran out of memory, with the settings that size the run and what to change.

    The dtype named is the one the run computes in (`resolve_dtype`: 'auto' is bfloat16 or
    float32), not the setting.
    """
    try:
        latest = ckpt.latest_checkpoint(config.out_dir)
    except ckpt.CheckpointError:
        latest = None
    kept = f"the last checkpoint, {latest}, is intact" if latest else "no checkpoint had been saved"
    first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    dtype_name, suggest_bf16 = config.dtype, config.dtype != "bfloat16"
    try:  # never let describing the error raise another one
        device = pick_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        dtype_name = str(dtype).removeprefix("torch.")
        # bfloat16 halves activation memory, but not where the run already uses it, nor where it
        # would be slow: a CPU without native bf16 matmul (see describe_run's note), a GPU without bf16.
        suggest_bf16 = dtype != torch.bfloat16 and has_fast_bf16(device)
    except Exception:
        pass
    others = (("dtype=bfloat16, " if suggest_bf16 else "")
              + "or on several GPUs parallel=fsdp (with fsdp_cpu_offload=true for the largest models)")
    sizes = f"out of memory ({first_line}) with batch_size {config.batch_size}, block_size " \
            f"{config.block_size}, n_layer {config.n_layer}, n_embd {config.n_embd}, dtype {dtype_name}; {kept}."
    if latest is None:
        return (f"{sizes} Reduce batch_size (set tokens_per_step to keep the tokens per optimizer step: "
                f"gradient accumulation makes up the difference), block_size, or the model size (n_layer, "
                f"n_embd); or set activation_checkpointing=true, {others}")
    # A resume refuses another block_size or model shape (they are the checkpoint's), and another
    # batch_size unless the tokens per optimizer step stay the same: advice naming those failed.
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    keep = ("" if config.tokens_per_step else
            f" and set tokens_per_step = {tokens_per_optimizer_step(config, world)} (this run's tokens per "
            f"optimizer step: gradient accumulation makes up the difference)")
    # resume = 'never' refuses an out_dir with checkpoints: the rerun must resume.
    auto = " with resume = 'auto'" if config.resume == "never" else ""
    return (f"{sizes} To resume from it{auto}, lower batch_size{keep}, or set activation_checkpointing=true, "
            f"{others}. A smaller block_size or model (n_layer, n_embd) is a new run: another out_dir")


# ----------------------------------------------------------------------------------------
# The run's pieces: what `_train` calls


def use_tf32(device: torch.device) -> None:
    if device.type == "cuda":
        # fp32 matmuls (and the fp32 parts of a bf16 run) on TF32 tensor cores: ~8x the fp32
        # rate on A100/H100 at ~1e-3 relative precision, which training does not notice.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def restore_checkpoint(resume_from: Path, model: GPT, optimizer: torch.optim.Optimizer, loader: TokenLoader,
                       info: DistInfo) -> dict[str, Any]:
    """Load the checkpoint to resume into the model, the optimizer and the train loader; return
    its state.json (step, tokens_seen, the log interval in progress, the loss scale, ...).

    Verifies the files, then loads either format at any world size (under FSDP each rank
    reads only its shard) and this rank's RNG state; a collective when distributed."""
    # The optimizer's saved state carries its hyperparameters too (weight_decay, betas, Muon's
    # momentum and lr_scale); this run's config sets them, as it sets the learning rate.
    hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    state = ckpt.load_checkpoint(resume_from, model, optimizer, model_config=asdict(model.config),
                                 rank=info.rank, world_size=info.world_size)
    for group, values in zip(optimizer.param_groups, hyperparameters):
        group.update(values)
    try:
        loader.load_state_dict(state["loader"])
    except ShardError:
        raise  # names the dataset and what to do already
    except ValueError as e:
        # An edited or foreign state.json (the manifest seals ours): one line naming the file,
        # not a traceback. The settings a loader state depends on were checked before.
        raise ckpt.CheckpointError(f"{resume_from / ckpt.STATE_FILE}: {e}; {ckpt.NOT_OURS}") from None
    log(info, f"resumed from {resume_from} at step {state['step']}")
    return state


def autocast_context(config: TrainConfig, info: DistInfo, dtype: torch.dtype):
    # Under FSDP the MixedPrecisionPolicy does the casting; elsewhere autocast does.
    compute_dtype = parallel.autocast_dtype(parallel.resolve_strategy(config, info), dtype)
    return (torch.autocast(info.device.type, dtype=compute_dtype) if compute_dtype is not None
            else contextlib.nullcontext())


def grad_scaler(device: torch.device, dtype: torch.dtype, state: dict[str, Any]) -> torch.amp.GradScaler:
    # fp16 has too little range for raw gradients; the scaler keeps them representable.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if scaler.is_enabled() and state.get("grad_scaler"):
        # The loss scale the run had reached, and its count of finite steps towards the next
        # growth: a fresh scaler starts again at 65536 and skips (or under-scales) steps the
        # uninterrupted run did not. A checkpoint saved in another dtype has none: a fresh one.
        saved_scaler = state["grad_scaler"]
        scaler.load_state_dict({**scaler.state_dict(), "scale": saved_scaler["scale"],
                                "_growth_tracker": saved_scaler["_growth_tracker"]})
    return scaler


def open_metrics(config: TrainConfig, info: DistInfo, out_dir: Path, gpt_config: GPTConfig, step: int,
                 resumed: bool, wandb: bool = True) -> MetricsLog | Sinks:
    """metrics.jsonl, and wandb when configured (and `wandb`: not for a rerun with nothing to
    train, which would open a wandb run folder of its own for no records)."""
    # Records past the step resumed from are dropped (the run repeats those steps); a fresh
    # start (step 0) keeps none: they are of a run killed before its first checkpoint.
    metrics = MetricsLog(out_dir, enabled=info.is_main, resume_step=step)
    if info.is_main and config.wandb_mode != "disabled" and wandb:
        metrics = Sinks(metrics, WandbSink(
            out_dir, mode=config.wandb_mode, project=config.wandb_project, name=config.wandb_run_name,
            tags=wandb_tags(config.wandb_tags), config=dict(config.to_dict(), model_config=asdict(gpt_config)),
            resumed=resumed, resume_step=step if resumed else None, note=lambda line: log(info, line)))
    return metrics


def checkpoint_state(at_step: int, val_loss: tuple[float | None, int | None], tokens_seen: int, loader: TokenLoader,
                     interval: LogInterval, clock: Clock, guard: NonFiniteGuard, scaler: torch.amp.GradScaler,
                     config: TrainConfig, gpt_config: GPTConfig, meta: dict[str, Any], info: DistInfo,
                     accum: int, peak: tuple[float, str] | None = None) -> dict[str, Any]:
    """A checkpoint's state.json: where the run is and how it runs. A collective (every rank's
    RNG state and log-interval loss sum are gathered, in this order). `peak`: MFU's (FLOP/s,
    source), which a resume keeps where it was measured (gpt/mfu.py peak_flops). `val_loss`: the
    run's latest eval and the step it was measured at (earlier than `at_step` for a stop's save
    between evals: `gpt.checkpoint list` and keep_best tell the two apart)."""
    return {
        "step": at_step,
        "tokens_seen": tokens_seen,
        "loader": loader.state_dict(),
        "rng": ckpt.gather_rng_states(),  # every rank's: each draws its own dropout masks
        "world_size": info.world_size,
        "val_loss": val_loss[0],
        "val_loss_step": val_loss[1],
        "model_config": asdict(gpt_config),
        "train_config": config.to_dict(),
        "dataset": meta,
        "skipped_steps": guard.skipped,
        # float16's loss scale (GradScaler's state: a few numbers); null in other dtypes
        "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "log_interval": {"steps": interval.steps, "skipped": interval.skipped, "accum": accum,
                         "loss_sums": all_gather_floats(interval.loss_sum, info)},
        "elapsed_s": run_seconds(clock),
        # On a CPU each matmul splits its sums over the threads: another count, other roundings.
        "cpu_threads": torch.get_num_threads() if info.device.type == "cpu" else None,
        "peak_flops": list(peak) if peak is not None else None,
    }


def train_step(wrapped: torch.nn.Module, model: GPT, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, loader: TokenLoader, guard: NonFiniteGuard, loss_sum: torch.Tensor,
               autocast, accum: int, config: TrainConfig, step: int, lr: float) -> None:
    """One optimizer step after `step` steps, at learning rate `lr`: `accum` micro-batches forward
    and backward (their losses added to `loss_sum`), clipping, the non-finite check, the update."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    guard.begin_step(loss_sum)
    for micro in range(accum):
        x, y = loader.next_batch()
        # Only the last micro-batch reduces gradients across ranks; the others accumulate locally.
        parallel.set_gradient_sync(wrapped, micro == accum - 1)
        with autocast:
            # The loss alone, without the [B, T, V] logits (gpt/loss.py): less memory traffic.
            _, loss = wrapped(x, y, return_logits=False)
        loss_sum += loss.detach()
        scaler.scale(loss / accum).backward()
    grad_norm = None
    if config.grad_clip > 0:
        scaler.unscale_(optimizer)
        # Under FSDP2 the gradients are DTensor shards; clip_grad_norm_ reduces the norm over
        # all of them, so every rank clips by the same global factor.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    guard.end_step(step + 1, loss_sum, grad_norm)  # device-only: flags a NaN/Inf step (or skips it)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def interval_loss(interval: LogInterval, guard: NonFiniteGuard, step: int, accum: int, info: DistInfo) -> float:
    """The log interval's mean loss over ranks and its kept steps (NaN when every one was skipped).
    Reads the steps' non-finite flags first: nan_policy=stop raises here, before any eval or save."""
    kept_steps = interval.steps - interval.skipped - guard.review()
    return (all_reduce_mean(interval.loss_sum / (kept_steps * accum), info).item() if kept_steps
            else float("nan"))


def _latest_if_step(out_dir: str, step: int) -> Path | None:
    """The run's latest checkpoint where it is that of `step`, else None."""
    try:
        latest = ckpt.latest_checkpoint(out_dir)
    except (ckpt.CheckpointError, OSError):
        return None
    return latest if latest is not None and ckpt.step_of(latest.name) == step else None


def timed_evaluate(wrapped: torch.nn.Module, config: TrainConfig, info: DistInfo, autocast,
                   val_loader: TokenLoader, guard: NonFiniteGuard, clock: Clock, step: int) -> float:
    """The val loss at `step`, its seconds kept in `clock` for the ETA."""
    began = time.perf_counter()
    val_loss = evaluate(wrapped, config, info, autocast, val_loader)
    clock.eval_s = time.perf_counter() - began
    guard.check_val_loss(step, val_loss)  # a model that outputs NaN is never saved
    return val_loss


# ----------------------------------------------------------------------------------------
# The run


def train(config: TrainConfig, *, tune_cpu_allocator: bool = False) -> TrainResult:
    """Train as `config` says; see the module docstring. `tune_cpu_allocator` (train.py sets it):
    on a CPU, keep freed memory in the process for the next step (gpt/allocator.py), a setting
    that lasts as long as the process, hence not for a library caller that goes on to other work.

    From Python: `config` is checked as train.py checks it (validate, '~' expanded), so a
    TrainConfig built by hand gets the same ConfigErrors. A stop signal (Ctrl-C, SIGTERM) saves a
    checkpoint and raises SystemExit (130 for Ctrl-C, 75 otherwise), which `except Exception` does
    not catch; calling train() again resumes. The caller's CPU random state is put back afterwards
    (the run seeds its own from config.seed); a GPU's generators are left seeded."""
    config = expand_home(config).validate()
    if torch.get_default_dtype() != torch.float32:
        # Every weight would be built in it, while the log and state.json said float32.
        raise ConfigError(f"torch's default dtype is {torch.get_default_dtype()} (torch.set_default_dtype): "
                          f"train() builds its model in float32 and sets lower precision with dtype = "
                          f"{config.dtype!r}; set the default back to torch.float32 first")
    with torch.random.fork_rng(devices=[]), torch.enable_grad():  # a caller under no_grad too
        return _train_guarded(config, tune_cpu_allocator)


def _train_guarded(config: TrainConfig, tune_cpu_allocator: bool) -> TrainResult:
    stop = StopFlag()
    stop.install()  # first: a signal during set-up must not kill the run (see StopFlag)
    try:
        # CPU offload keeps FSDP's shards in CPU memory: their collectives need gloo beside NCCL.
        info = init_distributed(config.device, cpu_collectives=config.fsdp_cpu_offload)
        # What the run holds until it ends, however it ends (out_dir's lock): released here, not
        # when a traceback that keeps _train's frame alive is finally dropped.
        with contextlib.ExitStack() as held:
            try:
                return _train(config, info, stop, held, tune_cpu_allocator)
            except SystemExit as e:  # a stop signal: saved, exiting with 75 (or 130)
                # Raised again below, once the process group is gone. Its traceback holds _train's
                # frame, hence the model (a DDP reducer holds the group): dropped at the end of this
                # block, so that shutdown's destroy_process_group frees the group and joins its threads.
                exit_code = e.code
            finally:
                shutdown()
        raise SystemExit(exit_code)
    except (RuntimeError, MemoryError) as e:
        if is_out_of_memory(e):
            raise TrainingError(out_of_memory_message(config, e)) from e
        sign = lost_peer(e)
        if sign is not None and stop.signal == signal.SIGTERM:
            # Told to stop first, then the connection went: torchrun stopping this worker because
            # another one failed (rank 0 refusing the run, say); that one's error is the run's.
            raise FollowOnFailure(
                f"told to stop (SIGTERM), this process then lost the connection to another process "
                f"of this run ({sign}), which had failed: its error, if it printed one, says why. "
                f"Checkpoints already written are intact") from e
        if sign is not None:
            # The survivors of a dead rank (another node, most often) printed 25 lines of
            # traceback from inside the collective, ending in gloo's "GLHF!".
            raise TrainingError(
                f"lost the connection to another process of this run ({sign}): it failed or was "
                f"killed (out of memory, its node lost); its own error, if it printed one, is in its "
                f"log. Checkpoints already written are intact: run again to resume from the last "
                f"one") from e
        raise
    finally:
        stop.restore()


def finish_background_save(checkpointer: ckpt.Checkpointer, info: DistInfo, failing: bool) -> bool:
    """Wait for the checkpointer's save in flight as training ends, whatever ended it (`failing`:
    an error is on its way out, and stays the run's error: the save's own failure is then said
    in one line). A sharded save of several processes is left when failing: its writes need
    every rank, and another may be gone (docs/checkpoints.md). False: nothing is suppressed."""
    if failing and checkpointer.format == "sharded" and info.world_size > 1:
        return False
    try:
        checkpointer.close()
    except Exception as e:
        if not failing:
            raise
        log(info, f"note: the checkpoint being written in the background when the run failed could not be "
                  f"completed: {e}")
    return False


def _train(config: TrainConfig, info: DistInfo, stop: StopFlag, held: contextlib.ExitStack,
           tune_cpu_allocator: bool) -> TrainResult:
    device = info.device
    dtype = resolve_dtype(config.dtype, device)
    parallel.resolve_strategy(config, info)  # a strategy that cannot run here fails before any work
    use_tf32(device)
    # Before the model and its first step allocate (gpt/allocator.py, docs/speed.md). A bad
    # GPT_CPU_MALLOC is refused on any device, not ignored where it does not apply.
    allocator.choice()
    memory_note = allocator.keep_freed_memory() if tune_cpu_allocator and device.type == "cpu" else None
    out_dir = claim_out_dir(config, info, held)

    meta = ensure_dataset(config, info)
    loader, val_loader, tokenizer_json = open_loaders(config, meta, info)
    # Whose vocabulary: a data_dir prepared for a fine-tune (--tokenizer-from) may be the default
    # folder, which a later run with prepare_tokenizer's settings then reads as it is.
    reused = f" (the tokenizer of {meta['tokenizer_from']})" if isinstance(meta.get("tokenizer_from"), str) else ""
    log(info, f"data: {config.data_dir}: {meta.get('tokenizer', '?')} vocabulary of {meta['vocab_size']:,} ids{reused}; "
              f"train {loader.num_tokens:,} tokens, val {val_loader.num_tokens:,}")
    accum = grad_accum_steps(config, info.world_size)
    tokens_per_step = tokens_per_optimizer_step(config, info.world_size)

    config, model, resume_from = build_model(config, info, meta, out_dir, loader)
    model.to(device)
    # Data parallelism (DDP/FSDP2), activation checkpointing and compilation, applied from
    # outside (gpt/parallel.py). The optimizer comes after: FSDP replaces the parameters.
    wrapped = parallel.parallelize(model, config, info, dtype, log=lambda message: log(info, message))
    # The weights came from one seed on every rank (DDP and FSDP need them equal). From here each
    # rank draws its own dropout masks, as one process drawing for the whole batch would give
    # every row its own; a resume then restores each rank's generator (checkpoint.restore_rank_rng).
    torch.manual_seed(config.seed + info.rank)
    optimizer = build_optimizer(model, config, device)

    # A fresh start has no saved state: {} gives every setting below its fresh value.
    state = {} if resume_from is None else restore_checkpoint(resume_from, model, optimizer, loader, info)
    step, tokens_seen = state.get("step", 0), state.get("tokens_seen", 0)
    # A rerun of a finished run trains nothing: the run's record keeps the settings it trained
    # with (a sweep's rerun with other values must not relabel the run).
    nothing_to_train = resume_from is not None and step >= config.max_steps
    if info.is_main and not nothing_to_train:  # once the weights are in: a refused start leaves the record
        record_config(out_dir / CONFIG_FILE, config)
    interval = carried_interval(state, info, accum)

    # Counted at the windows trained on: a model started from a Hugging Face folder keeps that
    # folder's context (n_positions), which may be longer than config.block_size.
    flops_per_token = model.flops_per_token(config.block_size)
    peak, peak_source = peak_flops(device, dtype, config.peak_tflops, earlier=state.get("peak_flops"))
    describe_run(config, info, model, optimizer, dtype, accum, tokens_per_step, flops_per_token, peak, peak_source)
    if memory_note:
        log(info, f"cpu memory: {memory_note}")

    autocast = autocast_context(config, info, dtype)
    scaler = grad_scaler(device, dtype, state)
    metrics = open_metrics(config, info, out_dir, model.config, step, resumed=resume_from is not None,
                           wandb=not nothing_to_train)
    guard = NonFiniteGuard(config, model, optimizer, scaler.is_enabled(), info, out_dir)
    guard.skipped = state.get("skipped_steps", 0)
    if step >= config.max_steps:
        log(info, f"note: already at step {step}, max_steps is {config.max_steps}: nothing to train "
                  f"(raise max_steps to train longer)")

    # Full (gathered to rank 0) or sharded (every rank writes its shard; auto under FSDP),
    # synchronous or in a background thread: see gpt/checkpoint/save.py and docs/checkpoints.md.
    checkpointer = ckpt.Checkpointer(
        out_dir, format=ckpt.resolve_format(config.checkpoint_format, parallel.resolve_strategy(config, info)),
        rank=info.rank, world_size=info.world_size, keep_last=config.keep_last, keep_best=config.keep_best,
        tokenizer_json=tokenizer_json, async_save=config.async_checkpoint)
    # However _train ends, a save in flight in the background is finished first (before the
    # out_dir lock goes and the process group with it; on the normal and stop paths it already
    # is). An error leaving training did not wait: at interpreter exit the save's thread could no
    # longer start its checksum pool, and the checkpoint was dropped without a word.
    held.push(lambda error_type, error, traceback: finish_background_save(checkpointer, info, error is not None))

    clock = Clock(elapsed_before=state.get("elapsed_s", 0.0), timed_from=step,
                  interval_start=time.perf_counter(), run_start=time.perf_counter(),
                  compiled=parallel.compile_enabled(config.compile, info.device))

    def save(at_step: int, val_loss: tuple[float | None, int | None]) -> Path:
        # A collective: every rank takes part (gathering to rank 0, or writing its own shard).
        # Reads the loop's tokens_seen, interval and clock as they are when it is called.
        state = checkpoint_state(at_step, val_loss, tokens_seen, loader, interval, clock, guard, scaler,
                                 config, model.config, meta, info, accum, peak=(peak, peak_source))
        return checkpointer.save(at_step, model, optimizer, state)

    wrapped.train()
    train_loss = None
    # The run's latest eval and checkpoint until this one makes its own: a stop before the
    # next eval saves that val loss again (not null), and a resume with nothing left to
    # train reports the finished run's result.
    val_loss, last_ckpt = state.get("val_loss"), resume_from
    val_loss_step = state.get("val_loss_step")
    stop.training = True
    while step < config.max_steps:
        lr = learning_rate_at(step, config)
        train_step(wrapped, model, optimizer, scaler, loader, guard, interval.loss_sum, autocast, accum, config,
                   step, lr)
        step += 1
        tokens_seen += tokens_per_step
        interval.steps += 1
        if clock.first_step_done is None:
            clock.first_step_done = time.perf_counter()

        last = step == config.max_steps
        do_eval = last or (config.eval_interval > 0 and step % config.eval_interval == 0)
        if step % config.log_interval == 0 or do_eval:  # do_eval includes the last step
            # The loop's one host-device sync: reading the loss, on log steps alone. (One more per
            # step: nan_policy=skip without a fused optimizer, see NonFiniteGuard; float16 with
            # any optimizer but fused AdamW, whose GradScaler.step reads the overflow flag.)
            train_loss = interval_loss(interval, guard, step, accum, info)
            step_time, steady = interval_step_time(clock, step)  # before the eval: tokens/s times training alone
            if do_eval:
                val_loss = timed_evaluate(wrapped, config, info, autocast, val_loader, guard, clock, step)
                val_loss_step = step
            loss_scale = scaler.get_scale() if scaler.is_enabled() else None
            peak, peak_source = peak_at_least(peak, peak_source, flops_per_token * tokens_per_step / step_time
                                              / info.world_size, info)
            record, message = log_record(
                step, config, info, lr=lr, tokens_seen=tokens_seen, train_loss=train_loss,
                val_loss=val_loss if do_eval else None, step_time=step_time, steady=steady, clock=clock,
                accum=accum, tokens_per_step=tokens_per_step, flops_per_token=flops_per_token, peak=peak,
                skipped=guard.skipped, loss_scale=loss_scale)
            metrics.write(record)
            log(info, message)
            if loss_scale is not None:
                guard.check_loss_scale(step, loss_scale)
            interval.loss_sum.zero_()
            interval.steps = interval.skipped = 0
            if do_eval:
                began = time.perf_counter()
                last_ckpt = save(step, (val_loss, val_loss_step))
                clock.save_s = time.perf_counter() - began
            clock.interval_start, clock.timed_from = time.perf_counter(), step
        if stop.agreed(info):
            if last:  # the final step's checkpoint is saved: nothing is left to resume or requeue
                log(info, f"received a stop signal ({stop.name}) as the last step ended: the run is complete")
                break
            interval.skipped += guard.review()  # never save a model gone non-finite since the last log
            log(info, f"received a stop signal ({stop.name}): saving a checkpoint at step {step} and "
                      f"exiting with code {stop.exit_code} (run again to resume)")
            try:
                # An eval step has just saved this very state: writing it again would only spend the
                # time a preempted job has left before it is killed (twice as long for a large model).
                if not do_eval:
                    save(step, (val_loss, val_loss_step))
                checkpointer.close()  # an async save completes before the exit code says it is saved
            except KeyboardInterrupt:  # a second Ctrl-C: an async save in flight completes all the same
                if not info.is_main:  # (another rank's part may be done before rank 0 writes `latest`)
                    raise InterruptedAfterSave(f"interrupted: stopped at once (rank 0 says whether the checkpoint "
                                               f"of step {step} was complete)") from None
                saved = _latest_if_step(config.out_dir, step)
                if saved is None:
                    raise
                raise InterruptedAfterSave(f"interrupted: stopped at once; the checkpoint of step {step} was "
                                           f"complete by then ({saved}): run again to resume from it") from None
            metrics.close()  # wandb's run finished too (else a caller's next train() logged into it)
            raise SystemExit(stop.exit_code)

    stop.settle()
    checkpointer.close()  # wait for an async save in flight
    metrics.close()
    # Steps and tokens count the whole run; so does the time (metrics' elapsed_s), with this
    # process's share beside it when the run was resumed.
    this_process = time.perf_counter() - clock.run_start
    took = format_duration(run_seconds(clock))
    if clock.elapsed_before > 0:
        took += f" ({format_duration(this_process)} in this process)"
    log(info, f"done: {step} steps, {tokens_seen:,} tokens, {took}"
              + (f", final val loss {val_loss:.4f}" if val_loss is not None else ""))
    return TrainResult(step=step, train_loss=train_loss, val_loss=val_loss, checkpoint=last_ckpt)
