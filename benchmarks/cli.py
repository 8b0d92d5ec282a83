"""Option types shared by the benchmark command lines. No torch import: bench_data.py measures
its children's peak RSS with wait4, which counts the parent's memory at fork time."""

from __future__ import annotations

import argparse
import math


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is too small: give {least} or more")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


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
    the same file, never gpu_train.json.json."""
    name = text[:-len(".json")] if text.endswith(".json") else text
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a file name: give a bare name such as 'gpu_train' (the file is "
            "benchmarks/results/NAME.json)")
    return name
