"""The optimizer (AdamW with decoupled weight decay on matrices only, or Muon + AdamW) and the
warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig
from .muon import MuonAdamW


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW where only >=2-D tensors (Linear and Embedding weights) are decayed; or, with
    optimizer = "muon", Muon for the blocks' weight matrices and that AdamW for the rest.

    Biases and LayerNorm gains are left alone: decaying them pulls activations towards zero
    without regularizing anything (as in GPT-2 / nanoGPT). The fused kernel is several times
    faster than the per-tensor loop and exists for CPU and CUDA.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    fused = device.type in ("cpu", "cuda")
    betas = (config.beta1, config.beta2)
    if config.optimizer == "muon":
        hidden = [p for name, p in named if p.dim() == 2 and name.startswith("blocks.")]
        rest = [(name, p) for name, p in named if not (p.dim() == 2 and name.startswith("blocks."))]
        groups = [
            {"params": hidden, "muon": True, "lr_scale": config.muon_lr / config.learning_rate},
            {"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0},
        ]
        return MuonAdamW(groups, lr=config.learning_rate, betas=betas, momentum=config.muon_momentum,
                         fused=fused)
    groups = [
        {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas, fused=fused)


def describe_optimizer(optimizer: torch.optim.Optimizer, config: TrainConfig) -> str:
    """One log line: which parameters each rule steps, at what peak step size, and the schedule."""
    def count(muon: bool) -> int:
        return sum(len(g["params"]) for g in optimizer.param_groups if g.get("muon", False) == muon)
    floor = f"{config.min_lr / config.learning_rate:g}x of the peak" if config.min_lr else "0"
    end = config.lr_decay_steps or config.max_steps
    schedule = f"warmup {config.warmup_steps} steps, cosine to {floor} by step {end}"
    if config.warmup_steps >= end:  # the run ends in its warmup (a note says at what rate)
        schedule = f"warmup {config.warmup_steps} steps (the run ends within it: no decay)"
    if config.optimizer == "muon":
        return (f"optimizer: Muon for {count(True)} block matrices (lr {config.muon_lr:g}, momentum "
                f"{config.muon_momentum:g}), AdamW for the other {count(False)} tensors "
                f"(lr {config.learning_rate:g}); {schedule}")
    return f"optimizer: AdamW for {count(False)} tensors (lr {config.learning_rate:g}); {schedule}"


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to the peak, then cosine decay to `min_lr` at `lr_decay_steps`, then flat.

    `step` counts from 0; warmup starts above zero so the very first update is not wasted. The
    warmup reaches the peak at step warmup_steps - 1 and the cosine starts from it at step
    warmup_steps, so the peak is held for two steps (nanoGPT's (step + 1) / (warmup + 1) holds
    it once; changing it now would change every run's schedule, and resumed runs say so).
    """
    decay_steps = config.lr_decay_steps or config.max_steps
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if step >= decay_steps:
        return config.min_lr
    progress = (step - config.warmup_steps) / max(1, decay_steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr + cosine * (config.learning_rate - config.min_lr)
