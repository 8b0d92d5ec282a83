"""Training-step throughput, ours vs Hugging Face GPT2LMHeadModel, side by side in one process.

    python -m benchmarks.bench_train [--shapes default shakespeare_char] [--dtypes float32 bfloat16]
                                     [--device cpu|cuda] [--compile] [--vocab-multiple 64] [--budget-s 40]

One step = forward + backward + AdamW step (torch.optim.AdamW(fused=True) for both models, the
same learning rate, no weight decay groups, no clipping), on one fixed random batch, dropout 0,
both models in train mode, each scored on the same B x T next tokens (`loss_of`; until 2026-12-02
the peer shifted x itself and scored B x (T - 1) of them: one small label copy more per step,
within the noise of the committed figures). The peer is a GPT2Config of the same shape (layers,
heads, width, n_positions = block, vocabulary) with exact GELU and SDPA attention, so both
compute the same function: the script copies our weights into it and checks that the logits
agree, and that the two parameter counts are equal. bf16 means torch.autocast(bfloat16) around
the forward, for both. Prints tokens/s, the ratio and MFU; writes benchmarks/results/train.json.

--vocab-multiple N also times ours (eager) with its vocabulary tables padded to a multiple of N,
as train.py builds the model (vocab_multiple, default 64): the same weights and logits, matmul
shapes that GPUs tile better (GPT-2's 50257 -> 50304 at 64).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

# `python benchmarks/bench_*.py` puts benchmarks/, not the repository, on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cli import device as device_name, non_negative_int, positive_float, positive_int, results_name  # noqa: E402
from benchmarks.common import (MALLOC_CHOICES, MALLOC_HELP, check_malloc_env, build_peer, count_params,  # noqa: E402
                               format_per_round, interleave, load_average, log, machine, median, peer_available,
                               PEAK_MAX_SECONDS, per_round_ratio, use_malloc, write_json)
from gpt.hf import from_hf_state_dict, to_hf_state_dict  # noqa: E402
from gpt.mfu import peak_flops  # noqa: E402
from gpt.model import GPT, GPTConfig  # noqa: E402
from gpt.trainer import use_tf32  # noqa: E402

# (layers, heads, width, context, batch, vocabulary)
SHAPES: dict[str, dict[str, int]] = {
    # configs/default.toml
    "default": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, vocab_size=4096),
    # configs/shakespeare_char.toml's model (6 x 384, context 256, 65 characters); batch 8
    # instead of 64 so that a step takes seconds, not tens of seconds, on a 2-core CPU.
    "shakespeare_char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, vocab_size=65),
    # GPT-2 small, for GPUs (benchmarks/gpu.sh)
    "gpt2_124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16, vocab_size=50257),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def build_pair(shape: dict[str, int], device: torch.device, seed: int = 0) -> tuple[GPT, Any, dict[str, Any]]:
    """Our GPT and the peer with the same weights; checks they compute the same logits."""
    torch.manual_seed(seed)
    dims = {k: v for k, v in shape.items() if k != "batch_size"}
    ours = GPT(GPTConfig(**dims, dropout=0.0))
    peer, implementation = build_peer(**dims)
    missing, unexpected = peer.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    peer.tie_weights()
    ours.to(device), peer.to(device)
    x = torch.randint(0, shape["vocab_size"], (2, min(32, shape["block_size"])), device=device)
    with torch.no_grad():
        ours.eval(), peer.eval()
        diff = (ours(x)[0] - peer(x).logits).abs().max().item()
    check = {
        "params_ours": count_params(ours),
        "params_peer": count_params(peer),
        "peer_attention": implementation,
        "max_abs_logit_diff_same_weights": diff,
    }
    # `not diff <= ...`: a NaN difference (NaN logits) must fail the check, not pass it.
    if check["params_ours"] != check["params_peer"] or not diff <= 1e-3:
        raise AssertionError(f"ours and the peer are not the same model: {check}")
    return ours, peer, check


def loss_of(model, x: torch.Tensor, y: torch.Tensor, peer: bool) -> torch.Tensor:
    """The mean cross-entropy of predicting y from x, as each side computes it."""
    if peer:
        # The same B x T targets as ours: given `labels` alone, HF shifts them itself and scores
        # B x (T - 1) positions on x[:, 1:] (its loss then differed from ours at 1e-4).
        return model(input_ids=x, labels=y, shift_labels=y).loss
    return model(x, y, return_logits=False)[1]  # as the trainer calls it


def train_step_fn(model, optimizer, x, y, autocast, peer: bool):
    def step():
        with autocast:
            loss = loss_of(model, x, y, peer)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def padded_copy(ours: GPT, multiple: int) -> tuple[GPT, float]:
    """Ours with its vocabulary tables padded to a multiple of `multiple` (zero rows, as train.py
    starts them), same weights; and the largest logit difference from ours (the check)."""
    config = dataclasses.replace(ours.config, vocab_multiple=multiple)
    device = next(ours.parameters()).device
    padded = GPT(config).to(device)
    padded.load_state_dict(from_hf_state_dict(to_hf_state_dict(ours), config, "ours"))
    x = torch.randint(0, config.vocab_size, (2, min(32, config.block_size)), device=device)
    with torch.no_grad():
        ours.eval(), padded.eval()
        diff = (ours(x)[0] - padded(x)[0]).abs().max().item()
    if not diff <= 1e-3:  # NaN fails too
        raise AssertionError(f"the padded model computes another function (max logit difference {diff})")
    return padded, diff


def run_case(shape_name: str, dtype_name: str, *, device: torch.device, compile_ours: bool = False,
             vocab_multiple: int = 1, budget_s: float = 40.0, min_rounds: int = 3, max_rounds: int = 10,
             peak: dict[str, float] | None = None) -> dict[str, Any]:
    shape = SHAPES[shape_name]
    dtype = DTYPES[dtype_name]
    ours, peer, check = build_pair(shape, device)
    B, T, V = shape["batch_size"], shape["block_size"], shape["vocab_size"]
    g = torch.Generator().manual_seed(1)
    window = torch.randint(0, V, (B, T + 1), generator=g).to(device)
    x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()
    autocast = _autocast(device, dtype)
    contenders = {}
    compile_s = None
    models = {"ours": ours, "peer": peer}
    if compile_ours:
        torch.manual_seed(0)
        compiled = GPT(ours.config).to(device)
        compiled.load_state_dict(ours.state_dict())
        compiled.compile()
        models["ours+compile"] = compiled
    padded_name = f"ours+pad{vocab_multiple}"
    if vocab_multiple > 1 and V % vocab_multiple:
        models[padded_name], check["max_abs_logit_diff_padded"] = padded_copy(ours, vocab_multiple)
    for name, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0,
                                      fused=device.type in ("cpu", "cuda"))
        contenders[name] = train_step_fn(model, optimizer, x, y, autocast, peer=name == "peer")
    if compile_ours:
        start = time.perf_counter()
        contenders["ours+compile"]()  # compiles forward and backward
        compile_s = time.perf_counter() - start
    # Warm-up: one step each, timed, to size the number of rounds to the budget.
    first = interleave(contenders, rounds=1, warmup=1, device=device)
    per_round = sum(v[0] for v in first.values())
    rounds = max(min_rounds, min(max_rounds, int(budget_s / max(per_round, 1e-6))))
    load_before = load_average()
    seconds = interleave(contenders, rounds=rounds, warmup=0, device=device)
    tokens = B * T
    flops_per_token = ours.flops_per_token()
    rows = {}
    for name, times in seconds.items():
        m = median(times)
        row = {"step_ms": round(m * 1e3, 2), "tokens_per_s": round(tokens / m, 1),
               "step_ms_all": [round(t * 1e3, 2) for t in times]}
        if peak:
            achieved = flops_per_token * tokens / m
            row["achieved_gflops"] = round(achieved / 1e9, 2)
            for key, value in peak.items():
                row[f"mfu_vs_{key}"] = round(achieved / value, 4)
        rows[name] = row
    result = {
        "shape": shape_name, **shape, "dtype": dtype_name, "device": str(device),
        "rounds": rounds, "statistic": "median of rounds, contenders alternated",
        "flops_per_token": flops_per_token, **check,
        "load_avg_before": load_before, "load_avg_after": load_average(),
        "results": rows,
        "ratio_ours_over_peer": round(rows["peer"]["step_ms"] / rows["ours"]["step_ms"], 3),
        "ratio_ours_over_peer_per_round": per_round_ratio(seconds["peer"], seconds["ours"]),
    }
    if peak:
        result["peak_gflops"] = {key: round(value / 1e9, 1) for key, value in peak.items()}
    if padded_name in rows:
        result["ratio_padded_over_ours"] = round(rows["ours"]["step_ms"] / rows[padded_name]["step_ms"], 3)
    if compile_ours:
        result["compile_s"] = round(compile_s, 1)
        result["ratio_ours_compiled_over_peer"] = round(rows["peer"]["step_ms"] / rows["ours+compile"]["step_ms"], 3)
    return result


def case_peak(device: torch.device, dtype_name: str) -> dict[str, float]:
    """MFU's denominator for one case: the GPU's datasheet figure, else a matmul measured as the
    suite measures it (PEAK_MAX_SECONDS), not with train.py's quick start-up budget."""
    peak, source = peak_flops(device, DTYPES[dtype_name], max_seconds=PEAK_MAX_SECONDS)
    return {"datasheet" if "datasheet" in source else "measured": peak}


