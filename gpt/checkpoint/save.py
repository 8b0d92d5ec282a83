"""Saving: a checkpoint folder assembled in hiding, made durable, renamed into place, then
`latest` pointed at it and old checkpoints pruned (the order that makes a kill harmless).

`save_checkpoint` writes one from a single process; `Checkpointer` is the trainer's (any world
size, full or sharded format, in the background or not)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import traceback
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

from .. import locks
from ..staging import Staging, live_storages
from .files import files_under, fsync_dir, give_ordinary_permissions, seal, seal_all, write_text_atomic, writeback
from .find import best_checkpoint, complete_checkpoints, latest_checkpoint, latest_name
from .full_state import drop_tied_aliases, full_state_dicts
from .layout import (CHECKPOINTS_DIR, DCP_DIR, FORMATS, LATEST_FILE, MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE,
                     STATE_FILE, STATE_VERSION, TOKENIZER_FILE, TRASH_PREFIX, CheckpointError, quiet_dcp, step_dir_name,
                     step_of)
from .state_json import param_groups_to_json
from .verify import read_manifest


# ----------------------------------------------------------------------------------------
# Assembling a checkpoint folder atomically (rank 0's part)


def _begin(out_dir: Path, step: int) -> Path | None:
    """Create the temporary folder for `step` and return it; None when `step` is saved already.

    Removes what an interrupted save left behind. Rank 0 only."""
    root = out_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".tmp_*"), *root.glob(f"{TRASH_PREFIX}*")]:  # left by a killed save or prune
        _discard(stale)
    for stale in out_dir.glob(f".{LATEST_FILE}.tmp*"):  # `latest` half-replaced by a killed process
        stale.unlink(missing_ok=True)
    final = root / step_dir_name(step)
    if (final / MANIFEST_FILE).exists() and latest_name(out_dir) == final.name:
        # This step is this run's latest already (a stop signal right after a scheduled save, or
        # right after resuming from it). Its content is the same, and replacing it would open a
        # moment with no checkpoint that `latest` names. A complete step_N that `latest` does not
        # name is left by another run or a killed save, and may hold another state: it is replaced.
        return None
    tmp = root / f".tmp_{final.name}_{os.getpid()}"
    tmp.mkdir()
    return tmp


def complete_folder(tmp: Path, final: Path, state: dict[str, Any], tokenizer_json: bytes | None,
                    sealed: dict[str, dict[str, Any]]) -> None:
    """Add state.json, tokenizer.json (the bytes given; none if None) and the manifest to `tmp`,
    make everything durable and rename it to `final`. `sealed` holds manifest entries of files
    already checksummed."""
    # This code's format, also where `state` is copied from an older checkpoint (consolidation).
    versioned = {"format_version": STATE_VERSION} | {k: v for k, v in state.items() if k != "format_version"}
    (tmp / STATE_FILE).write_text(json.dumps(versioned, indent=1))
    if tokenizer_json is not None:
        (tmp / TOKENIZER_FILE).write_bytes(tokenizer_json)
    rest = [p for p in files_under(tmp) if p.relative_to(tmp).as_posix() not in sealed]
    entries = {**sealed, **seal_all(rest, tmp)}
    manifest = {name: entries[name] for name in sorted(entries)}
    with open(tmp / MANIFEST_FILE, "w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    for folder in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
        fsync_dir(folder)
    stale = None
    if final.exists():  # not ours (see _begin); moved aside at once, so a kill while deleting
        # it never leaves a half-deleted folder that still looks complete under the final name
        stale = _trash_path(final)
        os.rename(final, stale)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if stale is not None:
        _discard(stale)


def _trash_path(path: Path) -> Path:
    """A free name to move `path` aside to before deleting it: one a failed deletion left (a
    file: rmtree removes none) made the next rename to it fail, after the save was complete."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}_{os.getpid()}")
    count = 0
    while os.path.lexists(trash):
        count += 1
        trash = path.with_name(f"{TRASH_PREFIX}{path.name}_{os.getpid()}_{count}")
    return trash


