"""Full (unsharded) model and optimizer state under any wrapper: DDP, FSDP2, or none.

The full checkpoint format holds the single-process state: `model.state_dict()` without tied
aliases (as safetensors.save_model writes it) and the native `optimizer.state_dict()`
(parameters as integers in param-group order). torch.distributed.checkpoint's state_dict helpers
gather and scatter those states under any wrapper, but name the optimizer's parameters by FQN;
`optimizer_state_by_index` (numbering parameters in param-group order, as the optimizer does) and
`optimizer_state_by_name` (naming each by `model`'s parameter names) translate. Parameter names are the plain model's under every strategy (gpt/parallel.py applies its
wrappers in place), which is what lets one format serve all of them.
"""

from __future__ import annotations

import torch
from torch import nn


def _state_dict_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer,
                     to_cpu: bool = True) -> tuple[dict, dict]:
    """(model state, optimizer state), unsharded and on the CPU, in the checkpoint file format.

    A collective under FSDP: every rank must call it. Only rank 0 receives the tensors (the other
    ranks get empty dicts), so only rank 0 needs the host memory for a whole copy.
    to_cpu=False: a model that is not sharded hands over its live tensors where they are, on
    every rank, for the caller to copy (gpt/checkpoint/save.py copies a GPU's into page-locked memory,
    several times faster); a sharded one is still gathered into rank 0's CPU memory.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sharded = any(hasattr(p, "device_mesh") for p in model.parameters())
    options = _state_dict_options(cpu_offload=to_cpu or sharded)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if not model_state:  # not rank 0
        return {}, {}
    return drop_tied_aliases(model_state, model), optimizer_state_by_index(optim_state)


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                          model_state: dict, optim_state: dict | None) -> None:
    """Load full states (as read from a checkpoint, on every rank) into `model` and `optimizer`,
    each rank keeping its own shard under FSDP. A collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    options = _state_dict_options(strict=True)
    set_model_state_dict(model, add_tied_aliases(model_state, model), options=options)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state_by_name(optim_state, model, optimizer),
                                 options=options)
        keep_tuples(optimizer)


def keep_tuples(optimizer: torch.optim.Optimizer) -> None:
    """set_optimizer_state_dict hands tuple hyperparameters (AdamW's betas) back as lists; make
    them tuples again, as the optimizer built them, so a resumed run's later checkpoints are
    identical to an uninterrupted run's."""
    for group in optimizer.param_groups:
        for key, value in group.items():
            if key != "params" and isinstance(value, list):
                group[key] = tuple(value)


def tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor (the tied embedding and lm_head)."""
    by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), []).append(name)
    return [sorted(names) for names in by_param.values() if len(names) > 1]


def drop_tied_aliases(state: dict, model: nn.Module) -> dict:
    """Keep one name per tied tensor, the same one safetensors.save_model keeps (sorted first)."""
    state = dict(state)
    for names in tied_names(model):
        for alias in names[1:]:
            state.pop(alias, None)
    return state


def add_tied_aliases(state: dict, model: nn.Module) -> dict:
    """Fill in the names `drop_tied_aliases` (or safetensors) left out, from the name that was kept."""
    state = dict(state)
    for names in tied_names(model):
        present = [n for n in names if n in state]
        for name in names:
            if present and name not in state:
                state[name] = state[present[0]]
    return state


def optimizer_state_by_index(state: dict) -> dict:
    """FQN-keyed optimizer state (torch.distributed.checkpoint) -> `optimizer.state_dict()` format."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def optimizer_state_by_name(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` format -> FQN-keyed, naming each index by this optimizer's params."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    saved_groups = state["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups) or any(
        len(saved["params"]) != len(live["params"]) for saved, live in zip(saved_groups, optimizer.param_groups)
    ):
        shape = [len(g["params"]) for g in saved_groups]
        raise ValueError(
            f"optimizer state has parameter groups of sizes {shape}, this optimizer "
            f"{[len(g['params']) for g in optimizer.param_groups]}"
        )
    by_name, groups = {}, []
    for saved, live in zip(saved_groups, optimizer.param_groups):
        names = [name_of[id(p)] for p in live["params"]]
        groups.append({**saved, "params": names})
        for index, name in zip(saved["params"], names):
            if index in state["state"]:
                by_name[name] = state["state"][index]
    return {"state": by_name, "param_groups": groups}
