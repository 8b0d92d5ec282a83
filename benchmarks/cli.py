"""Option types shared by the benchmark command lines. No torch import: bench_data.py measures
its children's peak RSS with wait4, which counts the parent's memory at fork time."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import subprocess
import tempfile
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is too small: give {least} or more")
    return value


def positive_int(text: str) -> int:
    return whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return whole_number(text, 0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def results_name(text: str) -> str:
    """A file name in benchmarks/results/, given with or without its .json ending (gpu.sh once
    passed one kind to --out and the other to --results): 'gpu_train' and 'gpu_train.json' are
    the same file, never gpu_train.json.json. The folder must take a file: said before minutes of
    timing (argparse checks a default too), not by a traceback after them."""
    name = _bare_name(text)
    if name is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a file name: give a bare name such as 'gpu_train' (the file is "
            "benchmarks/results/NAME.json)")
    _check_writable()
    return name


def results_prefix(text: str) -> str:
    """The suite's --out-prefix: the start of file names in benchmarks/results/ (NAME_train.json,
    NAME_suite.json ...), so a bare name as --out's ('trial.json' is 'trial'). A trial must not
    replace a committed result: a name whose files are committed (s26: s26_train.json) is refused."""
    name = _bare_name(text)
    if name is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a name: give a bare one such as 'trial' (the files are "
            "benchmarks/results/trial_train.json, trial_suite.json ...)")
    written = (f"{name}_train.json", f"{name}_generate.json", f"{name}_suite.json")
    taken = [file for file in committed_results() if file in written or file.startswith(f"{name}_suite_")]
    if taken:
        which = f"{taken[0]} is a committed result" if len(taken) == 1 else \
            f"{taken[0]} and {len(taken) - 1} more are committed results"
        raise argparse.ArgumentTypeError(
            f"{text!r}: benchmarks/results/{which}, which a trial must not replace: give another name, "
            "such as 'trial'")
    _check_writable()
    return name


def _bare_name(text: str) -> str | None:
    name = text[:-len(".json")] if text.endswith(".json") else text
    return None if not name or "/" in name or "\\" in name or name in (".", "..") else name


def committed_results() -> list[str]:
    """The names of the files git tracks in benchmarks/results/ (none outside a git checkout). Also
    in a checkout another user owns (a shared one, a container's bind mount), which git refuses to
    read by default ("dubious ownership"): it is only read here."""
    try:
        listed = subprocess.run(["git", "-c", "safe.directory=*", "ls-files", "-z", "--", "."], cwd=RESULTS_DIR,
                                capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    if listed.returncode != 0:
        return []
    return sorted(Path(path).name for path in listed.stdout.decode(errors="replace").split("\0") if path)


def _check_writable() -> None:
    try:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=RESULTS_DIR):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write into {RESULTS_DIR} ({e.strerror or e}): make it "
                                         "writable, or run from a checkout you may write to") from None


def write_results(name: str, text: str, folder: Path = RESULTS_DIR) -> Path:
    """Write FOLDER/NAME.json atomically; returns the path. A failure (a full disk, the folder
    made read-only since the start) is one line, not a traceback."""
    path = folder / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise SystemExit(f"error: cannot write the results {path} ({e.strerror or e}); the figures are "
                         "printed above") from None
    return path


def device(text: str) -> str:
    """--device: cpu or cuda[:N], checked before a model is built; a CPU-only torch used to end
    in "Torch not compiled with CUDA enabled" deep in a traceback."""
    import torch  # here, not at the top: see the module docstring

    try:
        kind = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: give cpu or cuda") from None
    if kind.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmarks run on cpu or cuda")
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device here (torch {torch.__version__}); "
                                             "give cpu")
        if kind.index is not None and kind.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: only {count} CUDA device(s) here")
    return text


def text_file_problem(path: Path) -> str | None:
    """What keeps `path` from being read as a text file, in words ("not found", "is a folder",
    "is empty"...), or None: an --input checked before minutes of work, not a traceback in them."""
    if not path.exists():
        return "not found"
    if not path.is_file():
        return "is a folder" if path.is_dir() else "is not a regular file"
    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    return "is empty" if empty else None
