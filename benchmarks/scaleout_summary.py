"""The summary of benchmarks/gpu_scaleout.sh: median figures of each strategy's run, printed as a
table and written to a results JSON.

    python benchmarks/scaleout_summary.py RUNS SKIP RESULTS NPROC BATCH COMPILE STRATEGY...

RUNS holds one run folder per strategy (metrics.jsonl, config.json), as the script leaves them.
A figure that a run logged as null (MFU where the device has no datasheet peak, a loss that was
not finite) is left out of its median; a figure null at every step is null in the JSON and
'n/a' in the table, never a failure after the GPU time was spent.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any


def median_or_none(values) -> float | None:
    """The median of the values that are not None, or None when none is left."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: Path, strategies: list[str], skip: int) -> dict[str, dict[str, Any]]:
    """Per strategy, the medians of its logged steps after the first `skip` (all of them if no
    more were logged) and its final loss."""
    rows = {}
    for strategy in strategies:
        records = [json.loads(line) for line in (runs / strategy / "metrics.jsonl").read_text().splitlines()
                   if line.strip()]
        timed = records[skip:] or records
        rows[strategy] = {
            "tokens_per_s": median_or_none(r.get("tokens_per_s") for r in timed),
            "tokens_per_s_per_gpu": median_or_none(r.get("tokens_per_s_per_device") for r in timed),
            "mfu": median_or_none(r.get("mfu") for r in timed),
            "step_ms": median_or_none(r.get("step_ms") for r in timed),
            "final_loss": records[-1].get("loss") if records else None,
            "steps_timed": len(timed),
        }
    return rows


def _cell(value: float | None, spec: str, width: int, scale: float = 1.0, suffix: str = "") -> str:
    text = "n/a" if value is None else f"{value * scale:{spec}}{suffix}"
    return f"{text:>{width}}"


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'strategy':<8} {'tokens/s':>12} {'per GPU':>12} {'MFU':>7} {'ms/step':>9} {'loss':>7}"]
    for strategy, r in rows.items():
        lines.append(" ".join([
            f"{strategy:<8}", _cell(r["tokens_per_s"], ",.0f", 12), _cell(r["tokens_per_s_per_gpu"], ",.0f", 12),
            _cell(r["mfu"], ".1f", 7, 100, "%"), _cell(r["step_ms"], ".1f", 9), _cell(r["final_loss"], ".3f", 7),
        ]))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) < 7:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    runs, skip, results, nproc, batch, compile_ = Path(argv[0]), int(argv[1]), Path(argv[2]), *argv[3:6]
    strategies = argv[6:]
    c = json.loads((runs / strategies[0] / "config.json").read_text())  # what train.py really ran
    vocab = json.loads((Path(c["data_dir"]) / "meta.json").read_text())["vocab_size"]
    rows = summarize(runs, strategies, skip)
    print(f"\n{c['n_layer']} x {c['n_head']} x {c['n_embd']}, block {c['block_size']}, {c['device']} "
          f"{c['dtype']}, {c['optimizer']}")
    print(table(rows))
    import torch  # only for the GPU's name and the version: the table comes first, whatever happens

    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "nproc": int(nproc), "batch_per_process": int(batch), "block": c["block_size"],
        "compile": compile_ == "true", "device": c["device"], "dtype": c["dtype"], "optimizer": c["optimizer"],
        "model": f"{c['n_layer']} x {c['n_head']} x {c['n_embd']}, vocab {vocab}",
        "results": rows,
    }, indent=1))
    print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
