"""Checking a checkpoint before anything is loaded from it: every file against the manifest
(size, then CRC-32), and state.json's keys for their types, so that damage or an edited file is
an error naming the file and what to do, never a traceback from deep inside torch; and
`checkpoint_format`, which of the two formats a folder holds."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from ..model import GPTConfig
from .files import crc32, files_under, sha256
from ..run_layout import is_run_folder
from .find import complete_checkpoints
from .layout import (CHECKPOINTS_DIR, DCP_DIR, FORMATS, LATEST_FILE, MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE,
                     STATE_FILE, STATE_VERSION, TOKENIZER_FILE, DCP_METADATA, CheckpointError, step_of)


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


def _is_loader_state(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    counts = all(_is_count(value[key]) for key in ("num_tokens", "block_size", "seed", "windows_consumed", "version")
                 if key in value)
    # windows_consumed becomes a NumPy int64 index: a larger number was an OverflowError there.
    return counts and value.get("windows_consumed", 0) < 2**62 and isinstance(value.get("order", ""), str)


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
        if isinstance(e, FileNotFoundError) and is_run_folder(Path(ckpt_dir)):
            # A run folder given to a library call that wants one of its checkpoints (load_model):
            # "restore the checkpoint from a copy" sent its user after damage there is none of.
            raise CheckpointError(f"{ckpt_dir} is a training run's folder, not one of its checkpoints: name "
                                  f"a checkpoint folder (gpt.checkpoint.latest_checkpoint finds the run's "
                                  f"latest)") from None
        raise CheckpointError(
            f"{manifest_path}: unreadable manifest ({e}); {_damaged_advice(ckpt_dir)}") from e
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise CheckpointError(f"{manifest_path}: {problem}; {NOT_OURS}")
    return manifest


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


def _files_readers_load(ckpt_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """The files of a checkpoint that resuming or sampling reads, so the manifest must vouch for
    each: state.json and the weights of its format (dcp/ holds the optimizer state too), and
    optimizer.pt and tokenizer.json where the folder has them (a weights-only copy has no
    optimizer.pt; a run without a tokenizer file, no tokenizer.json)."""
    names = [STATE_FILE]
    if checkpoint_format(ckpt_dir) == "sharded":
        names += _dcp_files(ckpt_dir, manifest)
    else:
        names.append(MODEL_FILE)
        if (ckpt_dir / OPTIMIZER_FILE).exists():
            names.append(OPTIMIZER_FILE)
    if (ckpt_dir / TOKENIZER_FILE).exists():
        names.append(TOKENIZER_FILE)
    return names


def _dcp_files(ckpt_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """The files of dcp/ that loading reads: .metadata and the shard files it names. Not every
    file there: one a file system or a copy leaves beside them (.nfs0001, macOS's ._.metadata)
    is never read, and had the whole checkpoint refused as "edited", to be restored from a copy.
    .metadata is read only once the manifest vouches for it (a damaged one, unpickled, raised
    MemoryError); where it cannot be, every file (the checks that follow say what is wrong)."""
    from .dcp_read import read_dcp_metadata

    name = f"{DCP_DIR}/{DCP_METADATA}"
    every_file = [p.relative_to(ckpt_dir).as_posix() for p in files_under(ckpt_dir / DCP_DIR)]
    entry = manifest.get(name)
    if not isinstance(entry, dict):
        return every_file
    # Damage to .metadata is said as such (not as a stray file beside it the fallback would name).
    _check_size(ckpt_dir, name, entry)
    _check_sum(ckpt_dir, name, entry)
    try:
        read = {info.relative_path for info in read_dcp_metadata(ckpt_dir).storage_data.values()}
    except (CheckpointError, AttributeError, TypeError):
        return every_file
    return [name, *(f"{DCP_DIR}/{shard}" for shard in sorted(read))]


def check_format_version(ckpt_dir: Path, *, strict: bool = True) -> None:
    """Refuse a checkpoint written by newer code in a newer format (state.json's "format_version"
    above STATE_VERSION) before its other files and keys are checked: those may differ in ways this
    code would otherwise call damage ("restore it from a copy"). The version is read only from a
    state.json the manifest vouches for (a flipped bit in it is corruption, not a newer format):
    `strict`, a state.json that does not match the manifest is an error here; otherwise (a reader
    of another file alone) it is passed over. A manifest or state.json that cannot be read, or that
    is not a plain file, is left to the checks that say so."""
    version = newer_format_version(ckpt_dir, strict=strict)
    if version is not None:
        raise _newer_format_error(Path(ckpt_dir) / STATE_FILE, version)


def newer_format_version(ckpt_dir: Path, *, strict: bool = False) -> int | None:
    """The format version of a checkpoint written in a newer format than this code reads, else
    None: `check_format_version`'s reading, for a caller that only reports it (the listing)."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / STATE_FILE
    try:
        entry = read_manifest(ckpt_dir).get(STATE_FILE)
    except CheckpointError:
        return None
    if entry is None or not path.is_file():
        return None
    try:
        _check_size(ckpt_dir, STATE_FILE, entry)
        _check_sum(ckpt_dir, STATE_FILE, entry)
        state = json.loads(path.read_bytes())
    except CheckpointError:
        if strict:
            raise
        return None
    except (OSError, ValueError):
        return None
    return _newer_version(state)


def _newer_version(state: Any) -> int | None:
    version = state.get("format_version") if isinstance(state, dict) else None
    return version if _is_count(version) and version > STATE_VERSION else None


def _newer_format_error(path: Path, version: int) -> CheckpointError:
    return CheckpointError(
        f"{path}: the checkpoint is in format version {version}, written by a newer version of this code, "
        f"which reads versions up to {STATE_VERSION}: update this code (git pull) to read it")


def verify_checkpoint(ckpt_dir: Path, part: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Check every file against the manifest (size, then checksum); return the manifest.

    `part = (i, n)` checksums only every n-th file starting at i (sizes are always all checked),
    so n ranks verify a checkpoint together, each reading 1/n of it."""
    ckpt_dir = Path(ckpt_dir)
    check_format_version(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    for name in _files_readers_load(ckpt_dir, manifest):
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
        _check_size(ckpt_dir, name, manifest[name])
    index, count = part
    for name in names[index::count]:
        _check_sum(ckpt_dir, name, manifest[name])
    return manifest


def verify_file(ckpt_dir: Path, name: str) -> bool:
    """Check one file of a checkpoint against the manifest, as verify_checkpoint does them all
    (a reader of that file alone: prep reusing its tokenizer.json). False where the manifest
    lists no such file: the checkpoint has none."""
    ckpt_dir = Path(ckpt_dir)
    check_format_version(ckpt_dir, strict=False)  # this reader needs `name` alone, not state.json
    manifest = read_manifest(ckpt_dir)
    if name not in manifest:
        return False
    _check_size(ckpt_dir, name, manifest[name])
    _check_sum(ckpt_dir, name, manifest[name])
    return True


def _check_size(ckpt_dir: Path, name: str, expected: dict[str, Any]) -> None:
    path = ckpt_dir / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint; {_damaged_advice(ckpt_dir)}")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(
            f"{path}: {size} bytes, the manifest says {expected['bytes']}; the file is truncated or "
            f"corrupt; {_damaged_advice(ckpt_dir)}"
        )


def _check_sum(ckpt_dir: Path, name: str, expected: dict[str, Any]) -> None:
    path = ckpt_dir / name
    if isinstance(expected.get("crc32"), str):
        ok = crc32(path) == expected["crc32"]
    else:  # checkpoints written before the manifest used CRC-32
        ok = sha256(path) == expected["sha256"]
    if not ok:
        raise CheckpointError(
            f"{path}: checksum does not match the manifest; the file is corrupt; {_damaged_advice(ckpt_dir)}")


# What each key of state.json must hold, where it is present: (what the message says, test).
# The trainer writes all of them but optimizer_param_groups, which sharded saves alone hold (a full
# save keeps the param groups inside optimizer.pt); tools and tests may write fewer (`read_state`).
_STATE_KEYS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "format_version": ("a whole number >= 1", lambda v: _is_count(v) and v >= 1),
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
    # The log interval in progress (gpt/training_log.py carried_interval): its steps, skipped steps,
    # micro-batches per step and each rank's loss sum.
    "log_interval": ("an object with whole numbers 'steps', 'skipped' >= 0, 'accum' >= 1 and an array of "
                     "numbers 'loss_sums'",
                     lambda v: isinstance(v, dict) and _is_count(v.get("steps")) and _is_count(v.get("skipped"))
                     and _is_count(v.get("accum")) and v["accum"] >= 1 and isinstance(v.get("loss_sums"), list)
                     and len(v["loss_sums"]) >= 1
                     and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                             for x in v["loss_sums"])),
    # The loader's position (gpt/loader.py state_dict): numbers a resume formats, compares and
    # indexes with, so a wrong type or an absurd size is named here, not met as a traceback.
    "loader": ("an object whose 'num_tokens', 'block_size', 'seed', 'windows_consumed' are whole numbers "
               ">= 0 ('windows_consumed' below 2**62) and 'order' a string", _is_loader_state),
    **{key: ("an object", lambda v: isinstance(v, dict))
       for key in ("model_config", "train_config", "dataset")},
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
    version = _newer_version(state)  # before the keys: a newer format may have others
    if version is not None:
        # A reader that checks the keys before the files (a resume's data check): a flipped bit in
        # the version is the manifest's to name, as corruption.
        check_format_version(ckpt_dir)
        raise _newer_format_error(path, version)
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
