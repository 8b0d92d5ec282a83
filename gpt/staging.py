"""CPU memory that a checkpoint's state is copied into, so that training can go on changing its own.

A synchronous save from a GPU, and every asynchronous save, first copies the tensors it will
write (`Staging.snapshot`): off the GPU into one page-locked block of host memory, and, for an
async save, the CPU tensors training keeps changing. The memory is kept from save to save.
gpt/checkpoint/save.py's `Checkpointer` is the user.
"""

from __future__ import annotations

import math
import mmap
import warnings
import weakref
from typing import Any, Callable

import torch
from torch import nn


def live_storages(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> set[int]:
    """Addresses of the memory training keeps mutating (parameters, buffers, optimizer state)."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {local(t).untyped_storage().data_ptr() for t in tensors}


def map_copies(obj: Any, live: set[int], copy: Callable[[tuple, torch.Tensor], torch.Tensor],
                path: tuple = ()) -> Any:
    """`obj` (a state dict) with `copy(path, tensor)` in place of each tensor that training can
    still change: those sharing memory with the live model or optimizer (`live`) or sitting on an
    accelerator. Fresh CPU tensors (gathered for the full format, say) are kept as they are.
    `path` is the tensor's position in the state dict; a DTensor's local shard is copied."""
    if hasattr(obj, "to_local") and hasattr(obj, "device_mesh"):  # DTensor
        from torch.distributed.tensor import DTensor

        local = copy(path, obj.to_local().detach())
        # The same spec (mesh, placements, global shape) around the copy where it is. Not
        # DTensor.from_local: it moves the local tensor to the mesh's device type, so under FSDP
        # on GPUs every shard staged in host memory went straight back to the GPU (a spike of the
        # rank's whole state at each save; with fsdp_cpu_offload, all of it on the GPU). The
        # constructor is what torch's own DCP staging uses (_state_dict_utils: a CPU local tensor
        # under a CUDA mesh).
        return DTensor(local, obj._spec, requires_grad=False)
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu" or obj.untyped_storage().data_ptr() in live:
            return copy(path, obj.detach())
        return obj
    if isinstance(obj, dict):
        return {k: map_copies(v, live, copy, path + (k,)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_copies(v, live, copy, path + (i,)) for i, v in enumerate(obj))
    return obj


ALIGN = 64  # bytes between tensors carved from one block: every dtype's alignment, a cache line


def _bytes(shape: tuple, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def packed_bytes(shapes: list[tuple[tuple, torch.dtype]]) -> int:
    return sum(_aligned(_bytes(shape, dtype)) for shape, dtype in shapes)


def carve(block: torch.Tensor, shapes: list[tuple[tuple, torch.dtype]]) -> list[torch.Tensor]:
    """Tensors of these (shape, dtype)s laid one after another in `block` (uint8, at least
    `packed_bytes(shapes)` long), each with a storage of its own: torch.save writes the whole
    storage of a tensor it saves, so views of one block saved the whole block (optimizer.pt of
    the 124M model held the model's weights too: 1.99 GB instead of 1.49)."""
    memory = block.numpy()
    tensors, offset = [], 0
    for shape, dtype in shapes:
        nbytes = _bytes(shape, dtype)
        if nbytes == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
        else:  # keeps `memory` (and so the block) alive while the tensor lives
            tensors.append(torch.frombuffer(memory[offset:offset + nbytes], dtype=dtype).view(shape))
        offset += _aligned(nbytes)
    return tensors


def _clear_last_cuda_error() -> None:
    """Read back (and so clear) the CUDA runtime's last error after a failed cudaHostRegister:
    left there, the next kernel launch's check reports it as its own failure. Best effort,
    through the libcudart this process has loaded (torch's bindings do not expose the call);
    not run on a GPU yet: registration has not failed on the one GPU machine tried."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            libraries = {line.split()[-1] for line in maps if "libcudart" in line}
        for library in libraries:
            ctypes.CDLL(library).cudaGetLastError()
    except (OSError, AttributeError):
        pass


PAGE = mmap.PAGESIZE  # the OS's: 4 KiB on x86, often 64 KiB on aarch64 (GH200)


def _whole_pages(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes` rounded up to whole pages, starting on a page boundary, inside a
    larger allocation. cudaHostRegister locks whole pages: a block from malloc shares its first
    and last pages with other memory, and a second block registered on a shared page (two
    Checkpointers, one left open after an error) fails with "already registered"."""
    size = -(-nbytes // PAGE) * PAGE
    memory = torch.empty(size + PAGE, dtype=torch.uint8)
    start = -memory.data_ptr() % PAGE
    return memory[start:start + size]  # a view: it keeps `memory` allocated


class Staging:
    """CPU memory a checkpoint's state is copied into, so that training can go on changing its
    own: what an async save writes from, and where a save from a GPU lands first. Kept from save
    to save (keyed by each tensor's position in the state dict): after the first save a copy is a
    memcpy, without allocating and page-faulting fresh memory each time.

    From a CUDA GPU the copies go into one page-locked block (registered with cudaHostRegister),
    queued without waiting; `ready()` waits for them. A GPU copies into pageable memory through a
    small pinned bounce buffer, synchronously: the 124M model and its AdamW state (1.5 GB) took
    0.80 s of a 2.6 s synchronous save on an H200 (1.9 GB/s); into this block 0.04 s, and the
    save 0.93 s (an async save stalls training 0.02 s, was 0.47). One block of exactly the bytes
    needed, rather than a pinned tensor per entry: PyTorch's pinned allocator rounds each
    allocation up to a power of two (a 154 MB embedding would pin 256 MB)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}
        self._block: torch.Tensor | None = None  # the page-locked memory behind the GPU copies
        self._block_layout: list | None = None
        self._event = None  # recorded after the last GPU copy was queued
        self._unpin: Callable[[], Any] = lambda: None

    def snapshot(self, obj: Any, live: set[int] = frozenset()) -> Any:
        """`map_copies(obj, live, ...)` into this staging memory; call `ready()` before reading it."""
        from_gpu: dict[tuple, torch.Tensor] = {}

        def note(path: tuple, t: torch.Tensor) -> torch.Tensor:
            if t.device.type == "cuda":
                from_gpu[path] = t
            return t

        map_copies(obj, live, note)
        if from_gpu:
            self._pin_for(from_gpu)
        copied = map_copies(obj, live, self._copy)
        self._event = None
        if from_gpu:
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(next(iter(from_gpu.values())).device))
        return copied

    def ready(self) -> None:
        """Wait until the copies from a GPU have landed."""
        if self._event is not None:
            self._event.synchronize()

    def _copy(self, path: tuple, t: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers.get(path)
        if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
            buffer = self.buffers[path] = torch.empty(t.shape, dtype=t.dtype, device="cpu")
        # Asynchronous only into the page-locked block; the stream orders the copy before any
        # later kernel of the training step that changes `t`.
        return buffer.copy_(t, non_blocking=t.device.type == "cuda")

    def _pin_for(self, tensors: dict[tuple, torch.Tensor]) -> None:
        """Give each GPU tensor its place in one page-locked block (the same block as last time
        when the shapes are the same)."""
        layout = [(path, tuple(t.shape), t.dtype) for path, t in tensors.items()]
        if layout == self._block_layout:
            return
        for path, _, _ in self._block_layout or ():  # views of the old block keep it allocated
            self.buffers.pop(path, None)
        self.release()
        shapes = [(shape, dtype) for _, shape, dtype in layout]
        block = _whole_pages(max(packed_bytes(shapes), 1))
        cudart = torch.cuda.cudart()
        error = int(cudart.cudaHostRegister(block.data_ptr(), block.numel(), 0))
        if error:  # the copies still work, synchronously
            _clear_last_cuda_error()
            warnings.warn(f"checkpoint: could not page-lock {block.numel() / 1e9:.2f} GB of host memory for "
                          f"copies off the GPU (cudaHostRegister error {error}); saves will copy more slowly")
        else:
            # Unpinned when the block is dropped (release(), or this object's end), before its
            # memory can go back to the allocator still registered.
            self._unpin = weakref.finalize(block, cudart.cudaHostUnregister, block.data_ptr())
            self._block = block
        for (path, _, _), tensor in zip(layout, carve(block, shapes)):
            self.buffers[path] = tensor
        self._block_layout = layout

    def release(self) -> None:
        """Unpin the block (its views stay usable as ordinary memory until dropped)."""
        if self._block is not None:
            self.ready()  # no copy may still be landing in it
            self._unpin()
        self._block = self._block_layout = None
