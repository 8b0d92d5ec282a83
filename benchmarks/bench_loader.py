"""Throughput of gpt.loader.TokenLoader on a synthetic ~50M-token shard.

    python benchmarks/bench_loader.py [--tokens N] [--batches N] [--repeats N] [--data-dir DIR]

Prints batches/s and tokens/s (median of the repeats) for each (batch, block, order) and writes
benchmarks/results/loader.json (--out names another). The shard is written to a temporary folder in chunks (never
held in memory) and removed afterwards unless --data-dir names an existing dataset.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# `python benchmarks/bench_loader.py` puts benchmarks/, not the repository, on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cli import positive_int, results_name  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from gpt.dataset import load_meta  # noqa: E402
from gpt.loader import TokenLoader  # noqa: E402
from gpt.shards import HEADER_INTS, MAGIC, VERSION, ShardError, shard_name  # noqa: E402

CASES = [(12, 64), (8, 1024)]  # (batch_size, block_size)
ORDERS = ("random", "sequential")


SYNTHETIC_VOCAB = 50257  # GPT-2's: random ids below it


def write_synthetic_shard(path: Path, n_tokens: int, chunk: int = 8_000_000) -> None:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = [MAGIC, VERSION, n_tokens]
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        for begin in range(0, n_tokens, chunk):
            n = min(chunk, n_tokens - begin)
            f.write(rng.integers(0, SYNTHETIC_VOCAB, size=n, dtype=np.uint16).astype("<u2").tobytes())


def time_loader(
    data_dir: Path, batch: int, block: int, order: str, n_batches: int, repeats: int,
    vocab_size: int = SYNTHETIC_VOCAB,
) -> dict:
    # vocab_size as the trainer passes it: the loader then checks every batch's ids, part of
    # what a training step waits for.
    loader = TokenLoader(data_dir, "train", batch, block, order=order, seed=0, vocab_size=vocab_size)
    for _ in range(min(n_batches, 50)):  # warm up: first-touch page faults, allocator
        loader.next_batch()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n_batches):
            loader.next_batch()
        seconds.append(time.perf_counter() - t0)
    median = statistics.median(seconds)
    return {
        "batch_size": batch,
        "block_size": block,
        "order": order,
        "batches_per_s": n_batches / median,
        "tokens_per_s": n_batches * batch * block / median,
        "us_per_batch": 1e6 * median / n_batches,
        "repeats_s": seconds,
    }


def bench_loader(data_dir: Path, n_batches: int, repeats: int, vocab_size: int = SYNTHETIC_VOCAB) -> list[dict]:
    """The loader's speed on `data_dir` (the synthetic shard, or a dataset of `vocab_size` ids)."""
    rows = []
    for batch, block in CASES:
        for order in ORDERS:
            row = time_loader(data_dir, batch, block, order, n_batches, repeats, vocab_size)
            print(
                f"loader batch={batch:3d} block={block:5d} {order:10s} "
                f"{row['batches_per_s']:10.0f} batches/s "
                f"{row['tokens_per_s'] / 1e6:8.1f} M tokens/s "
                f"({row['us_per_batch']:.1f} us/batch)",
                flush=True,
            )
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=positive_int, default=50_000_000,
                        help="tokens in the synthetic shard")
    parser.add_argument("--batches", type=positive_int, default=500, help="batches per repeat")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="read this existing dataset instead"
    )
    # Without it every run replaced the committed results/loader.json, a trial run's too.
    parser.add_argument("--out", type=results_name, default="loader",
                        help="results file: benchmarks/results/OUT.json (default: loader)")
    args = parser.parse_args(argv)
    least = max(block for _, block in CASES) + 1
    if args.data_dir is None and args.tokens < least:
        parser.error(f"--tokens {args.tokens}: the synthetic shard needs at least {least} tokens "
                     f"(one window of the largest block, {least - 1}, plus its target)")

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        try:
            if data_dir is None:
                data_dir = Path(tmp)
                write_synthetic_shard(data_dir / shard_name("train", 0), args.tokens)
            num_tokens = TokenLoader(data_dir, "train", 1, 1).num_tokens
            if num_tokens < least:
                # Checked before any timing: the small cases ran first and the run then failed.
                raise SystemExit(f"error: --data-dir: {data_dir} has {num_tokens} train tokens; this "
                                 f"benchmark's largest block needs at least {least}")
            # A dataset's own vocabulary (up to 65,536 ids), not the synthetic shard's: a BPE of
            # 60,000 ids was refused as "ids outside the vocabulary".
            vocab = SYNTHETIC_VOCAB if args.data_dir is None else load_meta(data_dir)["vocab_size"]
            rows = bench_loader(data_dir, args.batches, args.repeats, vocab)
        except (ShardError, OSError) as e:
            # A --data-dir that is missing, a file, or has no train shards (or shards too short
            # for the largest block) ended in a ShardError traceback; its message says what to do.
            raise SystemExit(f"error: {'--data-dir: ' if args.data_dir is not None else ''}{e}") from None

    report = {
        "benchmark": "loader",
        "num_tokens": num_tokens,
        "batches_per_repeat": args.batches,
        "repeats": args.repeats,
        "statistic": "median over repeats",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "torch": torch.__version__,
        },
        "results": rows,
    }
    print(f"wrote {write_json(args.out, report)}")


if __name__ == "__main__":
    main()
