"""The stop signals that arrive before the trainer listens: imported by train.py before torch.

Nothing here imports torch (or anything slow): the point is to be in place within ~0.1 s of the
process starting, while the trainer's own handler (gpt/stop.py StopFlag) comes a second or
more later, once torch has been imported.

Also here, armed as early for the same reason: `PARENT_WATCH`, which stops a torchrun worker whose
torchrun has gone (see ParentWatch).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time


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
        PARENT_WATCH.arm()  # under torchrun: from now on, a torchrun that dies stops this worker
        return self

    def restore(self) -> None:
        """Put back what `install` replaced, where this handler is still the one installed (the
        trainer's StopFlag restores this one when it ends; a handler set since is kept)."""
        for sig, previous in self.replaced.items():
            if signal.getsignal(sig) is self:
                signal.signal(sig, previous)


class ImportInterrupted:
    """SIGINT's handler while a `python -m gpt.TOOL` process imports torch (a second or more),
    before the tool's own handling (gpt/cli.py report_errors) is in place: a Ctrl-C then ends the
    process with the tool's one line and exit code 130, where it printed Python's traceback into
    torch's import machinery. report_errors puts Python's own handler back."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __call__(self, signum, frame) -> None:
        print(self.message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Not SystemExit: raised into the import machinery it can land inside a library's bare
        # `except:` around an optional import, which swallowed it: the tool then went on after
        # saying it had stopped (seen once in a full test run). Nothing of the tool's is open yet.
        os._exit(130)

    @classmethod
    def install(cls, message: str) -> None:
        """In place of Python's own SIGINT handler only (one that ignores SIGINT, as a background
        job's, or a caller's own handler is left alone)."""
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, cls(message))

    @staticmethod
    def uninstall() -> None:
        """Python's own handler back (KeyboardInterrupt), where this one is installed."""
        if isinstance(signal.getsignal(signal.SIGINT), ImportInterrupted):
            signal.signal(signal.SIGINT, signal.default_int_handler)


class ParentWatch:
    """Stops a torchrun worker whose torchrun has died, as SIGUSR1 would: the trainer finishes the
    step, all ranks agree, save a checkpoint and exit with 75.

    torchrun dies of any signal it does not handle; SIGUSR1 (SLURM's warning signal, `scancel
    --signal=USR1`, a `kill -USR1` of the launcher) is the usual one: its default action ends the
    process (-10), and torchrun does not pass it on. Its workers, each in a session of its own, then
    went on training with no parent (adopted by init or a subreaper): nothing saved, no exit code,
    no one to stop them but kill -9 (SIGTERM, SIGINT, SIGHUP and SIGQUIT torchrun catches and
    passes on as SIGTERM, so those already stopped the run cleanly). PR_SET_PDEATHSIG does not fit:
    it fires when the *thread* that started the worker ends, and torchrun starts workers from
    threads.

    So each worker polls `os.getppid()` in a daemon thread, once a second, against the parent it
    had when armed; when that changes, it calls the SIGUSR1 handler in place (EarlyStopSignals
    while torch imports, then the trainer's StopFlag), as a delivered SIGUSR1 would, but from this
    thread rather than the main one (both only record the stop). All workers lose their parent at
    the same moment, but even if they notice it a second apart, the trainer's per-step vote
    (StopFlag.agreed) makes them stop at the same step; the collectives of the vote, the save and
    the shutdown go between the workers, which still run. Armed only under torchrun
    (TORCHELASTIC_RUN_ID set), never for a plain process, whose parent (a shell) may go away on
    purpose (nohup). Where no Python handler is in place (the process is exiting), it does nothing."""

    INTERVAL_S = 1.0

    def __init__(self) -> None:
        self.parent: int | None = None
        self.orphaned = threading.Event()  # set once the parent is gone: what StopFlag.name says
        self._thread: threading.Thread | None = None

    def arm(self) -> bool:
        """Start watching (once per process; later calls do nothing). True if armed by this call."""
        if self._thread is not None or "TORCHELASTIC_RUN_ID" not in os.environ:
            return False
        self.parent = os.getppid()
        self._thread = threading.Thread(target=self._watch, name="parent-watch", daemon=True)
        self._thread.start()
        return True

    def _watch(self) -> None:
        while os.getppid() == self.parent:
            time.sleep(self.INTERVAL_S)
        self.orphaned.set()
        if os.environ.get("RANK", "0") == "0":
            try:
                os.write(2, f"torchrun (pid {self.parent}) has exited: stopping as on SIGUSR1 (finish "
                            f"the step, save a checkpoint, exit with 75)\n".encode())
            except OSError:
                pass  # nowhere left to say it: stop all the same
        called = []
        # The handler can be replaced while it runs (EarlyStopSignals by StopFlag, which has then
        # maybe read its notes already): the new one is told too (a stop twice is a stop once).
        while callable(handler := signal.getsignal(signal.SIGUSR1)) and handler not in called:
            called.append(handler)
            try:
                handler(signal.SIGUSR1, None)
            except BaseException as e:  # this thread's end would swallow it: say it at least
                try:
                    os.write(2, f"parent watch: the stop handler failed: {type(e).__name__}: {e}\n".encode())
                except OSError:
                    pass


PARENT_WATCH = ParentWatch()  # one per process
