"""Reading the sharded format (torch.distributed.checkpoint files) without unpickling anything.

torch.distributed.checkpoint reads `.metadata` with pickle.load and non-tensor entries with
torch.load(weights_only=False); either could run code from a crafted checkpoint. So the
metadata is read here with an unpickler that builds only DCP's own metadata classes, and
non-tensor entries (which this project never writes) are refused."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from .layout import DCP_DIR, DCP_METADATA, CheckpointError, quiet_dcp

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


def dcp_load(payload: dict, ckpt_dir: Path, no_dist: bool) -> None:
    """Fill `payload`'s tensors (plain or DTensor shards) in place from the checkpoint; DCP reads
    the overlap of each saved shard with each requested one, whatever the world sizes."""
    import torch.distributed.checkpoint as dcp

    metadata = read_dcp_metadata(ckpt_dir)
    quiet_dcp()
    dcp.load(payload, storage_reader=_safe_reader(ckpt_dir, metadata), planner=_safe_planner(),
             no_dist=no_dist)


def read_sharded_state(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(model state, optimizer state by parameter name) of a sharded checkpoint, as full CPU
    tensors, in this process alone (no process group needed; memory for the whole state)."""
    metadata = read_dcp_metadata(ckpt_dir)
    flat = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in metadata.state_dict_metadata.items()}
    dcp_load(flat, ckpt_dir, no_dist=True)
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
