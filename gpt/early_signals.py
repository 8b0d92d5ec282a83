"""The stop signals that arrive before the trainer listens: imported by train.py before torch.

Nothing here imports torch (or anything slow): the point is to be in place within ~0.1 s of the
process starting, while the trainer's own handler (gpt/trainer.py StopFlag) comes a second or
more later, once torch has been imported.
"""

from __future__ import annotations

import signal


class EarlyStopSignals:
    """Notes SIGTERM/SIGUSR1 (a preemption, SLURM's warning) that arrive while torch imports, the
    second or so before the trainer installs its own handler: with the default disposition they
    killed the run (-15) with no requeue exit code. The trainer's StopFlag takes over what was
    `caught` (see StopFlag.install): the run stops after its first step with a checkpoint and 75.

    `restore` puts back the dispositions this replaced, for the process's exit. That matters under
    slurm/launch.py, whose workers inherit SIGTERM ignored: when one worker has exited (75, or
    gloo's rare abort at exit), torchrun sends SIGTERM to the others, and a worker still exiting
    must go on ignoring it, as without this class, and exit with 75 itself. Left in place, this
    handler (which Python resets to the default one as the interpreter finalizes) let that
    SIGTERM kill it (-15), and a gloo abort in the other worker then left no 75 for launch.py."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.caught: list[int] = []
        self.replaced: dict[int, object] = {}

    def __call__(self, signum, frame) -> None:
        self.caught.append(signum)

    def install(self) -> "EarlyStopSignals":
        for sig in self.SIGNALS:
            self.replaced[sig] = signal.signal(sig, self)
        return self

    def restore(self) -> None:
        """Put back what `install` replaced, where this handler is still the one installed (the
        trainer's StopFlag restores this one when it ends; a handler set since is kept)."""
        for sig, previous in self.replaced.items():
            if signal.getsignal(sig) is self:
                signal.signal(sig, previous)
