"""Train configs/shakespeare_char_cpu.toml on tiny-Shakespeare and report val loss, wall time, speed.

    python benchmarks/bench_shakespeare.py [--input TEXT] [--out NAME] [--key=value ...]   # extra keys go to train.py

--input: the tiny-Shakespeare text (default: ../shared/data/tinyshakespeare.txt beside the
repository; data_prep/shakespeare.py's URL is where to download it).
--out: the results file, benchmarks/results/NAME.json (default: shakespeare_char_cpu, the
committed one); a trial run can name another. Every other --key=value is train.py's (not
--config, --data_dir or --out_dir: this script sets those).

Reference point (measured on this project's 2-core CPU machines): the well-known nanoGPT CPU
recipe of this shape (4 x 128, context 64, batch 12, 2000 iterations, lr 1e-3) reaches val loss
1.886 in 1 min 58 s wall (54 ms per step, 14,200 tokens/s, 372 MB peak RSS).
Goal: val loss <= 1.75 within the same wall time on the same machine. Run it on a quiet machine:
another CPU-heavy job at the same time makes every figure meaningless.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.cli import results_name, text_file_problem  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from gpt.eval import evaluate_split, load_for_eval  # noqa: E402
from gpt.metrics import read_metrics  # noqa: E402
from gpt.mfu import measure_matmul_flops  # noqa: E402
from gpt.prepare import prepare  # noqa: E402

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
REFERENCE = {"val_loss": 1.886, "wall_s": 118.0, "tokens_per_s": 14200, "peak_rss_mb": 372}
# What the machine does on a large fp32 matmul (2 cores): the reference was timed there.
REFERENCE_MATMUL_GFLOPS = 180.0
GOAL_VAL_LOSS = 1.75


# train.py keys this script sets itself: given again, the run would read another dataset or
# write where the figures are not read from (a traceback after the whole run), or name two configs.
OWN_KEYS = ("config", "data_dir", "out_dir")


def parse(argv: list[str]) -> tuple[Path, list[str], str]:
    """(the text file, the overrides for train.py: every argument but --input and --out, the
    results name). No abbreviations: --out_dir and --out-dir are train.py's, never --out."""
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=SHAKESPEARE, help="the tiny-Shakespeare text")
    # Without it every run, a trial's too, replaced the committed results/shakespeare_char_cpu.json.
    parser.add_argument("--out", type=results_name, default="shakespeare_char_cpu",
                        help="results file: benchmarks/results/OUT.json (default: shakespeare_char_cpu)")
    args, overrides = parser.parse_known_args(argv)
    for arg in overrides:
        key = arg[2:].split("=", 1)[0].replace("-", "_") if arg.startswith("--") else None
        if key in OWN_KEYS:
            parser.error(f"{arg.split('=', 1)[0]}: this script sets it (the run is in a temporary folder)")
    problem = text_file_problem(args.input)
    if problem is not None:
        raise SystemExit(f"error: {args.input} {problem}; pass --input with the tiny-Shakespeare text "
                         f"(data_prep/shakespeare.py's URL is where to download it)")
    return args.input, overrides, args.out


