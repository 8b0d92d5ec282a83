"""Preemption and Ctrl-C: finish the step, save a checkpoint, exit with a code that says why.

SLURM (before a time limit or a preemption) and other schedulers send SIGTERM or SIGUSR1 ahead of
the kill; a person presses Ctrl-C. `StopFlag` notes the signal; the training loop checks it at
each step boundary (`agreed`: the same step on every rank), saves and exits with
PREEMPTED_EXIT_CODE (75: requeue and resume) or INTERRUPTED_EXIT_CODE (130, after Ctrl-C).
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

from .distributed import COLLECTIVE_TIMEOUT_MINUTES, DistInfo


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (cluster preemption, time limits) and Ctrl-C (SIGINT); checked at
    step boundaries so a checkpoint is never taken mid-step.

    Installed before anything else in `train`, so a signal during set-up (dataset prep, model
    build, resume) is remembered, not fatal: the run stops after its first step. A second Ctrl-C
    aborts at once (KeyboardInterrupt) without saving; checkpoints are written atomically, so
    that loses nothing but the steps since the last one. `restore` puts the previous handlers back.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: int | None = None
        self.training = False  # set by _train when its first step starts: what Ctrl-C's note says
        self._previous: dict[int, Any] = {}
        self._vote: tuple[Any, torch.Tensor] | None = None  # (all-reduce work, its CPU flag)
        self._group = None  # the gloo group votes go over when the default one is NCCL
        # What the ranks agreed on (distributed runs): "interrupted" when any rank had Ctrl-C,
        # else "preempted". Every rank then exits with the same code, signalled or not.
        self._agreed: str | None = None

    def install(self) -> None:
        """Handle SIGTERM, SIGUSR1 and SIGINT from now on. A signal that the handler installed
        before this one noted in its `caught` list (train.py's EarlyStopSignals, while torch
        imports) counts as received here."""
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        from .early_signals import PARENT_WATCH

        PARENT_WATCH.arm()  # a torchrun worker whose torchrun dies stops as on SIGUSR1 (train.py arms it first)
        earlier = {id(h): h for h in self._previous.values()}.values()  # one handler may serve several
        for signum in (s for handler in earlier for s in getattr(handler, "caught", ())):
            self._handle(signum, None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        # The flag is set before anything else: a second signal can run this handler again in
        # the middle of the first (between its bytecodes), and must see the first one.
        first = self.signal is None
        if first:
            self.signal = signum
        if signum == signal.SIGINT:
            if not first:
                raise KeyboardInterrupt  # the second signal: stop now, without saving
            if os.environ.get("RANK", "0") == "0":
                # os.write: print() is not safe in a handler that may interrupt another print.
                if self.training:
                    note = (b"\nCtrl-C: finishing this step, then saving a checkpoint and exiting "
                            b"(press Ctrl-C again to abort at once without saving)\n")
                else:  # set-up (data prep, model build, resume) goes on first: it can take minutes
                    note = (b"\nCtrl-C: training has not started; the run finishes its set-up and "
                            b"one step, then saves a checkpoint and exits (press Ctrl-C again to "
                            b"abort at once without saving)\n")
                try:
                    os.write(2, note)
                except OSError:  # standard error closed: raised here, it would end the run unsaved
                    pass

    @property
    def exit_code(self) -> int:
        interrupted = self._agreed == "interrupted" if self._agreed is not None else self.signal == signal.SIGINT
        return INTERRUPTED_EXIT_CODE if interrupted else PREEMPTED_EXIT_CODE

    @property
    def name(self) -> str:
        from .early_signals import PARENT_WATCH

        if self.signal == signal.SIGUSR1 and PARENT_WATCH.orphaned.is_set():
            return f"torchrun (pid {PARENT_WATCH.parent}) exited"  # gpt/early_signals.py ParentWatch
        if self.signal is not None:
            return signal.Signals(self.signal).name
        return "SIGINT on another rank" if self._agreed == "interrupted" else "a signal to another rank"

    def agreed(self, info: DistInfo) -> bool:
        """True on every rank, at the same step, once any rank was signalled.

        Ranks receive a signal at slightly different moments; without agreeing, one rank
        would stop at step N while another waits in step N+1's all-reduce forever. Each step
        casts a vote, an asynchronous all-reduce (max) of a CPU flag, and reads the previous
        step's: the ranks agree one step late, with no wait and no host-device sync in the
        training loop (on GPUs the vote goes over a gloo group beside NCCL).
        """
        if not info.is_distributed:
            return self.signal is not None
        if self._vote is not None:
            work, flag = self._vote
            work.wait()  # long done: it was started a whole step ago
            self._vote = None
            if flag.item():
                self._agreed = "interrupted" if flag.item() == VOTE_INTERRUPTED else "preempted"
                return True
        if self._group is None and dist.get_backend() != "gloo":
            # Every rank gets here at its first step. With the process group's own timeout: the
            # default for a gloo group is 30 minutes, so a vote a dead rank never joined held the
            # others three times as long as any other collective would.
            self._group = dist.new_group(
                backend="gloo", timeout=datetime.timedelta(minutes=COLLECTIVE_TIMEOUT_MINUTES))
        flag = torch.tensor([float(VOTE_INTERRUPTED if self.signal == signal.SIGINT
                                   else VOTE_PREEMPTED if self.signal is not None else 0)])
        self._vote = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return False

    def settle(self) -> None:
        """Wait for the vote in flight, so the process group never goes away under it."""
        if self._vote is not None:
            self._vote[0].wait()
            self._vote = None


# A rank's vote: 0 (no signal), or which of the two ways to stop; the highest wins, so a Ctrl-C
# sent to one worker alone is an interrupt on every rank (exit 130), not 130 there and 75 elsewhere.
VOTE_PREEMPTED, VOTE_INTERRUPTED = 1, 2
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", i.e. requeue and resume
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for Ctrl-C
