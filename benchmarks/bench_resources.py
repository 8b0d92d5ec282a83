"""Peak FLOP/s of the device, loader throughput, data-prep MB/s, and the peak RSS of training.

    python benchmarks/bench_resources.py [--parts peak loader data rss] [--device cpu]
        [--loader-tokens N] [--loader-batches N] [--repeats N] [--data-mb MB]
        [--tokenizers char bpe] [--vocab-size N] [--rss-steps N] [--results NAME]

Small, quick versions of benchmarks/bench_loader.py and benchmarks/bench_data.py (which they
call), plus a short `python train.py` run in a child process that reports its own peak resident
memory. Used by `python -m benchmarks` (its peak, loader, data and rss parts); alone, it prints
each part's figures and writes benchmarks/results/NAME.json (default: resources.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

# `python benchmarks/bench_resources.py` puts benchmarks/, not the repository, on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_data, bench_loader  # noqa: E402
from benchmarks.cli import device as device_name, positive_float, positive_int, results_name  # noqa: E402
from benchmarks.common import PEAK_MAX_SECONDS, REPO, load_average, write_json  # noqa: E402
from benchmarks.scaleout_summary import median_or_none  # noqa: E402
from gpt.mfu import gpu_peak_flops, measure_matmul_flops  # noqa: E402
from gpt.shards import MAX_VOCAB  # noqa: E402
from gpt.tokenizer import MIN_BPE_VOCAB  # noqa: E402

PARTS = ("peak", "loader", "data", "rss")

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


def run_measured(script: Path, args: list[str], log_path: Path) -> tuple[int, float, float | None, float | None, str]:
    """Run `python script args` in a child; returns (exit code, wall seconds, its peak RSS in MB,
    the peak of its RSS summed with its descendants' (data prep's encoding workers; sampled every
    20 ms), its output). The peaks are None where /proc is missing."""
    rss_file = log_path.with_suffix(".rss")
    # The child uses as many threads as this process (torch reads OMP_NUM_THREADS at start).
    env = dict(os.environ, PEAK_RSS_FILE=str(rss_file), OMP_NUM_THREADS=str(torch.get_num_threads()))
    start = time.perf_counter()
    tree_peak = [0]
    with open(log_path, "w+") as output:
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(script), *args], cwd=REPO, env=env,
                                stdout=output, stderr=subprocess.STDOUT)
        sampler = threading.Thread(target=bench_data.sample_tree_rss, args=(proc.pid, tree_peak), daemon=True)
        sampler.start()
        proc.wait()
        sampler.join()
        output.seek(0)
        text = output.read()
    wall = time.perf_counter() - start
    peak = int(rss_file.read_text()) * 1024 / 1e6 if rss_file.exists() else None
    # The sampler can miss a peak between samples: never report less than the process's own.
    tree = max(tree_peak[0] / 1e6, peak or 0.0) if tree_peak[0] else None
    return proc.returncode, wall, peak, tree, text


def peaks(device: torch.device) -> dict[str, Any]:
    """Measured matmul FLOP/s for fp32 and bf16 (all threads torch uses), and on GPUs the
    datasheet figures for the device's name."""
    out: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(), "load_avg": load_average()}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        out[f"measured_{name}_gflops"] = round(measure_matmul_flops(device, dtype, max_seconds=PEAK_MAX_SECONDS) / 1e9, 1)
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
            code, wall, peak, tree_peak, text = run_measured(
                REPO / "data_prep" / "prepare.py",
                bench_data.prep_args(corpus, out, tokenizer, vocab_size), Path(tmp) / f"{tokenizer}.log")
            if code != 0:
                raise RuntimeError(f"data prep failed ({code}):\n{text[-3000:]}")
            meta = json.loads((out / "meta.json").read_text())
            n_tokens = sum(meta["tokens"].values())
            rows.append({"tokenizer": tokenizer, "vocab_size": meta["vocab_size"],
                         "text_mb": round(meta["text_bytes"] / 1e6, 2), "tokens": n_tokens,
                         "seconds": round(wall, 2), "mb_per_s": round(meta["text_bytes"] / 1e6 / wall, 2),
                         "tokens_per_s": round(n_tokens / wall), "peak_rss_mb": _rounded(peak, 1),
                         # BPE prep encodes in forked workers: their memory counts too (pages
                         # they share with the parent are counted in each: an upper bound).
                         "peak_rss_all_processes_mb": _rounded(tree_peak, 1),
                         "note": "wall time of the whole command: Python start-up and, for BPE, "
                                 "training the tokenizer on the corpus included"})
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
        code, wall, peak, _, text = run_measured(REPO / "train.py", args, Path(tmp) / "train.log")
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
        "trainer_tokens_per_s_median": _rounded(median_or_none(r.get("tokens_per_s") for r in timed), 1),
        # null where the trainer logged none (an MFU without a peak to measure it against)
        "trainer_mfu_median": _rounded(median_or_none(r.get("mfu") for r in timed), 4),
        "load_avg_after": load_average(),
    }


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    p.add_argument("--device", type=device_name, default="cpu",
                   help="cpu (default) or cuda: where the peak FLOP/s are measured")
    p.add_argument("--loader-tokens", "--loader_tokens", type=positive_int, default=5_000_000,
                   help="tokens in the loader's synthetic shard (default: 5,000,000)")
    p.add_argument("--loader-batches", "--loader_batches", type=positive_int, default=200,
                   help="loader batches per repeat (default: 200)")
    p.add_argument("--repeats", type=positive_int, default=3, help="loader repeats, median kept (default: 3)")
    p.add_argument("--data-mb", "--data_mb", type=positive_float, default=8.0,
                   help="MB of text for the data-prep part (default: 8)")
    p.add_argument("--tokenizers", nargs="+", choices=["char", "bpe"], default=["char", "bpe"],
                   help="tokenizers the data-prep part prepares with (default: char bpe)")
    p.add_argument("--vocab-size", "--vocab_size", type=positive_int, default=4096,
                   help="BPE vocabulary of the data-prep part (default: 4096)")
    p.add_argument("--rss-steps", "--rss_steps", type=positive_int, default=6,
                   help="training steps of the peak-RSS run (default: 6)")
    p.add_argument("--results", type=results_name, default="resources",
                   help="file name in benchmarks/results/ (default: resources.json)")
    args = p.parse_args(argv)
    # Checked here, not after minutes of the parts before: each would fail only when reached.
    least = max(block for _, block in bench_loader.CASES) + 1
    if "loader" in args.parts and args.loader_tokens < least:
        p.error(f"--loader-tokens {args.loader_tokens}: the synthetic shard needs at least {least} tokens "
                f"(one window of the largest block, {least - 1}, plus its target)")
    if "data" in args.parts and "bpe" in args.tokenizers and not MIN_BPE_VOCAB <= args.vocab_size <= MAX_VOCAB:
        p.error(f"--vocab-size {args.vocab_size}: byte-level BPE needs {MIN_BPE_VOCAB} to {MAX_VOCAB} ids")
    device = torch.device(args.device)

    record: dict[str, Any] = {"benchmark": "resources: peak FLOP/s, loader, data prep, training RSS",
                              "load_avg_start": load_average(), "args": vars(args)}
    if "peak" in args.parts:
        record["peak"] = peaks(device)
        print(f"peak: {json.dumps(record['peak'])}", flush=True)
    if "loader" in args.parts:
        record["loader"] = loader(args.loader_tokens, args.loader_batches, args.repeats)
        for r in record["loader"]:
            print(f"loader batch {r['batch_size']} x {r['block_size']} {r['order']}: "
                  f"{r['tokens_per_s']:,.0f} tokens/s", flush=True)
    if "data" in args.parts:
        record["data"] = data_prep(args.data_mb, tuple(args.tokenizers), args.vocab_size)
        for r in record["data"]:
            print(f"data prep: {json.dumps(r)}", flush=True)
    if "rss" in args.parts:
        record["rss"] = training_rss(steps=args.rss_steps)
        r = record["rss"]
        print(f"training peak RSS: {r.get('peak_rss_mb', r.get('skipped'))} MB", flush=True)
    print(f"wrote {write_json(args.results, record)}")
    return record


if __name__ == "__main__":
    main()
