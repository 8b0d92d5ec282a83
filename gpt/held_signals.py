"""Signals noted, not acted on, for a few steps that must not stop half-done, then delivered.

    held = HeldSignals((signal.SIGINT, signal.SIGTERM))
    ...                # replace a dataset's files: stopped between, neither dataset is whole
    held.release()     # each noted signal now goes to its handler

Python runs signal handlers in the main thread only, so in another thread nothing is held; nor
is a signal whose handler was not set from Python (`signal.getsignal` gives None: it could not
be put back). No torch here: data prep uses this without it.

`terminate_as_interrupt` is the tools' other need: SIGTERM stopping them as Ctrl-C does, so that
their clean-up runs.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any


class HeldSignals:
    def __init__(self, signals: tuple[int, ...]) -> None:
        self.noted: list[int] = []
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in signals:
            if signal.getsignal(sig) is not None:
                self._previous[sig] = signal.signal(sig, lambda signum, frame: self.noted.append(signum))

    def release(self, deliver: bool = True) -> None:
        """Put the handlers back and, with `deliver`, hand each noted signal to its own, in order
        (a second Ctrl-C means something to train.py's): Python's default for SIGINT raises
        KeyboardInterrupt here, and SIGTERM's default ends the process. A second call does nothing."""
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if deliver:
            for sig in self.noted:
                if sig in previous and previous[sig] != signal.SIG_IGN:
                    signal.raise_signal(sig)
        self.noted = []


@contextlib.contextmanager
def terminate_as_interrupt():
    """Within it, SIGTERM (kill, timeout, the end of a job) stops a tool as Ctrl-C does, by a
    KeyboardInterrupt, so that its clean-up runs on the way out (an unfinished copy or staging
    folder removed, a lock released): SIGTERM's default action ended the process on the spot and
    left them. Only in the main thread, where a handler can be set; the previous one is put back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
