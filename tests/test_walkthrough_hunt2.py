"""Found by a researcher's first session, following README.md and docs/ only: each test is one
thing that session met which did not work, or said less than it should."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from gpt import checkpoint as ckpt
from gpt import export
from gpt.model import GPT, GPTConfig

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


def saved_run(run: Path) -> Path:
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    ckpt.save_checkpoint(run, 1, GPT(config), None, {"step": 1, "model_config": asdict(config)})
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
    from gpt.cli import run_train

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
