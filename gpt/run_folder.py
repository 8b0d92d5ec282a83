"""The run's folder (out_dir): claimed by one live run, proven writable before any training
time is spent, and the run's record of its settings (config.json).

A run folder holds checkpoints/, `latest`, metrics.jsonl and config.json (the layout is drawn in
gpt/checkpoint/__init__.py). Its lock, `.run-lock`, is held by rank 0 for the whole run: a second
run into the same folder is refused while the first lives, and nothing is left to refuse a
restart once it has died (kill -9 included).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from . import checkpoint as ckpt
from . import locks
from .config import ConfigError, TrainConfig
from .console import say
from .distributed import DistInfo
from .run_layout import RUN_MARKS, typo_of

RUN_LOCK_FILE = ".run-lock"  # held (flock, gpt/locks.py) by the live run writing out_dir: its rank 0


def lock_out_dir(config: TrainConfig, out_dir: Path) -> locks.FolderLock:
    """Create out_dir, prove it writable and lock it for this run, before any training time is
    spent; refuse to mix a fresh run (resume = never) with checkpoints of an earlier one.

    Returns the lock (gpt/locks.py): hold it for the whole run; a second run into the same
    out_dir is refused while it is held. It goes when released, or when the process dies (kill -9
    included), so a restart, a requeue or a rerun is never refused. Called by the process that
    writes the run's files (rank 0) only."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir {out_dir} is a file, not a folder: the run keeps its checkpoints and "
                          f"metrics in a folder. Choose another --out_dir, or move that file away")
    if out_dir.is_symlink() and not out_dir.exists():
        raise ConfigError(f"out_dir {out_dir} is a symbolic link to {os.readlink(out_dir)}, which does not "
                          f"exist. Create that folder, or choose another --out_dir")
    probe = out_dir / f".write_test_{os.getpid()}"
    subject = f"out_dir {out_dir}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
        if (out_dir / ckpt.CHECKPOINTS_DIR).is_dir():  # an earlier run's: saves go there
            subject = f"{out_dir / ckpt.CHECKPOINTS_DIR}, where the run saves its checkpoints,"
            probe = out_dir / ckpt.CHECKPOINTS_DIR / probe.name
            probe.write_bytes(b"")
            probe.unlink()
        lock = locks.acquire(out_dir / RUN_LOCK_FILE)
    except locks.FolderBusy as e:
        holder = f" ({e.holder})" if e.holder else ""
        raise ConfigError(
            f"out_dir {out_dir} is in use by another training run right now{holder}; two runs in one "
            f"folder would mix their checkpoints and metrics. Wait for it to finish (run again then to "
            f"resume), or use another --out_dir"
        ) from None
    except OSError as e:
        raise ConfigError(
            f"{subject} is not writable ({e.strerror or e}): the run could save neither "
            f"checkpoints nor metrics. Choose another --out_dir, or fix that folder's permissions "
            f"or free space"
        ) from None
    if lock.warning:
        print(f"warning: {lock.warning} (out_dir is not guarded against a second run)", file=sys.stderr,
              flush=True)
    existing = (out_dir / ckpt.LATEST_FILE).exists() or any((out_dir / ckpt.CHECKPOINTS_DIR).glob("step_*"))
    if config.resume == "never" and existing:
        lock.release()
        raise ConfigError(
            f"resume = 'never' but out_dir {out_dir} already holds checkpoints of an earlier run; a "
            f"fresh run would mix its checkpoints with them. Use another --out_dir, resume = 'auto' "
            f"to continue that run, or delete {out_dir / ckpt.CHECKPOINTS_DIR} and "
            f"{out_dir / ckpt.LATEST_FILE} to start over"
        )
    return lock


def claim_out_dir(config: TrainConfig, info: DistInfo, held: contextlib.ExitStack) -> Path:
    """out_dir, locked (by rank 0) until the run ends; rank 0 prints the config."""
    out_dir = Path(config.out_dir)
    if info.is_main:
        created = not out_dir.exists()
        # The folders above it that this run makes too (out/ of `out/NAME`): a refused run removes
        # them with out_dir, else an empty out/ was left where the command ran.
        made = [p for p in out_dir.absolute().parents if not p.exists()] if created else []
        # A new folder next to a run of nearly its name: most likely a typo of that run's out_dir
        # (meant to extend or resume it), which would silently start a fresh run from step 0.
        meant = typo_of(out_dir, RUN_MARKS) if created else None
        held.enter_context(lock_out_dir(config, out_dir))
        if created:  # runs before the lock's release (an ExitStack unwinds last in, first out)
            held.callback(remove_if_unused, out_dir, made)
        say("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in config.to_dict().items()))
        if meant is not None:
            say(f"note: out_dir {out_dir} is a new folder: this is a fresh run from step 0. Did you mean "
                f"{meant}, the run beside it? (to resume or extend that run, give its out_dir)")
    return out_dir


def remove_if_unused(out_dir: Path, parents: list[Path] = ()) -> None:
    """Remove an out_dir this run made if it holds nothing but the run's lock: a run refused
    during set-up (a dataset missing, tokens_per_step that does not divide) left an empty folder
    that looked like a run's. Then `parents`, the folders above it the run made, while empty."""
    try:
        if [p.name for p in out_dir.iterdir()] == [RUN_LOCK_FILE]:
            (out_dir / RUN_LOCK_FILE).unlink()
            out_dir.rmdir()
            for parent in parents:  # nearest first; rmdir refuses one that is not empty
                parent.rmdir()
    except OSError:
        pass  # something else wrote there meanwhile, or it is gone: leave it


def record_config(path: Path, config: TrainConfig) -> None:
    """Write the run's settings to config.json (a record for people and tools: training never reads it back; messages may quote it),
    whole or not at all: a full disk leaves the previous start's record."""
    try:
        ckpt.write_text_atomic(path, json.dumps(config.to_dict(), indent=1))
    except OSError as e:
        what = "a folder by that name is in the way: move it" if path.is_dir() else "check the disk and permissions"
        raise ConfigError(f"cannot write {path}, the run's record of its settings ({e.strerror or e}): "
                          f"{what}") from e
