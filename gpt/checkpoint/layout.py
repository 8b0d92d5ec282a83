"""The names of a checkpoint's files and folders (step_dir_name, step_of, resolve_format), the
error every part of this package raises, and quiet_dcp, the warning filter save.py and
dcp_read.py set around torch.distributed.checkpoint.

The whole layout is drawn in `gpt/checkpoint/__init__.py`."""

from __future__ import annotations

import warnings

# A run's own names, shared with the code that must recognize a run without importing torch.
from ..run_layout import CHECKPOINTS_DIR, LATEST_FILE, MANIFEST_FILE, STATE_FILE  # noqa: F401

TRASH_PREFIX = ".trash_"  # pruned checkpoints being deleted
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TOKENIZER_FILE = "tokenizer.json"
DCP_DIR = "dcp"  # the sharded format's torch.distributed.checkpoint folder
DCP_METADATA = ".metadata"
FORMATS = ("full", "sharded")
# state.json's "format_version": raised when a checkpoint's content changes in a way that older
# code would misread, so that older code refuses it with a message rather than a KeyError from
# deep inside a load. Checkpoints written before the key existed are version 1.
STATE_VERSION = 1


def quiet_dcp() -> None:
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
    # isascii too: str.isdigit() is true of '²' and '٣', which int() refuses (a stray folder
    # step_² broke listing, and every save in its pruning).
    return int(digits) if name.startswith("step_") and digits.isascii() and digits.isdigit() else None


def resolve_format(setting: str, strategy: str) -> str:
    """The format a run saves in: config `checkpoint_format` ('auto' is sharded under FSDP, where
    every rank holds only a shard, and full otherwise) for the resolved parallel strategy."""
    if setting == "auto":
        return "sharded" if strategy == "fsdp" else "full"
    if setting not in FORMATS:
        raise ValueError(f"checkpoint_format must be auto, full or sharded, got {setting!r}")
    return setting
