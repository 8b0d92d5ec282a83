"""A training run's folder, recognized by its files: the names every part agrees on, whether a
path is (or lies inside) a run or a checkpoint, and the runs beside a path that does not exist.

    out_dir/
      checkpoints/step_NNNNNNN/   manifest.json, state.json, weights (gpt/checkpoint/)
      latest                      the newest complete checkpoint's name
      metrics.jsonl, config.json

No torch here: data prep (which must never write into a run), gpt.plot and the checkpoint
package (gpt/checkpoint/layout.py takes these names from here) all ask it.
"""

from __future__ import annotations

import difflib
import itertools
import os
from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
STATE_FILE = "state.json"


def training_output(path: Path, anywhere_in_run: bool = False) -> str | None:
    """What part of a training run `path` is or lies inside, in words ("is a checkpoint folder"),
    or None when it is no part of one.

    Replacing any of these would lose checkpoints or leave `latest` naming a broken one (a
    checkpoint's tokenizer.json is in its manifest), so prep and export never write there. A run
    folder holds `latest` or `checkpoints/`; a checkpoint folder holds manifest.json and
    state.json. Other folders inside a run (not checkpoints/) count only with `anywhere_in_run`.
    """
    path = Path(path).resolve()
    if is_checkpoint_folder(path):
        return "is a checkpoint folder"
    if (path / LATEST_FILE).is_file() or (path / CHECKPOINTS_DIR).is_dir():
        return "is a training run folder"
    for parent in path.parents:
        if is_checkpoint_folder(parent):
            return f"is inside the checkpoint folder {parent}"
        # Two marks, not one: any folder may happen to hold a subfolder named "checkpoints".
        if (parent / LATEST_FILE).is_file() and (parent / CHECKPOINTS_DIR).is_dir():
            if path == parent / CHECKPOINTS_DIR:
                return f"is the checkpoints folder of the training run {parent}"
            if path.is_relative_to(parent / CHECKPOINTS_DIR):
                return f"is inside the checkpoints folder of the training run {parent}"
            if anywhere_in_run:
                return f"is inside the training run folder {parent}"
    return None


def is_checkpoint_folder(folder: Path) -> bool:
    """Whether `folder` is a checkpoint of this project (step_NNNNNNN/ or a consolidated one)."""
    # Both files: manifest.json alone is common elsewhere (browser extensions, web apps).
    return (folder / MANIFEST_FILE).is_file() and (folder / STATE_FILE).is_file()


def siblings(path: Path, holds: str | tuple[str, ...]) -> list[str]:
    """The names of the folders beside `path` (not itself) that hold a file or folder named in
    `holds`, sorted; [] where the parent cannot be listed."""
    try:  # the first 1,000 entries: a parent such as /tmp may hold a great many
        entries = list(itertools.islice(path.parent.iterdir(), 1000))
    except OSError:
        return []
    marks = (holds,) if isinstance(holds, str) else holds
    # os.path's tests: a sibling this user may not read has none (Path's would raise EACCES).
    return sorted(p.name for p in entries if p.name != path.name and any(os.path.exists(p / m) for m in marks))


def looks_like(path: Path, names: list[str]) -> Path | None:
    """The sibling among `names` that `path` looks like a typo of (lr_3e3 for lr_3e-3), or None."""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return path.parent / close[0] if close else None


def nearby_runs(path: Path) -> str:
    """The run folders beside a path that does not exist, and the one it looks like a typo of
    (`--out_dir out/shakespeare_char` for out/shakespeare_char_cpu); "" where there are none."""
    runs = siblings(path, (LATEST_FILE, CHECKPOINTS_DIR))
    checkpoints = [name for name in siblings(path, MANIFEST_FILE) if name not in runs]
    found = runs + checkpoints
    if not found:
        return ""
    meant = looks_like(path, found)
    kinds = " and ".join(kind for kind, names in (("run folders", runs), ("checkpoint folders", checkpoints)) if names)
    return ((f"; did you mean {meant}?" if meant else "")
            + f" ({kinds} in {path.parent}: {', '.join(found[:10])}{', ...' if len(found) > 10 else ''})")