def _discard(path: Path) -> None:
    """Delete `path`, a folder or anything else (a file where a step_N folder belongs), as far
    as it can be: what stays is tried again by the next save's `_begin`."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _publish(out_dir: Path, final: Path, keep_last: int,
             remove: Callable[[list[Path]], None], keep_best: bool = False) -> None:
    """Point `latest` at the complete `final`, then prune older checkpoints (`remove` deletes
    the folders `_prune` moved aside: now, or in a background thread)."""
    write_text_atomic(out_dir / LATEST_FILE, final.name + "\n")
    remove(_prune(final.parent, keep_last, keep=final.name, keep_best=keep_best))


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
    # The failed writer (torch.save's zip writer, say) is still referenced by the frames of the
    # error's traceback, and keeps its deleted file's blocks allocated while its file is open:
    # drop those frames' locals so that the free space measured below is the real one.
    seen: BaseException | None = error
    while seen is not None:  # the writer's own second error (closing its file) chains the first
        traceback.clear_frames(seen.__traceback__)
        seen = seen.__context__
    try:
        previous = latest_checkpoint(out_dir)
    except CheckpointError:
        previous = None
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    again = "run again to resume" if previous else "run again (it starts from step 0)"
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        # Serializing needs memory too (torch.save's buffers, the staging copy): not the disk.
        cause = f"It ran out of memory while writing: free memory (or give the job more), then {again}"
    else:
        cause = _disk_cause(out_dir, final, previous, again)
    return CheckpointError(f"could not write checkpoint {final} ({type(error).__name__}: {error}); {kept}. {cause}")


def _disk_cause(out_dir: Path, final: Path, previous: Path | None, again: str) -> str:
    # A full disk often shows only as the writer's own error (torch.save: "unexpected pos 4096
    # vs 3988"), never as ENOSPC: say so where the free space cannot hold another checkpoint.
    try:
        free = shutil.disk_usage(out_dir).free
        needed = sum(entry["bytes"] for entry in read_manifest(previous).values()) if previous else 0
    except (OSError, CheckpointError):
        free = needed = 0
    if free < needed:
        return (f"The disk is full: the file system holding {out_dir} has {free:,} bytes free, and the "
                f"previous checkpoint takes {needed:,} (a save needs room for one more: older ones are "
                f"deleted only after it is complete). Free space there, then {again}")
    return f"Is the disk full or {final.parent} not writable? Fix that and {again}"


def _prune(root: Path, keep_last: int, keep: str, keep_best: bool = False) -> list[Path]:
    """Move the complete checkpoints beyond the newest `keep_last` out of the way (with
    `keep_best`, all but the one with the lowest val loss: `best_checkpoint`); return the
    folders to delete. A rename is instant and atomic, so no half-deleted folder ever looks like
    a checkpoint, and the deleting (~1 s for 1.5 GB) can happen while training goes on.

    Only checkpoints up to the new one count: a later step_N is not this run's history but one
    a rewound run (`latest` set back by hand) left behind. Counting it pruned the run's own
    checkpoints (the one just resumed from included) and kept that one, which a lost `latest`
    would then resume from; it is left alone, and replaced if the run reaches its step."""
    newest = step_of(keep)
    unreadable: list[Path] = []
    complete = [p for p in complete_checkpoints(root.parent, unreadable=unreadable) if step_of(p.name) <= newest]
    for folder in unreadable:  # after the new checkpoint is complete: not a failed save
        warnings.warn(f"could not look into {folder} (this user may not read it: ls -ld); it is kept, "
                      f"and the next save tries again", stacklevel=2)
    best = best_checkpoint(complete) if keep_best else None
    doomed = []
    for old in complete[:-keep_last] if keep_last > 0 else []:
        if old.name != keep and old != best:
            with _unread(old) as free:
                if not free:  # a reader holds it: a later save prunes it once the reader is gone
                    continue
                trash = _trash_path(old)
                try:
                    os.rename(old, trash)
                except OSError as e:  # after the new checkpoint is complete: not a failed save
                    warnings.warn(f"could not move {old} aside to delete it ({e}); it is kept, and the "
                                  f"next save tries again", stacklevel=2)
                    continue
            doomed.append(trash)
    return doomed


@contextlib.contextmanager
def _unread(ckpt_dir: Path):
    """Yield whether no process reads `ckpt_dir` (see find.py's `reading`), holding an exclusive lock on
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
        _discard(folder)


def _save_full_folder(out_dir: Path, step: int, write_weights: Callable[[Path], None],
                      state: dict[str, Any], tokenizer_json: bytes | None, keep_last: int,
                      remove: Callable[[list[Path]], None] = _remove, keep_best: bool = False) -> Path:
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
            with writeback(tmp):
                for path in write_weight_files(tmp, write_weights):
                    sealed[path.name] = pool.submit(seal, path)
            entries = {name: future.result() for name, future in sealed.items()}
        complete_folder(tmp, final, dict(state, format="full"), tokenizer_json, entries)
        _publish(out_dir, final, keep_last, remove, keep_best)
    except Exception as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(out_dir, final, e) from e
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_weight_files(tmp: Path, write_weights: Callable[[Path], None]):
    """Run `write_weights(tmp)`, which may be a generator yielding each file as it is done."""
    result = write_weights(tmp)
    if result is not None:
        yield from result


def full_writer(model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None):
    """The `write_weights` of the full format, for `write_weight_files`: model.safetensors, then
    optimizer.pt when `optimizer_state` is given, yielding each file once it is written."""
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
# Save: one process, full format, from Python (the trainer saves through Checkpointer, below)


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
    # One name per tied tensor, the one safetensors' save_model keeps.
    model_state = drop_tied_aliases(model.state_dict(), model)
    optimizer_state = optimizer.state_dict() if optimizer is not None else None
    return _save_full_folder(Path(out_dir), step, full_writer(model_state, optimizer_state), state,
                             read_tokenizer_json(tokenizer_path), keep_last)


def read_tokenizer_json(path: str | os.PathLike | None) -> bytes | None:
    """The bytes of the tokenizer.json a checkpoint carries, or None where there is none."""
    if path is None or not Path(path).exists():
        return None
    return Path(path).read_bytes()


# ----------------------------------------------------------------------------------------
# Save: the trainer's checkpointer (any world size; full or sharded; sync or async)


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
        memory and rank 0 writes model.safetensors + optimizer.pt (`full_state_dicts`).
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
                 world_size: int = 1, keep_last: int = 2, keep_best: bool = False,
                 tokenizer_json: bytes | None = None, async_save: bool = False) -> None:
        if format not in FORMATS:
            raise ValueError(f"checkpoint format must be one of {FORMATS}, got {format!r}")
        self.out_dir = Path(out_dir)
        self.format = format
        self.rank, self.world_size = rank, world_size
        self.keep_last, self.keep_best = keep_last, keep_best
        # Bytes read when the run opened its data, not a path read at each save: a dataset
        # prepared again into data_dir during the run would give later checkpoints the new
        # prep's vocabulary beside weights trained on the old one's.
        self.tokenizer_json = tokenizer_json
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
                _save_full_folder(self.out_dir, step, full_writer(model_state, optimizer_state),
                                  state, self.tokenizer_json, self.keep_last, self._remove, self.keep_best)
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
        model_state, optimizer_state = full_state_dicts(model, optimizer, to_cpu=False)
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
        payload = {"model": drop_tied_aliases(model_state, model),
                   "optimizer": optimizer_state["state"]}
        state = dict(state, format="sharded",
                     optimizer_param_groups=param_groups_to_json(optimizer_state["param_groups"]))
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
                with writeback(tmp / DCP_DIR, f"__{self.rank}_*"):
                    self._dcp_save(payload, tmp / DCP_DIR)
                # Each rank checksums and fsyncs the files it wrote (DCP names them __RANK_N).
                mine = sorted((tmp / DCP_DIR).glob(f"__{self.rank}_*"))
                sealed = seal_all(mine, tmp)
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
                    complete_folder(tmp, final, state, self.tokenizer_json, entries)
                    _publish(self.out_dir, final, self.keep_last, self._remove, self.keep_best)
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

        quiet_dcp()
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
