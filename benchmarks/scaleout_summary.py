"""The summary of benchmarks/gpu_scaleout.sh: median figures of each strategy's run, printed as a
table and written to a results JSON.

    python benchmarks/scaleout_summary.py RUNS SKIP RESULTS NPROC BATCH STRATEGY...

RUNS holds one run folder per strategy (metrics.jsonl, config.json), as the script leaves them.
The settings recorded (compile, device, dtype...) are those config.json says train.py ran with.
A figure that a run logged as null (MFU where the device has no datasheet peak, a loss that was
not finite) is left out of its median; a figure null at every step is null in the JSON and
'n/a' in the table, never a failure after the GPU time was spent; so is a strategy whose
metrics.jsonl holds no record, and the vocabulary when the dataset's meta.json is gone. What
cannot be summarized (a missing folder or file, a line that is not a JSON record, a figure that
is not a number, an argument that is not a count) is one line "error: ..." naming it, exit 1
(2 for the arguments), not a traceback.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

# `python benchmarks/scaleout_summary.py` puts benchmarks/, not the repository, on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402  (for the GPU's name and the version in the results)

from benchmarks.cli import whole_number  # noqa: E402
from gpt import parallel  # noqa: E402
from gpt.metrics import MetricsError, read_metrics  # noqa: E402


# The figures summarize() takes the median of (and the loss it reports), as metrics.jsonl names them.
FIGURES = ("tokens_per_s", "tokens_per_s_per_device", "mfu", "step_ms", "loss")
# What the header line and the results need from a run's config.json.
CONFIG_KEYS = ("data_dir", "n_layer", "n_head", "n_embd", "block_size", "device", "dtype", "optimizer", "compile")


class SummaryError(Exception):
    """Something the summary cannot read: its message names the file and what is wrong."""


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (gpt.metrics.read_metrics: a last line cut short by a kill
    is skipped); a SummaryError names the file and line of a bad one, or a figure not a number."""
    if path.is_dir():  # read_metrics would look inside it for a run's metrics.jsonl
        raise SummaryError(f"{path}: is a folder, not a metrics file")
    try:
        records = read_metrics(path)
    except MetricsError as e:
        if not path.exists():
            raise SummaryError(f"{path}: not found (did this strategy's run happen?)") from None
        raise SummaryError(str(e)) from None
    for number, record in enumerate(records, 1):
        for key in FIGURES:
            value = record.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise SummaryError(f"{path}: record {number} (step {record['step']}): {key} is {value!r}, "
                                   f"not a number")
    return records


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SummaryError(f"{path}: not found ({what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SummaryError(f"{path}: cannot be read ({e})") from None
    except ValueError as e:
        raise SummaryError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise SummaryError(f"{path}: not a JSON object ({what})")
    return data


def read_config(path: Path) -> dict[str, Any]:
    """A run's config.json (what train.py really ran), with the keys the summary prints."""
    c = read_json_object(path, "the run's settings, written by train.py")
    missing = [key for key in CONFIG_KEYS if key not in c]
    if missing:
        raise SummaryError(f"{path}: no {', '.join(missing)} (not a train.py config.json?)")
    return c


def compiled(c: dict[str, Any]) -> bool:
    """Whether train.py compiled the model, from its config.json: compile 'auto' (or 'true', as
    --compile=1 and yes are stored) resolved as the trainer resolves it, on this machine's devices."""
    device = c["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"  # (auto's mps is never compiled)
    return parallel.compile_enabled(c["compile"], torch.device(device))


def read_vocab(data_dir: Any) -> int | None:
    """The dataset's vocabulary from its meta.json, or None (n/a) where it is gone or unreadable:
    it only labels the results."""
    try:
        vocab = json.loads((Path(data_dir) / "meta.json").read_text())["vocab_size"]
    except (OSError, ValueError, TypeError, KeyError) as e:
        print(f"note: no vocabulary from {Path(str(data_dir)) / 'meta.json'} ({type(e).__name__}: {e}); "
              "the results say vocab n/a", file=sys.stderr)
        return None
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def _count(text: str, name: str, least: int) -> int:
    try:
        return whole_number(text, least)
    except argparse.ArgumentTypeError as e:
        raise SummaryError(f"{name} {e}") from None


def median_or_none(values) -> float | None:
    """The median of the values that are not None, or None when none is left."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: Path, strategies: list[str], skip: int) -> dict[str, dict[str, Any]]:
    """Per strategy, the medians of its logged steps after the first `skip` (all of them if no
    more were logged) and its final loss."""
    rows = {}
    for strategy in strategies:
        records = read_records(runs / strategy / "metrics.jsonl")
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
    usage = __doc__.split("\n\n")[1].strip()
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if len(argv) < 6:
        print(usage, file=sys.stderr)
        return 2
    try:
        skip = _count(argv[1], "SKIP", 0)
        nproc, batch = _count(argv[3], "NPROC", 1), _count(argv[4], "BATCH", 1)
    except SummaryError as e:
        print(f"error: {e}\n{usage}", file=sys.stderr)
        return 2
    runs, results = Path(argv[0]), Path(argv[2])
    strategies = argv[5:]
    try:
        if not runs.is_dir():
            raise SummaryError(f"{runs}: {'not a folder' if runs.exists() else 'no such folder'} "
                               "(RUNS: the folder of one run per strategy)")
        c = read_config(runs / strategies[0] / "config.json")  # what train.py really ran
        rows = summarize(runs, strategies, skip)
    except SummaryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    vocab = read_vocab(c["data_dir"])
    print(f"\n{c['n_layer']} x {c['n_head']} x {c['n_embd']}, block {c['block_size']}, {c['device']} "
          f"{c['dtype']}, {c['optimizer']}")
    print(table(rows))
    try:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps({
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "nproc": nproc, "batch_per_process": batch, "block": c["block_size"],
            "compile": compiled(c), "device": c["device"], "dtype": c["dtype"], "optimizer": c["optimizer"],
            "model": f"{c['n_layer']} x {c['n_head']} x {c['n_embd']}, vocab {'n/a' if vocab is None else vocab}",
            "results": rows,
        }, indent=1))
    except OSError as e:
        print(f"error: cannot write the results {results}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
