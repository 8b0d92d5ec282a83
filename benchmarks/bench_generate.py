"""Generation tokens/s: ours with KV cache vs Hugging Face `generate` with its cache, and ours
with vs without the cache; side by side in one process.

    python -m benchmarks.bench_generate [--batches 1 8] [--new-tokens 255] [--no-cache-batches 1]

Model: the shakespeare_char shape (6 x 384, context 256, 65 characters), random weights, copied
into the peer (GPT2LMHeadModel, exact GELU, SDPA) so both compute the same function. Greedy
decoding for both (temperature 0 / do_sample=False, min_new_tokens = max_new_tokens so neither
stops early), from a 1-token prompt: 1 + 255 new tokens fill the 256-token context exactly (the
peer's position table has 256 rows and cannot go further). The check: both produce the very
same tokens. tokens/s = batch x new tokens / wall time of the whole call (prefill included).
Also at batch 1 with both under bf16 autocast (how sample.py runs --dtype bfloat16).
On a GPU, ours_cache replays each decode step as a CUDA graph (generate's default there) and
the row ours_cache_no_graph is the same call with cuda_graph=False: one run shows the speedup
(ratio_graph_over_no_graph). The uncached path cannot replay a graph, so there the cache's own
gain is ratio_cache_over_no_cache_both_without_graph; ratio_cache_over_no_cache is the shipped
paths' (graph included).
Writes benchmarks/results/generate.json (--out names another).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

# `python benchmarks/bench_*.py` puts benchmarks/, not the repository, on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cli import device as device_name, non_negative_int, positive_float, positive_int, results_name  # noqa: E402
from benchmarks.common import (format_per_round, interleave, load_average, log, machine, median,  # noqa: E402
                               peer_available, per_round_ratio, write_json)
from benchmarks.bench_train import build_pair  # noqa: E402
from gpt.generate import generate  # noqa: E402

SHAPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, batch_size=1)


def ours_fn(model, idx: torch.Tensor, new_tokens: int, use_cache: bool, cuda_graph: bool | None = None):
    def run() -> torch.Tensor:
        return torch.cat(list(generate(model, idx, new_tokens, temperature=0.0, use_cache=use_cache,
                                       cuda_graph=cuda_graph)), dim=1)
    return run


def peer_fn(model, idx: torch.Tensor, new_tokens: int):
    mask = torch.ones_like(idx)  # no padding; without it HF would guess a mask from pad_token_id

    def run() -> torch.Tensor:
        out = model.generate(idx, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=0)
        return out[:, idx.size(1):]
    return run


def under_autocast(fn, device: torch.device, dtype: str):
    """fn run under torch.autocast(dtype), as sample.py runs --dtype bfloat16; float32 as it is."""
    if dtype == "float32":
        return fn

    def run():
        with torch.autocast(device.type, dtype=getattr(torch, dtype)):
            return fn()
    return run


def run_case(batch: int, new_tokens: int, *, no_cache: bool, device: torch.device,
             rounds: int = 5, budget_s: float = 40.0, dtype: str = "float32") -> dict[str, Any]:
    ours, peer, check = build_pair(SHAPE, device)
    ours.eval(), peer.eval()
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, SHAPE["vocab_size"], (batch, 1), generator=g).to(device)
    contenders = {"ours_cache": ours_fn(ours, idx, new_tokens, True), "peer_cache": peer_fn(peer, idx, new_tokens)}
    graphs = device.type == "cuda"  # ours_cache replays CUDA graphs there: also time it without
    if graphs:
        contenders["ours_cache_no_graph"] = ours_fn(ours, idx, new_tokens, True, cuda_graph=False)
    if no_cache:
        contenders["ours_no_cache"] = ours_fn(ours, idx, new_tokens, False)
    contenders = {name: under_autocast(fn, device, dtype) for name, fn in contenders.items()}
    outputs: dict[str, torch.Tensor] = {}

    def keeping(name, fn):
        def run():
            outputs[name] = fn()
        return run
    # The warm-up, timed; it also keeps each contender's tokens for the check.
    warm = interleave({k: keeping(k, fn) for k, fn in contenders.items()}, rounds=1, warmup=0, device=device)
    same = {name: bool(torch.equal(out, outputs["ours_cache"])) for name, out in outputs.items()}
    load_before = load_average()
    # Rounds: as many as fit the budget, at least 2 but never more than `rounds` (--rounds 1 ran
    # 2). Every contender takes part in every round, the slow uncached path (it recomputes the
    # whole context every token) too: its ratio to the cache is then measured side by side as
    # well, not in a block of its own after the others (this VM's speed drifts by tens of %).
    per_round = sum(warm[k][0] for k in contenders)
    rounds = min(rounds, max(2, int(budget_s / max(per_round, 1e-6))))
    seconds = interleave(contenders, rounds=rounds, warmup=0, device=device)
    rows, medians = {}, {name: median(times) for name, times in seconds.items()}
    for name, times in seconds.items():
        m = medians[name]
        rows[name] = {"seconds": round(m, 3), "tokens_per_s": round(batch * new_tokens / m, 1),
                      "seconds_all": [round(t, 3) for t in times]}

    def ratio(slower: str, faster: str) -> float:  # of the medians themselves, not their rounded seconds
        return round(medians[slower] / medians[faster], 3)

    result = {
        "batch": batch, "dtype": dtype, "prompt_tokens": 1, "new_tokens": new_tokens, "shape": SHAPE | {"batch_size": batch},
        "decoding": "greedy", "device": str(device), "rounds": rounds, **check,
        "same_tokens_as_ours_cache": same,
        "load_avg_before": load_before, "load_avg_after": load_average(), "results": rows,
        "ratio_ours_over_peer": ratio("peer_cache", "ours_cache"),
        "ratio_ours_over_peer_per_round": per_round_ratio(seconds["peer_cache"], seconds["ours_cache"]),
    }
    if graphs:
        result["ratio_graph_over_no_graph"] = ratio("ours_cache_no_graph", "ours_cache")
    if no_cache:
        # As shipped: on a GPU the cached path replays a CUDA graph, which the uncached one cannot
        # (its shapes grow every token), so the like-for-like figure is the cache without graph.
        result["ratio_cache_over_no_cache"] = ratio("ours_no_cache", "ours_cache")
        if graphs:
            result["ratio_cache_over_no_cache_both_without_graph"] = ratio("ours_no_cache", "ours_cache_no_graph")
    return result


def format_case(r: dict[str, Any]) -> str:
    lines = [f"  {name:<19} {row['tokens_per_s']:9,.0f} tok/s ({row['seconds']:.2f} s)"
             for name, row in r["results"].items()]
    extra = (f"; cache / no cache: {r['ratio_cache_over_no_cache']:.1f}x" if "ratio_cache_over_no_cache" in r else "")
    if "ratio_cache_over_no_cache_both_without_graph" in r:
        extra += f" ({r['ratio_cache_over_no_cache_both_without_graph']:.2f}x without the graph)"
    if "ratio_graph_over_no_graph" in r:
        extra += f"; CUDA graph / none: {r['ratio_graph_over_no_graph']:.2f}x"
    lines.append(f"  ours / peer: {r['ratio_ours_over_peer']:.2f}x, {format_per_round(r['ratio_ours_over_peer_per_round'])}"
                 f"{extra}; same tokens: "
                 f"{all(r['same_tokens_as_ours_cache'].values())}  [load {r['load_avg_before']} -> "
                 f"{r['load_avg_after']}, {r['rounds']} rounds]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", nargs="+", type=positive_int, default=[1, 8])
    p.add_argument("--new-tokens", type=positive_int, default=255,
                   help="tokens to generate after the 1-token prompt (at most 255: the context is 256)")
    p.add_argument("--no-cache-batches", nargs="*", type=positive_int, default=[1],
                   help="batches at which to also time our uncached path (slow)")
    p.add_argument("--bf16-batches", nargs="*", type=positive_int, default=[1],
                   help="batches at which to also compare both under bf16 autocast (the peer is slow there)")
    p.add_argument("--rounds", type=positive_int, default=5, help="at most this many (as many as fit --budget-s)")
    p.add_argument("--budget-s", type=positive_float, default=40.0)
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=results_name, default="generate", help="results file: benchmarks/results/OUT.json")
    args = p.parse_args(argv)
    if args.new_tokens > SHAPE["block_size"] - 1:
        p.error(f"--new-tokens {args.new_tokens}: at most {SHAPE['block_size'] - 1} (1 prompt token + new "
                f"tokens must fit the peer's {SHAPE['block_size']}-position table)")
    if not peer_available():
        raise SystemExit("transformers is not installed: pip install transformers")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    cases = [(b, "float32") for b in args.batches] + [(b, "bfloat16") for b in args.bf16_batches]
    for batch, dtype in cases:
        log(f"generate batch {batch} {dtype} ...")
        r = run_case(batch, args.new_tokens, no_cache=dtype == "float32" and batch in args.no_cache_batches,
                     device=torch.device(args.device), rounds=args.rounds, budget_s=args.budget_s, dtype=dtype)
        print(f"generate batch {batch} {dtype}, 1 + {args.new_tokens} tokens:\n{format_case(r)}", flush=True)
        results.append(r)
    path = write_json(args.out, {"benchmark": "generation vs Hugging Face generate", "machine": machine(),
                                 "results": results})
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
