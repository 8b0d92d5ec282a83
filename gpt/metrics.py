"""Where training numbers go: stdout, `out_dir/metrics.jsonl`, and optionally wandb.

Also the device's peak FLOP/s, the denominator of MFU (model FLOPs utilization).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"

# Dense (no sparsity) datasheet peaks in TFLOP/s by dtype. Matched against
# torch.cuda.get_device_name(); the first matching entry wins, so more specific names first.
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bfloat16": 989.5, "float16": 989.5, "float32": 494.7}),  # SXM; fp32 = TF32
    ("H100 PCIe", {"bfloat16": 756.5, "float16": 756.5, "float32": 378.0}),
    ("H100", {"bfloat16": 989.5, "float16": 989.5, "float32": 494.7}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
    ("L40S", {"bfloat16": 362.1, "float16": 362.1, "float32": 183.0}),
    ("A10G", {"bfloat16": 70.0, "float16": 70.0, "float32": 35.0}),
    ("RTX 4090", {"bfloat16": 165.2, "float16": 165.2, "float32": 82.6}),
    ("RTX 3090", {"bfloat16": 71.0, "float16": 71.0, "float32": 35.6}),
    ("V100", {"float16": 125.0, "float32": 15.7}),
    ("T4", {"float16": 65.0, "float32": 8.1}),
]


def gpu_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    key = str(dtype).removeprefix("torch.")
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if pattern in device_name and key in peaks:
            return peaks[key] * 1e12
    return None


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """Best-of-`repeats` FLOP/s of an n x n matmul: our stand-in peak where no datasheet applies.

    On CPU this is what the cores can do on the one operation that dominates a transformer,
    which makes MFU there a fair 'how close to the hardware are we'.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: thread pools, kernel selection
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float = 0.0) -> tuple[float, str]:
    """The FLOP/s figure MFU is measured against, and where it came from."""
    if override_tflops > 0:
        return override_tflops * 1e12, "config peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = gpu_peak_flops(name, dtype)
        if found is not None:
            return found, f"{name} datasheet"
    return measure_matmul_flops(device, dtype), f"measured {device.type} matmul"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class MetricsLog:
    """Appends one JSON object per record to `out_dir/metrics.jsonl` (rank 0 only)."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(out_dir) / METRICS_FILE
        self.enabled = enabled
        if enabled and resume_step is not None and self.path.exists():
            self._drop_after(resume_step)

    def _drop_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their old records so
        the file reads as one uninterrupted run."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
