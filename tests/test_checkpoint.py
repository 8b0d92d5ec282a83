"""Checkpoints never lose work: kill -9 at random moments (mid-save too), full disks, resume exactly."""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import safetensors.torch
import torch

from gpt import checkpoint as ckpt
from gpt.metrics import read_metrics

from conftest import REPO, tiny_args

TIMING = {"tokens_per_s", "tokens_per_s_per_device", "mfu", "step_ms", "elapsed_s", "eta_s"}


def learning_records(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run)]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(ckpt.latest_checkpoint(run) / ckpt.MODEL_FILE))


def assert_latest_is_complete(run: Path) -> None:
    """`latest` either does not exist yet or names a checkpoint whose every file checks out."""
    found = ckpt.latest_checkpoint(run)  # raises if `latest` names a missing/incomplete folder
    if found is not None:
        ckpt.verify_checkpoint(found)


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, text=True)


def latest_step(run: Path) -> int:
    found = ckpt.latest_checkpoint(run)
    return ckpt.read_state(found)["step"] if found else 0


def wait_for_progress(proc: subprocess.Popen, run: Path, beyond: int, timeout: float = 120) -> None:
    """Wait until the run has saved a checkpoint newer than step `beyond`, so each attempt
    moves the run forward before it is killed."""
    deadline = time.monotonic() + timeout
    while latest_step(run) <= beyond:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint after step {beyond} (exit code {proc.poll()})")
        time.sleep(0.01)


def wait_for_save_in_progress(proc: subprocess.Popen, run: Path, timeout: float = 60) -> bool:
    """Poll until a checkpoint is being assembled (its temporary folder exists)."""
    deadline = time.monotonic() + timeout
    root = run / ckpt.CHECKPOINTS_DIR
    while time.monotonic() < deadline and proc.poll() is None:
        if root.exists() and any(p.name.startswith(".tmp_step") for p in root.iterdir()):
            return True
        time.sleep(0.0005)
    return False


def test_kill_9_at_random_moments_then_resume_matches_uninterrupted(char_data, tmp_path):
    # Dropout makes the RNG state part of what must survive; a save every 3 steps makes kills
    # land in the middle of saves often.
    args = dict(max_steps=60, eval_interval=3, eval_iters=1, log_interval=1, dropout=0.1,
                keep_last=2)
    full = tmp_path / "full"
    subprocess.run([sys.executable, "train.py", *tiny_args(char_data, full, **args)], cwd=REPO,
                   check=True, capture_output=True, timeout=300)

    run = tmp_path / "killed"
    rng = random.Random(0)
    mid_save_kills = 0
    for attempt in range(6):
        proc = start(tiny_args(char_data, run, **args))
        wait_for_progress(proc, run, beyond=latest_step(run))
        if attempt % 2 == 0:
            mid_save_kills += wait_for_save_in_progress(proc, run)
        else:
            time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()
        assert_latest_is_complete(run)
    assert mid_save_kills >= 2, "the test meant to kill during saves but never caught one"

    done = subprocess.run([sys.executable, "train.py", *tiny_args(char_data, run, **args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout
    assert learning_records(run) == learning_records(full)
    a, b = weights(full), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    leftovers = [p.name for p in (run / ckpt.CHECKPOINTS_DIR).iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_full_disk_during_save_keeps_previous_checkpoint(char_data, tmp_path):
    """A save that cannot be written fails with a clear error; the last checkpoint survives."""
    run = tmp_path / "run"
    first = subprocess.run([sys.executable, "train.py", *tiny_args(char_data, run, max_steps=10)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = ckpt.latest_checkpoint(run)
    size = (before / ckpt.MODEL_FILE).stat().st_size

    def small_file_limit():
        # Files larger than half a model cannot be written, as on a disk that fills up mid-save.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    second = subprocess.run([sys.executable, "train.py", *tiny_args(char_data, run, max_steps=20)],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            preexec_fn=small_file_limit)
    assert second.returncode != 0
    assert "error:" in second.stderr and "checkpoint" in second.stderr.lower()
    assert "Traceback" not in second.stderr
    assert ckpt.latest_checkpoint(run) == before
    ckpt.verify_checkpoint(before)
    assert not [p for p in (run / ckpt.CHECKPOINTS_DIR).iterdir() if p.name.startswith(".tmp")]

    # With room again, the run resumes from the surviving checkpoint and finishes.
    third = subprocess.run([sys.executable, "train.py", *tiny_args(char_data, run, max_steps=20)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert f"resumed from {before}" in third.stdout
