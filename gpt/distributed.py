"""Process-group start-up and teardown: one process per device, from torchrun's environment.

Without torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) the run is a single
process and no process group is created, so `python train.py` needs nothing distributed at all.
Under torchrun a process group exists even for one process, so `torchrun --nproc_per_node=1
train.py --parallel=fsdp` really runs FSDP (e.g. with CPU offload, or to check a multi-GPU
config on one GPU).
"""

from __future__ import annotations

import datetime
import gc
import importlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .console import say
from .device import pick_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    process_group: bool = False  # launched by torchrun: collectives and DDP/FSDP are available

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def log(info: DistInfo, message: str) -> None:
    """Print a line of the run's log: once, from the main process (rank 0)."""
    if info.is_main:
        say(message)


def process_group_backend(device: torch.device, cpu_collectives: bool = False) -> str:
    """NCCL on GPUs, gloo elsewhere; with `cpu_collectives` on a GPU, gloo beside NCCL for
    tensors kept in CPU memory (`cuda:nccl,cpu:gloo`: each collective goes to the backend of
    its tensors' device).

    FSDP's CPU offload needs it: the sharded gradients and weights then live in CPU memory, and
    clip_grad_norm_'s norm, GradScaler's overflow flag, Muon's gather of each matrix and the
    full-format checkpoint's gather are all collectives over them, which NCCL alone refuses
    ("No backend type associated with device type cpu", pytorch/pytorch#148532)."""
    if device.type != "cuda":
        return "gloo"
    return "cuda:nccl,cpu:gloo" if cpu_collectives else "nccl"


# How long a collective may wait for the other ranks before it fails (a rank died or hangs).
COLLECTIVE_TIMEOUT_MINUTES = 10.0


def init_distributed(device_preference: str, timeout_minutes: float = COLLECTIVE_TIMEOUT_MINUTES,
                     cpu_collectives: bool = False) -> DistInfo:
    """Join the process group torchrun set up, or run as a single process.

    The timeout bounds every collective: if a rank dies, the others fail with an error
    instead of waiting forever. `cpu_collectives`: see `process_group_backend` (the trainer sets
    it for fsdp_cpu_offload).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    if (world_size > 1 or launched) and not dist.is_initialized():
        backend = process_group_backend(device, cpu_collectives)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Before the group exists. torch.distributed.nn's collectives take `group=group.WORLD` as
        # a default argument, evaluated at its first import; imported after init (DDP's
        # constructor imports torch._dynamo, which imports it; so does torch.compile), ten such
        # defaults hold the group for good, destroy_process_group cannot free it, and its gloo
        # threads live on into interpreter finalization. There one that drops the last reference
        # to a finished collective (a checkpoint's broadcast_object_list) must take the GIL;
        # Python ends such a thread mid-destructor and the process aborts (SIGABRT, 'terminate
        # called without an active exception'): about 1 launch in 25 failed after its work was
        # done. Imported first, the defaults are None. (FSDP2 can still hold the group through
        # its mesh: gpt/cli.py exit_process covers that.)
        importlib.import_module("torch.distributed.nn")  # for that side effect alone
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                    process_group=dist.is_initialized())


# What a collective raises when another process of the run has died (killed, out of memory, its
# node lost): gloo's TCP transport reports the socket the dead process left; NCCL reports a
# remote error. The exception is a plain RuntimeError, so its text is all there is to go by.
LOST_PEER_SIGNS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                   "ncclRemoteError", "remote process exited")


def lost_peer(error: BaseException) -> str | None:
    """The sign, if `error` is a collective failing because another process of the run died."""
    if not isinstance(error, RuntimeError) or int(os.environ.get("WORLD_SIZE", "1") or 1) < 2:
        return None
    return next((sign for sign in LOST_PEER_SIGNS if sign in str(error)), None)


def barrier(info: DistInfo) -> None:
    if info.is_distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over all ranks (the tensor itself on one process)."""
    if info.is_distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def all_gather_floats(value: torch.Tensor, info: DistInfo) -> list[float]:
    """A scalar tensor's value on every rank, in rank order (a collective when distributed)."""
    if not info.is_distributed:
        return [value.item()]
    everyone = [torch.empty_like(value) for _ in range(info.world_size)]
    dist.all_gather(everyone, value)
    return [v.item() for v in everyone]


def shutdown() -> None:
    """Destroy the process group so gloo/nccl threads exit cleanly before the interpreter does.

    Called from a `finally:`. After a normal finish, all ranks first meet at a barrier, so no rank
    tears down its connections while a peer is still using them (gloo can abort the process at
    exit otherwise). While an exception is propagating a barrier could wait for ranks that will
    never arrive, so the group is destroyed at once.
    """
    if not dist.is_initialized():
        return
    try:
        if sys.exc_info()[0] is None:
            dist.barrier()
    finally:
        # What only the garbage collector frees (a DDP reducer in a reference cycle) may hold the
        # group: collected first, destroy_process_group drops its last reference and frees it
        # (joining its threads) here rather than during finalization.
        gc.collect()
        dist.destroy_process_group()
