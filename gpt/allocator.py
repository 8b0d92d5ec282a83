"""The C allocator's settings for training on a CPU: keep freed memory for the next step.

A training step frees and allocates the same activation buffers, a few MB each, every time.
glibc's malloc serves a block above its mmap threshold (adjusted as it goes, at most 32 MB by
default) with a fresh mmap() and hands freed memory at the top of its heap back to the system
above its trim threshold, so each step page-faults its buffers in again. With both thresholds
at 1 GB the blocks are reused: ~0 faults per step. docs/speed.md has the figures (train.py's
default config ~11,000 -> ~0 faults and 154-167 vs 188 ms per step; 6 x 384 ~6%). 256 MB
thresholds still left 2,000 faults per step at 6 x 384: what matters is the trim threshold
being above what a step frees.

What a run gives up: memory it freed stays with the process rather than going back to the
system, up to 1 GB per malloc arena that freed it (threads beyond the first get arenas of their
own), and the heap grows further before freed blocks merge into ones it can reuse (torch asks
for 64-byte aligned memory, a little more than a freed block of the same size offers): peak RSS
5-16% higher in train.py (docs/speed.md). The setting lasts as long as the process (glibc cannot
undo it), which is why only train.py's process takes it (`train(..., tune_cpu_allocator=True)`),
not a library caller that goes on to other work.

GPT_CPU_MALLOC=system in the environment keeps glibc's own behaviour (where memory matters
more than those seconds). So do a user's own settings of the same thresholds (the MALLOC_*_
variables or glibc.malloc tunables below; note that setting any of them also turns off glibc's
adjusting of the mmap threshold, so each of those is not glibc's default behaviour), another C
library (macOS, musl) and an allocator loaded with LD_PRELOAD (jemalloc, tcmalloc, mimalloc).
"""

from __future__ import annotations

import ctypes
import os
import platform

from .config import ConfigError

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # blocks up to this size come from (and return to) the heap
# The settings that decide what keep_freed_memory would change, as environment variables and
# as GLIBC_TUNABLES names.
USER_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": "glibc.malloc.mmap_threshold",
                 "MALLOC_TRIM_THRESHOLD_": "glibc.malloc.trim_threshold",
                 "MALLOC_TOP_PAD_": "glibc.malloc.top_pad",
                 "MALLOC_MMAP_MAX_": "glibc.malloc.mmap_max"}
PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
OPT_OUT = "GPT_CPU_MALLOC"  # "system": leave the allocator as it is


def user_settings() -> list[str]:
    """The environment's own settings of glibc malloc's thresholds, which keep_freed_memory
    leaves in place."""
    names = [name for name in USER_SETTINGS if name in os.environ]
    tunables = [t.split("=", 1)[0].strip() for t in os.environ.get("GLIBC_TUNABLES", "").split(":")]
    if set(tunables) & set(USER_SETTINGS.values()):
        names.append("GLIBC_TUNABLES")
    return names


def choice() -> str:
    """GPT_CPU_MALLOC's value: "keep" (the default) or "system"; ConfigError for anything else."""
    value = os.environ.get(OPT_OUT, "keep")
    if value not in ("keep", "system"):
        raise ConfigError(f"{OPT_OUT}={value!r}: use 'system' (the C library's allocator as it is) or "
                          f"'keep' (the default: freed memory kept for reuse; gpt/allocator.py)")
    return value


def keep_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds to KEEP_BYTES; returns what was done, for the log."""
    if choice() == "system":
        return f"the system's allocator as it is ({OPT_OUT}=system)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the system's allocator as it is (not glibc)"
    preloaded = [name for name in PRELOADED_ALLOCATORS if name in os.environ.get("LD_PRELOAD", "")]
    if preloaded:  # glibc's mallopt would answer, for a malloc that no longer serves the process
        return f"{preloaded[0]} (LD_PRELOAD) as it is"
    own = user_settings()
    if own:
        return f"glibc malloc as {', '.join(own)} set it"
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: libc's
    except (OSError, AttributeError):
        return "the system's allocator as it is (no mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; an older glibc refuses a threshold above 32 MB.
    if mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) and mallopt(M_TRIM_THRESHOLD, KEEP_BYTES):
        return f"glibc malloc keeps freed blocks up to {KEEP_BYTES / 2**30:g} GB for reuse"
    return "glibc malloc as it is (mallopt refused the thresholds)"
