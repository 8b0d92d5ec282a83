"""Found by a researcher's first session, following README.md and docs/ only: each test is one
thing that session met which did not work, or said less than it should."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gpt import checkpoint as ckpt

from conftest import REPO, tiny_args


def test_train_piped_into_head_keeps_training_and_logs_on_stderr(char_data, tmp_path):
    # `train.py ... | head` ended the run with a BrokenPipeError traceback at the first log line
    # after head exited, losing every step since the last checkpoint.
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *tiny_args(char_data, run, max_steps=60, log_interval=5,
                                                                     eval_interval=30)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("config:")
    proc.stdout.close()  # what head does once it has its lines
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err, err
    assert "warning: standard output was closed" in err and "training continues" in err
    assert "done: 60 steps" in err  # the log went on, on stderr
    assert ckpt.read_state(ckpt.latest_checkpoint(run))["step"] == 60
