"""The run's log lines on standard output, and what happens when they cannot be written there.

A training run must not die of its log: `train.py | head` closes the pipe after ten lines, a
job's log file can sit on a disk that fills up. The steps since the last checkpoint would be
lost, and metrics.jsonl records every log line anyway. So a line that cannot be written sends
the log on to standard error, with one warning, and training goes on.
"""

from __future__ import annotations

import os
import sys


def say(message: str) -> None:
    """Print a line to standard output; if it cannot be written (its reader has stopped, as in
    `train.py | head`, or the file it goes to is on a full disk), go on on standard error instead.
    A training run must not die of its log: the steps since the last checkpoint would be lost,
    and metrics.jsonl records every log line anyway."""
    try:
        print(message, flush=True)
    except OSError as e:  # the failed line is dropped from sys.stdout's buffer: print it again
        why = ("was closed (its reader stopped, as `| head` does)" if isinstance(e, BrokenPipeError)
               else f"cannot be written ({e.strerror or e})")
        if _stdout_to_stderr(why):
            print(message, flush=True)


def _stdout_to_stderr(why: str) -> bool:
    """Point file descriptor 1 where 2 goes, so every later line reaches standard error (True);
    at /dev/null if that fails too (False)."""
    try:
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        sys.stderr.write(f"warning: standard output {why}; the log goes on here, on standard error, and "
                         f"training continues (Ctrl-C saves a checkpoint and stops)\n")
        sys.stderr.flush()
        return True
    except (OSError, ValueError, AttributeError):  # standard error is gone as well (`2>&1 | head`,
        # or closed: None): nothing written later (a Ctrl-C's note, a late error) may fail on them
        to_devnull(sys.stdout, sys.stderr)
        return False


def to_devnull(*streams) -> None:
    """Point these streams' file descriptors at /dev/null: what is written to them from now on
    (the interpreter's own flush at exit included) goes nowhere instead of failing again on a
    closed pipe or a full disk. A stream without a descriptor (None, or captured in a test) is
    left as it is."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        for stream in streams:
            try:
                os.dup2(devnull, stream.fileno())
            except (OSError, ValueError, AttributeError):
                pass
    finally:
        os.close(devnull)
