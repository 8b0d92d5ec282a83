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

# Runs a script and, at exit, writes its own peak RSS (VmHWM: the high-water mark of *this*
# process image) to $PEAK_RSS_FILE. Not ru_maxrss from wait4: on Linux a child's ru_maxrss
# starts from the parent's RSS at fork/vfork time, so a child of this (large) benchmark process
# would report at least the benchmark's own memory.
_LAUNCHER = """
import atexit, os, runpy, sys
def _report():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                open(os.environ["PEAK_RSS_FILE"], "w").write(line.split()[1])  # KiB
    except OSError:
        pass
atexit.register(_report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_measured(script: Path, args: list[str], log_path: Path) -> tuple[int, float, float | None, str]:
    """Run `python script args` in a child; returns (exit code, wall seconds, peak RSS in MB or
    None where /proc is missing, its output)."""
    rss_file = log_path.with_suffix(".rss")
    # The child uses as many threads as this process (torch reads OMP_NUM_THREADS at start).
    env = dict(os.environ, PEAK_RSS_FILE=str(rss_file), OMP_NUM_THREADS=str(torch.get_num_threads()))
    start = time.perf_counter()
    with open(log_path, "w+") as output:
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(script), *args], cwd=REPO, env=env,
                              stdout=output, stderr=subprocess.STDOUT)
        output.seek(0)
        text = output.read()
    wall = time.perf_counter() - start
    peak = int(rss_file.read_text()) * 1024 / 1e6 if rss_file.exists() else None
    return proc.returncode, wall, peak, text


def peaks(device: torch.device) -> dict[str, Any]:
    """Measured matmul FLOP/s for fp32 and bf16 (all threads torch uses), and on GPUs the
    datasheet figures for the device's name."""
    out: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(), "load_avg": load_average()}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        out[f"measured_{name}_gflops"] = round(measure_matmul_flops(device, dtype, max_seconds=1.5) / 1e9, 1)
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
    """`python data_prep/prepare.py` on `mb` MB of tiny Shakespeare repeated (as
    benchmarks/bench_data.py does, smaller): wall-clock MB/s of text, tokens/s, peak RSS."""
    if not SHAKESPEARE.exists():
        return [{"skipped": f"{SHAKESPEARE} not found"}]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        bench_data.write_corpus(corpus, SHAKESPEARE, mb)
        for tokenizer in tokenizers:
            out = Path(tmp) / f"out_{tokenizer}"
            code, wall, peak, text = run_measured(
                REPO / "data_prep" / "prepare.py",
                ["--input", str(corpus), "--out", str(out), "--tokenizer", tokenizer,
                 "--vocab-size", str(vocab_size), "--no-progress"], Path(tmp) / f"{tokenizer}.log")
            if code != 0:
                raise RuntimeError(f"data prep failed ({code}):\n{text[-3000:]}")
            meta = json.loads((out / "meta.json").read_text())
            n_tokens = sum(meta["tokens"].values())
            rows.append({"tokenizer": tokenizer, "vocab_size": meta["vocab_size"],
                         "text_mb": round(meta["text_bytes"] / 1e6, 2), "tokens": n_tokens,
                         "seconds": round(wall, 2), "mb_per_s": round(meta["text_bytes"] / 1e6 / wall, 2),
                         "tokens_per_s": round(n_tokens / wall), "peak_rss_mb": peak,
                         "note": "wall time of the whole command, Python start-up included"})
    return rows


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
        args = [f"--data_dir={data}", f"--out_dir={out}",
                "--prepare_source=none", "--device=cpu", "--resume=never", "--dropout=0",
                f"--n_layer={n_layer}", f"--n_head={n_head}", f"--n_embd={n_embd}",
                f"--block_size={block_size}", f"--batch_size={batch_size}", f"--max_steps={steps}",
                "--warmup_steps=1", "--eval_interval=0", "--eval_iters=2", "--log_interval=1", *extra]
        code, wall, peak, text = run_measured(REPO / "train.py", args, Path(tmp) / "train.log")
        if code != 0:
            raise RuntimeError(f"training run failed ({code}):\n{text[-3000:]}")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = records[1:] or records  # the first step includes warm-up
    return {
        "command": "python train.py " + " ".join(args),
        "shape": dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, batch_size=batch_size),
        "steps": steps,
        "peak_rss_mb": peak,
        "wall_s": round(wall, 1),
        "trainer_tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in timed), 1),
        "trainer_mfu_median": round(statistics.median(r["mfu"] for r in timed), 4),
        "load_avg_after": load_average(),
    }
