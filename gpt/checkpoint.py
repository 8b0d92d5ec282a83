"""Checkpoints that never lose work.

Layout of a run folder:

    out_dir/
      checkpoints/
        step_0000250/        one complete checkpoint
          model.safetensors  weights (safetensors: plain tensors, no code can hide in it)
          optimizer.pt       AdamW state, loaded with torch.load(weights_only=True)
          state.json         step, tokens seen, loader position, RNG states, configs
          tokenizer.json     copy of the dataset's tokenizer, so a checkpoint samples on its own
          manifest.json      size and sha256 of every file above; written last
      latest                 the name of the newest complete checkpoint

Why it is safe to kill at any moment: a checkpoint is assembled in a hidden temporary folder,
every file is fsynced, and only then is the folder renamed to its final name (a rename is
atomic on POSIX file systems). `latest` is replaced the same way, after the rename, and old
checkpoints are pruned only after that. So `latest` always names a complete checkpoint, and a
crash mid-save leaves at worst a `.tmp_*` folder that the next save removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TOKENIZER_FILE = "tokenizer.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, unsafe or does not fit this run."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a small text file so readers see either the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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
# Save


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    tokenizer_path: str | os.PathLike | None = None,
    keep_last: int = 2,
) -> Path:
    """Write a complete checkpoint for `step`, point `latest` at it, prune old ones.

    `model` is the plain (unwrapped) model; `state` must be JSON-serializable.
    """

    def write_weights(folder: Path) -> None:
        # save_model drops the duplicate name of tied weights, which safetensors refuses.
        safetensors.torch.save_model(model, str(folder / MODEL_FILE))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)

    return _write_checkpoint(out_dir, step, write_weights, state, tokenizer_path, keep_last)


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

    `model_state` holds CPU tensors with one name per tied tensor (as `save_model` writes);
    `optimizer_state` is in `optimizer.state_dict()` format. The files are the same.
    """

    def write_weights(folder: Path) -> None:
        tensors = {name: t.detach().contiguous() for name, t in model_state.items()}
        safetensors.torch.save_file(tensors, str(folder / MODEL_FILE), metadata={"format": "pt"})
        if optimizer_state is not None:
            torch.save(optimizer_state, folder / OPTIMIZER_FILE)

    return _write_checkpoint(out_dir, step, write_weights, state, tokenizer_path, keep_last)


def _write_checkpoint(out_dir, step, write_weights, state, tokenizer_path, keep_last) -> Path:
    root = Path(out_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp_*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    if (final / MANIFEST_FILE).exists():
        # This step is already saved (a stop signal right after a scheduled save, say). Its
        # content is the same, and replacing it would open a moment with no such folder.
        write_text_atomic(Path(out_dir) / LATEST_FILE, final.name + "\n")
        return final
    tmp = root / f".tmp_{final.name}_{os.getpid()}"
    tmp.mkdir()
    try:
        write_weights(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        if tokenizer_path is not None and Path(tokenizer_path).exists():
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        for p in tmp.iterdir():
            _fsync_file(p)
        _fsync_dir(tmp)
        if final.exists():  # an incomplete folder under the final name cannot come from us
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(out_dir) if (Path(out_dir) / LATEST_FILE).exists() else None
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(
            f"could not write checkpoint {final} ({type(e).__name__}: {e}); {kept}. "
            f"Is the disk full or {root} not writable? Fix that and run again to resume"
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(Path(out_dir) / LATEST_FILE, final.name + "\n")
    _prune(root, keep_last, keep=final.name)
    return final


def _prune(root: Path, keep_last: int, keep: str) -> None:
    complete = sorted(p for p in root.glob("step_*") if (p / MANIFEST_FILE).exists())
    for old in complete[:-keep_last] if keep_last > 0 else []:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# Find and verify


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names, or None when the run folder has none yet."""
    out_dir = Path(out_dir)
    latest = out_dir / LATEST_FILE
    if not latest.exists():
        return None
    name = latest.read_text().strip()
    path = out_dir / CHECKPOINTS_DIR / name
    if not name or not (path / MANIFEST_FILE).exists():
        raise CheckpointError(
            f"{latest} names checkpoint {name!r}, but {path} is missing or incomplete. "
            f"Point {latest} at a complete folder in {out_dir / CHECKPOINTS_DIR}, or start over "
            f"with --resume=never"
        )
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a run folder (uses `latest`) or a checkpoint folder."""
    path = Path(path)
    if (path / MANIFEST_FILE).exists():
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is not None:
            return found
        raise CheckpointError(f"{path} holds no checkpoint (no {LATEST_FILE} file and no {MANIFEST_FILE})")
    raise CheckpointError(f"checkpoint path {path} does not exist")


def verify_checkpoint(ckpt_dir: Path) -> dict[str, Any]:
    """Check every file against the manifest (size, then sha256); return the manifest."""
    manifest_path = ckpt_dir / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from e
    for name, expected in manifest.items():
        path = ckpt_dir / name
        if not path.exists():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"{path}: {size} bytes, the manifest says {expected['bytes']}; the file is truncated or corrupt"
            )
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: checksum does not match the manifest; the file is corrupt")
    return manifest


def read_state(ckpt_dir: Path) -> dict[str, Any]:
    return json.loads((ckpt_dir / STATE_FILE).read_text())


# ----------------------------------------------------------------------------------------
# Load


def load_model_weights(ckpt_dir: Path, model: nn.Module, device: torch.device | str = "cpu") -> None:
    missing, unexpected = safetensors.torch.load_model(
        model, str(ckpt_dir / MODEL_FILE), strict=False, device=str(device)
    )
    # Tied weights are stored once under one of their names; a missing alias is fine as long
    # as another name of the same tensor was loaded.
    tensors = model.state_dict(keep_vars=True)
    loaded = set(tensors) - set(missing)
    missing = [m for m in missing
               if not any(tensors[other] is tensors[m] for other in loaded)]
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt_dir / MODEL_FILE}: weights do not fit this model "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )


def read_model_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The saved weights as CPU tensors (tied weights under one name, see `load_model_weights`)."""
    return safetensors.torch.load_file(str(ckpt_dir / MODEL_FILE), device="cpu")


def load_optimizer_state(ckpt_dir: Path, optimizer: torch.optim.Optimizer) -> None:
    optimizer.load_state_dict(read_optimizer_state(ckpt_dir))


def read_optimizer_state(ckpt_dir: Path) -> dict[str, Any]:
    """The saved `optimizer.state_dict()`, on the CPU, refusing anything but tensors and plain data."""
    path = ckpt_dir / OPTIMIZER_FILE
    try:
        # weights_only: a pickle that tries to build arbitrary objects (run code) is refused.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the file contains objects other than tensors and plain "
            f"data, which could run code. Only load checkpoints you trust. ({e})"
        ) from e
    return state


def check_model_config(ckpt_dir: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A checkpoint of another model shape cannot be resumed: say which keys differ."""
    keys = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "tie_weights")
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in keys
             if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(
            f"{ckpt_dir} holds a different model ({'; '.join(diffs)}). Use the checkpoint's "
            f"settings, another out_dir, or --resume=never"
        )
