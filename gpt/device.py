"""Which device a process computes on, and in which dtype: the choices behind `device` and
`dtype` in a config ("auto" included), for training, sampling and evaluation alike.
"""

from __future__ import annotations

import torch

from .config import ConfigError


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """'auto' takes a GPU (cuda, then mps) when present; an explicit choice must be available."""
    if preference == "auto":
        if torch.cuda.is_available():
            preference = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            preference = "mps"
        else:
            preference = "cpu"
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device = 'cuda' but no CUDA GPU is visible; use --device=cpu or auto")
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            # Two processes on one GPU: NCCL refuses them at the first collective ("Duplicate GPU
            # detected"), a traceback on every rank; a wrap-around here only put that off.
            raise ConfigError(
                f"this process is local rank {local_rank} of its node, but only {gpus} CUDA GPU"
                f"{'s are' if gpus > 1 else ' is'} visible here and each process needs its own: start at most "
                f"{gpus} per node (torchrun --nproc_per_node={gpus}; NPROC_PER_NODE={gpus} for slurm/train.sbatch), "
                f"or train on the CPU with --device=cpu")
        return torch.device("cuda", local_rank)
    if preference == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ConfigError("device = 'mps' but MPS is not available; use --device=cpu or auto")
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run at least as fast as fp32 here: a GPU that supports bf16, or a
    CPU with native bf16 instructions (AVX512-BF16/AMX; without them oneDNN emulates bf16)."""
    if device.type == "cpu":
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    # The CPU allocator and MPS raise a plain RuntimeError (not a subclass such as CheckpointError,
    # whose message may quote an allocation failure but says more).
    text = str(error)
    return type(error) is RuntimeError and ("can't allocate memory" in text or "out of memory" in text.lower())


def free_memory(device: torch.device) -> int | None:
    """Bytes of memory free for new tensors on `device`, where it can be told: a CUDA GPU's free
    memory (the caching allocator's unused blocks included), or on Linux the RAM the kernel
    reports as available (MemAvailable: free plus what it can reclaim). None elsewhere (macOS, MPS)."""
    if device.type == "cuda":
        # What the driver has free, and what torch's caching allocator holds without using it.
        return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # in kB
    except (OSError, ValueError, IndexError):
        pass
    return None
