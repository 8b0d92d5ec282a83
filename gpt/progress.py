"""Progress bars (tqdm, on stderr) for data prep and evaluation, fit for a terminal and a log.

In a terminal a bar redraws in place ten times a second. Written to a file (a SLURM job's
output, CI's log) every redraw stays, `\\r`-separated on one line: a ten-minute encode left
6,000 of them. There the bar redraws every `LOG_INTERVAL_S` instead, and its last state is
written when it closes, as in a terminal.
"""

from __future__ import annotations

import sys
from typing import IO

from .console import to_devnull

LOG_INTERVAL_S = 30.0


def progress_bar(desc: str, total: int | None, unit: str, enabled: bool, file: IO[str] | None = None):
    from tqdm import tqdm  # imported here: the tools that never show a bar do not pay for it

    stream = file if file is not None else sys.stderr
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or already closed
        terminal = False
    # No bar into a closed standard error (`2>&-`: sys.stderr is None), where tqdm failed on write.
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled or stream is None,
                dynamic_ncols=True, file=_Unfailing(stream), mininterval=0.1 if terminal else LOG_INTERVAL_S)


class _Unfailing:
    """A bar's stream whose failed write (its reader stopped, `prepare.py 2>&1 | head`; a full
    disk) ends the bar's output, not the work it shows: a data prep was abandoned, with no
    dataset written, for its progress bar. The stream is then pointed at /dev/null, so that
    nothing later written to it (the interpreter's flush at exit) fails again."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        try:
            self._stream.write(text)
        except OSError:
            to_devnull(self._stream)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            to_devnull(self._stream)

    def __getattr__(self, name: str):  # isatty, fileno, encoding: the stream's own
        return getattr(self._stream, name)
