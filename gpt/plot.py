"""Plot training curves from runs' metrics.jsonl files into one PNG.

    python -m gpt.plot RUN [RUN ...] [--out FILE] [--title TEXT]

One row per quantity (train and val loss, learning rate, tokens/s), against optimizer steps in
the left column and against tokens seen in the right one: runs with different batch sizes
compare fairly on the token axis. Several runs are overlaid, one colour each (train loss
solid, val loss dashed with dots). The default output is RUN/metrics.png for one run folder
(out/a/metrics.jsonl given as a file: out/a/metrics.png too) and ./metrics_a+b_HASH.png for the
runs out/a and out/b (HASH: of their paths, so that two sweeps' runs of one name get two images).
Needs the `plot` extra: pip install 'gpt-from-scratch[plot]'.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m` this tool: a Ctrl-C while torch imports is one line too
    from gpt.early_signals import ImportInterrupted

    ImportInterrupted.install("interrupted: stopped before plotting")

import argparse
import hashlib
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import ArgumentParser, path_arg, path_or_default_arg
from .console import report
from .metrics import METRICS_FILE, MetricsError, read_metrics
from .run_layout import CHECKPOINTS_DIR, LATEST_FILE, nearby_runs

ROWS = (
    ("loss", "loss (nats/token)"),
    ("lr", "learning rate"),
    ("tokens_per_s", "tokens/s"),
)
X_AXES = (("step", "step"), ("tokens", "tokens seen"))


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_runs(runs: Sequence[str | Path],
              warn: Callable[[str], None] = _to_stderr) -> dict[str, list[dict[str, Any]]]:
    """{label: records} for each run folder (or metrics file). A run with nothing to plot yet (no
    metrics.jsonl, or an empty one: it has not logged a step) is an error alone, and left out
    with a warning among others (`gpt.plot out/sweep/*` while some runs still start)."""
    loaded = _load(runs, warn)
    return dict(zip(_labels(list(loaded)), loaded.values()))


def _load(runs: Sequence[str | Path], warn: Callable[[str], None]) -> dict[Path, list[dict[str, Any]]]:
    """`load_runs`' records by the path each run was given as."""
    paths = [Path(run) for run in runs]
    loaded: dict[Path, list[dict[str, Any]]] = {}
    not_yet: list[str] = []
    seen: dict[Path, Path] = {}  # each metrics file once: a run given twice would be one legend entry
    for path in paths:
        _check_is_a_run(path)
        file = path / METRICS_FILE if path.is_dir() else path
        if file.resolve() in seen:
            warn(f"warning: {path} is {seen[file.resolve()]} again; plotted once")
            continue
        seen[file.resolve()] = path
        if path.is_dir() and not file.exists():
            records = []  # a run that has started (its folder is made first) but not logged yet
        else:
            records = read_metrics(path)
        if not records:
            if len(paths) == 1:
                raise MetricsError(f"{file} {_nothing_in(file)}: the run has not logged a step yet")
            not_yet.append(str(path))
            continue
        loaded[path] = records
    if not loaded:
        raise MetricsError(f"none of these runs has logged a step yet: {', '.join(not_yet)}")
    if not_yet:
        warn(f"warning: left out, nothing logged yet: {', '.join(not_yet)}")
    return loaded


def _nothing_in(file: Path) -> str:
    """How a metrics file that gives no record stands: a run killed while writing its first line
    leaves that line cut short, which is not an empty file."""
    if not file.exists():
        return "does not exist"
    return "holds only a line cut short" if file.read_text(errors="replace").strip() else "is empty"


