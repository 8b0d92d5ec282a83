"""Checkpoints that never lose work.

Layout of a run folder (docs/checkpoints.md has the whole story):

    out_dir/
      checkpoints/
        step_0000250/        one complete checkpoint, in one of two formats:
          model.safetensors    full: weights (safetensors: plain tensors, no code can hide in it)
          optimizer.pt         full: optimizer state, loaded with torch.load(weights_only=True)
          dcp/                 sharded: model + optimizer state as torch.distributed.checkpoint files,
            .metadata            written by every rank in parallel (one __RANK_0.distcp each);
            __0_0.distcp         any world size, or one process, can read them back
          state.json         step, tokens seen, loader position, every rank's RNG state, configs
          tokenizer.json     copy of the dataset's tokenizer, so a checkpoint samples on its own
          manifest.json      size and CRC-32 of every file above; written last
      latest                 the name of the newest complete checkpoint

Why it is safe to kill at any moment: a checkpoint is assembled in a hidden temporary folder
(by rank 0 alone, or by every rank for the sharded format), every file is fsynced, and only then
does rank 0 rename the folder to its final name (a rename is atomic on POSIX file systems).
`latest` is replaced the same way, after the rename, and old checkpoints are pruned only after
that (renamed to `.trash_*`, then deleted, in the background after a synchronous save). So
`latest` always names a complete checkpoint, and a crash mid-save leaves at worst a `.tmp_*` or
`.trash_*` folder that the next save removes.

`Checkpointer` is what the trainer saves with (full or sharded, synchronous or in a background
thread); `load_checkpoint` is how it resumes; `load_model_weights` / `read_model_state` read the
weights of either format; `python -m gpt.checkpoint consolidate RUN` turns a sharded checkpoint
into the single-file format.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

from . import locks, parallel
from .crc import file_crc32
from .model import GPTConfig
from .staging import Staging, live_storages

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
TRASH_PREFIX = ".trash_"  # pruned checkpoints being deleted
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TOKENIZER_FILE = "tokenizer.json"
DCP_DIR = "dcp"  # the sharded format's torch.distributed.checkpoint folder
DCP_METADATA = ".metadata"
FORMATS = ("full", "sharded")
READ_PIN_TRIES = 10  # resolves of `latest` while a run prunes what it names (`reading`), 0.05 s more apart each


def _quiet_dcp() -> None:
    """DCP warns whenever it runs without a process group; here that is deliberate (one process
    reading or writing a checkpoint alone), never a mistake worth a warning. (Set at each use:
    test runners reset the filters.)"""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                            category=UserWarning)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, unsafe or does not fit this run."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def step_of(name: str) -> int | None:
    """The step a checkpoint folder's name (`step_dir_name`) holds; None for any other name."""
    digits = name.removeprefix("step_")
    return int(digits) if name.startswith("step_") and digits.isdigit() else None


def resolve_format(setting: str, strategy: str) -> str:
    """The format a run saves in: config `checkpoint_format` ('auto' is sharded under FSDP, where
    every rank holds only a shard, and full otherwise) for the resolved parallel strategy."""
    if setting == "auto":
        return "sharded" if strategy == "fsdp" else "full"
    if setting not in FORMATS:
        raise ValueError(f"checkpoint_format must be auto, full or sharded, got {setting!r}")
    return setting


# ----------------------------------------------------------------------------------------
# Small file helpers


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


BLOCK = 16 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _crc32(path: Path) -> str:
    return f"{file_crc32(path):08x}"  # big files in parallel ranges (gpt/crc.py)


def _seal(path: Path) -> dict[str, Any]:
    """Manifest entry of a just-written file (size and CRC-32, read back while it is still in
    the page cache), after fsyncing it to disk.

    CRC-32 (zlib, ~1.5 GB/s per thread, and a big file is read in parallel ranges) rather
    than sha256 (~1.2 GB/s, one thread per file): the manifest detects truncated and
    corrupted files, and cannot prove authenticity anyway (it lies beside them)."""
    entry = {"bytes": path.stat().st_size, "crc32": _crc32(path)}
    _fsync_file(path)
    return entry


