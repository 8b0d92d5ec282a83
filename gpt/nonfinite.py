"""Non-finite losses and gradients: find the steps that went NaN/Inf, then stop or skip them.

`NonFiniteGuard` keeps one flag per step on the device and reads them where the training loop
syncs anyway, so finding a bad step costs no host-device sync per step; `nan_policy` says what
happens to one ('stop', or 'skip' its optimizer update).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import DistInfo, log
from .errors import TrainingError


class NonFiniteGuard:
    """Finds the steps whose loss or gradients are not finite, without a host sync per step.

    Every step leaves a 0-d bool on the device (`end_step`); `review` reads them all at once
    where the loop syncs anyway (log steps) and before every save, so a model that went
    non-finite is never saved. A step is bad when its loss is not finite (the interval's running
    loss sum turns non-finite at the first bad step) or, except under float16, its global
    gradient norm is not: the norm clipping computes anyway (computed for the check alone when
    grad_clip = 0: a finite loss over NaN gradients, an overflow in the backward, turned every
    weight NaN, and under 'stop' a stop signal then saved that model). Under float16 GradScaler
    skips overflowing steps itself as a matter of course, so there only the loss counts, and
    `check_loss_scale` stops a run whose loss scale has collapsed (every step skipped, with a
    finite loss).

    nan_policy 'stop': `review` raises TrainingError naming the first bad step.
    nan_policy 'skip': the bad step's optimizer update is dropped on the device (fused AdamW, and
    MuonAdamW with its AdamW part fused, take GradScaler's `found_inf` flag and leave weights,
    moments and step counts as they were; other optimizers: the flag is read at once, one sync
    per step, and the gradients are dropped). The flag is agreed over ranks, its loss is left out of the logged mean, and
    `review` logs the skipped steps and raises once more than max_skipped_steps were skipped.
    """

    def __init__(self, config: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler_enabled: bool, info: DistInfo, out_dir: Path) -> None:
        self.config = config
        self.policy = config.nan_policy
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer
        self.scaler_enabled = scaler_enabled
        # Fused AdamW, and MuonAdamW when its AdamW part is fused, honour a `found_inf` flag.
        self.on_device = bool(getattr(optimizer, "skips_on_device", optimizer.defaults.get("fused")))
        self.info = info
        self.out_dir = out_dir
        self.skipped = 0  # skipped steps in the whole run (kept in checkpoints)
        self._flags: list[torch.Tensor] = []
        self._first_step = 0
        self._loss_before: torch.Tensor | None = None

    def begin_step(self, loss_sum: torch.Tensor) -> None:
        if self.policy == "skip":
            self._loss_before = loss_sum.clone()

    def end_step(self, step: int, loss_sum: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """After backward and clipping, before the optimizer step; `step` as it will be logged."""
        bad = ~torch.isfinite(loss_sum)
        if not self.scaler_enabled:
            if grad_norm is None:
                grad_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in self.parameters if p.grad is not None])
            if grad_norm is not None:
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor; all ranks must agree
                    grad_norm = grad_norm.full_tensor()
                bad = bad | ~torch.isfinite(grad_norm)
        if not self._flags:
            self._first_step = step
        if self.policy == "skip":
            if self.info.is_distributed:
                flag = bad.float()
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                bad = flag > 0
            loss_sum.copy_(torch.where(bad, self._loss_before, loss_sum))
            if self.scaler_enabled:
                pass  # the step's gradients are not finite either: GradScaler skips it
            elif self.on_device:
                self.optimizer.found_inf = bad.float()  # read by the optimizer (GradScaler's mechanism)
            elif bool(bad):
                self.optimizer.zero_grad(set_to_none=True)  # AdamW leaves params without grads alone
        self._flags.append(bad)

    def review(self) -> int:
        """Read the flags since the last review (one sync); return how many steps were skipped."""
        if not self._flags:
            return 0
        flags = torch.stack(self._flags).float()
        self._flags = []
        if self.info.is_distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad_steps = [self._first_step + i for i in flags.nonzero().flatten().tolist()]
        config = self.config
        if not bad_steps:
            if self.skipped > config.max_skipped_steps:  # max_skipped_steps lowered at a resume
                raise TrainingError(
                    f"{self.skipped} steps of this run were skipped (non-finite loss or gradient norm), more "
                    f"than max_skipped_steps = {config.max_skipped_steps}, lowered since they were: set "
                    f"max_skipped_steps to {self.skipped} or more to go on")
            return 0
        advice = self._advice()
        if self.policy == "stop":
            raise TrainingError(
                f"the loss or gradient norm was not finite (NaN/Inf) at step {bad_steps[0]} "
                f"(nan_policy = 'stop'). {self._last_checkpoint()}: "
                f"{advice}; or set nan_policy=skip to skip such steps (their batches are dropped; "
                f"at most max_skipped_steps = {TrainConfig.max_skipped_steps} by default)"
            )
        self.skipped += len(bad_steps)
        log(self.info, f"skipped {len(bad_steps)} step(s) whose loss or gradient norm was not finite: "
                       f"{', '.join(map(str, bad_steps[:10]))}{' ...' if len(bad_steps) > 10 else ''} "
                       f"({self.skipped} skipped in this run, at most {config.max_skipped_steps})")
        if self.skipped > config.max_skipped_steps:
            raise TrainingError(
                f"{self.skipped} steps had a non-finite loss or gradient norm, more than "
                f"max_skipped_steps = {config.max_skipped_steps} (the last at step {bad_steps[-1]}). "
                f"The run is diverging. {self._last_checkpoint()}: {advice}"
            )
        return len(bad_steps)

    def check_val_loss(self, step: int, val_loss: float) -> None:
        """An eval cannot be skipped: a model whose validation loss is not finite is broken
        (under either policy), and is not saved."""
        if not math.isfinite(val_loss):
            raise TrainingError(
                f"the validation loss was {val_loss} at step {step}: the model's outputs are not "
                f"finite. {self._last_checkpoint()}: {self._advice()}"
            )

    def check_loss_scale(self, step: int, scale: float) -> None:
        """float16: GradScaler halves its scale at each step whose gradients overflow and skips
        that step, with no non-finite loss for `review` to count. Below 1 the gradients overflowed
        float16 even unscaled: stop, rather than skip step after step until max_steps."""
        if scale >= MIN_LOSS_SCALE:
            return
        latest, advice = self._latest(), self._advice()
        where = (f"the latest checkpoint, {latest}, holds the weights as they last trained" if latest
                 else "no checkpoint was saved")
        raise TrainingError(
            f"the float16 loss scale fell to {scale:g} by step {step}: the gradients overflow float16 "
            f"even unscaled, so every step is skipped (GradScaler) and the model no longer learns "
            f"({where}). {advice[0].upper()}{advice[1:]}"
        )

    def _advice(self) -> str:
        config = self.config
        return (f"lower learning_rate (now {config.learning_rate:g})"
                + (f" or grad_clip (now {config.grad_clip:g})" if config.grad_clip > 0 else
                   ", set grad_clip (now 0: off)")
                + (", use dtype bfloat16 or float32 instead of float16" if config.dtype == "float16" else ""))

    def _latest(self) -> Path | None:
        try:
            return ckpt.latest_checkpoint(self.out_dir)
        except ckpt.CheckpointError:
            return None

    def _last_checkpoint(self) -> str:
        """The start of the advice's sentence, which the caller ends with ': ' and the advice."""
        latest = self._latest()
        if latest is None:
            # Nothing to go on from: running again starts the run over (from its first step).
            return "No checkpoint was saved before it, so running again starts the run over. Before you do"
        return f"Nothing was saved after it: the last good checkpoint, {latest}, is intact. To go on from there"


# GradScaler starts at 65,536 and halves at each overflow; below 1 the gradients overflow float16
# unscaled (a scale of 1 is training without one).
MIN_LOSS_SCALE = 1.0
