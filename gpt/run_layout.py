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
import json
import os
import re
from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
STATE_FILE = "state.json"
RUN_MARKS = (LATEST_FILE, CHECKPOINTS_DIR)  # a run folder holds one of them
CONFIG_FILE = "config.json"  # the run's resolved config (gpt/run_folder.py), from its start
METRICS_FILE = "metrics.jsonl"  # a line per log step (gpt/metrics.py)


def training_output(path: Path, anywhere_in_run: bool = False) -> str | None:
    """What part of a training run `path` is or lies inside, in words ("is a checkpoint folder"),
    or None when it is no part of one.

    Replacing any of these would lose checkpoints or leave `latest` naming a broken one (a
    checkpoint's tokenizer.json is in its manifest), so prep and export never write there. A run
    folder holds `latest` or `checkpoints/`; a checkpoint folder holds manifest.json and
    state.json. Other folders inside a run (not checkpoints/) count only with `anywhere_in_run`.
    """
    path = Path(os.path.realpath(path))  # Path.resolve raises RuntimeError at a link loop (Python < 3.13)
    if is_checkpoint_folder(path):
        return "is a checkpoint folder"
    if (path / LATEST_FILE).is_file() or (path / CHECKPOINTS_DIR).is_dir():
        return "is a training run folder"
    for parent in path.parents:
        if is_checkpoint_folder(parent):
            return f"is inside the checkpoint folder {parent}"
        # is_run_folder, not checkpoints/ alone: any folder may hold a subfolder of that name.
        if (parent / CHECKPOINTS_DIR).is_dir() and is_run_folder(parent):
            if path == parent / CHECKPOINTS_DIR:
                return f"is the checkpoints folder of the training run {parent}"
            if path.is_relative_to(parent / CHECKPOINTS_DIR):
                return f"is inside the checkpoints folder of the training run {parent}"
            if anywhere_in_run:
                return f"is inside the training run folder {parent}"
    return None


def is_run_before_first_save(path: Path) -> bool:
    """Whether `path` looks like a training run's folder that holds no checkpoint yet (or was
    stopped before its first): its metrics.jsonl, or a config.json that is a training config
    (a Hugging Face model folder has a config.json too, of the model)."""
    if (path / METRICS_FILE).is_file():
        return True
    if not (path / CONFIG_FILE).is_file():  # (opening a FIFO of that name would wait for a writer)
        return False
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "data_dir" in config and "out_dir" in config


HF_WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def is_hf_model_folder(path: Path) -> bool:
    """Whether `path` holds a Hugging Face model (what gpt.export writes, or a hub download): its
    config.json beside weights. Not a run of this project, but no place to write a dataset either
    (its tokenizer.json is the model's)."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and any((path / name).is_file() for name in HF_WEIGHTS_FILES)


def is_run_folder(path: Path) -> bool:
    """Whether `path` is a training run's folder: it holds `latest`, or (a run killed in its first
    save, or its `latest` deleted) a checkpoints/ folder holding a checkpoint. checkpoints/ alone
    is not enough: any folder may happen to hold a subfolder of that name."""
    return (path / LATEST_FILE).is_file() or (
        (path / CHECKPOINTS_DIR).is_dir() and _holds_a_checkpoint(path / CHECKPOINTS_DIR))


def _holds_a_checkpoint(folder: Path) -> bool:
    try:
        return any(is_checkpoint_folder(child) for child in folder.glob("step_*"))
    except OSError:  # unreadable: not known to be a run's
        return False


def is_checkpoint_folder(folder: Path) -> bool:
    """Whether `folder` is a checkpoint of this project (step_NNNNNNN/ or a consolidated one)."""
    # Both files: manifest.json alone is common elsewhere (browser extensions, web apps).
    return (folder / MANIFEST_FILE).is_file() and (folder / STATE_FILE).is_file()


def _beside(path: Path) -> list[Path]:
    """The entries of `path`'s parent but `path` itself; [] where the parent cannot be listed."""
    try:  # the first 1,000 entries: a parent such as /tmp may hold a great many
        return [p for p in itertools.islice(path.parent.iterdir(), 1000) if p.name != path.name]
    except OSError:
        return []


def _holding(entries: list[Path], marks: tuple[str, ...]) -> list[str]:
    """The sorted names of the folders among `entries` that hold a file or folder named in `marks`."""
    # os.path's tests: a folder this user may not read holds none (Path's would raise EACCES).
    return sorted(p.name for p in entries if any(os.path.exists(p / m) for m in marks))


def typo_of(path: Path, marks: tuple[str, ...]) -> Path | None:
    """The folder beside `path` holding one of `marks` (RUN_MARKS: a run; ("meta.json",): a
    dataset) whose name `path`'s is one slip away from (lr_3e3 for lr_3e-3, shakespear_char for
    shakespeare_char), or None. Not names that differ in their numbers alone (lr_1e-4 beside
    lr_1e-3, seed_2 beside seed_1): a sweep's runs are named so on purpose."""
    names = _holding(_beside(path), marks)
    return next((path.parent / name for name in names if _one_slip(path.name, name)), None)


def _one_slip(typed: str, name: str) -> bool:
    """Whether `typed` is `name` with one character dropped, added, swapped with its neighbour or
    mistyped (a letter, not a digit for a digit), or with other punctuation."""
    if re.sub(r"\d+", "#", typed) == re.sub(r"\d+", "#", name):
        return False  # the same, or the same but for numbers: another run, not a typo
    if re.sub(r"[-_. ]", "", typed) == re.sub(r"[-_. ]", "", name):
        return True
    if abs(len(typed) - len(name)) > 1:
        return False
    i = next((k for k, (a, b) in enumerate(zip(typed, name)) if a != b), min(len(typed), len(name)))
    if len(typed) != len(name):  # one dropped or added character
        longer, shorter = (typed, name) if len(typed) > len(name) else (name, typed)
        return longer[:i] + longer[i + 1:] == shorter
    if typed[i + 1:] == name[i + 1:]:  # one mistyped character
        return not (typed[i].isdigit() and name[i].isdigit())
    # two neighbours swapped
    return i + 1 < len(typed) and typed[i] == name[i + 1] and typed[i + 1] == name[i] and typed[i + 2:] == name[i + 2:]


def nearby_runs(path: Path) -> str:
    """The run folders beside a path that does not exist, and the one it looks like a typo of
    (`--out_dir out/shakespeare_char` for out/shakespeare_char_cpu); "" where there are none."""
    entries = _beside(path)  # listed once for both kinds
    runs = _holding(entries, RUN_MARKS)
    checkpoints = [name for name in _holding(entries, (MANIFEST_FILE,)) if name not in runs]
    found = runs + checkpoints
    if not found:
        return ""
    # Looser than typo_of: this answers an error (the path does not exist), where naming a run
    # of a rather different name (shakespeare_char_cpu for shakespeare_char) costs nothing.
    close = difflib.get_close_matches(path.name, found, n=1, cutoff=0.6)
    meant = path.parent / close[0] if close else None
    kinds = " and ".join(kind for kind, names in (("run folders", runs), ("checkpoint folders", checkpoints)) if names)
    return ((f"; did you mean {meant}?" if meant else "")
            + f" ({kinds} in {path.parent}: {', '.join(found[:10])}{', ...' if len(found) > 10 else ''})")
