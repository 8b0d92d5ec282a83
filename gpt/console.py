"""Lines on standard output, and what happens when they cannot be written there.

A log line: a training run must not die of its log. `train.py | head` closes the pipe after ten
lines, a job's log file can sit on a disk that fills up. The steps since the last checkpoint would
be lost, and metrics.jsonl records every log line anyway. So a line that cannot be written sends
the log on to standard error, with one warning, and training goes on (`say`). The same for the
tools' lines about work they have done (data prep's summary, "wrote FILE"): the work stands
(`report`).

A result: what a command prints is what it was run for (sample.py's text, gpt.eval's figures, a
checkpoint listing). A write that fails is an OutputError, one line and exit 1; a reader that
stops reading (`| head`) is no error: exit 141 (gpt/cli.py report_errors).
"""

from __future__ import annotations

import os
import sys


TRAINING_GOES_ON = "training continues (Ctrl-C saves a checkpoint and stops)"


def say(message: str, going_on: str = TRAINING_GOES_ON) -> None:
    """Print a line to standard output; if it cannot be written (its reader has stopped, as in
    `train.py | head`, or the file it goes to is on a full disk), go on on standard error instead.
    A training run must not die of its log: the steps since the last checkpoint would be lost,
    and metrics.jsonl records every log line anyway. `going_on`: what the warning says goes on."""
    try:
        print(message, flush=True)
    except OSError as e:  # the failed line is dropped from sys.stdout's buffer: print it again
        why = ("was closed (its reader stopped, as `| head` does)" if isinstance(e, BrokenPipeError)
               else f"cannot be written ({e.strerror or e})")
        if _stdout_to_stderr(why, going_on):
            print(message, flush=True)


def report(message: str) -> None:
    """A tool's line about its work (data prep's progress and summary, "wrote FILE"): printed as
    `say` prints, so that a dataset or file already written is not reported as a failure (exit 2
    after a complete prep) because standard output failed."""
    say(message, going_on="the command goes on")


def _stdout_to_stderr(why: str, going_on: str) -> bool:
    """Point file descriptor 1 where 2 goes, so every later line reaches standard error (True);
    at /dev/null if that fails too (False)."""
    try:
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        sys.stderr.write(f"warning: standard output {why}; the log goes on here, on standard error, and "
                         f"{going_on}\n")
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


# Exit status when whatever reads stdout stops reading (`sample.py ... | head`): 128 + SIGPIPE,
# what a shell tool killed by SIGPIPE reports.
BROKEN_PIPE_EXIT = 141


class OutputError(Exception):
    """Standard output refused a command's result (a full disk, an I/O error), not a closed pipe."""


class ReaderGone(Exception):
    """Whatever read a command's result stopped reading (`| head`): no error. (Its own class: a
    BrokenPipeError from anywhere else, a library's pipe, is a failure to show, not to hush.)"""


def write_result(text: str, end: str = "\n", what: str = "the result") -> None:
    """Print `text`, the command's result (or part of it), to stdout at once. A failed write is
    an OutputError naming `what`; a closed pipe is ReaderGone."""
    try:
        print(text, end=end, flush=True)
    except BrokenPipeError:
        raise ReaderGone from None
    except OSError as e:
        raise OutputError(f"cannot write {what} to standard output ({e.strerror or e}); the text there is "
                          f"incomplete") from None
