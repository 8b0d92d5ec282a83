"""Progress bars (tqdm, on stderr) for data prep and evaluation, fit for a terminal and a log.

In a terminal a bar redraws in place ten times a second. Written to a file (a SLURM job's
output, CI's log) every redraw stays, `\\r`-separated on one line: a ten-minute encode left
6,000 of them. There the bar redraws every `LOG_INTERVAL_S` instead, and its last state is
written when it closes, as in a terminal.
"""

from __future__ import annotations

import sys
from typing import IO

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
                dynamic_ncols=True, file=stream, mininterval=0.1 if terminal else LOG_INTERVAL_S)
