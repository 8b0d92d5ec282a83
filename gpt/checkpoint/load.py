"""Loading: a checkpoint's model (`load_model`), its weights into a model (`load_model_weights`,
`read_model_state`), and
the trainer's resume (`load_checkpoint`: verify, check the model's shape, load the weights and
optimizer state of either format on any world size, restore each rank's RNG)."""

from __future__ import annotations

import contextlib
import pickle
import shlex
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

from ..model import GPT, GPTConfig
from .dcp_read import dcp_load, read_sharded_state
from .full_state import (add_tied_aliases, drop_tied_aliases, keep_tuples, load_full_state_dicts,
                         optimizer_state_by_index)
from .layout import DCP_DIR, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, CheckpointError
from .state_json import param_groups_from_json, restore_rank_rng
from .verify import NOT_OURS, RESUME_NEEDS, checkpoint_format, read_state, verify_checkpoint


def load_model(ckpt_dir: Path) -> tuple[GPT, dict[str, Any]]:
    """A checkpoint's model, on the CPU, and its state.json: verified against its manifest, built
    from the model_config it records, its weights loaded (what sample.py and gpt.eval read)."""
    verify_checkpoint(ckpt_dir)
    state = read_state(ckpt_dir)
    try:
        model = GPT(GPTConfig(**state["model_config"]))
    except (RuntimeError, MemoryError) as e:  # a model_config edited to a size no memory holds
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{Path(ckpt_dir) / STATE_FILE}: cannot build the model its 'model_config' "
                              f"describes ({why}); {NOT_OURS}") from None
    load_model_weights(ckpt_dir, model)
    return model, state


def load_model_weights(ckpt_dir: Path, model: nn.Module) -> None:
    """Load a checkpoint's weights (either format) into a plain model, in this process alone,
    wherever the model's parameters are (the file is read into CPU memory first)."""
    ckpt_dir = Path(ckpt_dir)
    if checkpoint_format(ckpt_dir) == "sharded":
        source = ckpt_dir / DCP_DIR
        try:
            state = read_model_state(ckpt_dir)
        except BaseException as e:
            if isinstance(e, CheckpointError) or type(e).__name__ != "CheckpointException":
                raise
            raise CheckpointError(f"{source}: could not read the weights ({e})") from None
        missing, unexpected = model.load_state_dict(add_tied_aliases(state, model), strict=False)
    else:
        source = ckpt_dir / MODEL_FILE
        with _readable_safetensors(source):
            missing, unexpected = safetensors.torch.load_model(model, str(source), strict=False)
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
        groups = param_groups_from_json(state["optimizer_param_groups"])
        by_name = read_sharded_state(ckpt_dir)[1]
        return optimizer_state_by_index({"state": by_name, "param_groups": groups})
    path = ckpt_dir / OPTIMIZER_FILE
    if not path.exists():
        raise CheckpointError(
            f"{ckpt_dir} holds weights only (no {OPTIMIZER_FILE}), so training cannot resume from "
            f"it exactly; start a new run from its weights with --init_from={shlex.quote(str(ckpt_dir))} "
            f"--out_dir=ANOTHER_FOLDER"
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


def _table_rows(model_config: dict[str, Any]) -> int | None:
    """The rows of a model's vocabulary tables (vocab_size padded to vocab_multiple)."""
    try:
        return GPTConfig(**model_config).padded_vocab_size
    except (TypeError, ValueError):
        return None


def check_model_config(ckpt_dir: Path, saved: dict[str, Any], current: dict[str, Any],
                       init_from: bool = False) -> None:
    """A checkpoint of another model shape cannot be resumed, nor its weights loaded into this
    model (`init_from`): say which keys differ, and what to do in either case."""
    keys = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "tie_weights")
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in keys
             if saved.get(k) != current.get(k)]
    # Only the table size matters (a 4096-id vocabulary is 4096 rows at vocab_multiple 1 or 64);
    # checkpoints from before vocab_multiple existed have none: no padding. Said beside other
    # differences too, so that following the advice takes one try.
    padding = None
    if saved.get("vocab_size") == current.get("vocab_size"):
        rows = [_table_rows(c) for c in (saved, current)]
        if None not in rows and rows[0] != rows[1]:
            padding = f"--vocab_multiple={saved.get('vocab_multiple', 1)}"
            diffs.append(f"vocabulary tables: checkpoint {rows[0]} rows (vocab_multiple "
                         f"{saved.get('vocab_multiple', 1)}) vs config {rows[1]}; set {padding}")
    if diffs and init_from:
        # A new run already: another out_dir would not help. Its weights load only as they are
        # (a longer trained block_size does not get here: the trainer loads it, then crops).
        keys = ("block_size", "n_layer", "n_head", "n_embd", "bias", "tie_weights")
        settings = " ".join([f"--{k}={saved[k]}" for k in keys
                             if k in saved and k in current and saved[k] != current[k]] + [padding or ""]).strip()
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
               f"--init_from={shlex.quote(str(ckpt_dir))} --out_dir=ANOTHER_FOLDER, which crops the position table)"
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
            load_full_state_dicts(model, optimizer, model_state, optimizer_state)
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
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, OverflowError) as e:  # numpy's state: both
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
    payload = {"model": drop_tied_aliases(get_model_state_dict(model), model)}
    if optimizer is not None:
        payload["optimizer"] = get_optimizer_state_dict(model, optimizer)["state"]
    dcp_load(payload, ckpt_dir, no_dist=not (dist.is_available() and dist.is_initialized()))
    options = StateDictOptions(strict=True)
    set_model_state_dict(model, add_tied_aliases(payload["model"], model), options=options)
    if optimizer is not None:
        groups = param_groups_from_json(state["optimizer_param_groups"])
        set_optimizer_state_dict(model, optimizer, {"state": payload["optimizer"], "param_groups": groups},
                                 options=options)
        keep_tuples(optimizer)
