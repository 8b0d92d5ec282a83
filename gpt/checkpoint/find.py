"""Finding the checkpoint to read: the one `latest` names (or the newest complete one), from a
run folder or a checkpoint folder, held off a running run's pruning while it is read
(`reading`); and, where there is none, an error that says what the folder is instead."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .. import locks
from ..run_layout import CONFIG_FILE, is_run_before_first_save, nearby_runs
from ..hf import HF_PREFIX, hf_folder_hint
from .layout import CHECKPOINTS_DIR, LATEST_FILE, MANIFEST_FILE, STATE_FILE, CheckpointError, step_dir_name, step_of


READ_PIN_TRIES = 10  # resolves of `latest` while a run prunes what it names (`reading`), 0.05 s more apart each


def latest_name(out_dir: Path) -> str | None:
    """What `latest` says, or None where it cannot be read."""
    try:
        return (out_dir / LATEST_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def complete_checkpoints(out_dir: str | os.PathLike, *, unreadable: list[Path] | None = None) -> list[Path]:
    """The run's complete checkpoint folders (those with a manifest), oldest first.

    A step folder this user may not look into (another user's, chmod 000) raises PermissionError,
    unless `unreadable` is given: it is then appended there, oldest first, and left out."""
    found, refused = [], []
    for folder in (Path(out_dir) / CHECKPOINTS_DIR).glob("step_*"):
        step = step_of(folder.name)
        if step is None:
            continue
        try:
            complete = (folder / MANIFEST_FILE).exists()
        except PermissionError:
            if unreadable is None:
                raise
            refused.append((step, folder))
            continue
        if complete:
            found.append((step, folder))
    if unreadable is not None:
        unreadable.extend(folder for _, folder in sorted(refused))
    return [folder for _, folder in sorted(found)]


def saved_val_loss(ckpt_dir: Path) -> float | None:
    """The val loss measured on this checkpoint's own weights, as its state.json records it, or
    None: none recorded, not a finite number, no state.json to read, or a loss carried on from an
    earlier eval (a stop signal's save between evals records the run's latest eval, and its step)."""
    return own_loss(ckpt_dir, saved_eval(ckpt_dir))


def own_loss(ckpt_dir: Path, evaluated: tuple[float | None, int | None]) -> float | None:
    """Of `saved_eval(ckpt_dir)`, the loss if it was measured on this checkpoint's weights."""
    loss, measured_at = evaluated
    return loss if measured_at in (None, step_of(ckpt_dir.name)) else None


def saved_eval(ckpt_dir: Path) -> tuple[float | None, int | None]:
    """The run's latest val loss when this checkpoint was saved, and the step it was measured at
    (None where that cannot be known: taken as the checkpoint's own)."""
    try:
        state = json.loads((ckpt_dir / STATE_FILE).read_bytes())
        value, measured_at = state.get("val_loss"), state.get("val_loss_step")
        if "val_loss_step" not in state:
            measured_at = _eval_step_before(step_of(ckpt_dir.name), state.get("train_config"))
    except (OSError, ValueError, AttributeError):
        return None, None
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    known_step = isinstance(measured_at, int) and not isinstance(measured_at, bool)
    return (float(value) if finite else None), (measured_at if finite and known_step else None)


EARLIER_EVAL = -1  # saved_eval's step of a loss carried on from an eval whose step is unknown


def _eval_step_before(step: int | None, train_config: Any) -> int | None:
    """For a checkpoint from before state.json recorded val_loss_step: `step` where it is an eval
    step of the run (every eval_interval steps, and the last one), else EARLIER_EVAL. A stop
    signal's save between evals carried an earlier eval's loss on, and must not pass it off as
    its own (nor be kept as the best for it)."""
    if not isinstance(train_config, dict) or step is None:
        return None
    interval, last = train_config.get("eval_interval"), train_config.get("max_steps")
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (interval, last)) or interval <= 0:
        return None
    # Between evals: an earlier eval's loss, carried on. Which one is not known (eval_interval
    # may have been another before a resume): EARLIER_EVAL, not a step that may never have run.
    return step if step % interval == 0 or step == last else EARLIER_EVAL


def best_checkpoint(checkpoints: list[Path]) -> Path | None:
    """Of `checkpoints` (oldest first), the one with the lowest val loss measured on its own
    weights; the earliest of equals."""
    index = lowest_loss(saved_val_loss(ckpt_dir) for ckpt_dir in checkpoints)
    return checkpoints[index] if index is not None else None


