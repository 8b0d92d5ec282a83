"""sample.py as a user drives it from a shell: output to a full disk or a closed stdout, Ctrl-C
while it is still starting, prompt files that are empty or were saved on Windows."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt.sampling import run_sample
from gpt.trainer import train

from conftest import REPO, tiny_config


@pytest.fixture(scope="module")
def run(char_data, tmp_path_factory) -> Path:
    """A finished 2-step tiny char-level run."""
    out = tmp_path_factory.mktemp("sample_cli_hunt") / "run"
    train(tiny_config(char_data, out, max_steps=2, eval_interval=0, eval_iters=1, log_interval=1))
    return out


def sample_cmd(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "sample.py", "--out_dir", str(run), "--device", "cpu", "--prompt", "A",
            "--max_new_tokens", "20", *extra]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_stdout_on_a_full_disk_is_a_one_line_error(run):
    # `sample.py ... > file` on a full disk ended in an OSError traceback (ENOSPC from print).
    with open("/dev/full", "w") as full:
        proc = subprocess.run(sample_cmd(run), cwd=REPO, stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert "error: cannot write the sample to standard output (No space left on device)" in proc.stderr


def test_a_closed_stdout_is_an_error_not_a_silent_success(run):
    # `sample.py ... >&-`: Python's sys.stdout is then None, print() drops the text, and the
    # run used to exit 0 having shown nothing.
    proc = subprocess.run(sample_cmd(run), cwd=REPO, stderr=subprocess.PIPE, text=True, timeout=120,
                          preexec_fn=lambda: os.close(1))
    assert proc.returncode == 2, proc.stderr
    assert "error: standard output is closed" in proc.stderr, proc.stderr


def _maps_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_ctrl_c_while_torch_is_still_importing_is_one_line(run):
    # Ctrl-C in the first second or so (a typo seen in the command just run) came while
    # `from gpt.sampling import run_sample` was importing torch, outside run_sample's handler: a
    # traceback through torch's modules.
    proc = subprocess.Popen(sample_cmd(run), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not _maps_torch(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)  # torch's library is loaded; its Python modules are still coming
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.startswith("interrupted: stopped before generating"), err


def test_an_empty_prompt_file_warns_that_the_sample_is_unconditional(run, tmp_path, capsys):
    # `head -20 missing.py | sample.py --prompt_file -`: head's error scrolls by and the sample,
    # silently unconditional, looked like the continuation asked for.
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert run_sample(["--out_dir", str(run), "--device", "cpu", "--prompt_file", str(empty),
                       "--max_new_tokens", "5"]) == 0
    assert f"warning: --prompt_file {empty} is empty; drawing an unconditional sample" in capsys.readouterr().err


def test_a_prompt_file_with_windows_line_endings_says_so(run, tmp_path, capsys):
    # The char vocabulary of a Unix corpus has no '\r': the error named that character alone,
    # not the fix (the file's line endings).
    crlf = tmp_path / "prompt.txt"
    crlf.write_bytes(b"ROMEO:\r\nAy me\r\n")
    assert run_sample(["--out_dir", str(run), "--device", "cpu", "--prompt_file", str(crlf),
                       "--max_new_tokens", "5"]) == 2
    err = capsys.readouterr().err
    assert "'\\r' (U+000D)" in err and "Windows line endings (CRLF)" in err, err
    assert err.count("\n") == 1, err


def test_a_num_samples_too_large_for_memory_is_one_line_naming_it(run, capsys, monkeypatch):
    # The rows decode as one batch: a huge --num_samples crashed with the allocator's traceback
    # (or Python's MemoryError building the prompt batch).
    from gpt import sampling

    args = ["--out_dir", str(run), "--device", "cpu", "--prompt", "A", "--max_new_tokens", "5"]
    assert run_sample([*args, "--num_samples", str(10**12)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --num_samples 1,000,000,000,000: the samples decode as one batch, which needs "
                          "about "), err
    fit = int(re.search(r"use --num_samples ([\d,]+) or fewer", err)[1].replace(",", ""))
    assert 1 < fit < 10**12 and err.count("\n") == 1, err
    # Where the free memory cannot be told (macOS), the allocation's own failure says the same.
    # (2**62 rows: Python refuses a list that long outright, so nothing is allocated even where the
    # kernel would promise any amount of memory, vm.overcommit_memory = 1.)
    monkeypatch.setattr(sampling, "free_memory", lambda device: None)
    assert run_sample([*args, "--num_samples", str(2**62)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: out of memory generating {2**62:,} samples on cpu \((MemoryError|"
                        r"RuntimeError)\); use a smaller --num_samples\n", err), err
    assert run_sample([*args, "--num_samples", "3"]) == 0  # a batch that fits is drawn as before


def test_the_batch_memory_check_counts_the_widest_pass_a_sample_makes(monkeypatch):
    # With the KV cache a short sample never runs a whole window (counting one refused batches
    # that fit); without it, every token reruns the whole context so far (counting the prompt
    # alone passed batches thousands of times too large).
    from gpt import sampling
    from gpt.config import ConfigError
    from gpt.model import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=256, vocab_size=65))
    monkeypatch.setattr(sampling, "free_memory", lambda device: 50_000_000)

    def fit(use_cache: bool, prompt: int, new: int) -> int:
        with pytest.raises(ConfigError, match="use --num_samples") as refused:
            sampling.check_batch_fits(10**6, model, torch.device("cpu"), torch.float32, use_cache, prompt, new)
        most = int(re.search(r"use --num_samples ([\d,]+) or fewer", str(refused.value))[1].replace(",", ""))
        sampling.check_batch_fits(most, model, torch.device("cpu"), torch.float32, use_cache, prompt, new)
        return most

    cached_short, cached_long = fit(True, 4, 200), fit(True, 4, 300)  # 303 fed > 256: the window is rebuilt
    assert cached_short > 2 * cached_long > 0
    assert fit(True, 4, 253) == cached_short  # 256 fed (the last token drawn is not): no rebuild
    assert fit(False, 4, 200) < cached_short / 2  # the context grows to 204 positions
    assert fit(False, 4, 10) > cached_short  # 14 positions, and no cache to keep


@pytest.mark.parametrize("option", ["--out_dir", "--ckpt", "--init_from"])
def test_an_empty_model_option_is_refused_naming_it(option, capsys):
    # `--out_dir=$UNSET`: --out_dir and --init_from raised a TypeError traceback, and --ckpt
    # looked for a checkpoint in the current folder.
    with pytest.raises(SystemExit) as exit_:
        run_sample([f"{option}=", "--device", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "must name a file or folder, got an empty string" in err
    assert "Traceback" not in err
