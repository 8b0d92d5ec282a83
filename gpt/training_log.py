"""What a log step reports, and the arithmetic behind it: the log interval's mean loss, tokens/s,
MFU, the time per step and the ETA, and the record metrics.jsonl (and wandb) get.

The trainer's loop keeps a `LogInterval` (the losses of the steps since the last log line) and a
`Clock` (when the interval and the run began, how long evals and saves take); at each log step
`log_record` turns them into the record and the printed line. A checkpoint carries both, so a
resumed run's first line averages the same steps, and its elapsed time and ETA go on from where
the run was.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from .config import TrainConfig
from .distributed import DistInfo, log


def format_duration(seconds: float) -> str:
    """A duration as a log line shows it: 45s, 12m05s, 7h03m, 3d04h (a long run's ETA)."""
    if not math.isfinite(seconds):  # an ETA from a step time of 0 or NaN: nothing to show
        return "?"
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours >= 24:
        return f"{hours // 24}d{hours % 24:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def eta_seconds(step_time: float, steps_left: int, evals_left: int, eval_s: float | None, save_s: float,
                eval_iters: int, accum: int, eval_compile_s: float = 0.0, saving_now: bool = False) -> float:
    """Seconds to the end of the run: the steps left at `step_time` each, plus each eval (and
    the save after it) to come, priced at the latest ones (`eval_s`, `save_s`). An eval step's
    line is written before its own save (`saving_now`), which is counted too: the last line of
    a run said "ETA 0s" while its final checkpoint was still being written.

    Before this process has timed an eval (the first log lines of a run, and of a resumed one),
    `eval_s` is None and an eval is priced as what it does: `eval_iters` forward passes over one
    micro-batch each, a third of a training micro-step (forward + backward ~ 3 forwards): left
    out until the first one, a costly eval would make the ETA a fraction of the time really left.
    A compiled model also compiles its eval-mode graph at that first eval: `eval_compile_s`,
    added once.
    """
    now = save_s if saving_now else 0.0
    if steps_left == 0 and evals_left == 0:
        return now
    if not math.isfinite(step_time):  # no steady step time yet (interval_step_time)
        return math.nan
    first_eval = 0.0
    if eval_s is None:
        eval_s = step_time / accum * eval_iters / 3
        first_eval = eval_compile_s if evals_left else 0.0
    return max(0.0, step_time * steps_left + evals_left * (eval_s + save_s) + first_eval + now)


def eval_compile_estimate(clock: Clock, steady: float) -> float:
    """What the first eval of a compiled model adds for compiling its forward alone in eval mode:
    a third of the first step's warm-up (its compile of forward and backward). Measured on a CPU
    (1 layer, compile = true): a 113 s first step, then 29 s for the first eval's compile; the
    ETA before it had said 0.8 s."""
    if not clock.compiled or clock.first_step_done is None or not math.isfinite(steady):
        return 0.0
    return max(0.0, clock.first_step_done - clock.run_start - steady) / 3

@dataclass
class LogInterval:
    """The log interval in progress: this rank's summed micro-batch losses, its steps, its skipped
    steps. A stop signal saves mid-interval; the checkpoint carries the interval, so the first
    record after a resume averages the same steps as in a run never stopped."""
    loss_sum: torch.Tensor
    steps: int = 0
    skipped: int = 0


def carried_loss_sum(saved: dict[str, Any], info: DistInfo, accum: int) -> float:
    """This rank's loss sum for the log interval a checkpoint was saved in (`log_interval` in
    state.json). On the same world size and accumulation: its own, bit for bit. Otherwise the
    saved ranks' mean, rescaled to this run's micro-batches per step: the record's mean over
    ranks and steps is the same, only its rounding differs."""
    sums = saved["loss_sums"]
    if len(sums) == info.world_size and saved["accum"] == accum:
        return sums[info.rank]
    return sum(sums) / len(sums) * accum / saved["accum"]


def carried_interval(state: dict[str, Any], info: DistInfo, accum: int) -> LogInterval:
    """The interval a resumed checkpoint was saved in (an empty one for a fresh start)."""
    interval = LogInterval(torch.zeros((), device=info.device))
    if "log_interval" in state:
        carried = state["log_interval"]
        interval.loss_sum.fill_(carried_loss_sum(carried, info, accum))
        interval.steps, interval.skipped = carried["steps"], carried["skipped"]
    return interval

