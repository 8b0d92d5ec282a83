"""Causal attention forward + backward on a CPU: SDPA vs gpt/cpu_attention.py vs the formula.

    python -m benchmarks.bench_attention [--dtypes bfloat16 float32] [--rounds 15] [--threads N]

For each shape (batch, heads, positions, head size) and dtype: milliseconds of one forward and
backward of `F.scaled_dot_product_attention(is_causal=True)`, of `causal_attention` (the
hand-written backward that training in bf16 on a CPU uses up to `max_positions()` positions), and
of the formula through autograd (`attention = "explicit"`), alternated round by round; medians.
Prints a table and writes benchmarks/results/attention.json (--out names another). Run it on a
new kind of CPU to see whether the rule in `gpt.cpu_attention.use_cpu_attention` still holds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

# `python benchmarks/bench_attention.py` puts benchmarks/, not the repository, on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cli import non_negative_int, positive_int, results_name  # noqa: E402
from benchmarks.common import interleave, load_average, log, machine, median, write_json  # noqa: E402
from gpt.allocator import keep_freed_memory  # noqa: E402
from gpt.cpu_attention import causal_attention, max_positions, use_cpu_attention  # noqa: E402
from gpt.model import attend  # noqa: E402

# (batch, heads, positions, head size): the default config's shape, shakespeare_char's at batch
# 8 and at 128 positions, a longer context at the same 2,048 positions per batch, and GPT-2
# 124M's heads at its full 1,024-position context (one sequence).
SHAPES = [(16, 4, 128, 32), (8, 6, 128, 64), (8, 6, 256, 64), (4, 6, 512, 64), (1, 12, 1024, 64)]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "cpu_attention": causal_attention,
    "formula": lambda q, k, v: attend(q, k, v, q_start=0, dropout_p=0.0, explicit=True),
}


def forward_backward(fn: Callable[..., torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(dtype).requires_grad_() for _ in range(3))
    d_out = torch.randn(shape, generator=g).to(dtype)

    def step() -> None:
        out = fn(q, k, v)
        out.backward(d_out)
        q.grad = k.grad = v.grad = None
    return step


def run_case(shape: tuple[int, int, int, int], dtype_name: str, rounds: int) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    load_before = load_average()
    seconds = interleave({name: forward_backward(fn, shape, dtype) for name, fn in IMPLEMENTATIONS.items()},
                         rounds=rounds, warmup=2)
    ms = {name: round(median(s) * 1e3, 3) for name, s in seconds.items()}
    B, H, T, D = shape
    probe = torch.empty(1, dtype=dtype)
    return {
        "batch": B, "heads": H, "positions": T, "head_size": D, "dtype": dtype_name, "rounds": rounds,
        "ms": ms,
        "sdpa_over_cpu_attention": round(ms["sdpa"] / ms["cpu_attention"], 3),
        "training_takes": "cpu_attention" if use_cpu_attention(probe, 0, T) else "sdpa",
        "load": [load_before, load_average()],
    }


def format_case(r: dict[str, Any]) -> str:
    ms = r["ms"]
    return (f"B {r['batch']:>2} H {r['heads']:>2} T {r['positions']:>4} D {r['head_size']:>3} {r['dtype']:<8}  "
            f"sdpa {ms['sdpa']:8.2f}  cpu_attention {ms['cpu_attention']:8.2f}  formula {ms['formula']:8.2f} ms   "
            f"sdpa / cpu_attention {r['sdpa_over_cpu_attention']:5.2f}x   training takes {r['training_takes']}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--rounds", type=positive_int, default=15, help="timed calls of each (default 15)")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=results_name, default="attention", help="results file: benchmarks/results/OUT.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as train.py runs on a CPU
    results = []
    for dtype_name in args.dtypes:
        for shape in SHAPES:
            r = run_case(shape, dtype_name, args.rounds)
            log(format_case(r))
            results.append(r)
    path = write_json(args.out, {"benchmark": "attention", "machine": machine(), "max_positions": max_positions(),
                                 "cases": results})
    log(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
