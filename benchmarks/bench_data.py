"""End-to-end data prep throughput and peak memory, BPE and char, on tiny Shakespeare repeated.

    python benchmarks/bench_data.py [--mb 100] [--tokenizers bpe char] [--vocab-size 8192]

Builds one text file of about --mb MB (tiny Shakespeare repeated: one huge document, the case
that most tests streaming) in a temporary folder, runs `python data_prep/prepare.py` on it in a
child process per tokenizer, and prints wall time, MB/s of text, tokens/s and the child's peak
RSS (its own ru_maxrss, from os.wait4, so one run's peak does not mask the next). Results go to
benchmarks/results/data.json (--out names another). Figures are measured, not asserted.
The goal: at least 10 MB/s end to end for BPE, and peak RSS under 1.5 GB whatever the corpus size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `python benchmarks/bench_data.py` puts benchmarks/, not the repository, on sys.path.
sys.path.insert(0, str(REPO))

from benchmarks.cli import RESULTS_DIR, positive_float, positive_int, results_name, text_file_problem  # noqa: E402
from benchmarks.cli import write_results  # noqa: E402

SHAKESPEARE = REPO.parent / "shared/data/tinyshakespeare.txt"


def write_corpus(path: Path, source: Path, mb: float) -> int:
    text = source.read_bytes()
    copies = max(1, round(mb * 1e6 / len(text)))
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(text)
    return copies * len(text)


def prep_args(corpus: Path, out: Path, tokenizer: str, vocab_size: int) -> list[str]:
    """data_prep/prepare.py's arguments; --vocab-size only for BPE (prep refuses it with char,
    whose vocabulary is the corpus's characters)."""
    size = ["--vocab-size", str(vocab_size)] if tokenizer == "bpe" else []
    return ["--input", str(corpus), "--out", str(out), "--tokenizer", tokenizer, *size, "--no-progress"]


def run_prep(corpus: Path, out: Path, tokenizer: str, vocab_size: int) -> dict:
    cmd = [sys.executable, str(REPO / "data_prep/prepare.py"), *prep_args(corpus, out, tokenizer, vocab_size)]
    log = out.with_suffix(".log")
    with open(log, "w+") as output:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT)
        tree_peak = [0]
        sampler = threading.Thread(target=sample_tree_rss, args=(proc.pid, tree_peak), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (peak RSS)
        sampler.join()
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        stdout = output.read()
    if proc.returncode != 0:
        raise SystemExit(f"prep failed ({proc.returncode}):\n{stdout}")
    meta = json.loads((out / "meta.json").read_text())
    n_tokens = sum(meta["tokens"].values())
    max_rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    return {
        "tokenizer": tokenizer,
        "vocab_size": meta["vocab_size"],
        "text_mb": meta["text_bytes"] / 1e6,
        "tokens": n_tokens,
        "seconds": round(seconds, 2),
        "mb_per_s": round(meta["text_bytes"] / 1e6 / seconds, 2),
        "tokens_per_s": round(n_tokens / seconds),
        "bytes_per_token": round(meta["text_bytes"] / n_tokens, 3),
        "peak_rss_mb": round(max_rss / 1e6, 1),
        # The prep process and its encoding workers together, sampled every 20 ms; pages the
        # forked workers share with their parent are counted in each (an upper bound).
        "peak_rss_all_processes_mb": round(tree_peak[0] / 1e6, 1),
        "summary": stdout.strip().splitlines()[-1] if stdout.strip() else "",
    }


def sample_tree_rss(pid: int, peak: list[int]) -> None:
    """Keep peak[0] at the largest summed RSS (bytes) of `pid` and its descendants seen (Linux)."""
    while os.path.exists(f"/proc/{pid}"):
        total = sum(_rss(p) for p in _tree(pid))
        peak[0] = max(peak[0], total)
        time.sleep(0.02)


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except OSError:
            pass  # ended meanwhile
    return found


def _rss(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_input(path: Path) -> None:
    """--input must be a readable, non-empty file: a folder, an unreadable file or an empty one
    (repeated zero times: a division by zero) ended in a traceback."""
    problem = text_file_problem(path)
    if problem is not None:
        raise SystemExit(f"error: --input {path} {problem}; give one text file (it is repeated to --mb MB)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=positive_float, default=100, help="corpus size in MB (default: 100)")
    p.add_argument("--tokenizers", nargs="+", choices=["bpe", "char"], default=["bpe", "char"])
    p.add_argument("--vocab-size", "--vocab_size", type=positive_int, default=8192)
    p.add_argument("--input", type=Path, default=SHAKESPEARE, help="text to repeat (default: tiny Shakespeare)")
    # Without it every run replaced the committed results/data.json, a trial run's too.
    p.add_argument("--out", type=results_name, default="data",
                   help="results file: benchmarks/results/OUT.json (default: data)")
    args = p.parse_args(argv)
    check_input(args.input)

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        size = write_corpus(corpus, args.input, args.mb)
        print(f"corpus: {size / 1e6:.1f} MB ({args.input.name} repeated), {os.cpu_count()} CPUs")
        for tokenizer in args.tokenizers:
            r = run_prep(corpus, Path(tmp) / f"out_{tokenizer}", tokenizer, args.vocab_size)
            results.append(r)
            print(f"{tokenizer:>4}: {r['seconds']:7.1f} s  {r['mb_per_s']:6.2f} MB/s  {r['tokens_per_s']:>11,} tokens/s"
                  f"  {r['bytes_per_token']:.2f} bytes/token  peak RSS {r['peak_rss_mb']:,.0f} MB"
                  f" ({r['peak_rss_all_processes_mb']:,.0f} MB with its workers)")

    record = {
        "benchmark": "data prep end to end (python data_prep/prepare.py)",
        "corpus_mb": round(size / 1e6, 1),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "results": results,
    }
    path = write_results(args.out, json.dumps(record, indent=2) + "\n", RESULTS_DIR)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