def lowest_loss(losses: Iterable[float | None]) -> int | None:
    """The index of the lowest of `losses` (None: no loss), the earliest of equals; None if none."""
    scored = [(loss, index) for index, loss in enumerate(losses) if loss is not None]
    return min(scored)[1] if scored else None


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names, or None when the run folder has none yet.

    Without a `latest` file, the newest complete checkpoint folder: `latest` was deleted by hand,
    or the process was killed between its first save's rename and writing `latest`. Starting
    over instead would log every step twice and mix a new run's checkpoints with the old ones."""
    out_dir = Path(out_dir)
    latest = out_dir / LATEST_FILE
    if not latest.exists() and not latest.is_symlink():
        complete = complete_checkpoints(out_dir)
        return complete[-1] if complete else None
    how_to_fix = (f"Point {latest} at a complete folder in {out_dir / CHECKPOINTS_DIR}, or start over "
                  f"in another --out_dir")
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        if latest.is_dir():
            what = "a folder"
        elif isinstance(e, UnicodeDecodeError):
            what = f"not text (byte {e.object[e.start]:#04x} at offset {e.start} is not UTF-8)"
        else:
            what = f"unreadable ({e.strerror or e})"
        raise CheckpointError(
            f"{latest} should be a text file holding the name of the newest checkpoint (such as "
            f"{step_dir_name(250)!r}), but it is {what}. {how_to_fix}"
        ) from None
    path = out_dir / CHECKPOINTS_DIR / name
    if name and (Path(name).name != name or name in (".", "..")):
        # A folder's name, no path: an absolute path or one with '..' made this run resume
        # another run's checkpoint (and overwrite its own next one), and sample.py sample it.
        raise CheckpointError(f"{latest} names {name!r}, not a checkpoint folder of this run (it should hold "
                              f"a name such as {step_dir_name(250)!r}, in {out_dir / CHECKPOINTS_DIR}). "
                              f"{how_to_fix}")
    if not name or not (path / MANIFEST_FILE).exists():
        # Name the checkpoint to go back to, as verify.py's _damaged_advice does for a damaged file.
        complete = complete_checkpoints(out_dir)
        if complete:
            how_to_fix = (f"Point {latest} at a complete folder in {out_dir / CHECKPOINTS_DIR} (the newest is "
                          f"{complete[-1].name}: write {complete[-1].name!r} into it), or start over in "
                          f"another --out_dir")
        what = (f"is empty (it should name the newest checkpoint, such as {step_dir_name(250)!r})" if not name
                else f"names checkpoint {name!r}, but {path} is missing or incomplete")
        raise CheckpointError(f"{latest} {what}. {how_to_fix}")
    return path


def resolve_checkpoint(path: str | os.PathLike, hf_advice: str | None = None) -> Path:
    """Accept a run folder (uses `latest`) or a checkpoint folder ('~' is home: no shell expands
    it in `--out_dir=~/run`). `hf_advice`: what the caller's user should do when `path` is a
    Hugging Face model folder instead (the default speaks of init_from's 'hf:' prefix). To read
    the checkpoint while a run may still be saving into its folder, use `reading`."""
    path = Path(path).expanduser()
    if (path / MANIFEST_FILE).exists():
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is not None:
            return found
        raise CheckpointError(_no_checkpoint_message(path, hf_advice))
    if path.exists():
        # Most likely a file of a checkpoint (model.safetensors) or of a run (latest): its folder is meant.
        parent = path.parent
        meant = (f" (did you mean {parent}?)"
                 if (parent / MANIFEST_FILE).exists() or (parent / LATEST_FILE).is_file() else "")
        raise CheckpointError(
            f"{path} is a file, not a checkpoint folder: give a run folder (its {LATEST_FILE} "
            f"checkpoint is used) or a checkpoint folder ({CHECKPOINTS_DIR}/step_N){meant}"
        )
    raise CheckpointError(f"checkpoint path {path} does not exist{nearby_runs(path)}")


class _Pruned(Exception):
    """The checkpoint was pruned (or is being) before it could be pinned for reading."""


def _pin(ckpt_dir: Path) -> int | None:
    """A descriptor of `ckpt_dir`'s manifest under a shared flock, which keeps a run's pruning
    off the folder (save.py's `_unread`) until it is closed; None where the file system cannot flock."""
    manifest = ckpt_dir / MANIFEST_FILE
    try:
        fd = os.open(manifest, os.O_RDONLY)
    except FileNotFoundError:
        raise _Pruned from None
    locked = locks.try_flock(fd, exclusive=False)
    if locked is None:  # no flock on this file system (or platform): read unguarded
        os.close(fd)
        return None
    if not locked or not locks.names_file(manifest, fd):  # being pruned, or moved away since opened
        os.close(fd)
        raise _Pruned
    return fd


