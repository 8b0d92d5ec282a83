"""What state.json holds that Python does not turn into JSON by itself: every rank's RNG
state and the optimizer's hyperparameters, as lists and numbers (so state.json needs no pickle)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def jsonable(value: Any) -> Any:
    """`value` as json.dumps takes it: numpy arrays and tuples as lists, numpy scalars as numbers."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def capture_rng_state() -> dict[str, Any]:
    state = {
        "python": jsonable(random.getstate()),
        "numpy": jsonable(np.random.get_state()),
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


def param_groups_to_json(groups: list[dict]) -> list[dict]:
    """The optimizer's hyperparameters (`state_dict()["param_groups"]`) for state.json."""
    return [{k: jsonable(v) for k, v in group.items()} for group in groups]


def param_groups_from_json(groups: list[dict]) -> list[dict]:
    """`param_groups_to_json`'s output read back, as `optimizer.load_state_dict` takes it."""
    # JSON turned tuples (AdamW's betas) into lists; `params` is a list of names.
    return [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
            for g in groups]
