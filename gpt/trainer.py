"""The training loop: data -> model -> loss -> gradients -> AdamW, with eval, logs and checkpoints.

`train(config)` is everything `python train.py` does. The loop itself is short; the functions
around it set up each piece (data, model, optimizer, resume) with explicit arguments.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import hf
from . import parallel
from .config import ConfigError, TrainConfig
from .distributed import DistInfo, all_reduce_mean, barrier, init_distributed, shutdown
from .loader import TokenLoader, eval_batches
from .metrics import MetricsLog, Sinks, WandbSink, format_duration, peak_flops, wandb_tags
from .model import GPT, GPTConfig
from .optim import build_optimizer, learning_rate_at
from .shards import load_meta

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainResult:
    step: int
    train_loss: float | None
    val_loss: float | None
    checkpoint: Path | None


def log(info: DistInfo, message: str) -> None:
    if info.is_main:
        print(message, flush=True)


# ----------------------------------------------------------------------------------------
# Set-up


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


def ensure_dataset(config: TrainConfig, info: DistInfo) -> dict[str, Any]:
    """Load the dataset's metadata, preparing the embedded default corpus if it is missing."""
    data_dir = Path(config.data_dir)
    has_data = (data_dir / "meta.json").exists() or any(data_dir.glob("*train_*.bin"))
    if not has_data and config.prepare_source != "none":
        if info.is_main:
            from .prepare import prepare  # imported here: only this path needs the tokenizer trainer

            print(f"{data_dir} holds no dataset; preparing it from '{config.prepare_source}' "
                  f"({config.prepare_tokenizer}, vocab {config.prepare_vocab_size})", flush=True)
            prepare(
                out_dir=data_dir,
                source=config.prepare_source,
                tokenizer=config.prepare_tokenizer,
                vocab_size=config.prepare_vocab_size,
            )
        barrier(info)
    return load_meta(data_dir)


