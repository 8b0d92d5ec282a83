"""Peak FLOP/s of the device, loader throughput, data-prep MB/s, and the peak RSS of training.

Small, quick versions of benchmarks/bench_loader.py and benchmarks/bench_data.py (which they
call), plus a short `python train.py` run in a child process whose own ru_maxrss is its peak
resident memory. Used by `python -m benchmarks`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import bench_data, bench_loader
from benchmarks.common import REPO, load_average
from gpt.metrics import gpu_peak_flops, measure_matmul_flops

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def peaks(device: torch.device) -> dict[str, Any]:
    """Measured matmul FLOP/s for fp32 and bf16 (all threads torch uses), and on GPUs the
    datasheet figures for the device's name."""
    out: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(), "load_avg": load_average()}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        out[f"measured_{name}_gflops"] = round(measure_matmul_flops(device, dtype) / 1e9, 1)
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        out["gpu"] = gpu
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            found = gpu_peak_flops(gpu, dtype)
            out[f"datasheet_{name}_gflops"] = found / 1e9 if found else None
    return out


def loader(n_tokens: int = 5_000_000, n_batches: int = 200, repeats: int = 3) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        data = Path(tmp)
        bench_loader.write_synthetic_shard(data / "train_000000.bin", n_tokens)
        rows = []
        for batch, block in bench_loader.CASES:
            for order in bench_loader.ORDERS:
                row = bench_loader.time_loader(data, batch, block, order, n_batches, repeats)
                rows.append({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()
                             if k != "repeats_s"})
    return rows


def data_prep(mb: float = 8.0, tokenizers: tuple[str, ...] = ("char", "bpe"), vocab_size: int = 4096) -> list[dict[str, Any]]:
    if not SHAKESPEARE.exists():
        return [{"skipped": f"{SHAKESPEARE} not found"}]
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        bench_data.write_corpus(corpus, SHAKESPEARE, mb)
        return [bench_data.run_prep(corpus, Path(tmp) / f"out_{t}", t, vocab_size) for t in tokenizers]


def training_rss(steps: int = 6, n_layer: int = 6, n_head: int = 6, n_embd: int = 384,
                 block_size: int = 256, batch_size: int = 8, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Peak RSS of `python train.py` training the given shape for a few steps on tiny
    Shakespeare (char level), with its final eval and checkpoint; also its own tokens/s and MFU
    from metrics.jsonl (the trainer's figures, measured against its own peak)."""
    from gpt.prepare import prepare

    if not SHAKESPEARE.exists():
        return {"skipped": f"{SHAKESPEARE} not found"}
    with tempfile.TemporaryDirectory(prefix="bench_rss_") as tmp:
        data = Path(tmp) / "data"
        prepare(data, SHAKESPEARE, tokenizer="char", val_fraction=0.1, val_rule="tail", progress=False)
        out = Path(tmp) / "run"
        command = [sys.executable, str(REPO / "train.py"), f"--data_dir={data}", f"--out_dir={out}",
                   "--prepare_source=none", "--device=cpu", "--resume=never", "--dropout=0",
                   f"--n_layer={n_layer}", f"--n_head={n_head}", f"--n_embd={n_embd}",
                   f"--block_size={block_size}", f"--batch_size={batch_size}", f"--max_steps={steps}",
                   "--warmup_steps=1", "--eval_interval=0", "--eval_iters=2", "--log_interval=1", *extra]
        start = time.perf_counter()
        with open(Path(tmp) / "log.txt", "w+") as output:
            proc = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
            output.seek(0)
            text = output.read()
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"training run failed:\n{text[-3000:]}")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = records[1:] or records  # the first step includes warm-up
    return {
        "command": " ".join(command[1:]),
        "shape": dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, batch_size=batch_size),
        "steps": steps,
        "peak_rss_mb": round(usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e6, 1),
        "wall_s": round(wall, 1),
        "trainer_tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in timed), 1),
        "trainer_mfu_median": round(statistics.median(r["mfu"] for r in timed), 4),
        "load_avg_after": load_average(),
    }