def _check_is_a_run(path: Path) -> None:
    """What a path that is not a run is instead, said with the command that plots the run(s)."""
    if not path.exists():
        raise MetricsError(f"{path} does not exist{nearby_runs(path)}")
    inside = _run_above(path)
    if inside is not None:
        raise MetricsError(f"{path} is inside the run folder {inside}, which holds its {METRICS_FILE}: "
                           f"plot that folder (python -m gpt.plot {shlex.quote(str(inside))})")
    if path.is_dir() and not (path / METRICS_FILE).exists():
        runs = sorted(p.name for p in path.iterdir() if (p / METRICS_FILE).is_file())
        if runs:  # a sweep's parent folder
            shown = ", ".join(runs[:10]) + (", ..." if len(runs) > 10 else "")
            raise MetricsError(f"{path} holds no {METRICS_FILE} of its own but runs that have one ({shown}): "
                               f"plot them with python -m gpt.plot {shlex.quote(str(path))}/*")


def _labels(paths: list[Path]) -> list[str]:
    """Each run's name in the legend: its folder's name, with as many parent folders as it takes
    to tell runs of the same name apart (out/sweep/lr_3e-3 and out/sweepB/lr_3e-3). A metrics
    file of another name is named with its folder (a/metrics_old.jsonl beside a/metrics.jsonl:
    the two had one label, and one of them was dropped without a word)."""
    folders = [(p if p.is_dir() else p.parent if p.name == METRICS_FILE else p).resolve() for p in paths]
    depth = 1
    while depth < 6:
        labels = ["/".join(f.parts[-depth:]) for f in folders]
        if len(set(labels)) == len(labels):
            return labels
        depth += 1
    return [str(f) for f in folders]  # the same folder given twice


def _run_above(path: Path) -> Path | None:
    """The run folder a folder without metrics lies in (a checkpoint, checkpoints/, an export
    in the run), or None: those are what a newcomer passes in place of the run itself."""
    if not path.is_dir() or any((path / name).exists() for name in (METRICS_FILE, LATEST_FILE, CHECKPOINTS_DIR)):
        return None  # a run itself, one that has not logged yet too (a fine-tune in out/default/ft)
    # A run's marks beside its metrics, so that a stray metrics.jsonl higher up (a home folder)
    # is not taken for one.
    return next((p for p in path.resolve().parents if (p / METRICS_FILE).is_file()
                 and ((p / LATEST_FILE).is_file() or (p / CHECKPOINTS_DIR).is_dir())), None)