@dataclass
class Clock:
    """The run's timings, for tokens/s and MFU, the ETA and metrics' elapsed_s."""
    elapsed_before: float  # training time of the earlier runs this one resumes (metrics' elapsed_s)
    timed_from: int  # the step the log interval's timing starts after: tokens/s counts this process's steps
    interval_start: float  # time.perf_counter() where the log interval's timing starts
    run_start: float  # time.perf_counter() where this process's training starts
    # When this process's first step ended: it carries warm-up (compile), left out of the ETA.
    first_step_done: float | None = None
    compiled: bool = False  # torch.compile'd: the first eval compiles too (eval_compile_estimate)
    eval_s: float | None = None  # the latest eval's seconds, for the ETA (None: none timed yet)
    save_s: float = 0.0  # the latest save's seconds, for the ETA


def run_seconds(clock: Clock) -> float:
    """Training time so far, the earlier runs this one resumes included."""
    return clock.elapsed_before + time.perf_counter() - clock.run_start

def interval_step_time(clock: Clock, step: int) -> tuple[float, float]:
    """Seconds per step over the log interval ending at `step`, and the same for the ETA: the
    first interval's first step also warmed up (torch.compile: a minute on a GPU), so the ETA
    prices the steps to come at the interval's other steps."""
    elapsed = time.perf_counter() - clock.interval_start
    step_time = steady = elapsed / (step - clock.timed_from)
    if clock.first_step_done > clock.interval_start:
        # An interval of the warm-up step alone (log_interval 1, or a resume one step before a
        # log step) has no steady step time yet: NaN, an ETA of "?" (it priced the run at the
        # compile's minute per step).
        warm_up_only = step - clock.timed_from == 1
        steady = math.nan if warm_up_only else (
            (clock.interval_start + elapsed - clock.first_step_done) / (step - clock.timed_from - 1))
    return step_time, steady


RAISED = ", raised to training's own speed"


def peak_at_least(peak: float, source: str, achieved: float, info: DistInfo) -> tuple[float, str]:
    """The MFU peak, raised to the FLOP/s training `achieved` (per device) where it was only
    measured (a brief matmul at start, `peak_flops`) and training went faster: measured while the
    machine was busy (another job, a data prep finishing), it gave MFU above 100% (160% seen) for
    the rest of the run. A datasheet's or peak_tflops' figure is kept as it is."""
    if achieved <= peak or not source.startswith("measured"):
        return peak, source
    if RAISED not in source:
        log(info, f"note: training ran at {achieved / 1e12:.3f} TFLOP/s per device, faster than the "
                  f"{peak / 1e12:.3f} TFLOP/s peak measured at start (the machine was busier then): MFU is "
                  f"against the faster figure from here on (set peak_tflops for a fixed one)")
    return achieved, source if RAISED in source else source + RAISED  # said once, however often raised


def log_record(step: int, config: TrainConfig, info: DistInfo, *, lr: float, tokens_seen: int,
               train_loss: float, val_loss: float | None, step_time: float, steady: float, clock: Clock,
               accum: int, tokens_per_step: int, flops_per_token: float, peak: float, skipped: int,
               loss_scale: float | None) -> tuple[dict[str, Any], str]:
    """A log step's metrics record and printed line: loss, speed (tokens/s, MFU), ETA; then the
    skipped steps (if any), the val loss (eval steps) and float16's loss scale (not printed).
    `step_time` and `steady` as `interval_step_time` gives them."""
    # Each eval step to come also evaluates and saves: priced at the latest ones.
    eta = eta_seconds(steady, config.max_steps - step, evals_left(step, config), clock.eval_s,
                      clock.save_s, config.eval_iters, accum, eval_compile_estimate(clock, steady),
                      saving_now=val_loss is not None)
    tok_s = tokens_per_step / step_time
    mfu = flops_per_token * tok_s / (peak * info.world_size)
    record = {
        "step": step, "loss": round(train_loss, 6), "lr": lr, "tokens": tokens_seen,
        "tokens_per_s": round(tok_s, 1), "tokens_per_s_per_device": round(tok_s / info.world_size, 1),
        "mfu": round(mfu, 5), "step_ms": round(step_time * 1000, 2), "elapsed_s": round(run_seconds(clock), 2),
        "eta_s": round(eta, 1),
    }
    message = (f"step {step:>6}/{config.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
               f"{tok_s:,.0f} tok/s | MFU {mfu * 100:.1f}% | {step_time * 1000:.0f} ms/step | "
               f"ETA {format_duration(eta)}")
    if skipped:
        record["skipped_steps"] = skipped
        message += f" | skipped {skipped}"
    if val_loss is not None:
        record["val_loss"] = round(val_loss, 6)
        message += f" | val loss {val_loss:.4f}"
    if loss_scale is not None:
        record["loss_scale"] = loss_scale
    return record, message

def evals_left(step: int, config: TrainConfig) -> int:
    """How many eval (and save) steps come after `step`: every eval_interval-th, and the last."""
    if step >= config.max_steps:
        return 0
    every = config.eval_interval
    periodic = (config.max_steps - 1) // every - step // every if every > 0 else 0
    return periodic + 1