@contextlib.contextmanager
def reading(path: str | os.PathLike, hf_advice: str | None = None) -> Iterator[Path]:
    """`resolve_checkpoint(path, hf_advice)`, kept from a training run's pruning for the block.

    A run that saves often prunes every few seconds: sample.py, gpt.eval or gpt.export reading
    its `latest` meanwhile lost the folder between resolving it and reading its weights ("not a
    readable safetensors file"). Inside the block the checkpoint's manifest is held under a
    shared flock, and pruning passes over a folder so held (a later save prunes it). Where the
    file system has no flock (or no fcntl: Windows), reads are unguarded; so they are, in effect,
    on NFS, whose client turns flock into POSIX locks, which a process drops when it closes any
    descriptor of the file (the reader opens the manifest again to verify it), and on file systems
    mounted with node-local locks (a reader on a login node does not hold off a compute node)."""
    for attempt in range(READ_PIN_TRIES):
        time.sleep(0.05 * attempt)  # a save, its rename and its pruning take a moment
        ckpt_dir = resolve_checkpoint(path, hf_advice)
        try:
            fd = _pin(ckpt_dir)
            break
        except _Pruned:
            continue  # pruned between resolving and pinning: `latest` names a newer one now
    else:  # pruned under us every time (2.25 s): read unguarded, as without flock
        fd = None
    try:
        yield ckpt_dir
    finally:
        if fd is not None:
            os.close(fd)


def _no_checkpoint_message(folder: Path, hf_advice: str | None = None) -> str:
    """The error for a folder that holds no checkpoint, saying what it is instead and what was
    meant where we can tell. Two look-alikes: a Hugging Face model folder written without 'hf:'
    (`--init_from=DIR`), and a run's checkpoints/ folder itself (`--out_dir RUN/checkpoints`)."""
    hint = hf_folder_hint(folder)
    if hint and hf_advice:
        return f"{hint}: {hf_advice}"
    if hint:
        return (f"{hint}, so it holds no checkpoint. To start from its weights, name it with the "
                f"'{HF_PREFIX}' prefix: init_from = '{HF_PREFIX}{folder}' (--init_from={shlex.quote(f'{HF_PREFIX}{folder}')})")
    none = f"{folder} holds no checkpoint (no {LATEST_FILE} file and no {MANIFEST_FILE})"
    steps = sorted((step_of(step.name), step.name) for step in folder.glob("step_*")
                   if step_of(step.name) is not None and (step / MANIFEST_FILE).is_file())
    run = folder.parent
    in_a_run = folder.name == CHECKPOINTS_DIR and ((run / LATEST_FILE).is_file() or bool(steps))
    if not in_a_run and not steps:
        from ..shards import holds_token_shards

        if holds_token_shards(folder):  # --out_dir given the dataset (data_dir) instead of the run
            return (f"{none}: it is a prepared dataset (token shards), not a training run; give the run "
                    f"folder that trained on it (train.py's out_dir)")
        if is_run_before_first_save(folder):
            return f"{none}: {_not_saved_yet(folder)}"
        return none
    meant = [str(run)] if in_a_run else []
    if steps:
        meant.append(f"one of its step_N folders, such as {folder / steps[-1][1]}")
    what = ("it is a run's folder of checkpoint folders (step_N), not itself a run or a checkpoint"
            if in_a_run else "it holds checkpoint folders (step_N), but is not itself a run or a checkpoint")
    return f"{none}: {what} (did you mean {', or '.join(meant)}?)"


def _not_saved_yet(run: Path) -> str:
    """What a run folder without a checkpoint is: a run still before its first save (sampling a
    new run too early is the usual way here), or one stopped before it."""
    try:
        every = json.loads((run / CONFIG_FILE).read_text(encoding="utf-8")).get("eval_interval")
    except (OSError, ValueError, AttributeError):
        every = None
    known = isinstance(every, int) and not isinstance(every, bool) and every > 0
    when = f"every eval_interval = {every:,} steps, " if known else ""
    return (f"it is a training run that has not saved a checkpoint yet (or was stopped before its "
            f"first). A run saves {when}at its end, and when stopped with Ctrl-C or SIGTERM: try "
            f"again once it has")
