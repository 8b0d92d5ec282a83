"""Found by a researcher's first session, following README.md and docs/ only: each test is one
thing that session met which did not work, or said less than it should."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gpt import checkpoint as ckpt
from gpt import eval as gpt_eval
from gpt import export, prepare
from gpt.cli import run_train
from gpt.config import TrainConfig
from gpt.distributed import DistInfo
from gpt.resume import note_changed_settings
from gpt.sampling import run_sample
from gpt.trainer import train

from conftest import REPO, tiny_args, tiny_config
from test_walkthrough_hunt import save_step


def train_into_head(data: Path, run: Path, stderr: int, **args) -> subprocess.Popen:
    """`train.py ... | head -1` (with `stderr=subprocess.STDOUT`: `2>&1 | head -1`): the reader
    closes its end once it has the config's first line."""
    proc = subprocess.Popen([sys.executable, "train.py", *tiny_args(data, run, log_interval=5, **args)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
    assert proc.stdout.readline().startswith("config:")
    proc.stdout.close()
    return proc


def test_train_piped_into_head_keeps_training_and_logs_on_stderr(char_data, tmp_path):
    # `train.py ... | head` ended the run with a BrokenPipeError traceback at the first log line
    # after head exited, losing every step since the last checkpoint.
    run = tmp_path / "run"
    proc = train_into_head(char_data, run, subprocess.PIPE, max_steps=60, eval_interval=30)
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err, err
    assert "warning: standard output was closed" in err and "training continues" in err
    assert "done: 60 steps" in err  # the log went on, on stderr
    assert ckpt.read_state(ckpt.latest_checkpoint(run))["step"] == 60


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_train_logging_to_a_full_disk_keeps_training(char_data, tmp_path):
    # Standard output into a file on a full disk (a job's log; /dev/full here) ended the run with
    # an OSError traceback at its first line, as a closed pipe did.
    run = tmp_path / "run"
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "train.py", *tiny_args(char_data, run, max_steps=20, eval_interval=10)],
                              cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "warning: standard output cannot be written (No space left on device)" in done.stderr
    assert "done: 20 steps" in done.stderr
    assert ckpt.read_state(ckpt.latest_checkpoint(run))["step"] == 20


def test_train_piped_into_head_with_its_stderr_trains_on_quietly_and_ctrl_c_still_saves(char_data, tmp_path):
    # `train.py 2>&1 | head`: standard error is the same closed pipe, so nothing more can be said;
    # the run still trains to its end and saves. Ctrl-C's note on that closed stderr raised in the
    # signal handler and ended the run with nothing saved.
    run = tmp_path / "run"
    assert train_into_head(char_data, run, subprocess.STDOUT, max_steps=40, eval_interval=10**6).wait(timeout=300) == 0
    assert ckpt.read_state(ckpt.latest_checkpoint(run))["step"] == 40
    stopped = tmp_path / "stopped"
    proc = train_into_head(char_data, stopped, subprocess.STDOUT, max_steps=10**6, eval_interval=10**6)
    deadline = time.monotonic() + 120
    while not (stopped / "metrics.jsonl").exists() and time.monotonic() < deadline:  # training, past the config
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert ckpt.read_state(ckpt.latest_checkpoint(stopped))["step"] > 0


def saved_run(run: Path) -> Path:
    """A run folder holding one tiny checkpoint (test_walkthrough_hunt's)."""
    save_step(run, 1, seed=0)
    return run


def test_export_onto_a_run_folder_is_refused_without_advising_overwrite(tmp_path, capsys):
    # Without --overwrite it said "already exists; pass --overwrite to replace it", and with it:
    # "is a training run folder; refusing to replace it even with --overwrite".
    source, other = saved_run(tmp_path / "a"), saved_run(tmp_path / "b")
    before = sorted(p.relative_to(other) for p in other.rglob("*"))
    for overwrite in ([], ["--overwrite"]):
        assert export.main([str(source), "--out", str(other), "--no-check", *overwrite]) == 2
        err = capsys.readouterr().err
        assert "refusing to replace it even with --overwrite" in err and "pass --overwrite" not in err, err
    assert sorted(p.relative_to(other) for p in other.rglob("*")) == before


def test_a_missing_dataset_for_a_char_config_is_made_with_the_char_tokenizer(tmp_path, capsys):
    # configs/shakespeare_char_cpu.toml with no data/shakespeare_char: the error's command made a
    # BPE-8192 dataset there, on which the "char" config then trained without a word.
    config = str(REPO / "configs" / "shakespeare_char_cpu.toml")
    missing = tmp_path / "shakespeare_char"
    assert run_train(["--config", config, f"--data_dir={missing}", f"--out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"--out {missing} --tokenizer char" in err, err
    text = tmp_path / "input.txt"
    text.write_text("To be, or not to be")
    assert run_train(["--config", config, f"--data_dir={text}", f"--out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"--input {text} --out DIR --tokenizer char" in err, err
    # The default (BPE) config's advice stays prep's default.
    assert run_train([f"--data_dir={missing}", "--prepare_source=none", f"--out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"--out {missing} (or --source stdlib" in err, err


def test_extending_a_run_whose_min_lr_is_0_does_not_advise_training_at_lr_0(char_data, tmp_path, capsys):
    # configs/shakespeare_char_cpu.toml decays to min_lr = 0. Extending a finished run, the note
    # said "to stay at min_lr, set lr_decay_steps = 600"; done so, the new steps trained at lr 0
    # (the val loss did not move) and the run said nothing of it.
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    finished = TrainConfig(max_steps=20, warmup_steps=2, min_lr=0.0)
    note_changed_settings(finished.to_dict(), replace(finished, max_steps=40), info, step=20)
    note = capsys.readouterr().out
    assert "that schedule had reached min_lr at step 20, and min_lr is 0 now" in note and "a min_lr above 0" in note, note
    assert "to stay at min_lr" not in note
    # A run set up that way is told at start.
    train(tiny_config(char_data, tmp_path / "run", max_steps=6, warmup_steps=1, lr_decay_steps=4, min_lr=0.0))
    out = capsys.readouterr().out
    assert "note: min_lr = 0 and lr_decay_steps = 4 < max_steps = 6: the last 2 steps train at learning rate 0" in out
    train(tiny_config(char_data, tmp_path / "other", max_steps=6, warmup_steps=1, lr_decay_steps=4))
    assert "train at learning rate 0" not in capsys.readouterr().out  # tiny_config's min_lr is above 0


def test_a_mistyped_run_folder_names_the_run_it_looks_like(tmp_path, capsys):
    # `sample.py --out_dir out/shakespeare_char` (the run is out/shakespeare_char_cpu) said only
    # "checkpoint path out/shakespeare_char does not exist".
    saved_run(tmp_path / "shakespeare_char_cpu")
    saved_run(tmp_path / "default")
    (tmp_path / "notes").mkdir()  # not a run: not listed
    assert run_sample(["--out_dir", str(tmp_path / "shakespeare_char"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert (f"checkpoint path {tmp_path / 'shakespeare_char'} does not exist; did you mean "
            f"{tmp_path / 'shakespeare_char_cpu'}? (run folders in {tmp_path}: default, shakespeare_char_cpu)") in err, err
    assert run_sample(["--out_dir", str(tmp_path / "zzz"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" not in err and "(run folders in" in err, err


def test_mistyped_options_of_the_other_scripts_name_the_option_meant(capsys):
    # train.py suggested near-misses for its keys; sample.py, the tools and data prep said only
    # "unrecognized arguments: --temp 0.5".
    cases = [(lambda: run_sample(["--out_dir", "x", "--temp", "0.5"]), "--temp 0.5 (did you mean --temperature?)"),
             (lambda: gpt_eval.main(["x", "--max_batch", "3"]), "--max_batch 3 (did you mean --max_batches?)"),
             (lambda: prepare.main(["--input", "x", "--out", "y", "--tokeniser", "char"]),
              "--tokeniser char (did you mean --tokenizer?)"),
             (lambda: ckpt.main(["consolidate", "x", "--optimiser"]), "--optimiser (did you mean --optimizer?)"),
             # Every option it is short for, one spelling each; a subcommand's option before it.
             (lambda: run_sample(["--out_dir", "x", "--top", "3"]), "--top 3 (did you mean --top_k, --top_p?)"),
             (lambda: prepare.main(["--input", "x", "--out", "y", "--val", "0.1"]),
              "--val 0.1 (did you mean --val-rule, --val-chunk-tokens, --val-fraction?)"),
             (lambda: ckpt.main(["--optimizer", "consolidate", "x"]),
              "--optimizer (--optimizer is an option of the subcommand: give it after the subcommand's name)")]
    for call, expected in cases:
        try:
            code = call()
        except SystemExit as e:  # argparse's own exit
            code = e.code
        assert code == 2
        assert f"error: unrecognized arguments: {expected}" in capsys.readouterr().err


def test_a_config_file_given_without_config_says_to_name_it_with_config(capsys):
    assert run_train(["configs/shakespeare_char_cpu.toml"]) == 2
    assert ("'configs/shakespeare_char_cpu.toml' is not an option; to read a config file, name it with "
            "--config: python train.py --config configs/shakespeare_char_cpu.toml") in capsys.readouterr().err
