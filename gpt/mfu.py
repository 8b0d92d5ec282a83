"""The device's peak FLOP/s: the denominator of MFU (model FLOPs utilization).

MFU = the model's FLOPs per token (`GPT.flops_per_token`, 6N plus attention, as in the PaLM
paper's appendix) x tokens/s / this peak. On a GPU the peak is its datasheet's dense figure for
the dtype, found from the device's name; where no datasheet applies (a CPU, an unknown GPU) it
is measured: the FLOP/s of a large matmul on all the device's cores.
"""

from __future__ import annotations

import re
import time
from typing import Any

import torch

# Dense (no sparsity) datasheet peaks in TFLOP/s by dtype. Matched against
# torch.cuda.get_device_name() as whole words ("A100" is not in "RTX A1000", nor "T4" in "T400");
# the first matching entry wins, so more specific names first.
# float32 is the TF32 tensor-core rate where the GPU has one: the trainer enables TF32 on CUDA.
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("B200", {"bfloat16": 2250.0, "float16": 2250.0, "float32": 1100.0}),
    # "NVIDIA H200 NVL" (PCIe, 600 W): 1,671 TFLOP/s bf16 with sparsity, so 835.5 dense, not the SXM's.
    ("H200 NVL", {"bfloat16": 835.5, "float16": 835.5, "float32": 417.5}),
    ("H200", {"bfloat16": 989.5, "float16": 989.5, "float32": 494.7}),  # SXM
    ("GH200", {"bfloat16": 989.5, "float16": 989.5, "float32": 494.7}),  # the H200's GPU (or H100's: the same rate)
    ("H100 NVL", {"bfloat16": 835.5, "float16": 835.5, "float32": 417.5}),
    ("H100 PCIe", {"bfloat16": 756.5, "float16": 756.5, "float32": 378.0}),
    ("H100", {"bfloat16": 989.5, "float16": 989.5, "float32": 494.7}),  # SXM
    ("H800 PCIe", {"bfloat16": 756.5, "float16": 756.5, "float32": 378.0}),
    ("H800", {"bfloat16": 989.5, "float16": 989.5, "float32": 494.7}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
    ("L40S", {"bfloat16": 362.1, "float16": 362.1, "float32": 183.0}),
    ("L40", {"bfloat16": 181.0, "float16": 181.0, "float32": 90.5}),
    ("L4", {"bfloat16": 121.0, "float16": 121.0, "float32": 60.0}),
    ("A10G", {"bfloat16": 70.0, "float16": 70.0, "float32": 35.0}),
    ("A10", {"bfloat16": 125.0, "float16": 125.0, "float32": 62.5}),
    ("RTX 4090", {"bfloat16": 165.2, "float16": 165.2, "float32": 82.6}),
    ("RTX 3090", {"bfloat16": 71.0, "float16": 71.0, "float32": 35.6}),
    ("V100", {"float16": 125.0, "float32": 15.7}),
    ("T4", {"float16": 65.0, "float32": 8.1}),
]


def gpu_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The datasheet peak of the GPU `device_name` for `dtype`, or None where the table has none
    (the caller then measures). A laptop part has its own clocks and power limit, not the desktop
    card's datasheet: measured too."""
    if "Laptop" in device_name:
        return None
    key = str(dtype).removeprefix("torch.")
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(pattern)}(?![A-Za-z0-9])", device_name) and key in peaks:
            return peaks[key] * 1e12
    return None


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 4096, repeats: int = 3,
                         max_seconds: float = 0.25) -> float:
    """Best-of-`repeats` FLOP/s of a square matmul on all the device's cores (every thread torch
    uses): our stand-in peak where no datasheet applies.

    On CPU this is what the cores can do on the one operation that dominates a transformer,
    which makes MFU there a fair 'how close to the hardware are we'. The size doubles from 512
    up to `n` while one product stays under `max_seconds`, so a dtype the CPU has no fast
    kernel for (bf16 without AVX512-BF16/AMX runs ~100x slower than fp32) is measured in about
    a second instead of minutes. The default budget stops at 2048 on a CPU (under a second in
    all, paid at every training start); benchmarks/ asks for more.
    """
    # Its own generator: drawing from torch's global one moved the run's random stream (dropout
    # masks) by an amount that depends on how fast the machine was at that moment (the number of
    # sizes tried), so a resume, which measures after restoring the RNG state, was not exact.
    generator = torch.Generator().manual_seed(0)

    def synchronize() -> None:  # a GPU's product is queued, not done, when `a @ b` returns
        if device.type == "cuda":
            torch.cuda.synchronize()
        elif device.type == "mps":
            torch.mps.synchronize()

    def seconds(size: int) -> float:
        a = torch.randn(size, size, generator=generator).to(device, dtype)
        b = torch.randn(size, size, generator=generator).to(device, dtype)
        a @ b  # warm-up: thread pools, kernel selection
        best = float("inf")
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            a @ b
            synchronize()
            best = min(best, time.perf_counter() - start)
        return best

    size = min(512, n)
    best = seconds(size)
    while size * 2 <= n and best * 8 < max_seconds:  # the next size costs ~8x
        size *= 2
        best = seconds(size)
    return 2 * size**3 / best


KEPT = ", kept from the run's earlier start"  # peak_flops' `earlier`


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float = 0.0,
               earlier: Any = None, max_seconds: float = 0.25) -> tuple[float, str]:
    """The FLOP/s figure MFU is measured against, and where it came from. `earlier`: the
    (FLOP/s, source) a resumed run's checkpoint recorded; where this start would measure again
    on the same kind of device and dtype, that figure is kept instead, so that MFU compares across
    the resume (measured afresh on a busier or quieter machine, it moved 2x within one run).
    `max_seconds`: the measurement's budget per product (`measure_matmul_flops`)."""
    if override_tflops > 0:
        return override_tflops * 1e12, "config peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = gpu_peak_flops(name, dtype)
        if found is not None:
            return found, f"{name} datasheet"
    source = f"measured {device.type} {str(dtype).removeprefix('torch.')} matmul"
    if (isinstance(earlier, (list, tuple)) and len(earlier) == 2 and isinstance(earlier[1], str)
            and earlier[1].startswith(source) and isinstance(earlier[0], (int, float)) and earlier[0] > 0):
        return float(earlier[0]), earlier[1].removesuffix(KEPT) + KEPT
    return measure_matmul_flops(device, dtype, max_seconds=max_seconds), source