def _series(records: list[dict[str, Any]], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    points = [(r[x_key], r[y_key]) for r in records
              if isinstance(r.get(x_key), (int, float)) and isinstance(r.get(y_key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


IMAGE_SUFFIXES = (".png", ".pdf", ".svg")


def _image_path(out: Path) -> Path:
    """--out checked: an image file's name (no suffix: .png)."""
    if out.is_dir():
        raise MetricsError(f"--out {out} is a folder; name the image file to write, e.g. {out / 'metrics.png'}")
    if not out.suffix:
        out = out.with_suffix(".png")
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise MetricsError(f"--out {out}: write a {', '.join(IMAGE_SUFFIXES)} file, not {out.suffix}")
    return out


def plot_runs(runs: Sequence[str | Path], out: str | Path | None = None, title: str | None = None) -> Path:
    """Draw the runs' curves into the image `out` (.png, or .pdf / .svg; no suffix: .png;
    None or "": `default_output` of the runs drawn, those left out not named in it); return its path."""
    out = _image_path(Path(out)) if out else None  # "" (--out=$UNSET) too: Path("") is "."
    # Before matplotlib: a bad run folder is the first thing to hear of.
    found = _load(runs, _to_stderr)
    out = default_output([str(path) for path in found]) if out is None else out
    loaded = dict(zip(_labels(list(found)), found.values()))
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    except ImportError:
        raise MetricsError("plotting needs matplotlib: pip install 'gpt-from-scratch[plot]' "
                           "(or pip install matplotlib)") from None
    fig = Figure(figsize=(12, 10), layout="constrained")
    axes = fig.subplots(len(ROWS), len(X_AXES), squeeze=False)
    colors = [f"C{i % 10}" for i in range(len(loaded))]
    for (label, records), color in zip(loaded.items(), colors):
        for col, (x_key, x_label) in enumerate(X_AXES):
            for row, (y_key, y_label) in enumerate(ROWS):
                ax = axes[row][col]
                xs, ys = _series(records, x_key, y_key)
                name = f"{label} train" if y_key == "loss" else label
                # A marker per point while there are few, so a short run is not invisible.
                ax.plot(xs, ys, color=color, linewidth=1.2, label=name,
                        marker="." if len(xs) < 30 else None)
                if y_key == "loss":
                    vx, vy = _series(records, x_key, "val_loss")
                    if vx:
                        ax.plot(vx, vy, color=color, linestyle="--", marker="o", markersize=3,
                                label=f"{label} val")
                ax.set_xlabel(x_label)
                ax.set_ylabel(y_label)
                ax.grid(True, alpha=0.3)
    for ax in axes[0]:
        ax.legend(fontsize="small")
    fig.suptitle(title or "training curves: " + ", ".join(loaded))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    except OSError as e:  # a parent that is a file, a full disk, a read-only file system: was a traceback
        raise MetricsError(f"--out {out}: cannot write the image ({e}); choose another "
                           f"--out") from None
    return out


def default_output(runs: Sequence[str]) -> Path:
    """RUN/metrics.png for one run; for several, an image in the current folder named after them
    (metrics_a+b_HASH.png, the hash of their paths: two sweeps' runs of the same names are other
    runs). Plotting the same runs again replaces their plot, and no other. A fixed ./metrics.png
    replaced whatever plot had that name, a run's own where run from its folder. (Not into the
    sweep's folder that holds them: `gpt.plot sweep/*` would then take the image for a run.)"""
    if len(runs) == 1:
        run = Path(runs[0])
        # A run's metrics file given itself: the image goes beside it, as for its folder (not
        # into the current folder, where it would replace another run's metrics.png).
        return run / "metrics.png" if run.is_dir() else run.with_suffix(".png")
    folders = [(p.parent if p.is_file() else p).resolve() for p in map(Path, runs)]
    names = [re.sub(r"[^\w.+-]", "_", folder.name or "root") for folder in folders]
    joined = "+".join(names)
    if len(joined) > 80:  # a sweep of many runs: a file name has a length limit
        joined = f"{names[0]}+{len(names) - 1}_more"
    digest = hashlib.sha1("\n".join(map(str, folders)).encode("utf-8", "surrogateescape")).hexdigest()[:6]
    return Path(f"metrics_{joined}_{digest}.png")


def _without_images(runs: list[str]) -> list[str]:
    """The runs but image files among them, each said: `gpt.plot *` in a sweep's folder (or
    `gpt.plot sweep/*` beside an image there) takes an earlier plot for a run, and failed on it."""
    images = [r for r in runs if Path(r).suffix.lower() in IMAGE_SUFFIXES and Path(r).is_file()]
    if not images or len(images) == len(runs):
        return runs  # (only images: the error for what was given)
    print(f"warning: left out, images (an earlier plot?): {', '.join(images)}", file=sys.stderr)
    return [r for r in runs if r not in images]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m gpt.plot",
        description="Plot loss, learning rate and tokens/s of one or more runs from their metrics.jsonl.",
        allow_abbrev=False,
    )
    parser.add_argument("runs", nargs="+", type=path_arg, metavar="RUN",
                        help="run folder (out_dir) or metrics.jsonl file")
    parser.add_argument("--out", default=None, type=path_or_default_arg,
                        help="image to write: .png, .pdf or .svg; no suffix: .png (default: RUN/metrics.png for "
                             "one run folder, FILE.png beside one metrics file, ./metrics_A+B_HASH.png for the runs A and B)")
    parser.add_argument("--title", default=None, help="figure title (default: 'training curves: ' and the run names)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import report_errors

    def run() -> None:
        args = build_parser().parse_args(argv)
        runs = _without_images(args.runs)
        out = plot_runs(runs, args.out, args.title)
        report(f"wrote {out}")

    return report_errors(run, interrupted="interrupted: stopped plotting")


if __name__ == "__main__":
    sys.exit(main())
