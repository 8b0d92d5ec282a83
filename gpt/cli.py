"""Entry points behind train.py, sample.py and the `python -m gpt.*` tools: turn expected failures
into one-line errors (sample.py's program itself is gpt/sampling.py).

A user who mistypes a key or points at a missing folder should read what to fix, not a
traceback; unexpected errors still show their traceback.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from .checkpoint import CheckpointError
from .config import ConfigError, parse_args
from .console import BROKEN_PIPE_EXIT, OutputError, ReaderGone, to_devnull
from .early_signals import ImportInterrupted
from .errors import FollowOnFailure, InterruptedAfterSave, TrainingError
from .hf import HFError
from .metrics import MetricsError
from .prepare import PrepareError
from .shards import ShardError
from .sources import SourceError
from .tokenizer import TokenizerError

# Bad input or environment (exit 2), and a run that could not go on (exit 1): one line each,
# no traceback. docs/errors.md lists the cases.
USER_ERRORS = (ConfigError, CheckpointError, ShardError, HFError, MetricsError, PrepareError,
               SourceError, TokenizerError, FileNotFoundError, PermissionError, NotADirectoryError)
RUN_ERRORS = (TrainingError,)


# How long a torchrun worker other than rank 0 holds back its error message (see `say_error`).
PEER_ERROR_DELAY_S = 5.0


def say_error(message: str) -> None:
    """Print `message` as the run's error, once per job rather than once per process.

    Under torchrun every rank usually meets the same error (a typo in the config, a missing
    dataset), and 8 copies of it bury the one line that matters. Rank 0 prints at once and exits;
    torchrun then stops the other workers (SIGTERM, within its 0.1 s monitor interval), which are
    waiting here to print theirs. An error only some rank met, or one rank 0 never reports, is still
    printed by that rank after the delay, with its rank: no message is lost, only delayed."""
    if worker_rank():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the trainer's stop handler is of no use now
        time.sleep(PEER_ERROR_DELAY_S)
    say_on_stderr(message)


def worker_rank() -> int:
    """This process's rank under torchrun when the job has several processes, else 0."""
    rank, world_size = int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)
    return rank if world_size > 1 else 0


def say_on_stderr(message: str) -> None:
    """Print a line on stderr, naming the rank of a torchrun worker other than rank 0."""
    rank = worker_rank()
    print(f"rank {rank}: {message}" if rank else message, file=sys.stderr, flush=True)


# What a Ctrl-C that reaches report_errors means for training (the trainer handles the first
# one itself: it saves and exits); the other tools say what it means for them.
TRAIN_INTERRUPTED = ("interrupted: stopped at once, without saving; checkpoints already written are "
                     "intact (run again to resume from the last one)")


def report_errors(main: Callable[[], int | None], interrupted: str = TRAIN_INTERRUPTED) -> int:
    if threading.current_thread() is threading.main_thread():
        ImportInterrupted.uninstall()  # from here a Ctrl-C is a KeyboardInterrupt, answered below
    try:
        return main() or 0
    except USER_ERRORS as e:
        # The OS's own words name the path alone: say what to look at, as the other errors do.
        advice = (" (this user may not use it: check the permissions of it and of the folders above it, "
                  "ls -ld, or run as the user who owns it)" if type(e) is PermissionError and e.filename else "")
        say_error(f"error: {e}{advice}")
        return 2
    except FollowOnFailure as e:  # not the run's error (another process's is): no delay, no "error:"
        say_on_stderr(f"stopped: {e}")
        return 1
    except RUN_ERRORS as e:
        say_error(f"error: {e}")
        return 1
    except OutputError as e:  # the result could not be written out: one line
        to_devnull(sys.stdout)  # (the interpreter's flush at exit would fail on it again)
        say_error(f"error: {e}")
        return 1
    except ReaderGone:
        # Whatever read the result stopped reading (`| head`): no error and no traceback, nor an
        # "Exception ignored" from the interpreter's flush at exit.
        to_devnull(sys.stdout)
        return BROKEN_PIPE_EXIT
    except KeyboardInterrupt as e:
        print(e.args[0] if isinstance(e, InterruptedAfterSave) else interrupted, file=sys.stderr, flush=True)
        return 130


def check_stdout(what: str, example: str) -> None:
    """Refuse a closed standard output (`>&-`: Python's sys.stdout is then None) for a command
    whose result is `what`: print() would drop every character and the command still exit 0."""
    if sys.stdout is None:
        raise ConfigError(f"standard output is closed: there is nowhere to write {what}; redirect it to a "
                          f"file instead (> {example})")


def run_train(argv: Sequence[str], default_config: Path | None = None) -> int:
    # A crash below Python (a shard truncated in place while memory-mapped: SIGBUS) still
    # prints where it happened. (Unless a handler is set already, e.g. by pytest or python -X faulthandler.)
    # (Not with standard error closed, `2>&-`: faulthandler.enable raises there, and the run ended
    # with exit 1 before its first line.)
    if not faulthandler.is_enabled() and sys.stderr is not None:
        faulthandler.enable()

    def main() -> None:
        # Only use the default file when the user did not name one.
        config = parse_args(argv, default_config=str(default_config) if default_config else None)
        from .trainer import train  # after parsing, so --help and typos answer instantly

        train(config, tune_cpu_allocator=True)  # the process ends with the run

    return report_errors(main)


def gloo_threads_running() -> bool:
    """Whether this process still runs a gloo process group's threads (Linux; False elsewhere)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                if "gloo" in f.read():
                    return True
        except OSError:
            pass  # a thread that just ended
    return False


def exit_process(code: int | str | None) -> None:
    """End a train.py process with `code` (what sys.exit takes).

    Normally that is sys.exit. But a torchrun worker whose gloo process group could not be freed
    still runs the group's threads, and Python's finalization can abort it after its work is done
    (see gpt/distributed.py init_distributed). What still holds a group: FSDP2's DeviceMesh, whose
    modules a reference cycle through autograd keeps alive past the garbage collector. Such a process
    ends the way finalization would, minus the part that aborts: non-daemon threads are joined (as threading does at exit),
    atexit handlers run (logging's flush among them), stdout and stderr are flushed, then os._exit.
    The trainer has closed its own files and joined its checkpoint threads before returning, so
    no output is lost. Nothing is freed on the way: the last reference to such a group, dropped
    outside destroy_process_group, joins its threads while holding the GIL, which one of them may
    be waiting for (a hang instead of an abort)."""
    if not (int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and gloo_threads_running()):
        sys.exit(code)
    import atexit
    import threading

    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)  # what the interpreter does with SystemExit("message")
        code = 1
    # What finalization does first, in its order: the threading module's exit hooks (they tell
    # idle ThreadPoolExecutor workers, such as torch.compile's, to end), then the join of every
    # non-daemon thread. Joining them without the hooks waited forever on such a worker.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass  # closed, or a broken pipe: as at a normal exit, nothing more can be written
    os._exit(code & 0xFF)