def format_case(r: dict[str, Any]) -> str:
    lines = []
    for name, row in r["results"].items():
        # MFU against the peak of the run's own dtype (or the only peak given).
        keys = [k for k in row if k.startswith("mfu_vs_")]
        own = [k for k in keys if ("bf16" in k) == (r["dtype"] == "bfloat16")] or keys
        mfu = "".join(f"  MFU {row[k] * 100:5.1f}% ({k.removeprefix('mfu_vs_')})" for k in own)
        lines.append(f"  {name:<13} {row['step_ms']:9.1f} ms/step {row['tokens_per_s']:10,.0f} tok/s{mfu}")
    lines.append(f"  ours / peer: {r['ratio_ours_over_peer']:.2f}x, {format_per_round(r['ratio_ours_over_peer_per_round'])}"
                 + (f"; compiled ours / peer: {r['ratio_ours_compiled_over_peer']:.2f}x "
                    f"(compile {r['compile_s']:.0f} s)" if "compile_s" in r else "")
                 + (f"; padded vocabulary / ours: {r['ratio_padded_over_ours']:.2f}x"
                    if "ratio_padded_over_ours" in r else "")
                 + f"  [load {r['load_avg_before']} -> {r['load_avg_after']}, {r['rounds']} rounds]")
    if any(v > 1 for row in r["results"].values() for k, v in row.items() if k.startswith("mfu_vs_measured")):
        lines.append(f"  note: MFU over 100% of the measured peak ({r['peak_gflops']}): the peak was measured "
                     f"while the CPU was busier than during the steps; rerun on an idle machine")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["default", "shakespeare_char"], choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd ours")
    p.add_argument("--vocab-multiple", type=positive_int, default=1,
                   help="also time ours (eager) with the vocabulary padded to a multiple of this, as "
                        "train.py does (shapes whose vocabulary is not a multiple already)")
    p.add_argument("--budget-s", type=positive_float, default=40.0, help="timed seconds per case (sets the rounds)")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--malloc", choices=MALLOC_CHOICES, default="trainer", help=MALLOC_HELP)
    p.add_argument("--out", type=results_name, default="train", help="results file: benchmarks/results/OUT.json")
    args = p.parse_args(argv)
    check_malloc_env()
    if not peer_available():
        raise SystemExit("transformers is not installed: pip install transformers")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # As train.py runs: fp32 matmuls on a GPU's TF32 units, which the fp32 MFU's datasheet peak
    # (gpt/mfu.py) assumes. Both contenders, as both share this process.
    use_tf32(device)
    malloc = use_malloc(args.malloc, device)
    log(f"allocator: {malloc}")
    results = []
    for shape in args.shapes:
        for dtype in args.dtypes:
            log(f"train {shape} {dtype} on {device} ...")
            r = run_case(shape, dtype, device=device, compile_ours=args.compile,
                         vocab_multiple=args.vocab_multiple, budget_s=args.budget_s, peak=case_peak(device, dtype))
            print(f"{shape} {dtype}: params {r['params_ours']:,} (peer {r['params_peer']:,}, "
                  f"attention {r['peer_attention']})\n{format_case(r)}", flush=True)
            results.append(r)
    path = write_json(args.out, {"benchmark": "train step vs Hugging Face GPT2LMHeadModel",
                                 "machine": machine(), "malloc": malloc, "results": results})
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