def main(argv: list[str]) -> dict:
    text, overrides, results = parse(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_shakespeare_"))
    try:
        result = run_and_report(text, overrides, results, work)
    except Exception:
        # A failure after the prep or the training (reading the metrics, the whole-split eval):
        # what it left is what to look into. (train.py's own failure names the folder already.)
        print(f"the prepared data and run are in {work}", file=sys.stderr, flush=True)
        raise
    # The prepared data and the run's checkpoints (tens of MB) are only the figures' means; a
    # failed run keeps them to be looked into.
    shutil.rmtree(work, ignore_errors=True)
    return result


def run_and_report(text: Path, overrides: list[str], results: str, work: Path) -> dict:
    data = work / "shakespeare_char"
    # nanoGPT's split: first 90% of the characters train, last 10% val.
    prepare(data, text, tokenizer="char", val_fraction=0.1, val_rule="tail", progress=False)
    out = work / "run"
    command = [sys.executable, "train.py", "--config", "configs/shakespeare_char_cpu.toml",
               f"--data_dir={data}", f"--out_dir={out}", *overrides]
    print("running:", " ".join(command), flush=True)
    start = time.perf_counter()
    code = subprocess.run(command, cwd=REPO).returncode
    if code != 0:
        # A bad --key=value, a stop signal: train.py has said why above; not a traceback here.
        raise SystemExit(f"error: train.py exited with status {code} (its output is above); "
                         f"the prepared data and run are in {work}")
    wall = time.perf_counter() - start
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e6  # Linux: KiB

    records = read_metrics(out)
    evals = [r for r in records if "val_loss" in r]
    # Process start to the training loop's start: imports, data checks, model build.
    startup_s = wall - records[-1]["elapsed_s"]
    in_budget = [r for r in evals if startup_s + r["elapsed_s"] <= REFERENCE["wall_s"]]
    # The trainer's val loss is a fixed sample of eval_iters random windows; score the whole
    # val split too (every token once, gpt/eval.py) so luck in that sample cannot flatter us.
    model, _, tokenizer, _ = load_for_eval(str(out), None, torch.device("cpu"))
    full_val = evaluate_split(model, data, tokenizer, "val", batch_size=64)
    matmul_gflops = measure_matmul_flops(torch.device("cpu"), torch.float32, max_seconds=1.5) / 1e9
    speeds = [r["tokens_per_s"] for r in records[1:]] or [records[0]["tokens_per_s"]]
    step_ms = [r["step_ms"] for r in records[1:]] or [records[0]["step_ms"]]
    result = {
        "config": "configs/shakespeare_char_cpu.toml",
        "overrides": overrides,
        "steps": records[-1]["step"],
        "val_loss": evals[-1]["val_loss"],
        "best_val_loss": min(r["val_loss"] for r in evals),
        "val_loss_whole_split": round(full_val.loss, 4),
        "wall_s": round(wall, 1),
        "startup_s": round(startup_s, 1),
        "val_loss_within_reference_wall": (
            {"step": in_budget[-1]["step"], "val_loss": in_budget[-1]["val_loss"],
             "wall_s": round(startup_s + in_budget[-1]["elapsed_s"], 1)} if in_budget else None),
        "fp32_matmul_gflops": round(matmul_gflops, 1),
        "reference_machine_fp32_matmul_gflops": REFERENCE_MATMUL_GFLOPS,
        "tokens_per_s_median": round(statistics.median(speeds)),
        "step_ms_median": round(statistics.median(step_ms), 1),
        "peak_rss_mb": round(peak_rss_mb),
        "reference_nanogpt": REFERENCE,
        "goal": f"val_loss <= {GOAL_VAL_LOSS} within {REFERENCE['wall_s']:.0f} s wall",
    }
    result["goal_met"] = result["val_loss"] <= GOAL_VAL_LOSS and wall <= REFERENCE["wall_s"]
    print()
    print(f"{'':22}{'ours':>12}{'nanoGPT ref':>14}")
    print(f"{'final val loss':22}{result['val_loss']:>12.4f}{REFERENCE['val_loss']:>14.3f}")
    print(f"{'  (whole val split)':22}{result['val_loss_whole_split']:>12.4f}{'':>14}")
    within = result["val_loss_within_reference_wall"]
    if within:
        print(f"{'val loss by 118 s':22}{within['val_loss']:>12.4f}{REFERENCE['val_loss']:>14.3f}"
              f"   (ours: step {within['step']}, {within['wall_s']} s)")
    print(f"{'wall time (s)':22}{result['wall_s']:>12.1f}{REFERENCE['wall_s']:>14.1f}")
    print(f"{'tokens/s (median)':22}{result['tokens_per_s_median']:>12,}{REFERENCE['tokens_per_s']:>14,}")
    print(f"{'ms/step (median)':22}{result['step_ms_median']:>12.1f}{54.0:>14.1f}")
    print(f"{'peak RSS (MB)':22}{result['peak_rss_mb']:>12,}{REFERENCE['peak_rss_mb']:>14,}")
    print(f"{'fp32 matmul GFLOP/s':22}{result['fp32_matmul_gflops']:>12.1f}{REFERENCE_MATMUL_GFLOPS:>14.1f}"
          f"   (the machine's speed: the reference was timed on a "
          f"{'faster' if REFERENCE_MATMUL_GFLOPS > result['fp32_matmul_gflops'] else 'slower'} one)")
    print(f"goal ({result['goal']}): {'met' if result['goal_met'] else 'NOT met'}")
    print(f"wrote {write_json(results, result)}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
