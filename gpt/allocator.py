"""The C allocator's settings for training on a CPU: keep freed memory for the next step.

A training step frees and allocates the same activation buffers, a few MB each, every time.
glibc's malloc serves a block above its mmap threshold (adjusted as it goes, at most 32 MB by
default) with a fresh mmap() and hands freed memory at the top of its heap back to the system
above its trim threshold, so each step page-faults its buffers in again: measured on the 2-core
development VMs, 6,000-21,000 page faults per step of ours at the default shape (fp32 / bf16),
16,000 at 6 x 384. With both thresholds at 1 GB the blocks are reused: 0 faults per step and
5-7% less time per step (docs/speed.md), at the same peak memory. What a run gives up: memory it
freed stays with the process until it ends, rather than going back to the system.

Process-wide, as the allocator is; set once at the start of a CPU run. A user's own glibc malloc
settings (MALLOC_*_ variables, glibc.malloc tunables) are left alone. Other C libraries (macOS,
musl) and allocators loaded with LD_PRELOAD (jemalloc, tcmalloc) keep their own behaviour.
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # blocks up to this size come from (and return to) the heap
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def user_settings() -> list[str]:
    """The environment's own glibc malloc settings, which keep_freed_memory leaves in place."""
    names = [name for name in USER_SETTINGS if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        names.append("GLIBC_TUNABLES")
    return names


def keep_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds to KEEP_BYTES; returns what was done, for the log."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the system's allocator as it is (not glibc)"
    if user_settings():
        return f"glibc malloc as {', '.join(user_settings())} set it"
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: libc's
    except (OSError, AttributeError):
        return "the system's allocator as it is (no mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; an older glibc refuses a threshold above 32 MB.
    if mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) and mallopt(M_TRIM_THRESHOLD, KEEP_BYTES):
        return "glibc malloc keeps freed blocks up to 1 GB for reuse"
    return "glibc malloc as it is (mallopt refused the thresholds)"
