"""A run's checkpoints at a glance (`python -m gpt.checkpoint list RUN`): which steps are kept,
the val loss each recorded, how large each is, and which ones `latest` and `best` are.

Read from each checkpoint's manifest.json and state.json alone (no weights are loaded), so it
answers at once, also while the run is training and saving.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from .find import EARLIER_EVAL, complete_checkpoints, latest_checkpoint, latest_name, lowest_loss, own_loss, saved_eval
from ..run_layout import nearby_runs, training_output
from .layout import CHECKPOINTS_DIR, CheckpointError, step_of
from .verify import checkpoint_format, newer_format_version, read_manifest


def list_checkpoints(run: str | os.PathLike) -> list[dict[str, Any]]:
    """One dict per complete checkpoint of `run`, oldest first: path, step, val_loss (None when
    the run had not evaluated yet), val_loss_step (the step it was measured at: an earlier one for
    a stop signal's save between evals; None where state.json predates it), format, bytes, latest
    (what a resume or `sample.py --out_dir` reads) and best (the lowest val loss measured on the
    checkpoint's own weights; what keep_best keeps). A step folder this user may not look into is
    listed too, with `unreadable` true and nothing else known of it."""
    run = Path(run)
    if not run.is_dir():
        raise CheckpointError(f"{run} is not a folder; give a run folder (out_dir){nearby_runs(run)}")
    inside = training_output(run)
    if inside is not None and inside != "is a training run folder":  # a checkpoint, or checkpoints/
        raise CheckpointError(f"{run} {inside}: list the run itself (its out_dir)")
    unreadable: list[Path] = []
    found = complete_checkpoints(run, unreadable=unreadable)
    if not found and not unreadable:
        raise CheckpointError(f"{run} holds no complete checkpoint (checkpoints/step_*/ with a manifest.json): "
                              f"give a run folder (out_dir) that has saved one")
    try:
        latest = latest_checkpoint(run)
    except CheckpointError:
        latest = None  # `latest` names a missing folder: every row still lists
    except PermissionError:  # it names a folder this user may not look into (listed below)
        latest = run / CHECKPOINTS_DIR / str(latest_name(run))
    evals = [saved_eval(ckpt_dir) for ckpt_dir in found]  # each state.json read once
    best = lowest_loss(own_loss(ckpt_dir, evaluated) for ckpt_dir, evaluated in zip(found, evals))
    rows = []
    for index, (ckpt_dir, (loss, measured_at)) in enumerate(zip(found, evals)):
        try:
            size: int | None = sum(entry["bytes"] for entry in read_manifest(ckpt_dir).values())
            fmt: str | None = checkpoint_format(ckpt_dir)
        except CheckpointError:  # pruned, or broken, since it was found: listed without them
            size = fmt = None
        rows.append({"path": str(ckpt_dir), "step": step_of(ckpt_dir.name), "val_loss": loss,
                     "val_loss_step": measured_at, "format": fmt, "bytes": size, "latest": ckpt_dir == latest,
                     "best": index == best, "newer_format_version": newer_format_version(ckpt_dir),
                     "unreadable": False})
    for ckpt_dir in unreadable:
        rows.append({"path": str(ckpt_dir), "step": step_of(ckpt_dir.name), "val_loss": None, "val_loss_step": None,
                     "format": None, "bytes": None, "latest": ckpt_dir == latest, "best": False,
                     "newer_format_version": None, "unreadable": True})
    return sorted(rows, key=lambda row: row["step"])


def format_listing(run: str | os.PathLike, rows: list[dict[str, Any]]) -> str:
    """`rows` as a table, one line per checkpoint, and how to sample the best one."""
    lines = [f"checkpoints of {run}:", f"  {'step':>9}  {'val loss':>8}  {'format':<7}  {'size':>9}"]
    for row in rows:
        loss = f"{row['val_loss']:.4f}" if row["val_loss"] is not None else "-"
        size = f"{row['bytes'] / 1e6:,.1f} MB" if row["bytes"] is not None else "?"
        marks = [mark for mark in ("latest", "best") if row[mark]]
        if row["val_loss"] is not None and row["val_loss_step"] not in (None, row["step"]):
            # a stop between evals
            of = "an earlier eval" if row["val_loss_step"] == EARLIER_EVAL else f"step {row['val_loss_step']:,}"
            marks.append(f"val loss of {of}, carried on")
        if row["unreadable"]:
            marks.append(f"this user may not read it: ls -ld {shlex.quote(row['path'])}")
        if row["newer_format_version"] is not None:  # every reader here refuses it: said before one is tried
            marks.append(f"format version {row['newer_format_version']}, newer than this code reads: git pull")
        lines.append(f"  {row['step']:>9,}  {loss:>8}  {row['format'] or '?':<7}  {size:>9}"
                     + (f"  ({', '.join(marks)})" if marks else ""))
    best = next((row for row in rows if row["best"]), None)
    if best is not None and not best["latest"]:
        lines.append(f"the best is not the latest: sample it with sample.py --ckpt {shlex.quote(str(best['path']))}")
    return "\n".join(lines)