@contextlib.contextmanager
def _writeback(folder: Path, pattern: str = "*", every_s: float = 0.1):
    """Make the disk write files while they are still being serialized: a thread fsyncs the
    files in `folder` matching `pattern` every `every_s` seconds until the body is done.

    Left alone, the kernel starts writing dirty pages only when they pass
    vm.dirty_background_ratio (10% of RAM) or are 30 s old, so a 1.5 GB checkpoint first fills
    the page cache and then waits in fsync for the whole of it: serialize + write, instead of
    about the slower of the two. A synchronous save of the 124M model and its AdamW state on
    the development machine's disk (~0.5 GB/s durable, so a floor of ~2.9 s): 3.20 vs 3.71 s
    (medians of 8, alternated). On tmpfs, with no disk behind the page cache, fsync is free."""
    stop = threading.Event()
    failed: list[OSError] = []

    def flush() -> None:
        while not stop.wait(every_s) and not failed:
            for path in folder.glob(pattern):
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:  # not created yet, or gone
                    continue
                try:
                    os.fsync(fd)
                except OSError as e:
                    # Linux reports a write error to the fsyncs of the descriptors open when it
                    # happened, so a later fsync on a fresh descriptor may not see it: keep it.
                    failed.append(e)
                    break
                finally:
                    os.close(fd)

    thread = threading.Thread(target=flush, name="checkpoint-writeback", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if failed:
        raise failed[0]


def _seal_all(paths: list[Path], base: Path) -> dict[str, dict[str, Any]]:
    """`_seal` for several files in parallel threads; keys are paths relative to `base`."""
    if not paths:
        return {}
    with ThreadPoolExecutor(max_workers=min(4, len(paths))) as pool:
        entries = list(pool.map(_seal, paths))
    return {p.relative_to(base).as_posix(): e for p, e in zip(paths, entries)}


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# The process's umask, read once at import. os.umask can only be read by setting it, so it is
# set and put back at once; at import, before the trainer starts any thread, no other thread
# can create a file in that instant with the wrong permissions.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def give_ordinary_permissions(path: str | os.PathLike) -> None:
    """Give a file the permissions the user's umask gives ordinary new files (0644 under umask
    022). safetensors' save_file and tempfile create theirs 0600, and on a shared cluster file
    system the user's group could then not read the weights beside the other files."""
    os.chmod(path, 0o666 & ~_UMASK)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a small text file so readers see either the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk, or path a folder: leave no half-written copy
        raise
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------------------
# RNG state as JSON-friendly data (so state.json needs no pickle)


def capture_rng_state() -> dict[str, Any]:
    state = {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tupled(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.tensor(s, dtype=torch.uint8), i)


def gather_rng_states() -> dict[str, Any]:
    """Every rank's RNG state, as {"0": ..., "1": ..., ...} (a collective when distributed).

    Each rank draws its own dropout masks from its own generator, so an exact resume needs
    each rank's state, not rank 0's alone."""
    mine = capture_rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {"0": mine}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {str(rank): state for rank, state in enumerate(everyone)}


def rng_state_for(state: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """The RNG state rank `rank` of `world_size` resumes with: its own when the checkpoint was
    saved by the same number of ranks, otherwise rank 0's (for every rank, then branched off by
    `restore_rank_rng`). A run resumed on another world size draws other dropout masks anyway
    (each rank holds other rows of the batch), so exactness there is out of reach; rank 0's
    state keeps it deterministic."""
    saved = state["rng"]
    saved_world = state.get("world_size", len(saved))
    if saved_world == world_size and str(rank) in saved:
        return saved[str(rank)]
    return saved["0"]


def restore_rank_rng(state: dict[str, Any], rank: int, world_size: int) -> None:
    """Restore this rank's generators from a checkpoint's `state` (see `rng_state_for`). On
    another world size, ranks other than 0 then reseed from a number drawn from rank 0's stream
    (the same draw on every rank) plus their rank: each keeps drawing its own dropout masks."""
    chosen = rng_state_for(state, rank, world_size)
    restore_rng_state(chosen)
    if chosen is not state["rng"].get(str(rank)):  # rank 0's state on another rank: branch off it
        torch.manual_seed(int(torch.randint(0, 2**62, ())) + rank)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------------------
# Assembling a checkpoint folder atomically (rank 0's part)


def _begin(out_dir: Path, step: int) -> Path | None:
    """Create the temporary folder for `step` and return it; None when `step` is saved already.

    Removes what an interrupted save left behind. Rank 0 only."""
    root = out_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".tmp_*"), *root.glob(f"{TRASH_PREFIX}*")]:  # left by a killed save or prune
        shutil.rmtree(stale, ignore_errors=True)
    for stale in out_dir.glob(f".{LATEST_FILE}.tmp*"):  # `latest` half-replaced by a killed process
        stale.unlink(missing_ok=True)
    final = root / step_dir_name(step)
    if (final / MANIFEST_FILE).exists() and _latest_name(out_dir) == final.name:
        # This step is this run's latest already (a stop signal right after a scheduled save, or
        # right after resuming from it). Its content is the same, and replacing it would open a
        # moment with no checkpoint that `latest` names. A complete step_N that `latest` does not
        # name is left by another run or a killed save, and may hold another state: it is replaced.
        return None
    tmp = root / f".tmp_{final.name}_{os.getpid()}"
    tmp.mkdir()
    return tmp


def _complete(tmp: Path, final: Path, state: dict[str, Any], tokenizer_path: Path | None,
              sealed: dict[str, dict[str, Any]]) -> None:
    """Add state.json, tokenizer.json and the manifest to `tmp`, make everything durable and
    rename it to `final`. `sealed` holds manifest entries of files already checksummed."""
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    if tokenizer_path is not None and Path(tokenizer_path).exists():
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
    rest = [p for p in _files_under(tmp) if p.relative_to(tmp).as_posix() not in sealed]
    entries = {**sealed, **_seal_all(rest, tmp)}
    manifest = {name: entries[name] for name in sorted(entries)}
    with open(tmp / MANIFEST_FILE, "w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    for folder in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
        _fsync_dir(folder)
    stale = None
    if final.exists():  # not ours (see _begin); moved aside at once, so a kill while deleting
        # it never leaves a half-deleted folder that still looks complete under the final name
        stale = final.with_name(f"{TRASH_PREFIX}{final.name}_{os.getpid()}")
        os.rename(final, stale)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def _publish(out_dir: Path, final: Path, keep_last: int,
             remove: Callable[[list[Path]], None]) -> None:
    """Point `latest` at the complete `final`, then prune older checkpoints (`remove` deletes
    the folders `_prune` moved aside: now, or in a background thread)."""
    write_text_atomic(out_dir / LATEST_FILE, final.name + "\n")
    remove(_prune(final.parent, keep_last, keep=final.name))


def _failure_text(error: BaseException) -> str:
    """`error` as "Type: message". DCP's CheckpointException prints every failed rank's whole
    traceback (~90 lines in a 2-rank save to a full disk), which then filled the error a user
    reads: keep each rank's exception alone."""
    failures = getattr(error, "failures", None)
    if type(error).__name__ == "CheckpointException" and isinstance(failures, dict) and failures:
        parts = []
        for rank, failure in sorted(failures.items()):
            inner = failure[0] if isinstance(failure, tuple) and failure else failure
            parts.append(f"rank {rank}: " + (_failure_text(inner) if isinstance(inner, BaseException) else str(inner)))
        return "; ".join(parts)
    return f"{type(error).__name__}: {error}"


def _write_error(out_dir: Path, final: Path, error: BaseException) -> CheckpointError:
    try:
        previous = latest_checkpoint(out_dir)
    except CheckpointError:
        previous = None
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    # A full disk often shows only as the writer's own error (torch.save: "unexpected pos 4096
    # vs 3988"), never as ENOSPC: say so where the free space cannot hold another checkpoint.
    cause = f"Is the disk full or {final.parent} not writable? Fix that and run again to resume"
    try:
        free = shutil.disk_usage(out_dir).free
        needed = sum(entry["bytes"] for entry in read_manifest(previous).values()) if previous else 0
    except (OSError, CheckpointError):
        free = needed = 0
    if free < needed:
        cause = (f"The disk is full: the file system holding {out_dir} has {free:,} bytes free, and the "
                 f"previous checkpoint takes {needed:,} (a save needs room for one more: older ones are "
                 f"deleted only after it is complete). Free space there, then run again to resume")
    return CheckpointError(f"could not write checkpoint {final} ({type(error).__name__}: {error}); {kept}. {cause}")


def _prune(root: Path, keep_last: int, keep: str) -> list[Path]:
    """Move the complete checkpoints beyond the newest `keep_last` out of the way; return the
    folders to delete. A rename is instant and atomic, so no half-deleted folder ever looks like
    a checkpoint, and the deleting (~1 s for 1.5 GB) can happen while training goes on.

    Only checkpoints up to the new one count: a later step_N is not this run's history but one
    a rewound run (`latest` set back by hand) left behind. Counting it pruned the run's own
    checkpoints (the one just resumed from included) and kept that one, which a lost `latest`
    would then resume from; it is left alone, and replaced if the run reaches its step."""
    newest = step_of(keep)
    complete = [p for p in complete_checkpoints(root.parent) if step_of(p.name) <= newest]
    doomed = []
    for old in complete[:-keep_last] if keep_last > 0 else []:
        if old.name != keep:
            with _unread(old) as free:
                if not free:  # a reader holds it: a later save prunes it once the reader is gone
                    continue
                trash = root / f"{TRASH_PREFIX}{old.name}_{os.getpid()}"
                os.rename(old, trash)
            doomed.append(trash)
    return doomed


@contextlib.contextmanager
def _unread(ckpt_dir: Path):
    """Yield whether no process reads `ckpt_dir` (see `reading`), holding an exclusive lock on
    its manifest meanwhile so that no reader pins it while it is moved away."""
    try:
        fd = os.open(ckpt_dir / MANIFEST_FILE, os.O_RDONLY)
    except OSError:
        yield True
        return
    try:
        yield locks.try_flock(fd, exclusive=True) is not False  # None: no flock here, unguarded
    finally:
        os.close(fd)


def _remove(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _save_full_folder(out_dir: Path, step: int, write_weights: Callable[[Path], None],
                      state: dict[str, Any], tokenizer_path, keep_last: int,
                      remove: Callable[[list[Path]], None] = _remove) -> Path:
    """One process writes a whole full-format checkpoint: begin, weights, complete, publish."""
    out_dir = Path(out_dir)
    final = out_dir / CHECKPOINTS_DIR / step_dir_name(step)
    tmp = None
    try:
        tmp = _begin(out_dir, step)
        if tmp is None:
            return final
        with ThreadPoolExecutor(max_workers=2) as pool:
            # Seal each weights file while the next one is being serialized.
            sealed: dict[str, Future] = {}
            with _writeback(tmp):
                for path in _write_weight_files(tmp, write_weights):
                    sealed[path.name] = pool.submit(_seal, path)
            entries = {name: future.result() for name, future in sealed.items()}
        _complete(tmp, final, dict(state, format="full"), tokenizer_path, entries)
        _publish(out_dir, final, keep_last, remove)
    except Exception as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(out_dir, final, e) from e
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_weight_files(tmp: Path, write_weights: Callable[[Path], None]):
    """Run `write_weights(tmp)`, which may be a generator yielding each file as it is done."""
    result = write_weights(tmp)
    if result is not None:
        yield from result


def _full_writer(model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None):
    def write(folder: Path):
        tensors = {name: t.detach().contiguous() for name, t in model_state.items()}
        safetensors.torch.save_file(tensors, str(folder / MODEL_FILE), metadata={"format": "pt"})
        give_ordinary_permissions(folder / MODEL_FILE)  # before sealing: the fsync makes it durable
        yield folder / MODEL_FILE
        if optimizer_state is not None:
            with _no_zip_crc():
                torch.save(optimizer_state, folder / OPTIMIZER_FILE)
            yield folder / OPTIMIZER_FILE
    return write


@contextlib.contextmanager
def _no_zip_crc():
    """torch.save (also inside torch.distributed.checkpoint, once per tensor) without the CRC-32
    its zip container computes for every record: the manifest checksums each whole file anyway,
    and the zip CRC made a synchronous save of the 124M model and its AdamW state ~0.3 s slower
    (2.62 vs 2.32 s on tmpfs, 3.72 vs 3.46 s on this disk, medians of 6 alternated; torch.load
    does not check it). The switch is process-wide: a torch.save elsewhere meanwhile also skips
    it, which costs that file nothing but the zip CRC."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


# ----------------------------------------------------------------------------------------
# Save: one process, full format (kept for tools and tests)


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    tokenizer_path: str | os.PathLike | None = None,
    keep_last: int = 2,
) -> Path:
    """Write a complete full-format checkpoint for `step` from one process, point `latest` at
    it, prune old ones. `model` is the plain (unwrapped) model; `state` must be JSON-serializable.
    """
    model_state = parallel.drop_tied_aliases(model.state_dict(), model)
    optimizer_state = optimizer.state_dict() if optimizer is not None else None
    return save_checkpoint_state(out_dir, step, model_state, optimizer_state, state, tokenizer_path, keep_last)


def save_checkpoint_state(
    out_dir: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    state: dict[str, Any],
    tokenizer_path: str | os.PathLike | None = None,
    keep_last: int = 2,
) -> Path:
    """`save_checkpoint` from state dicts instead of live objects (e.g. gathered from FSDP shards).

    `model_state` holds CPU tensors with one name per tied tensor (as `parallel.drop_tied_aliases`
    leaves them, the name safetensors' save_model keeps);
    `optimizer_state` is in `optimizer.state_dict()` format. The files are the same.
    """
    return _save_full_folder(Path(out_dir), step, _full_writer(model_state, optimizer_state), state,
                             tokenizer_path, keep_last)


# ----------------------------------------------------------------------------------------
# Save: the trainer's checkpointer (any world size; full or sharded; sync or async)


def _param_groups_to_json(groups: list[dict]) -> list[dict]:
    return [{k: _jsonable(v) for k, v in group.items()} for group in groups]


def _param_groups_from_json(groups: list[dict]) -> list[dict]:
    # JSON turned tuples (AdamW's betas) into lists; `params` is a list of names.
    return [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
            for g in groups]


def _default_group_timeout():
    """The timeout the default process group was created with (init_process_group's), or None
    (new_group's own default) where this torch does not tell."""
    try:
        group = dist.distributed_c10d._get_default_group()
    except Exception:
        return None
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except Exception:
            continue
    return None


class Checkpointer:
    """Saves the trainer's checkpoints; every rank makes the same calls at the same steps.

    format "full": the model and optimizer state are gathered (unsharded) into rank 0's CPU
        memory and rank 0 writes model.safetensors + optimizer.pt (`parallel.full_state_dicts`).
    format "sharded": every rank writes its own shard with torch.distributed.checkpoint into
        the shared temporary folder (`dcp/`); rank 0 adds state.json, tokenizer.json and the
        manifest (each rank checksums the files it wrote) and renames the folder.
    async_save: the state is copied to CPU memory at the step boundary (the only time training
        waits), the files are written and the checkpoint completed (manifest, rename, `latest`,
        prune) in a background thread. At most one save is in flight: the next save, and
        `close()`, wait for it. The sharded format's background collectives run in a separate
        gloo process group, so they never interleave with training's collectives.

    The multi-node caveat of the sharded format: every rank writes into out_dir, which must
    therefore be one shared file system (as the full format needs only on rank 0's node).
    """

    def __init__(self, out_dir: str | os.PathLike, *, format: str = "full", rank: int = 0,
                 world_size: int = 1, keep_last: int = 2,
                 tokenizer_path: str | os.PathLike | None = None, async_save: bool = False) -> None:
        if format not in FORMATS:
            raise ValueError(f"checkpoint format must be one of {FORMATS}, got {format!r}")
        self.out_dir = Path(out_dir)
        self.format = format
        self.rank, self.world_size = rank, world_size
        self.keep_last = keep_last
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else None
        self.async_save = async_save
        self.distributed = dist.is_available() and dist.is_initialized()
        self.group = None
        if async_save and format == "sharded" and self.distributed:
            # A collective; every rank constructs the Checkpointer at the same point. With the
            # default group's timeout: new_group's own default for gloo is 30 minutes, so a hung
            # rank held the background save (and the process's exit, which waits for it) 20
            # minutes past the 10 after which training's collectives give up.
            self.group = dist.new_group(backend="gloo", timeout=_default_group_timeout())
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if async_save else None
        self._pending: Future | None = None
        self._pruning: threading.Thread | None = None  # a synchronous save's old checkpoints being deleted
        self._staging = Staging()  # the CPU memory saves copy the state into, reused

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def final_path(self, step: int) -> Path:
        return self.out_dir / CHECKPOINTS_DIR / step_dir_name(step)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             state: dict[str, Any]) -> Path:
        """Checkpoint `step` (a collective: every rank calls it). `state` is the JSON part
        (loader position, RNG states, configs; only rank 0's is written). Returns the final
        folder: complete on return when synchronous, once `wait()` returns when async."""
        self.wait()  # at most one save in flight
        if self.format == "full":
            job = self._prepare_full(step, model, optimizer, state)
        else:
            job = self._prepare_sharded(step, model, optimizer, state)
        if job is not None:
            if self._executor is not None:
                self._pending = self._executor.submit(job)
            else:
                job()
        return self.final_path(step)

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete; raise its error if it failed."""
        pruning, self._pruning = self._pruning, None
        if pruning is not None:
            pruning.join()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the save in flight; call before exiting (a run's last checkpoint included)."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._staging.release()

    def _remove(self, folders: list[Path]) -> None:
        """Delete pruned checkpoints: in the save's own thread when that is a background one,
        else in a thread of their own (a synchronous save returns without waiting for it)."""
        if self._executor is not None or not folders:
            _remove(folders)
        else:
            self._pruning = threading.Thread(target=_remove, args=(folders,), name="checkpoint-prune")
            self._pruning.start()

    # -- full format --------------------------------------------------------------------

    def _prepare_full(self, step, model, optimizer, state) -> Callable[[], None] | None:
        # A collective under FSDP (all ranks gather the shards); only rank 0 receives them.
        model_state, optimizer_state = self._gather_full(model, optimizer)
        if not self.is_main:
            if self._executor is None:
                self._agree(None)  # wait for rank 0's outcome; raise if it failed
            return None

        def job() -> None:
            try:
                self._staging.ready()
                _save_full_folder(self.out_dir, step, _full_writer(model_state, optimizer_state),
                                  state, self.tokenizer_path, self.keep_last, self._remove)
            except CheckpointError as e:
                if self._executor is None:
                    self._agree(str(e))
                raise
            if self._executor is None:
                self._agree(None)

        return job

    def _gather_full(self, model, optimizer) -> tuple[dict, dict]:
        """The full-format state to write (empty dicts on ranks other than 0), in memory that
        training no longer changes once `self._staging.ready()` returns."""
        # An unsharded model's live tensors, copied below straight into page-locked memory when
        # they are on a GPU (rather than into fresh pageable memory, then again for an async save).
        model_state, optimizer_state = parallel.full_state_dicts(model, optimizer, to_cpu=False)
        if not self.is_main:
            return {}, {}
        return self._stage((model_state, optimizer_state), model, optimizer)

    def _stage(self, obj: Any, model, optimizer) -> Any:
        """`obj` (state dicts) with its tensors on a GPU copied to CPU memory, as are, for an async
        save, the CPU tensors training goes on changing."""
        live = live_storages(model, optimizer) if self._executor is not None else frozenset()
        return self._staging.snapshot(obj, live)

    # -- sharded format -----------------------------------------------------------------

    def _prepare_sharded(self, step, model, optimizer, state) -> Callable[[], None] | None:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)  # DTensor shards under FSDP
        # Only tensors go into dcp/ (so loading never unpickles anything); the optimizer's
        # hyperparameters go into state.json.
        payload = {"model": parallel.drop_tied_aliases(model_state, model),
                   "optimizer": optimizer_state["state"]}
        state = dict(state, format="sharded",
                     optimizer_param_groups=_param_groups_to_json(optimizer_state["param_groups"]))
        payload = self._stage(payload, model, optimizer)

        # Rank 0 creates the temporary folder; every rank learns its name (or that this step is
        # saved already, or why it could not be created).
        final = self.final_path(step)
        decision: Any = None
        if self.is_main:
            try:
                tmp = _begin(self.out_dir, step)
                decision = ("write", str(tmp)) if tmp is not None else ("done", None)
            except Exception as e:
                decision = ("error", str(_write_error(self.out_dir, final, e)))
        decision = self._broadcast(decision)
        if decision[0] == "error":
            raise CheckpointError(decision[1] if self.is_main else f"rank 0: {decision[1]}")
        if decision[0] == "done":
            return None
        tmp = Path(decision[1])

        def job() -> None:
            error = None
            sealed: dict[str, Any] = {}
            try:
                self._staging.ready()
                with _writeback(tmp / DCP_DIR, f"__{self.rank}_*"):
                    self._dcp_save(payload, tmp / DCP_DIR)
                # Each rank checksums and fsyncs the files it wrote (DCP names them __RANK_N).
                mine = sorted((tmp / DCP_DIR).glob(f"__{self.rank}_*"))
                sealed = _seal_all(mine, tmp)
            except BaseException as e:  # DCP's CheckpointException is a BaseException
                if not isinstance(e, Exception) and type(e).__name__ != "CheckpointException":
                    if self.is_main:  # KeyboardInterrupt, say: abandon this save
                        shutil.rmtree(tmp, ignore_errors=True)
                    raise
                # DCP's CheckpointException names the ranks (every rank gets the same one).
                error = (_failure_text(e) if type(e).__name__ == "CheckpointException"
                         else f"rank {self.rank}: {type(e).__name__}: {e}")
            results = self._all_gather((sealed, error))
            errors = list(dict.fromkeys(err for _, err in results if err))
            outcome = None
            if self.is_main:
                try:
                    if errors:
                        raise RuntimeError("; ".join(errors)[:2000])
                    entries = {k: v for s, _ in results for k, v in s.items()}
                    _complete(tmp, final, state, self.tokenizer_path, entries)
                    _publish(self.out_dir, final, self.keep_last, self._remove)
                except Exception as e:
                    shutil.rmtree(tmp, ignore_errors=True)
                    outcome = str(_write_error(self.out_dir, final, e))
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
            if self._executor is None:
                outcome = self._agree(outcome, raise_on_other_ranks=False)
            if outcome is not None:
                raise CheckpointError(outcome if self.is_main else f"rank 0: {outcome}")

        return job

    def _dcp_save(self, payload: dict, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        _quiet_dcp()
        writer = dcp.FileSystemWriter(folder, single_file_per_rank=True, sync_files=True)
        with _no_zip_crc():
            dcp.save(payload, storage_writer=writer, process_group=self.group, no_dist=not self.distributed)

    # -- agreement between ranks ----------------------------------------------------------

    def _broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (main thread, default process group)."""
        if not self.distributed or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _all_gather(self, obj: Any) -> list[Any]:
        if not self.distributed or self.world_size == 1:
            return [obj]
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, obj, group=self.group)
        return everyone

    def _agree(self, error: str | None, raise_on_other_ranks: bool = True) -> str | None:
        """The end of a synchronous save on every rank: rank 0 says whether the checkpoint is
        complete (None) or why not; the other ranks raise too, instead of training on alone."""
        error = self._broadcast(error)
        if error is not None and not self.is_main and raise_on_other_ranks:
            raise CheckpointError(f"rank 0: {error}")
        return error


# ----------------------------------------------------------------------------------------
# Find and verify


def _latest_name(out_dir: Path) -> str | None:
    """What `latest` says, or None where it cannot be read."""
    try:
        return (out_dir / LATEST_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def complete_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """The run's complete checkpoint folders (those with a manifest), oldest first."""
    found = []
    for folder in (Path(out_dir) / CHECKPOINTS_DIR).glob("step_*"):
        step = step_of(folder.name)
        if step is not None and (folder / MANIFEST_FILE).exists():
            found.append((step, folder))
    return [folder for _, folder in sorted(found)]


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
    if not name or not (path / MANIFEST_FILE).exists():
        # Name the checkpoint to go back to, as _damaged_advice does for a damaged file.
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
    raise CheckpointError(f"checkpoint path {path} does not exist")


class _Pruned(Exception):
    """The checkpoint was pruned (or is being) before it could be pinned for reading."""


def _pin(ckpt_dir: Path) -> int | None:
    """A descriptor of `ckpt_dir`'s manifest under a shared flock, which keeps a run's pruning
    off the folder (`_unread`) until it is closed; None where the file system cannot flock."""
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
    from .hf import HF_PREFIX, hf_folder_hint  # (imports only the model, as this module does)

    hint = hf_folder_hint(folder)
    if hint and hf_advice:
        return f"{hint}: {hf_advice}"
    if hint:
        return (f"{hint}, so it holds no checkpoint. To start from its weights, name it with the "
                f"'{HF_PREFIX}' prefix: init_from = '{HF_PREFIX}{folder}' (--init_from={HF_PREFIX}{folder})")
    none = f"{folder} holds no checkpoint (no {LATEST_FILE} file and no {MANIFEST_FILE})"
    steps = sorted((step_of(step.name), step.name) for step in folder.glob("step_*")
                   if step_of(step.name) is not None and (step / MANIFEST_FILE).is_file())
    run = folder.parent
    in_a_run = folder.name == CHECKPOINTS_DIR and ((run / LATEST_FILE).is_file() or bool(steps))
    if not in_a_run and not steps:
        from .sources import holds_token_shards  # (data prep's module: imported only here)

        if holds_token_shards(folder):  # --out_dir given the dataset (data_dir) instead of the run
            return (f"{none}: it is a prepared dataset (token shards), not a training run; give the run "
                    f"folder that trained on it (train.py's out_dir)")
        if (folder / "config.json").is_file() or (folder / "metrics.jsonl").is_file():
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
        every = json.loads((run / "config.json").read_text(encoding="utf-8")).get("eval_interval")
    except (OSError, ValueError, AttributeError):
        every = None
    known = isinstance(every, int) and not isinstance(every, bool) and every > 0
    when = f"every eval_interval = {every:,} steps, " if known else ""
    return (f"it is a training run that has not saved a checkpoint yet (or was stopped before its "
            f"first). A run saves {when}at its end, and when stopped with Ctrl-C or SIGTERM: try "
            f"again once it has")


# The end of every error about a manifest.json or state.json that is valid JSON of the wrong
# shape: this project never writes such a file, and its checksum cannot help.
NOT_OURS = "it was edited or not written by this project. Restore the checkpoint from a copy, or use another one"


def _json_kind(value: Any) -> str:
    """How JSON calls the type of `value`, for error messages."""
    if isinstance(value, bool):
        return "true/false"
    return {dict: "an object", list: "an array", str: "a string", type(None): "null"}.get(type(value), "a number")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _manifest_problem(manifest: Any) -> str | None:
    """What is wrong with the shape of a parsed manifest.json, or None. Its shape is
    {path relative to the checkpoint folder: {"bytes": size, "crc32": 8 hex digits}}
    ("sha256" instead of "crc32" in checkpoints written before CRC-32 was adopted)."""
    if not isinstance(manifest, dict):
        return f"expected an object mapping file names to their size and checksum, got {_json_kind(manifest)}"
    for name, entry in manifest.items():
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or name == MANIFEST_FILE:
            return f"{name!r} is not the name of a file in the checkpoint folder"
        if not isinstance(entry, dict):
            return f"the entry for {name} should be an object with \"bytes\" and \"crc32\", got {_json_kind(entry)}"
        if not _is_count(entry.get("bytes")):
            return f"the entry for {name} has no size (\"bytes\": a whole number)"
        if not (isinstance(entry.get("crc32"), str) or isinstance(entry.get("sha256"), str)):
            return f"the entry for {name} has no checksum (\"crc32\")"
    return None


def _damaged_advice(ckpt_dir: Path) -> str:
    """What to do about a checkpoint with a missing or damaged file. Inside a run with an earlier
    complete checkpoint, going back to that one is usually the quickest fix, and resuming is
    automatic, so name it and the file to edit."""
    ckpt_dir = Path(ckpt_dir)
    step = step_of(ckpt_dir.name)
    if ckpt_dir.parent.name == CHECKPOINTS_DIR and step is not None:
        run = ckpt_dir.parent.parent
        earlier = [p for p in complete_checkpoints(run) if step_of(p.name) < step]
        if earlier:
            return (f"restore the checkpoint from a copy, or go back to the previous one: write "
                    f"{earlier[-1].name!r} into {run / LATEST_FILE} and run again")
    return "restore the checkpoint from a copy, or use another one"


def read_manifest(ckpt_dir: Path) -> dict[str, dict[str, Any]]:
    """manifest.json, checked for its shape (see `_manifest_problem`), not yet against the files."""
    manifest_path = Path(ckpt_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise CheckpointError(
            f"{manifest_path}: unreadable manifest ({e}); {_damaged_advice(ckpt_dir)}") from e
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise CheckpointError(f"{manifest_path}: {problem}; {NOT_OURS}")
    return manifest


def _files_readers_load(ckpt_dir: Path) -> list[str]:
    """The files of a checkpoint that resuming or sampling reads, so the manifest must vouch for
    each: state.json and the weights of its format (dcp/ holds the optimizer state too), and
    optimizer.pt and tokenizer.json where the folder has them (a weights-only copy has no
    optimizer.pt; a run without a tokenizer file, no tokenizer.json)."""
    names = [STATE_FILE]
    if checkpoint_format(ckpt_dir) == "sharded":
        names += [p.relative_to(ckpt_dir).as_posix() for p in _files_under(ckpt_dir / DCP_DIR)]
    else:
        names.append(MODEL_FILE)
        if (ckpt_dir / OPTIMIZER_FILE).exists():
            names.append(OPTIMIZER_FILE)
    if (ckpt_dir / TOKENIZER_FILE).exists():
        names.append(TOKENIZER_FILE)
    return names


def verify_checkpoint(ckpt_dir: Path, part: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Check every file against the manifest (size, then checksum); return the manifest.

    `part = (i, n)` checksums only every n-th file starting at i (sizes are always all checked),
    so n ranks verify a checkpoint together, each reading 1/n of it."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    for name in _files_readers_load(ckpt_dir):
        if name not in manifest:
            if not (ckpt_dir / name).is_file():
                raise CheckpointError(
                    f"{ckpt_dir / name}: missing from the checkpoint (a {checkpoint_format(ckpt_dir)} "
                    f"checkpoint needs it); {_damaged_advice(ckpt_dir)}"
                )
            raise CheckpointError(
                f"{ckpt_dir / MANIFEST_FILE}: lists no size and checksum for {name}, so that file "
                f"cannot be checked; {NOT_OURS}"
            )
    names = sorted(manifest)
    for name in names:
        expected = manifest[name]
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint; {_damaged_advice(ckpt_dir)}")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"{path}: {size} bytes, the manifest says {expected['bytes']}; the file is truncated or "
                f"corrupt; {_damaged_advice(ckpt_dir)}"
            )
    index, count = part
    for name in names[index::count]:
        expected, path = manifest[name], ckpt_dir / name
        if isinstance(expected.get("crc32"), str):
            ok = _crc32(path) == expected["crc32"]
        else:  # checkpoints written before the manifest used CRC-32
            ok = _sha256(path) == expected["sha256"]
        if not ok:
            raise CheckpointError(
                f"{path}: checksum does not match the manifest; the file is corrupt; {_damaged_advice(ckpt_dir)}")
    return manifest


# What each key of state.json must hold, where it is present: (what the message says, test).
# The trainer writes all of them; tools and tests may write fewer (see `read_state`).
_STATE_KEYS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "step": ("a whole number >= 0", _is_count),
    "tokens_seen": ("a whole number >= 0", _is_count),
    "skipped_steps": ("a whole number >= 0", _is_count),
    "world_size": ("a whole number >= 1", lambda v: _is_count(v) and v >= 1),
    "format": (f"one of {', '.join(FORMATS)}", lambda v: isinstance(v, str) and v in FORMATS),
    "elapsed_s": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "rng": ('an object of RNG states by rank, with rank "0"', lambda v: isinstance(v, dict) and "0" in v),
    "optimizer_param_groups": ("an array", lambda v: isinstance(v, list)),
    "grad_scaler": ("null or an object with a number 'scale' > 0 and a whole number '_growth_tracker' >= 0",
                    lambda v: v is None or (isinstance(v, dict) and _is_count(v.get("_growth_tracker"))
                                            and isinstance(v.get("scale"), (int, float))
                                            and not isinstance(v.get("scale"), bool)
                                            and math.isfinite(v["scale"]) and v["scale"] > 0)),
    # The log interval in progress (gpt/trainer.py carried_interval): its steps, skipped steps,
    # micro-batches per step and each rank's loss sum.
    "log_interval": ("an object with whole numbers 'steps', 'skipped' >= 0, 'accum' >= 1 and an array of "
                     "numbers 'loss_sums'",
                     lambda v: isinstance(v, dict) and _is_count(v.get("steps")) and _is_count(v.get("skipped"))
                     and _is_count(v.get("accum")) and v["accum"] >= 1 and isinstance(v.get("loss_sums"), list)
                     and len(v["loss_sums"]) >= 1
                     and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v["loss_sums"])),
    **{key: ("an object", lambda v: isinstance(v, dict))
       for key in ("model_config", "loader", "train_config", "dataset")},
}
# Every reader builds the model (model_config); resuming also needs where the run was.
ALWAYS_IN_STATE = ("step", "model_config")
RESUME_NEEDS = ("tokens_seen", "loader", "rng")


def read_state(ckpt_dir: Path, require: tuple[str, ...] = ()) -> dict[str, Any]:
    """state.json, checked: an object holding `ALWAYS_IN_STATE` and the keys in `require`,
    each key of `_STATE_KEYS` it has of the expected type, and a model_config GPTConfig accepts;
    else a CheckpointError naming the file and the key."""
    path = Path(ckpt_dir) / STATE_FILE
    try:
        state = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise CheckpointError(f"{path}: unreadable ({e}); {_damaged_advice(Path(ckpt_dir))}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected an object, got {_json_kind(state)}; {NOT_OURS}")
    for key in (*ALWAYS_IN_STATE, *require):
        if key not in state:
            raise CheckpointError(f"{path}: the key {key!r} is missing; {NOT_OURS}")
    for key, (expected, valid) in _STATE_KEYS.items():
        if key in state and not valid(state[key]):
            got = json.dumps(state[key])
            raise CheckpointError(
                f"{path}: {key!r} should be {expected}, got {got if len(got) <= 40 else _json_kind(state[key])}; "
                f"{NOT_OURS}"
            )
    try:
        GPTConfig(**state["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: 'model_config' is not a model configuration ({e}); {NOT_OURS}") from None
    return state


def checkpoint_format(ckpt_dir: Path) -> str:
    """'sharded' (a dcp/ folder) or 'full' (model.safetensors).

    A sharded checkpoint that lost dcp/.metadata, or all of dcp/, is still sharded: the manifest
    lists dcp/ files. Taken for full, its error would name a model.safetensors it never had."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / DCP_DIR).is_dir():
        return "sharded"
    if not (ckpt_dir / MODEL_FILE).exists():
        try:
            listed = json.loads((ckpt_dir / MANIFEST_FILE).read_bytes())
        except (OSError, ValueError):
            listed = None
        if isinstance(listed, dict) and any(str(name).startswith(DCP_DIR + "/") for name in listed):
            return "sharded"
    return "full"


# ----------------------------------------------------------------------------------------
# Reading the sharded format without unpickling anything
#
# torch.distributed.checkpoint reads `.metadata` with pickle.load and non-tensor entries with
# torch.load(weights_only=False); either could run code from a crafted checkpoint. So the
# metadata is read here with an unpickler that builds only DCP's own metadata classes, and
# non-tensor entries (which this project never writes) are refused.

_SAFE_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _Refused(pickle.UnpicklingError):
    """Raised by `_MetadataUnpickler` itself. pickle raises UnpicklingError too, for a file that
    is merely truncated or no pickle at all: that is damage, not a file that could run code."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name} is not allowed in checkpoint metadata")

    def persistent_load(self, pid):
        raise _Refused("persistent ids are not allowed in checkpoint metadata")


def read_dcp_metadata(ckpt_dir: Path):
    """The DCP metadata of a sharded checkpoint, read safely (see above)."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    path = Path(ckpt_dir) / DCP_DIR / DCP_METADATA
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except _Refused as e:
        raise CheckpointError(
            f"{path}: refused to load: the file contains objects other than checkpoint metadata, "
            f"which could run code. Only load checkpoints you trust. ({e})"
        ) from e
    except (OSError, EOFError, ValueError, TypeError, AttributeError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from e
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: not torch.distributed.checkpoint metadata")
    others = [k for k, v in metadata.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
    if others:
        raise CheckpointError(
            f"{path}: refused to load: entries {others[:3]} are not tensors (this project never "
            f"writes such entries, and DCP would unpickle them)"
        )
    return metadata


def _safe_reader(ckpt_dir: Path, metadata):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """Returns the metadata read by `read_dcp_metadata` instead of unpickling the file."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            if kwargs.get("rank") is not None:
                raise FileNotFoundError("rank-local metadata is not used")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(Path(ckpt_dir) / DCP_DIR)


def _safe_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            raise CheckpointError(f"refused to load non-tensor entry {read_item.dest_index.fqn}")

    return TensorsOnlyPlanner()


def _dcp_load(payload: dict, ckpt_dir: Path, no_dist: bool) -> None:
    """Fill `payload`'s tensors (plain or DTensor shards) in place from the checkpoint; DCP reads
    the overlap of each saved shard with each requested one, whatever the world sizes."""
    import torch.distributed.checkpoint as dcp

    metadata = read_dcp_metadata(ckpt_dir)
    _quiet_dcp()
    dcp.load(payload, storage_reader=_safe_reader(ckpt_dir, metadata), planner=_safe_planner(),
             no_dist=no_dist)


def read_sharded_state(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(model state, optimizer state by parameter name) of a sharded checkpoint, as full CPU
    tensors, in this process alone (no process group needed; memory for the whole state)."""
    metadata = read_dcp_metadata(ckpt_dir)
    flat = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in metadata.state_dict_metadata.items()}
    _dcp_load(flat, ckpt_dir, no_dist=True)
    model_state: dict[str, torch.Tensor] = {}
    optimizer_state: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        section, _, rest = key.partition(".")
        if section == "model":
            model_state[rest] = tensor
        elif section == "optimizer":
            name, _, field = rest.rpartition(".")
            optimizer_state.setdefault(name, {})[field] = tensor
    return model_state, optimizer_state


# ----------------------------------------------------------------------------------------
# Load


def load_model_weights(ckpt_dir: Path, model: nn.Module, device: torch.device | str = "cpu") -> None:
    """Load a checkpoint's weights (either format) into a plain model, in this process alone."""
    ckpt_dir = Path(ckpt_dir)
    if checkpoint_format(ckpt_dir) == "sharded":
        source = ckpt_dir / DCP_DIR
        try:
            state = read_model_state(ckpt_dir)
        except BaseException as e:
            if isinstance(e, CheckpointError) or type(e).__name__ != "CheckpointException":
                raise
            raise CheckpointError(f"{source}: could not read the weights ({e})") from None
        missing, unexpected = model.load_state_dict(parallel.add_tied_aliases(state, model), strict=False)
    else:
        source = ckpt_dir / MODEL_FILE
        with _readable_safetensors(source):
            missing, unexpected = safetensors.torch.load_model(model, str(source), strict=False, device=str(device))
    # Tied weights are stored once under one of their names; a missing alias is fine as long
    # as another name of the same tensor was loaded.
    tensors = model.state_dict(keep_vars=True)
    loaded = set(tensors) - set(missing)
    missing = [m for m in missing
               if not any(tensors[other] is tensors[m] for other in loaded)]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit this model "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )


def read_model_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The saved weights as full CPU tensors (tied weights under one name, see `load_model_weights`)."""
    ckpt_dir = Path(ckpt_dir)
    if checkpoint_format(ckpt_dir) == "sharded":
        return read_sharded_state(ckpt_dir)[0]
    with _readable_safetensors(ckpt_dir / MODEL_FILE):
        return safetensors.torch.load_file(str(ckpt_dir / MODEL_FILE), device="cpu")


@contextlib.contextmanager
def _readable_safetensors(path: Path):
    """Turn safetensors' errors for a missing, truncated or garbled file into a CheckpointError
    naming it. (Callers that verify the checkpoint first, as the trainer, sample.py and init_from
    do, never see one; read_model_state alone does not verify.)"""
    try:
        yield
    except (OSError, safetensors.SafetensorError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); the file is missing, truncated "
                              f"or corrupt") from None


def read_optimizer_state(ckpt_dir: Path) -> dict[str, Any]:
    """The saved `optimizer.state_dict()`, on the CPU, refusing anything but tensors and plain data."""
    ckpt_dir = Path(ckpt_dir)
    if checkpoint_format(ckpt_dir) == "sharded":
        state = read_state(ckpt_dir, require=("optimizer_param_groups",))
        groups = _param_groups_from_json(state["optimizer_param_groups"])
        by_name = read_sharded_state(ckpt_dir)[1]
        return parallel.optimizer_state_by_index({"state": by_name, "param_groups": groups})
    path = ckpt_dir / OPTIMIZER_FILE
    if not path.exists():
        raise CheckpointError(
            f"{ckpt_dir} holds weights only (no {OPTIMIZER_FILE}), so training cannot resume from "
            f"it exactly; start a new run from its weights with --init_from={ckpt_dir}"
        )
    try:
        # weights_only: a pickle that tries to build arbitrary objects (run code) is refused.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the file contains objects other than tensors and plain "
            f"data, which could run code. Only load checkpoints you trust. ({e})"
        ) from e
    return state


def check_model_config(ckpt_dir: Path, saved: dict[str, Any], current: dict[str, Any],
                       init_from: bool = False) -> None:
    """A checkpoint of another model shape cannot be resumed, nor its weights loaded into this
    model (`init_from`): say which keys differ, and what to do in either case."""
    keys = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "tie_weights")
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in keys
             if saved.get(k) != current.get(k)]
    if not diffs:
        # Only the table size matters (a 4096-id vocabulary is 4096 rows at vocab_multiple 1 or
        # 64); checkpoints from before vocab_multiple existed have none: no padding.
        rows = [GPTConfig(**c).padded_vocab_size for c in (saved, current)]
        if rows[0] != rows[1]:
            multiple = saved.get("vocab_multiple", 1)
            diffs.append(f"vocabulary tables: checkpoint {rows[0]} rows (vocab_multiple {multiple}) vs "
                         f"config {rows[1]}; resume it with --vocab_multiple={multiple}")
    if diffs and init_from:
        # A new run already: another out_dir would not help. Its weights load only as they are
        # (a longer trained block_size does not get here: the trainer loads it, then crops).
        keys = ("block_size", "n_layer", "n_head", "n_embd", "bias", "tie_weights", "vocab_multiple")
        settings = " ".join(f"--{k}={saved[k]}" for k in keys
                            if k in saved and k in current and saved[k] != current[k])
        raise CheckpointError(
            f"init_from: {ckpt_dir} holds a different model ({'; '.join(diffs)}), and its weights load "
            f"only into a model of the same shape. Fine-tune it with its model settings"
            + (f" ({settings})" if settings else "") + ", or leave init_from empty to train this "
            "shape from scratch"
        )
    if diffs:
        shorter = (len(diffs) == 1 and isinstance(current.get("block_size"), int)
                   and isinstance(saved.get("block_size"), int) and current["block_size"] < saved["block_size"])
        raise CheckpointError(
            f"{ckpt_dir} holds a different model ({'; '.join(diffs)}). Use the checkpoint's "
            f"settings, or another --out_dir for a new run"
            + (f" (to train its weights on at the shorter context, start one from them: "
               f"--init_from={ckpt_dir} --out_dir=ANOTHER_FOLDER, which crops the position table)"
               if shorter else "")
        )


def _verify_together(ckpt_dir: Path, rank: int, world_size: int) -> None:
    """Every rank checksums 1/world_size of the files; all raise if any file is bad."""
    error = None
    try:
        verify_checkpoint(ckpt_dir, part=(rank, world_size))
    except CheckpointError as e:
        error = str(e)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        errors: list[Any] = [None] * world_size
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise CheckpointError(error)


def load_checkpoint(ckpt_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    *, model_config: dict[str, Any], rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Resume: verify the files, check the model shape, load model and optimizer (either format,
    any world size; under FSDP each rank keeps its shard), restore this rank's RNG state.
    A collective when distributed. Returns state.json (loader position, step, ...)."""
    ckpt_dir = Path(ckpt_dir)
    _verify_together(ckpt_dir, rank, world_size)
    sharded = checkpoint_format(ckpt_dir) == "sharded"
    needs = RESUME_NEEDS + (("optimizer_param_groups",) if sharded and optimizer is not None else ())
    state = read_state(ckpt_dir, require=needs)
    check_model_config(ckpt_dir, state["model_config"], model_config)
    try:
        if sharded:
            _load_sharded(ckpt_dir, model, optimizer, state)
        else:
            # The files hold full tensors; under FSDP each rank keeps its shard of them.
            model_state = read_model_state(ckpt_dir)
            optimizer_state = read_optimizer_state(ckpt_dir) if optimizer is not None else None
            parallel.load_full_state_dicts(model, optimizer, model_state, optimizer_state)
    except CheckpointError:
        raise
    except BaseException as e:
        if not isinstance(e, (KeyError, ValueError, RuntimeError)) and type(e).__name__ != "CheckpointException":
            raise
        raise CheckpointError(
            f"{ckpt_dir}: the saved weights or optimizer state do not fit this model: {e}"
        ) from None
    try:
        restore_rank_rng(state, rank, world_size)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{ckpt_dir / STATE_FILE}: 'rng' holds no usable RNG state ({type(e).__name__}: {e}); {NOT_OURS}"
        ) from None
    return state


def _load_sharded(ckpt_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                  state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict)

    # Live state dicts (DTensor shards under FSDP, full tensors otherwise) are the targets: DCP
    # fills each with its part of the saved tensors.
    payload = {"model": parallel.drop_tied_aliases(get_model_state_dict(model), model)}
    if optimizer is not None:
        payload["optimizer"] = get_optimizer_state_dict(model, optimizer)["state"]
    _dcp_load(payload, ckpt_dir, no_dist=not (dist.is_available() and dist.is_initialized()))
    options = StateDictOptions(strict=True)
    set_model_state_dict(model, parallel.add_tied_aliases(payload["model"], model), options=options)
    if optimizer is not None:
        groups = _param_groups_from_json(state["optimizer_param_groups"])
        set_optimizer_state_dict(model, optimizer, {"state": payload["optimizer"], "param_groups": groups},
                                 options=options)
        parallel.keep_tuples(optimizer)


# ----------------------------------------------------------------------------------------
# Consolidate: a sharded checkpoint -> the single-file format


def default_consolidated_path(ckpt_dir: Path) -> Path:
    """out_dir/consolidated/step_N for a run's checkpoint (outside checkpoints/, so pruning and
    `latest` never touch it); CKPT_consolidated beside any other folder."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.parent.name == CHECKPOINTS_DIR:
        return ckpt_dir.parent.parent / "consolidated" / ckpt_dir.name
    return ckpt_dir.with_name(ckpt_dir.name + "_consolidated")


def consolidate(source: str | os.PathLike, out: str | os.PathLike | None = None, *,
                optimizer: bool = False) -> Path:
    """Write checkpoint `source` (a run folder or checkpoint folder, either format) as one
    single-file, device-agnostic checkpoint folder `out`: model.safetensors (CPU tensors),
    state.json, tokenizer.json, manifest.json, and with `optimizer` also optimizer.pt (then the
    folder resumes training like any full checkpoint). Reads in one process: needs CPU memory for
    the whole model (and optimizer state). Returns `out`."""
    from .hf import HF_PREFIX

    if str(source).startswith(HF_PREFIX) and not Path(source).exists():
        raise CheckpointError(f"{source}: consolidate reads a sharded checkpoint of this project; a Hugging "
                              f"Face folder ('{HF_PREFIX}DIR', as init_from names one) is used as it is")
    with reading(source, hf_advice=(
            f"there is nothing to consolidate; a Hugging Face folder is used as it is, named with the "
            f"'{HF_PREFIX}' prefix (init_from = '{HF_PREFIX}{source}')")) as ckpt_dir:
        return _consolidate(ckpt_dir, out, optimizer)


def _consolidate(ckpt_dir: Path, out: str | os.PathLike | None, optimizer: bool) -> Path:
    verify_checkpoint(ckpt_dir)
    state = read_state(ckpt_dir)
    out = Path(out) if out is not None else default_consolidated_path(ckpt_dir)
    if out.exists():
        raise CheckpointError(f"{out} already exists; remove it or choose another --out")
    from .prepare import training_output  # (data prep's module: imported only here)

    inside = training_output(out)
    if inside is not None:  # keep_last would delete it with the checkpoint (or checkpoints/) it is in
        raise CheckpointError(f"--out {out} {inside}; choose another --out (the default is "
                              f"{default_consolidated_path(ckpt_dir)})")
    try:
        model_state = read_model_state(ckpt_dir)
        optimizer_state = read_optimizer_state(ckpt_dir) if optimizer else None
    except BaseException as e:
        if isinstance(e, CheckpointError) or type(e).__name__ != "CheckpointException":
            raise
        raise CheckpointError(f"{ckpt_dir}: could not read the checkpoint ({e})") from None
    state = {k: v for k, v in state.items() if k != "optimizer_param_groups"}
    state.update(format="full", consolidated_from=str(ckpt_dir))

    tmp = out.parent / f".tmp_{out.name}_{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        written = list(_write_weight_files(tmp, _full_writer(model_state, optimizer_state)))
        source_tokenizer = ckpt_dir / TOKENIZER_FILE
        _complete(tmp, out, state, source_tokenizer if source_tokenizer.exists() else None,
                  _seal_all(written, tmp))
    except OSError as e:
        # A full disk, a read-only folder, or a file where a folder of --out should be: nothing
        # of the source was changed, so only this copy failed.
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write {out} ({type(e).__name__}: {e}); {ckpt_dir} is unchanged. Is the disk "
            f"full or {out.parent} not a writable folder? Fix that, or choose another --out"
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt.checkpoint",
        description="Checkpoint tools. consolidate: turn a sharded (torch.distributed.checkpoint) "
                    "checkpoint into the single-file format that sample.py, export and any world "
                    "size read.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    cons = commands.add_parser("consolidate", help="write a single-file copy of a checkpoint")
    cons.add_argument("source", help="a run folder (its latest checkpoint) or a checkpoint folder")
    cons.add_argument("--out", default=None,
                      help="output folder (default: RUN/consolidated/step_N for a checkpoint of a run, "
                           "given as the run or as RUN/checkpoints/step_N; CKPT_consolidated beside "
                           "a checkpoint folder outside a run)")
    cons.add_argument("--optimizer", action="store_true",
                      help="include the optimizer state (optimizer.pt), so training can resume from the copy")
    from .cli import report_errors  # (cli imports this module)

    def run() -> None:
        args = parser.parse_args(argv)
        try:
            out = consolidate(args.source, args.out, optimizer=args.optimizer)
        except OSError as e:
            # Reading the source (a write error is a CheckpointError already): one line, not a
            # traceback. Nothing was written.
            raise CheckpointError(f"could not consolidate {args.source} ({type(e).__name__}: {e}); "
                                  f"nothing was written") from e
        print(f"wrote {out}")

    # `consolidate` removes its unfinished copy on the way out (KeyboardInterrupt included), and
    # never writes into the source checkpoint.
    return report_errors(run, interrupted="interrupted: stopped consolidating; the checkpoint is unchanged "
                                          "and no unfinished copy was left behind")


if __name__ == "__main__":
    # Run the package's copy of this module (not __main__'s), so its classes are the ones
    # everything else imports.
    from gpt.checkpoint import main as _main

    sys.exit(_main())