def grad_accum_steps(config: TrainConfig, world_size: int) -> int:
    """How many micro-batches each process runs per optimizer step.

    micro_batch x block x accum x world = tokens_per_step, so one recipe trains the same model
    on 1 or 8 GPUs; only the split of the work changes.
    """
    per_micro_step = config.batch_size * config.block_size * world_size
    if config.tokens_per_step == 0:
        return 1
    if config.tokens_per_step % per_micro_step:
        lower = max(1, config.tokens_per_step // per_micro_step) * per_micro_step
        raise ConfigError(
            f"tokens_per_step ({config.tokens_per_step}) must be a multiple of batch_size x "
            f"block_size x processes = {config.batch_size} x {config.block_size} x {world_size} "
            f"= {per_micro_step}; for example {lower} or {lower + per_micro_step}"
        )
    return config.tokens_per_step // per_micro_step


def model_config(config: TrainConfig, vocab_size: int) -> GPTConfig:
    return GPTConfig(
        vocab_size=vocab_size, block_size=config.block_size, n_layer=config.n_layer,
        n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout, bias=config.bias,
        tie_weights=config.tie_weights, attention=config.attention,
    )


def wrap_model(model: GPT, config: TrainConfig, info: DistInfo, dtype: torch.dtype) -> torch.nn.Module:
    """Apply data parallelism (DDP/FSDP2), activation checkpointing and compilation from outside;
    see parallel.py. Build the optimizer after this: FSDP replaces the parameters."""
    return parallel.parallelize(model, config, info, dtype, log=lambda message: log(info, message))


# ----------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: torch.nn.Module, config: TrainConfig, info: DistInfo, autocast) -> float:
    """Mean loss over a fixed set of val batches (the same windows at every eval), over all ranks."""
    batches = eval_batches(
        config.data_dir, "val", config.batch_size, config.block_size, config.eval_iters,
        rank=info.rank, world_size=info.world_size, seed=config.seed, device=info.device,
    )
    model.eval()
    total = torch.zeros((), device=info.device)
    for x, y in batches:
        with autocast:
            _, loss = model(x, y)
        total += loss.float()
    model.train()
    return all_reduce_mean(total / config.eval_iters, info).item()


# ----------------------------------------------------------------------------------------
# Preemption: finish the step, save, exit


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (cluster preemption, time limits); checked at step boundaries so
    a checkpoint is never taken mid-step."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def agreed(self, info: DistInfo) -> bool:
        """True on every rank if any rank was signalled.

        Ranks receive a signal at slightly different moments; without agreeing, one rank
        would stop at step N while another waits in step N+1's all-reduce forever.
        """
        if not info.is_distributed:
            return self.signal is not None
        flag = torch.tensor(float(self.signal is not None), device=info.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", i.e. requeue and resume


# ----------------------------------------------------------------------------------------
# The run


def train(config: TrainConfig) -> TrainResult:
    info = init_distributed(config.device)
    try:
        return _train(config, info)
    finally:
        shutdown()


def _train(config: TrainConfig, info: DistInfo) -> TrainResult:
    device = info.device
    dtype = resolve_dtype(config.dtype, device)
    out_dir = Path(config.out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        print("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in config.to_dict().items()), flush=True)
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))

    meta = ensure_dataset(config, info)
    accum = grad_accum_steps(config, info.world_size)
    tokens_per_step = config.batch_size * config.block_size * accum * info.world_size

    # Same seed on every rank: identical initial weights without a broadcast.
    torch.manual_seed(config.seed)
    gpt_config = model_config(config, meta["vocab_size"])
    resume_from = ckpt.latest_checkpoint(out_dir) if config.resume == "auto" else None
    # init_from = "hf:DIR": the architecture is the Hugging Face folder's, on resume too (so the
    # checkpoint fits); its weights are loaded only when not resuming.
    hf_dir = hf.parse_init_from(config.init_from)
    if hf_dir is not None:
        gpt_config = hf.init_from_hf(hf_dir, gpt_config, meta["vocab_size"], lambda m: log(info, m))
    model = GPT(gpt_config)
    if resume_from is None and hf_dir is not None:
        hf.load_hf_weights(model, hf_dir)
        log(info, f"initialized weights from {hf_dir} (Hugging Face GPT-2)")
    elif resume_from is None and config.init_from:
        source = ckpt.resolve_checkpoint(config.init_from)
        saved = ckpt.read_state(source)["model_config"]
        ckpt.check_model_config(source, saved, asdict(gpt_config))
        ckpt.load_model_weights(source, model)
        log(info, f"initialized weights from {source}")
    model.to(device)
    wrapped = wrap_model(model, config, info, dtype)
    optimizer = build_optimizer(model, config, device)
    loader = TokenLoader(
        config.data_dir, "train", config.batch_size, config.block_size, rank=info.rank,
        world_size=info.world_size, order=config.data_order, seed=config.seed, device=device,
    )

    step, tokens_seen = 0, 0
    if resume_from is not None:
        ckpt.verify_checkpoint(resume_from)
        state = ckpt.read_state(resume_from)
        ckpt.check_model_config(resume_from, state["model_config"], asdict(gpt_config))
        # The files hold full tensors; under FSDP each rank keeps its shard of them.
        model_state, optimizer_state = ckpt.read_model_state(resume_from), ckpt.read_optimizer_state(resume_from)
        try:
            parallel.load_full_state_dicts(model, optimizer, model_state, optimizer_state)
        except (KeyError, ValueError, RuntimeError) as e:
            raise ckpt.CheckpointError(
                f"{resume_from}: the saved weights or optimizer state do not fit this model: {e}"
            ) from e
        del model_state, optimizer_state
        loader.load_state_dict(state["loader"])
        ckpt.restore_rng_state(state["rng"][str(info.rank)] if str(info.rank) in state["rng"] else state["rng"]["0"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        log(info, f"resumed from {resume_from} at step {step}")

    n_params = model.num_params()
    flops_per_token = model.flops_per_token()
    peak, peak_source = peak_flops(device, dtype, config.peak_tflops)
    log(info, f"model: {n_params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOP/token; "
              f"device {device} x {info.world_size}, {str(dtype).removeprefix('torch.')}, "
              f"grad accumulation {accum}, {tokens_per_step:,} tokens/step; "
              f"peak {peak / 1e12:.2f} TFLOP/s per device ({peak_source})")

    # Under FSDP the MixedPrecisionPolicy does the casting; elsewhere autocast does.
    compute_dtype = parallel.autocast_dtype(parallel.resolve_strategy(config, info), dtype)
    autocast = (torch.autocast(device.type, dtype=compute_dtype) if compute_dtype is not None
                else contextlib.nullcontext())
    # fp16 has too little range for raw gradients; the scaler keeps them representable.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    metrics = MetricsLog(out_dir, enabled=info.is_main, resume_step=step if resume_from else None)
    if info.is_main and config.wandb_mode != "disabled":
        metrics = Sinks(metrics, WandbSink(
            out_dir, mode=config.wandb_mode, project=config.wandb_project, name=config.wandb_run_name,
            tags=wandb_tags(config.wandb_tags), config=dict(config.to_dict(), model_config=asdict(gpt_config)),
            resumed=resume_from is not None))
    stop = StopFlag()
    stop.install()

    tokenizer_path = Path(config.data_dir) / "tokenizer.json"

    def save(at_step: int, val_loss: float | None) -> Path | None:
        # A collective under FSDP (all ranks gather the shards); only rank 0 receives and writes.
        model_state, optimizer_state = parallel.full_state_dicts(model, optimizer)
        if not info.is_main:
            barrier(info)
            return None
        state = {
            "step": at_step,
            "tokens_seen": tokens_seen,
            "loader": loader.state_dict(),
            "rng": {str(info.rank): ckpt.capture_rng_state()},
            "val_loss": val_loss,
            "model_config": asdict(gpt_config),
            "train_config": config.to_dict(),
            "dataset": meta,
        }
        path = ckpt.save_checkpoint_state(out_dir, at_step, model_state, optimizer_state, state,
                                          tokenizer_path=tokenizer_path, keep_last=config.keep_last)
        barrier(info)
        return path

    wrapped.train()
    train_loss = val_loss = None
    last_ckpt = None
    loss_sum = torch.zeros((), device=device)
    interval_steps, interval_start = 0, time.perf_counter()
    run_start = time.perf_counter()
    while step < config.max_steps:
        lr = learning_rate_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(accum):
            x, y = loader.next_batch()
            # Only the last micro-batch reduces gradients across ranks; the others accumulate locally.
            parallel.set_gradient_sync(wrapped, micro == accum - 1)
            with autocast:
                _, loss = wrapped(x, y)
            loss_sum += loss.detach()
            scaler.scale(loss / accum).backward()
        if config.grad_clip > 0:
            scaler.unscale_(optimizer)
            # Under FSDP2 the gradients are DTensor shards; clip_grad_norm_ reduces the norm over
            # all of them, so every rank clips by the same global factor.
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        interval_steps += 1

        last = step == config.max_steps
        do_eval = last or (config.eval_interval > 0 and step % config.eval_interval == 0)
        if step % config.log_interval == 0 or do_eval or last:
            # The only host-device sync of the loop: reading the loss, on log steps alone.
            train_loss = all_reduce_mean(loss_sum / (interval_steps * accum), info).item()
            elapsed = time.perf_counter() - interval_start
            step_time = elapsed / interval_steps
            tok_s = tokens_per_step / step_time
            mfu = flops_per_token * tok_s / (peak * info.world_size)
            eta = step_time * (config.max_steps - step)
            record = {
                "step": step, "loss": round(train_loss, 6), "lr": lr, "tokens": tokens_seen,
                "tokens_per_s": round(tok_s, 1), "tokens_per_s_per_device": round(tok_s / info.world_size, 1),
                "mfu": round(mfu, 5), "step_ms": round(step_time * 1000, 2),
                "elapsed_s": round(time.perf_counter() - run_start, 2), "eta_s": round(eta, 1),
            }
            message = (f"step {step:>6}/{config.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                       f"{tok_s:,.0f} tok/s | MFU {mfu * 100:.1f}% | {step_time * 1000:.0f} ms/step | "
                       f"ETA {format_duration(eta)}")
            if do_eval:
                val_loss = evaluate(wrapped, config, info, autocast)
                record["val_loss"] = round(val_loss, 6)
                message += f" | val loss {val_loss:.4f}"
            if not math.isfinite(train_loss):
                raise FloatingPointError(
                    f"training loss became {train_loss} at step {step}; the last good checkpoint "
                    f"is kept. Lower learning_rate (now {config.learning_rate}) or grad_clip, or use "
                    f"dtype=float32/bfloat16 instead of float16"
                )
            metrics.write(record)
            log(info, message)
            loss_sum.zero_()
            interval_steps = 0
            if do_eval:
                last_ckpt = save(step, val_loss)
            interval_start = time.perf_counter()
        if stop.agreed(info):
            log(info, f"received a stop signal: saving a checkpoint at step {step} and exiting "
                      f"with code {PREEMPTED_EXIT_CODE} (run again to resume)")
            save(step, val_loss)
            raise SystemExit(PREEMPTED_EXIT_CODE)

    metrics.close()
    log(info, f"done: {step} steps, {tokens_seen:,} tokens, {format_duration(time.perf_counter() - run_start)}"
              + (f", final val loss {val_loss:.4f}" if val_loss is not None else ""))
    return TrainResult(step=step, train_loss=train_loss, val_loss=val_loss, checkpoint=last_ckpt)
