"""The speed suite: us and a well-known peer (Hugging Face GPT2LMHeadModel) on the same machine,
in one run, side by side; prints one table and writes benchmarks/results/*.json.

    python -m benchmarks                      # the CPU suite (3-7 minutes on 2 quiet cores)
    python -m benchmarks --parts train generate   # some parts: results/suite_generate_train.json
    python -m benchmarks --threads all        # every core even if other jobs are running (see below)
    python -m benchmarks --full               # also the slow cases (no-cache at batch 8; bf16 at 6 x 384 on a
                                              # CPU whose bf16 matmul is under half its fp32 rate)
    python -m benchmarks --compile            # also torch.compile'd ours in the training comparison
    python -m benchmarks --parts train --out-prefix trial   # a trial: results/trial_train.json, trial_suite_train.json

Parts:
  peak      measured fp32 and bf16 matmul FLOP/s (all threads) and, on GPUs, the datasheet peak
  train     fwd+bwd+AdamW tokens/s, ours vs peer: default config shape (4 x 128, ctx 128, batch
            16, vocab 4096) and shakespeare_char shape (6 x 384, ctx 256, batch 8, vocab 65),
            fp32 and bf16 autocast; MFU against the measured peaks (on a GPU, the datasheet's)
  generate  256-token greedy generation at batch 1 and 8: ours (KV cache) vs `generate` (its
            cache), and ours with vs without the cache; batch 1 under bf16 autocast too
  loader    TokenLoader tokens/s (benchmarks/bench_loader.py, small shard)
  data      data prep MB/s, char and BPE, on 8 MB of text (benchmarks/bench_data.py)
  rss       peak RSS of a short `python train.py` run of the 6 x 384 model (a child process)

Results: benchmarks/results/train.json and generate.json (the train and generate parts' rows)
and suite.json (everything, with the table), or suite_PARTS.json for some parts only. These are
the committed results: --out-prefix NAME writes NAME_train.json, NAME_generate.json and
NAME_suite[_PARTS].json in the same folder instead (as bench_train.py's and the others' --out
name their one file), so that a trial run replaces none of them.

Every comparison alternates its contenders in one process after warm-up and reports medians;
read the ratios, and the load average printed with each (other jobs on the machine slow both
sides, though not always alike: on a 2-core machine where another job holds one core, every
multi-threaded op waits for a descheduled thread, so ops count more than FLOPs; hence the
default --threads auto, which uses only the cores that are idle when the suite starts).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

# `python benchmarks/__main__.py` puts benchmarks/, not the repository, on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_generate, bench_resources, bench_train  # noqa: E402
from benchmarks.cli import device as device_name, positive_float, positive_int, results_prefix  # noqa: E402
from benchmarks.common import (MALLOC_CHOICES, MALLOC_HELP, check_malloc_env, busy_cores, format_per_round,  # noqa: E402
                               load_average, log, machine, peer_available, use_malloc, write_json)
from gpt.trainer import use_tf32  # noqa: E402

PARTS = ("peak", "train", "generate", "loader", "data", "rss")
# The goals, as numbers the table checks.
GOAL_TRAIN_RATIO = 1.3
GOAL_GENERATE_RATIO = 1.5
GOAL_CACHE_RATIO = 5.0
GOAL_MFU_OF_BF16 = 0.5


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--parts", nargs="+", choices=PARTS, help=f"default: all ({' '.join(PARTS)})")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", default="auto", type=thread_setting,
                   help="torch threads: a number, 'all' (torch's default: every core), or 'auto' "
                        "(default: every core not already busy, by CPU time used over 1 s)")
    p.add_argument("--full", action="store_true", help="also the slow cases")
    p.add_argument("--compile", action="store_true", help="also torch.compile'd ours when training")
    p.add_argument("--train-budget-s", type=positive_float, default=30.0, help="timed seconds per training case")
    p.add_argument("--malloc", choices=MALLOC_CHOICES, default="trainer", help=MALLOC_HELP)
    # Without it every run of the train or generate part, a trial's too, replaced the committed
    # results/train.json or generate.json.
    p.add_argument("--out-prefix", "--out_prefix", type=results_prefix, default=None, metavar="NAME",
                   help="write benchmarks/results/NAME_train.json, NAME_generate.json and "
                        "NAME_suite[_PARTS].json instead of the committed train.json, generate.json "
                        "and suite[_PARTS].json (default: those); a NAME that committed results start "
                        "with (gpu, s26) is refused")
    args = p.parse_args(argv)
    check_malloc_env()
    threads = choose_threads(args.threads)
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    use_tf32(device)  # as train.py runs on a GPU; the fp32 datasheet peak assumes it
    args.parts = parts_to_run(args.parts)

    started = time.perf_counter()
    suite: dict[str, Any] = {"machine": machine(), "load_avg_start": load_average(), "args": vars(args)}
    log(f"speed suite on {device}, {torch.get_num_threads()} threads, load {suite['load_avg_start']}")

    peak = bench_resources.peaks(device) if ({"peak", "train", "rss"} & set(args.parts)) else None
    if peak:
        suite["peak"] = peak
        log(f"peak: fp32 {peak['measured_float32_gflops']} GFLOP/s, bf16 {peak['measured_bfloat16_gflops']} GFLOP/s (measured)")
    # A CPU without native bf16 matmul (no AVX512-BF16 / AMX) runs bf16 far slower than fp32:
    # time only the small bf16 case there unless --full.
    slow_bf16 = bool(peak) and device.type == "cpu" and \
        peak["measured_bfloat16_gflops"] < 0.5 * peak["measured_float32_gflops"]

    if "generate" in args.parts:
        suite["generate"] = []
        for batch, dtype in ((1, "float32"), (8, "float32"), (1, "bfloat16")):
            log(f"generate batch {batch} {dtype} ...")
            r = bench_generate.run_case(batch, 255, no_cache=dtype == "float32" and (batch == 1 or args.full),
                                        device=device, dtype=dtype)
            log(bench_generate.format_case(r))
            suite["generate"].append(r)
        write_json(results_file("generate", args.out_prefix),
                   {"benchmark": "generation vs Hugging Face generate", "machine": suite["machine"],
                    "results": suite["generate"]})

    if "train" in args.parts:
        # After generation, which sample.py runs with the C library's allocator as it is (the
        # trainer's setting made our decoding slower here), and process-wide from here on.
        suite["malloc"] = use_malloc(args.malloc, device)
        log(f"allocator for training: {suite['malloc']}")
        peaks_flops = {"fp32_peak": peak["measured_float32_gflops"] * 1e9,
                       "bf16_peak": peak["measured_bfloat16_gflops"] * 1e9}
        if device.type == "cuda":
            peaks_flops = {k: v for k, v in (("datasheet_bf16", peak.get("datasheet_bfloat16_gflops")),
                                             ("datasheet_fp32", peak.get("datasheet_float32_gflops"))) if v}
            peaks_flops = {k: v * 1e9 for k, v in peaks_flops.items()}
        cases = [("default", "float32"), ("shakespeare_char", "float32"), ("default", "bfloat16"),
                 ("shakespeare_char", "bfloat16")]
        suite["train"] = []
        for shape, dtype in cases:
            if dtype == "bfloat16" and slow_bf16 and shape != "default" and not args.full:
                suite["train"].append({"shape": shape, "dtype": dtype, "skipped":
                                       "this CPU's bf16 matmul is far slower than fp32 (see peak); --full runs it"})
                continue
            log(f"train {shape} {dtype} ...")
            slow = dtype == "bfloat16" and slow_bf16
            r = bench_train.run_case(shape, dtype, device=device, compile_ours=args.compile,
                                     budget_s=args.train_budget_s, min_rounds=3,
                                     max_rounds=3 if slow else 10, peak=peaks_flops)
            log(bench_train.format_case(r))
            suite["train"].append(r)
        write_json(results_file("train", args.out_prefix),
                   {"benchmark": "train step vs Hugging Face GPT2LMHeadModel", "machine": suite["machine"],
                    "malloc": suite["malloc"], "peak": peak, "results": suite["train"]})

    if "loader" in args.parts:
        log("loader ...")
        suite["loader"] = bench_resources.loader()
    if "data" in args.parts:
        log("data prep ...")
        suite["data"] = bench_resources.data_prep()
    if "rss" in args.parts:
        log("peak RSS of training ...")
        # MFU in the trainer's own log against the suite's measured fp32 peak (not its own
        # start-up measurement, which a busy moment can make too low).
        # (training_rss runs train.py on the CPU: a GPU's peak is not its peak.)
        cpu_peak = peak["measured_float32_gflops"] if peak and device.type == "cpu" else None
        extra = (f"--peak_tflops={cpu_peak / 1e3}",) if cpu_peak else ()
        suite["rss"] = bench_resources.training_rss(extra=extra)

    suite["wall_s"] = round(time.perf_counter() - started, 1)
    suite["load_avg_end"] = load_average()
    suite["table"] = table(suite)
    print("\n".join(suite["table"]))
    # A run of some parts must not replace the whole suite's record: it gets a file of its own.
    name = "suite" if set(args.parts) == set(PARTS) else "suite_" + "_".join(sorted(args.parts))
    path = write_json(results_file(name, args.out_prefix), suite)
    print(f"wrote {path}")
    return suite


def results_file(name: str, prefix: str | None) -> str:
    """The results name `name` (train, generate, suite...), after --out-prefix if given."""
    return name if prefix is None else f"{prefix}_{name}"


def parts_to_run(asked: list[str] | None) -> list[str]:
    """The parts given, or all of them. Without transformers the whole suite used to stop at
    once, its peer-free parts too: they still run, and the two that time the peer are skipped
    with a note; asked for by name, they are an error."""
    peer_parts = [part for part in ("train", "generate") if part in (asked or PARTS)]
    if not peer_parts or peer_available():
        return list(asked or PARTS)
    if asked:
        raise SystemExit(f"--parts {' '.join(peer_parts)}: these time the peer, which needs transformers: "
                         "pip install transformers (or leave them out)")
    log("transformers is not installed: skipping the train and generate parts (both time the peer, "
        "Hugging Face GPT-2); pip install transformers to run them")
    return [part for part in PARTS if part not in peer_parts]


def thread_setting(text: str) -> str:
    """--threads: 'auto', 'all' or a positive count, checked before minutes of benchmarking."""
    if text in ("auto", "all"):
        return text
    try:
        positive_int(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; or 'auto' or 'all'") from None
    return text


def choose_threads(setting: str) -> int:
    """'auto': one thread per core not already busy. Measured on a 2-core machine where another
    job kept one core busy: with 2 threads every multi-threaded op waited for the descheduled
    second thread (an erf GELU on 1,536 numbers: 8 ms instead of 24 us; a batch-8 decode step:
    180 ms instead of 12 ms), so oversubscribing turns a compute benchmark into a scheduler one."""
    cores = torch.get_num_threads()
    if setting == "all":
        return cores
    if setting == "auto":
        return max(1, min(cores, cores - round(busy_cores())))
    return int(setting)


def _goal(value: float | None, goal: float) -> str:
    if value is None:
        return ""
    return f">= {goal:g}x: {'met' if value >= goal else 'NOT met'}"


def _per_round(r: dict[str, Any]) -> str:
    """The ratio taken round by round (common.per_round_ratio), where the results have it."""
    ratio = r.get("ratio_ours_over_peer_per_round")
    return f" ({format_per_round(ratio)})" if ratio else ""


def table(s: dict[str, Any]) -> list[str]:
    m = s["machine"]
    lines = [f"machine: {m['cpu']} ({', '.join(m['cpu_isa']) or 'no AVX2'}), {m['cpus']} CPUs, "
             f"{m['torch_threads']} torch threads; torch {m['torch']}, transformers {m['transformers']}; "
             f"load {s['load_avg_start']} -> {s['load_avg_end']}; suite {s['wall_s']:.0f} s",
             f"{'what':<46} {'ours':>12} {'peer':>12} {'ratio':>7}  goal / notes", "-" * 110]

    def row(what, ours, peer, ratio, note=""):
        def fmt(v):
            if not isinstance(v, (int, float)):
                return f"{v or '':>12}"
            return f"{v:12,.0f}" if abs(v) >= 100 else f"{v:12.2f}"
        r = f"{ratio:6.2f}x" if isinstance(ratio, (int, float)) else f"{'':>7}"
        lines.append(f"{what:<46} {fmt(ours)} {fmt(peer)} {r}  {note}")

    if "peak" in s:
        pk = s["peak"]
        row("peak matmul GFLOP/s, fp32 (measured)", pk["measured_float32_gflops"], None, None,
            "datasheet " + str(pk.get("datasheet_float32_gflops")) if "gpu" in pk else f"{pk['threads']} thread(s)")
        row("peak matmul GFLOP/s, bf16 (measured)", pk["measured_bfloat16_gflops"], None, None,
            "datasheet " + str(pk.get("datasheet_bfloat16_gflops")) if "gpu" in pk else
            ("no native bf16 matmul on this CPU" if not m.get("mkldnn_bf16") else ""))
    for r in s.get("train", []):
        what = f"train tok/s {r['shape']} {r['dtype']}"
        if "skipped" in r:
            row(what, "skipped", None, None, r["skipped"])
            continue
        res = r["results"]
        mfus = "; ".join(f"MFU ours {res['ours'][k] * 100:.1f}% / peer {res['peer'][k] * 100:.1f}% of "
                         f"{k.removeprefix('mfu_vs_')}"
                         for k in res["ours"] if k.startswith("mfu_vs_")
                         and (r["dtype"] == "bfloat16") == ("bf16" in k))
        row(what, res["ours"]["tokens_per_s"], res["peer"]["tokens_per_s"], r["ratio_ours_over_peer"],
            f"{_goal(r['ratio_ours_over_peer'], GOAL_TRAIN_RATIO)}{_per_round(r)}; {mfus}; load {r['load_avg_before']}")
        if "ours+compile" in res:
            row("  ... ours torch.compile'd", res["ours+compile"]["tokens_per_s"], res["peer"]["tokens_per_s"],
                r["ratio_ours_compiled_over_peer"], f"compile {r['compile_s']:.0f} s")
    shakespeare = [r for r in s.get("train", []) if r["shape"] == "shakespeare_char" and "results" in r]
    if shakespeare and "peak" in s:
        best = max(shakespeare, key=lambda r: r["results"]["ours"].get("achieved_gflops", 0))
        achieved = best["results"]["ours"].get("achieved_gflops")
        bf16 = s["peak"].get("datasheet_bfloat16_gflops") or s["peak"]["measured_bfloat16_gflops"]
        fp32 = s["peak"].get("datasheet_float32_gflops") or s["peak"]["measured_float32_gflops"]
        if achieved is not None:
            row("MFU goal: 6x384 ctx 256 training, GFLOP/s", achieved, None, None,
                f"best ours ({best['dtype']}) = {achieved / bf16 * 100:.0f}% of bf16 peak {bf16:g}, "
                f"{achieved / fp32 * 100:.0f}% of fp32 peak {fp32:g}; goal >= {GOAL_MFU_OF_BF16:.0%} of bf16 peak: "
                f"{'met' if achieved >= GOAL_MFU_OF_BF16 * bf16 and bf16 >= fp32 else 'NOT met'}"
                + (" (bf16 slower than fp32 here)" if bf16 < fp32 else ""))
    for r in s.get("generate", []):
        res = r["results"]
        row(f"generate tok/s batch {r['batch']} {r.get('dtype', 'float32')}, cache vs peer cache",
            res["ours_cache"]["tokens_per_s"],
            res["peer_cache"]["tokens_per_s"], r["ratio_ours_over_peer"],
            f"{_goal(r['ratio_ours_over_peer'], GOAL_GENERATE_RATIO)}{_per_round(r)}; same tokens "
            f"{all(r['same_tokens_as_ours_cache'].values())}; load {r['load_avg_before']}")
        if "ours_no_cache" in res:
            row(f"generate tok/s batch {r['batch']}, cache vs no cache", res["ours_cache"]["tokens_per_s"],
                res["ours_no_cache"]["tokens_per_s"], r["ratio_cache_over_no_cache"],
                f"{_goal(r['ratio_cache_over_no_cache'], GOAL_CACHE_RATIO)} (peer column: ours, no cache)"
                + (f"; {r['ratio_cache_over_no_cache_both_without_graph']:.2f}x with neither replaying a CUDA graph"
                   if "ratio_cache_over_no_cache_both_without_graph" in r else ""))
    for r in s.get("loader", []):
        row(f"loader tok/s batch {r['batch_size']} x {r['block_size']} {r['order']}", r["tokens_per_s"], None, None,
            f"{r['us_per_batch']:.0f} us/batch")
    for r in s.get("data", []):
        if "skipped" in r:
            row("data prep", "skipped", None, None, r["skipped"])
            continue
        row(f"data prep MB/s {r['tokenizer']} ({r['text_mb']:.1f} MB)", r["mb_per_s"], None, None,
            f"{r['tokens_per_s']:,} tok/s, peak RSS {r['peak_rss_mb']:.0f} MB"
            + (f" ({r['peak_rss_all_processes_mb']:.0f} MB with its workers)"
               if r.get("peak_rss_all_processes_mb") is not None else ""))
    if "rss" in s:
        r = s["rss"]
        if "skipped" in r:
            row("training peak RSS", "skipped", None, None, r["skipped"])
        else:
            sh = r["shape"]
            row(f"training peak RSS MB ({sh['n_layer']}x{sh['n_embd']}, ctx {sh['block_size']}, "
                f"batch {sh['batch_size']})", r["peak_rss_mb"], None, None,
                f"train.py {r['steps']} steps: {r['trainer_tokens_per_s_median']:,.0f} tok/s, trainer MFU "
                + ("n/a" if r["trainer_mfu_median"] is None else f"{r['trainer_mfu_median'] * 100:.1f}%"))
    return lines


if __name__ == "__main__":
    main()
