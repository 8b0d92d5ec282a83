"""Every bad input and failure a user can hit gets a clear error and loses nothing.

Each test provokes one case for real (a NaN loss, an allocation that fails, a signal, a file size
limit, a read-only folder, a shard rewritten under a running loader, ...) and checks both the
message and that nothing was lost. docs/errors.md is the table of these cases; the last test
checks that every test it names exists.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt import checkpoint as ckpt
from gpt.checkpoint import files as ckpt_files
from gpt.cli import report_errors
from gpt.config import ConfigError, TrainConfig, parse_args
from gpt.errors import TrainingError
from gpt.loader import TokenLoader, eval_batches
from gpt.metrics import read_metrics
from gpt.model import GPT
from gpt.nonfinite import NonFiniteGuard
from gpt.optim import build_optimizer
from gpt.prepare import prepare
from gpt.sampling import run_sample
from gpt.shards import ShardError, shard_name, write_shard
from gpt.stop import StopFlag
from gpt.tokenizer import Tokenizer, build_char
from gpt.trainer import gpt_config_for, out_of_memory_message, train

from conftest import REPO, SHAKESPEARE, tiny_args, tiny_config
from conftest import run_script as run_python

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
run_script = functools.partial(run_python, env=ENV)


def start_training(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)


def read_until(proc: subprocess.Popen, pattern: str, seen: list[str]) -> re.Match:
    """Read the process's output line by line until `pattern` matches (lines kept in `seen`)."""
    for line in proc.stdout:
        seen.append(line)
        found = re.search(pattern, line)
        if found:
            return found
    raise AssertionError(f"the process ended (code {proc.wait()}) before {pattern!r}:\n{''.join(seen)[-3000:]}")


def train_and_interfere(args: list[str], at: str, act: Callable[[subprocess.Popen, list[str]], None]
                        ) -> tuple[subprocess.Popen, str]:
    """Start train.py, wait for an output line matching `at`, call act(proc, seen), then read
    the output to the end; returns the ended process and all it printed."""
    proc = start_training(args)
    seen: list[str] = []
    try:
        read_until(proc, at, seen)
        act(proc, seen)
        seen.append(proc.communicate(timeout=120)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, "".join(seen)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_dataset(folder: Path, train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> Path:
    """A dataset folder written directly (shards + meta.json), for data the prep would never make."""
    folder.mkdir(parents=True)
    write_shard(folder / shard_name("train", 0), train_tokens)
    write_shard(folder / shard_name("val", 0), val_tokens)
    (folder / "meta.json").write_text(json.dumps({"tokenizer": "char", "vocab_size": vocab_size}))
    return folder


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A private copy of `trained`, for tests that resume it."""
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


# ----------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(("argv", "message"), [
    (["--n_lyer=3"], "unknown key 'n_lyer' (did you mean n_layer"),
    (["--n_layer=four"], "n_layer must be an integer, got 'four'"),
    (["--bias=maybe"], "bias must be true or false, got 'maybe'"),
    (["--device=tpu"], "device = 'tpu' is not allowed; choose one of auto, cpu, cuda, mps"),
    (["--nan_policy=ignore"], "nan_policy = 'ignore' is not allowed; choose one of stop, skip"),
    (["--n_head=3"], "n_embd (128) must be divisible by n_head (3)"),
    (["--max_steps=0"], "max_steps must be positive, got 0"),
    (["--max_steps=-5"], "max_steps must be positive, got -5"),
    (["--learning_rate=0"], "learning_rate must be positive, got 0.0"),
    (["--learning_rate=-1e-3"], "learning_rate must be positive, got -0.001"),
    (["--learning_rate=nan"], "learning_rate must be a finite number, got nan"),
    (["--grad_clip=inf"], "grad_clip must be a finite number, got inf"),
    (["--min_lr=0.1"], "min_lr (0.1) must not exceed learning_rate (0.001)"),
    # Warmup would end at the peak and the next step drop straight to min_lr, with no decay between.
    (["--warmup_steps=100", "--lr_decay_steps=50"], "lr_decay_steps (50) must be greater than warmup_steps (100)"),
    (["--dropout=1"], "dropout must be in [0, 1), got 1.0"),
    (["--seed=-1"], "seed must be >= 0, got -1"),
    (["--out_dir="], "out_dir must name a folder, got an empty string"),
    (["--prepare_vocab_size=70000"], "prepare_vocab_size must be between 257 and 65536"),
    (["--max_skipped_steps=3"], "max_skipped_steps = 3 applies only with nan_policy = 'skip'"),
    (["--fsdp_cpu_offload=true"], "fsdp_cpu_offload = True applies only with parallel = 'fsdp'"),
    (["--prepare_tokenizer=char", "--prepare_vocab_size=512"],
     "prepare_vocab_size = 512 applies only with prepare_tokenizer = 'bpe'"),
])
def test_config_errors_name_the_key_and_what_is_allowed(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    assert message in str(e.value)


def test_config_is_data_never_code(tmp_path):
    """A TOML config is parsed as TOML: Python in it is a string or a syntax error, never run."""
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    as_string = tmp_path / "string.toml"
    as_string.write_text(f'out_dir = "{code}"\n')
    assert parse_args(["--config", str(as_string)]).out_dir == code
    as_code = tmp_path / "code.toml"
    as_code.write_text(f"n_layer = {code}\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_args(["--config", str(as_code)])
    with pytest.raises(ConfigError, match="n_layer must be an integer"):
        parse_args([f"--n_layer={code}"])
    assert not marker.exists()


def test_no_eval_exec_or_unsafe_unpickling_in_the_code():
    """Configs, checkpoints and tokenizer files are data: no module evaluates or unpickles them."""
    sources = [*sorted((REPO / "gpt").rglob("*.py")), REPO / "train.py", REPO / "sample.py",
               *sorted((REPO / "data_prep").glob("*.py"))]
    offences = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if (name in ("eval", "exec", "compile", "pickle.load", "pickle.loads", "marshal.loads",
                         "yaml.load", "yaml.unsafe_load", "shelve.open")
                    or (name == "torch.load" and keywords.get("weights_only") != "True")):
                offences.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert offences == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_device_that_is_not_there_is_a_config_error(char_data, tmp_path):
    with pytest.raises(ConfigError, match="device = 'cuda' but no CUDA GPU is visible; use --device=cpu or auto"):
        train(tiny_config(char_data, tmp_path / "run", device="cuda"))


def test_resume_past_max_steps_says_there_is_nothing_to_do(char_data, run_copy, capsys):
    before = files_of(run_copy / "checkpoints")
    assert train(tiny_config(char_data, run_copy, max_steps=8)).step == 10
    assert "note: already at step 10, max_steps is 8: nothing to train (raise max_steps" in capsys.readouterr().out
    assert files_of(run_copy / "checkpoints") == before


def test_resume_never_refuses_to_mix_with_earlier_checkpoints(char_data, run_copy, capsys):
    before = files_of(run_copy)
    with pytest.raises(ConfigError, match=r"resume = 'never' but out_dir .* already holds checkpoints"):
        train(tiny_config(char_data, run_copy, resume="never", max_steps=20))
    assert files_of(run_copy) == before  # not even config.json was rewritten


def test_init_from_and_an_existing_checkpoint_resume_wins_and_says_so(char_data, trained, run_copy, capsys):
    result = train(tiny_config(char_data, run_copy, init_from=str(trained), max_steps=12))
    out = capsys.readouterr().out
    assert f"out_dir holds {run_copy / 'checkpoints' / 'step_0000010'}: resuming from it; init_from" in out
    assert result.step == 12 and f"resumed from {run_copy / 'checkpoints' / 'step_0000010'}" in out


def test_init_from_with_a_larger_block_size_names_the_key(char_data, trained, tmp_path):
    with pytest.raises(ConfigError, match="block_size = 128 is larger than the 64 positions .* set block_size = 64"):
        train(tiny_config(char_data, tmp_path / "tuned", init_from=str(trained), block_size=128))
    assert not (tmp_path / "tuned" / "metrics.jsonl").exists()


def test_resume_with_another_data_order_or_seed_names_the_key(char_data, run_copy):
    latest = ckpt.latest_checkpoint(run_copy)
    for overrides, message in [(dict(data_order="sequential"), "data_order: checkpoint 'random' vs config 'sequential'"),
                               (dict(seed=7), "seed: checkpoint 1337 vs config 7")]:
        with pytest.raises(ckpt.CheckpointError) as e:
            train(tiny_config(char_data, run_copy, max_steps=20, **overrides))
        assert message in str(e.value) and f"--init_from={latest}" in str(e.value)
    assert ckpt.latest_checkpoint(run_copy) == latest


def test_resume_on_a_dataset_prepared_again_names_the_checkpoint(char_data, run_copy, tmp_path):
    # As many tokens, other ones: refused before any weights are read, naming the checkpoint and
    # the way to go on (the loader's own check came after the model and optimizer were loaded).
    latest = ckpt.latest_checkpoint(run_copy)
    other = tmp_path / "data_again"
    shutil.copytree(char_data, other)
    shard = other / "train_000000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16, offset=1024)
    first = tokens[0]
    with open(shard, "r+b") as f:  # the stream's first token is one the fingerprint samples
        f.seek(1024)
        f.write(np.array([(first + 1) % 60], dtype=np.uint16).tobytes())
    with pytest.raises(ckpt.CheckpointError) as e:
        train(tiny_config(other, run_copy, max_steps=20))
    assert f"cannot resume {latest}" in str(e.value) and "not the same ones" in str(e.value)
    assert f"--init_from={latest}" in str(e.value)
    assert ckpt.latest_checkpoint(run_copy) == latest


# ----------------------------------------------------------------------------------------
# Data


def test_token_id_outside_the_vocabulary_is_refused_before_training(tmp_path):
    train_tokens = np.arange(5000) % 62
    train_tokens[3210] = 200
    data = make_dataset(tmp_path / "data", train_tokens, np.arange(2000) % 62, vocab_size=62)
    with pytest.raises(ShardError) as e:
        train(tiny_config(data, tmp_path / "run"))
    assert f"{data / 'train_000000.bin'}: token id 200 at position 3,210 is outside the vocabulary (vocab_size 62" in str(e.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step

    # The loader checks every batch too (for shards that change under a running job).
    loader = TokenLoader(data, "train", 1, 100, order="sequential", vocab_size=62)
    for _ in range(32):
        loader.next_batch()  # windows 0..31 end at token 3200
    with pytest.raises(ShardError, match="token id 200 at position 3,210 is outside the vocabulary"):
        loader.next_batch()


def test_shards_from_another_tokenizer_than_the_checkpoint(char_data, trained, run_copy, tmp_path):
    # Same number of characters, other ids: every 'Z' becomes '~', which Shakespeare never uses.
    text = SHAKESPEARE.read_text()[:300_000]
    assert "~" not in text and "Z" in text
    other = tmp_path / "other"
    prepare(other, [text.replace("Z", "~")], tokenizer="char", val_fraction=0.1, val_rule="tail",
            progress=False, log=None)
    assert json.loads((other / "meta.json").read_text())["vocab_size"] == json.loads(
        (char_data / "meta.json").read_text())["vocab_size"]
    for out_dir, init_from in [(run_copy, ""), (tmp_path / "tuned", str(trained))]:
        with pytest.raises(ckpt.CheckpointError) as e:
            train(tiny_config(other, out_dir, init_from=init_from, max_steps=20))
        assert f"does not fit the dataset in {other}" in str(e.value)
        assert "maps tokens to other ids" in str(e.value) and str(char_data) in str(e.value)
    assert ckpt.read_state(ckpt.latest_checkpoint(run_copy))["step"] == 10


def test_dataset_changed_since_the_checkpoint(run_copy, tmp_path):
    text = SHAKESPEARE.read_text()[:300_000]
    changed = tmp_path / "changed"
    prepare(changed, [text], tokenizer="char", val_fraction=0.2, val_rule="tail", progress=False, log=None)
    with pytest.raises(ckpt.CheckpointError, match="train tokens: checkpoint 270,000 vs .* 240,000"):
        train(tiny_config(changed, run_copy, max_steps=20))


def test_dataset_smaller_than_one_batch_or_one_block(tmp_path, capsys):
    tiny = make_dataset(tmp_path / "tiny", np.arange(300) % 62, np.arange(300) % 62, vocab_size=62)
    # 300 tokens < one batch of 8 x 64: allowed (windows repeat), with a note.
    result = train(tiny_config(tiny, tmp_path / "run", max_steps=3, eval_interval=3))
    assert result.step == 3 and math_finite(result.val_loss)
    assert ("note: the train split has 300 tokens, too few for one batch (8 x 64 x 1 processes = 512, and one "
            "more for the last target)") in capsys.readouterr().out
    # At exactly 512 tokens a window still came round twice in every batch, without the note.
    for n, note in ((512, True), (513, False)):
        exact = make_dataset(tmp_path / f"exact{n}", np.arange(n) % 62, np.arange(300) % 62, vocab_size=62)
        train(tiny_config(exact, tmp_path / f"run{n}", max_steps=1, eval_interval=1, eval_iters=1))
        assert ("too few for one batch" in capsys.readouterr().out) == note, n
    # Fewer tokens than one block + its target: refused before training, naming the fixes.
    with pytest.raises(ShardError, match=r"train split too small for one block of 512 tokens .* smaller block_size"):
        train(tiny_config(tiny, tmp_path / "run2", block_size=512))
    assert not (tmp_path / "run2" / "metrics.jsonl").exists()


def test_missing_val_split_is_found_before_training(char_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    (data / "val_000000.bin").unlink()
    with pytest.raises(ShardError, match=f"{data}: no val shards .* --out {data}"):
        train(tiny_config(data, tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not discovered at the first eval


def test_a_dataset_whose_files_disagree_is_refused_before_training(char_data, tmp_path):
    """meta.json, tokenizer.json and the shards come from one prep; a folder that mixes preps or
    lost a file would train on the wrong vocabulary or fail only when sampling."""
    def damaged(name: str, damage) -> Path:
        data = tmp_path / name
        shutil.copytree(char_data, data)
        damage(data)
        return data

    cases = {
        # Without meta.json, shards would be read as GPT-2 ids (what bare llm.c folders are).
        "no_meta": (lambda d: (d / "meta.json").unlink(), "tokenizer.json but no meta.json"),
        "garbage_tokenizer": (lambda d: (d / "tokenizer.json").write_text("zz\n"), "cannot be loaded"),
        "other_tokenizer": (lambda d: build_char("abc").save(d / "tokenizer.json"), "holds 3 ids"),
        "string_vocab_size": (lambda d: (d / "meta.json").write_text(json.dumps(
            dict(json.loads((d / "meta.json").read_text()), vocab_size="65"))), "vocab_size must be a JSON integer"),
        "huge_vocab_size": (lambda d: (d / "meta.json").write_text(json.dumps(
            dict(json.loads((d / "meta.json").read_text()), vocab_size=70000))), "outside 1..65536"),
    }
    for name, (damage, message) in cases.items():
        data = damaged(name, damage)
        with pytest.raises(ShardError, match=message):
            train(tiny_config(data, tmp_path / f"run_{name}"))
        assert not (tmp_path / f"run_{name}" / "metrics.jsonl").exists(), name


def math_finite(x) -> bool:
    return x is not None and np.isfinite(x)


def test_re_prep_during_training_does_not_disturb_the_running_loader(shakespeare, tmp_path):
    """prepare.py replaces shards by rename, so a running job keeps reading the old files (their
    inodes live on while memory-mapped); the dataset change is then caught at resume. Its
    checkpoints keep the vocabulary the run started with: each save copied data_dir's
    tokenizer.json anew, so those after the re-prep paired the weights with another vocabulary
    (sample.py printed shifted nonsense, gpt.eval scored without a word)."""
    text = shakespeare[:300_000]
    data = tmp_path / "data"
    prepare(data, [text], tokenizer="char", val_fraction=0.1, val_rule="tail", progress=False, log=None)
    started_with = (data / "tokenizer.json").read_bytes()
    run = tmp_path / "run"

    def re_prep_then_stop(proc: subprocess.Popen, seen: list[str]) -> None:
        # Another text of the same length, with one letter fewer: another vocabulary.
        prepare(data, [text.replace("a", "~")], tokenizer="char", val_fraction=0.2, val_rule="tail",
                overwrite=True, progress=False, log=None)
        assert (data / "tokenizer.json").read_bytes() != started_with
        for _ in range(2):  # evals after the swap: the run keeps the val split it started with
            read_until(proc, r"^step +\d+/.*val loss", seen)
        proc.send_signal(signal.SIGTERM)

    proc, out = train_and_interfere(tiny_args(data, run, max_steps=100_000, eval_interval=5, log_interval=1),
                                    r"^step +2/", re_prep_then_stop)
    assert proc.returncode == 75, out[-3000:]
    saved = ckpt.latest_checkpoint(run)
    ckpt.verify_checkpoint(saved)
    assert ckpt.read_state(saved)["loader"]["num_tokens"] == 270_000  # the old stream, throughout
    assert (saved / "tokenizer.json").read_bytes() == started_with  # and the old vocabulary
    resumed = run_script("train.py", *tiny_args(data, run, max_steps=100_000))
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr
    assert "does not fit the dataset" in resumed.stderr, resumed.stderr  # its vocabulary, first


def test_shard_truncated_in_place_while_training(shakespeare, tmp_path):
    """Rewriting a memory-mapped shard in place (not via prepare.py) can kill the job with SIGBUS;
    the checkpoints are intact and the restart names the damaged file."""
    text = shakespeare[:300_000]
    data = tmp_path / "data"
    prepare(data, [text], tokenizer="char", val_fraction=0.1, val_rule="tail", progress=False, log=None)
    run = tmp_path / "run"
    proc, out = train_and_interfere(
        tiny_args(data, run, max_steps=100_000, eval_interval=3, eval_iters=1, log_interval=1), r"^step +4/",
        # In place: the same inode shrinks under the running job's memory map.
        lambda proc, seen: os.truncate(data / "train_000000.bin", 1024 + 2 * 100))
    assert proc.returncode == -signal.SIGBUS and "Fatal Python error: Bus error" in out, out[-3000:]
    assert "gpt/loader.py" in out  # faulthandler shows where: reading the memory-mapped shard
    saved = ckpt.latest_checkpoint(run)
    ckpt.verify_checkpoint(saved)
    restart = run_script("train.py", *tiny_args(data, run, max_steps=100_000))
    assert restart.returncode == 2 and "Traceback" not in restart.stderr
    assert f"{data / 'train_000000.bin'}: size is 1224 bytes but the header promises" in restart.stderr


# ----------------------------------------------------------------------------------------
# Training: NaN / Inf


def poisoned_checkpoint(data: Path, folder: Path, token: int) -> Path:
    """Fresh weights (untied) with one finite but absurd embedding row: a batch whose input holds
    `token` overflows to NaN in its forward pass; every other batch trains normally."""
    config = tiny_config(data, folder, tie_weights=False)
    meta = json.loads((data / "meta.json").read_text())
    torch.manual_seed(config.seed)
    gpt_config = gpt_config_for(config, meta["vocab_size"])
    model = GPT(gpt_config)
    with torch.no_grad():
        model.tok_emb.weight[token] = 1e30
    state = {"step": 0, "model_config": asdict(gpt_config), "train_config": config.to_dict(), "dataset": meta}
    ckpt.save_checkpoint(folder, 0, model, None, state, tokenizer_path=data / "tokenizer.json")
    return folder


def rare_token(data: Path, steps: int, eval_iters: int) -> tuple[int, list[int]]:
    """A token that the training batches of steps 1..`steps` hold at 2-5 steps (none before the
    first checkpoint) and the eval batches never hold, with those steps."""
    loader = TokenLoader(data, "train", 8, 64, seed=TrainConfig.seed)
    batches = [loader.next_batch()[0] for _ in range(steps)]
    in_eval = torch.cat([x.flatten() for x, _ in eval_batches(data, "val", 8, 64, eval_iters, seed=TrainConfig.seed)])
    for token in range(json.loads((data / "meta.json").read_text())["vocab_size"]):
        hits = [i + 1 for i, x in enumerate(batches) if (x == token).any()]
        if 2 <= len(hits) <= 5 and hits[0] > NAN_RUN["eval_interval"] and not (in_eval == token).any():
            return token, hits
    pytest.fail("no suitable rare token in this dataset")


NAN_RUN = dict(tie_weights=False, max_steps=24, eval_interval=4, eval_iters=1)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(char_data, tmp_path):
    token, bad_steps = rare_token(char_data, NAN_RUN["max_steps"], NAN_RUN["eval_iters"])
    init = poisoned_checkpoint(char_data, tmp_path / "init", token)
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        train(tiny_config(char_data, run, init_from=str(init), **NAN_RUN))
    first = bad_steps[0]
    good = (first - 1) // NAN_RUN["eval_interval"] * NAN_RUN["eval_interval"]  # the last save before it
    message = str(e.value)
    assert f"not finite (NaN/Inf) at step {first} (nan_policy = 'stop')" in message
    assert f"the last good checkpoint, {run / 'checkpoints' / f'step_{good:07d}'}, is intact" in message
    assert "lower learning_rate (now 0.003)" in message and "nan_policy=skip" in message
    latest = ckpt.latest_checkpoint(run)
    assert ckpt.read_state(latest)["step"] == good
    assert max(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*")) == good
    ckpt.verify_checkpoint(latest)
    assert all(torch.isfinite(t).all() for t in ckpt.read_model_state(latest).values())
    assert read_metrics(run)[-1]["step"] < first  # nothing logged after it either


def test_nan_policy_skip_drops_exactly_the_bad_steps_and_trains_on(char_data, tmp_path, capsys):
    token, bad_steps = rare_token(char_data, NAN_RUN["max_steps"], NAN_RUN["eval_iters"])
    init = poisoned_checkpoint(char_data, tmp_path / "init", token)
    run = tmp_path / "run"
    result = train(tiny_config(char_data, run, init_from=str(init), nan_policy="skip",
                               max_skipped_steps=5, **NAN_RUN))
    out = capsys.readouterr().out
    logged = [int(s) for line in re.findall(r"^skipped \d+ step\(s\) .*?: ([\d, ]+) \(", out, re.M)
              for s in line.split(", ")]
    assert logged == bad_steps
    assert result.step == NAN_RUN["max_steps"] and math_finite(result.val_loss)
    records = read_metrics(run)
    assert records[-1]["skipped_steps"] == len(bad_steps)
    # A bad step's loss is left out of its interval's mean (NaN only where every step was skipped).
    assert {r["step"] for r in records if not math_finite(r["loss"])} <= set(bad_steps)
    assert records[-1]["val_loss"] < records[0]["val_loss"]  # it kept learning
    assert ckpt.read_state(ckpt.latest_checkpoint(run))["skipped_steps"] == len(bad_steps)
    assert all(torch.isfinite(t).all() for t in ckpt.read_model_state(ckpt.latest_checkpoint(run)).values())


def test_nan_policy_skip_gives_up_after_max_skipped_steps(char_data, tmp_path):
    """An absurd learning rate: every step after the first diverges; skipping cannot help."""
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        train(tiny_config(char_data, run, learning_rate=1e6, min_lr=0.0, warmup_steps=0, grad_clip=0.0,
                          nan_policy="skip", max_skipped_steps=3, log_interval=1, eval_interval=0))
    assert "4 steps had a non-finite loss or gradient norm, more than max_skipped_steps = 3" in str(e.value)
    assert "lower learning_rate (now 1e+06), set grad_clip" in str(e.value)
    assert [r.get("skipped_steps", 0) for r in read_metrics(run)] == [0, 1, 2, 3]
    assert ckpt.latest_checkpoint(run) is None


def test_a_stop_signal_after_a_nan_step_saves_nothing(char_data, run_copy, monkeypatch):
    """SIGTERM between log steps normally saves at once; after a non-finite step it must not."""
    import gpt.trainer as trainer

    real = trainer.learning_rate_at

    def signal_at_step_15(step, config):  # called at the start of each step (0-based)
        if step == 14:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, config)

    monkeypatch.setattr(trainer, "learning_rate_at", signal_at_step_15)
    with pytest.raises(TrainingError) as e:
        train(tiny_config(char_data, run_copy, learning_rate=1e6, min_lr=0.0, warmup_steps=0, grad_clip=0.0,
                          log_interval=100, eval_interval=0, max_steps=100))
    bad_step = int(re.search(r"not finite \(NaN/Inf\) at step (\d+)", str(e.value)).group(1))
    assert 10 < bad_step <= 15  # the step that went bad first, before the signal's step boundary
    assert f"the last good checkpoint, {run_copy / 'checkpoints' / 'step_0000010'}, is intact" in str(e.value)
    assert ckpt.read_state(ckpt.latest_checkpoint(run_copy))["step"] == 10


def test_a_model_with_a_non_finite_val_loss_is_never_saved(char_data, tmp_path):
    """Skipping keeps the weights finite, but they may still be broken: an eval that is not
    finite ends the run (under either policy) before the checkpoint of that step."""
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        train(tiny_config(char_data, run, learning_rate=1e6, min_lr=0.0, warmup_steps=0, grad_clip=0.0,
                          nan_policy="skip", max_skipped_steps=20, log_interval=1, eval_interval=3))
    assert "the validation loss was nan at step 3: the model's outputs are not finite. No checkpoint" in str(e.value)
    assert ckpt.latest_checkpoint(run) is None
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


@pytest.mark.parametrize("optimizer_name", ["adamw", "muon"])
def test_a_skipped_step_leaves_weights_and_optimizer_untouched(char_data, tmp_path, optimizer_name):
    """The skip happens on the device (the optimizer reads GradScaler's found_inf flag): no update,
    no moment or momentum, no step count; a finite step under nan_policy=skip gives the same
    numbers as under stop."""
    results = {}
    for policy in ("stop", "skip"):
        config = tiny_config(char_data, tmp_path, nan_policy=policy, optimizer=optimizer_name)
        torch.manual_seed(0)
        model = GPT(gpt_config_for(config, 62))
        optimizer = build_optimizer(model, config, torch.device("cpu"))
        guard = NonFiniteGuard(config, model, optimizer, scaler_enabled=False,
                               info=type("Info", (), {"is_distributed": False, "is_main": True})(),
                               out_dir=tmp_path)
        x = torch.randint(0, 62, (4, 64))
        loss_sum = torch.zeros(())
        for step in (1, 2):
            guard.begin_step(loss_sum)
            _, loss = model(x, x)
            loss_sum += loss.detach()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            guard.end_step(step, loss_sum, norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results[policy] = {k: v.clone() for k, v in model.state_dict().items()}
        if policy == "skip":
            before = {k: v.clone() for k, v in model.state_dict().items()}
            moments = {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state.items()}
            guard.begin_step(loss_sum)
            _, loss = model(x, x)
            (loss * float("nan")).backward()  # gradients NaN, as after an overflow
            loss_sum += loss.detach() * float("nan")
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            guard.end_step(3, loss_sum, norm)
            # Not the fallback (drop the gradients after reading the flag): the optimizer skips.
            assert guard.on_device and all(p.grad is not None for p in model.parameters())
            optimizer.step()
            for k, v in model.state_dict().items():
                assert torch.equal(v, before[k]), k
            for k, s in optimizer.state.items():
                for n, t in s.items():
                    assert torch.equal(t, moments[k][n]), n
            assert guard.review() == 1 and guard.skipped == 1 and torch.isfinite(loss_sum)
    for k in results["stop"]:
        assert torch.equal(results["stop"][k], results["skip"][k]), k


# ----------------------------------------------------------------------------------------
# Training: out of memory, signals


def address_space_after_import() -> int:
    """Bytes of address space a process has mapped once torch and the package are imported
    (~0.65 GB with the CPU build of torch, ~3.2 GB with a CUDA build, whose libraries it maps)."""
    probe = "import torch, gpt.cli; print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmPeak')))"
    result = run_script("-c", probe, check=True)
    return int(result.stdout) * 1024


def test_out_of_memory_names_what_to_reduce_and_loses_nothing(char_data, run_copy):
    if torch.cuda.is_available():
        pytest.skip("a GPU's driver reserves far more address space than RLIMIT_AS can leave it")
    before = ckpt.latest_checkpoint(run_copy)
    limit = address_space_after_import() + (1400 << 20)  # ~2 GiB with the CPU build

    def limited_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    # A 4096-sequence batch needs several GiB of activations: the allocation fails for real.
    result = run_script("train.py", *tiny_args(char_data, run_copy, max_steps=20, batch_size=4096),
                        preexec_fn=limited_address_space)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "error: out of memory" in result.stderr and "batch_size 4096, block_size 64" in result.stderr
    # A run with a checkpoint is told only what a resume from it accepts: the advice to reduce
    # block_size or the model was refused by the resume (a review followed it).
    assert ("To resume from it, lower batch_size and set tokens_per_step = 262144 (this run's tokens per "
            "optimizer step" in result.stderr), result.stderr[-3000:]
    assert "activation_checkpointing=true" in result.stderr and "Reduce batch_size" not in result.stderr
    assert "A smaller block_size or model (n_layer, n_embd) is a new run: another out_dir" in result.stderr
    assert f"the last checkpoint, {before}, is intact" in result.stderr
    assert ckpt.latest_checkpoint(run_copy) == before
    ckpt.verify_checkpoint(before)


def test_a_model_too_big_for_memory_is_refused_before_it_is_built(char_data, tmp_path):
    """n_layer = 100,000,000 (a slip of the keyboard) would build blocks until the kernel's OOM
    killer ends the run without a word; it is refused at once, naming the sizes."""
    run = tmp_path / "run"
    started = time.monotonic()
    result = run_script("train.py", *tiny_args(char_data, run, n_layer=100_000_000))
    assert time.monotonic() - started < 60
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "error: the model has " in result.stderr and "parameters (n_layer 100000000, n_embd " in result.stderr
    assert "its fp32 weights and gradients alone take " in result.stderr
    assert "more than this machine's RAM " in result.stderr and "Lower n_layer or n_embd" in result.stderr
    assert not (run / "checkpoints").exists()


def test_a_model_made_too_big_by_vocab_multiple_says_to_lower_that():
    # It said "Lower n_layer or n_embd" of a 2 x 64 model whose padded vocabulary was the size.
    from gpt.distributed import DistInfo
    from gpt.trainer import check_model_fits, gpt_config_for

    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    config = TrainConfig(device="cpu", n_layer=2, n_head=2, n_embd=64, vocab_multiple=1_000_000_000).validate()
    with pytest.raises(ConfigError) as e:
        check_model_fits(gpt_config_for(config, 65), config, info)
    assert "Lower vocab_multiple (1,000,000,000 pads the 65 ids to 1,000,000,000 rows; 64 is usual)" in str(e.value)
    wide = TrainConfig(device="cpu", n_layer=2, n_head=2, n_embd=2_000_000).validate()
    with pytest.raises(ConfigError, match="Lower n_layer or n_embd$"):
        check_model_fits(gpt_config_for(wide, 65), wide, info)


@pytest.mark.parametrize(("dtype", "fast_cpu_bf16", "shown", "bf16_advice"), [
    ("auto", True, "float32", True),       # 'auto' is float32 on a CPU: name that, not 'auto'
    ("auto", False, "float32", False),     # a CPU without native bf16 matmul: bf16 would be slower
    ("bfloat16", True, "bfloat16", False),  # already bf16: nothing to suggest
    ("float16", True, "float16", True),
])
def test_out_of_memory_message_names_the_dtype_in_use(tmp_path, monkeypatch, dtype, fast_cpu_bf16, shown,
                                                      bf16_advice):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: fast_cpu_bf16)
    config = TrainConfig(out_dir=str(tmp_path / "run"), device="cpu", dtype=dtype).validate()
    error = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes")
    text = out_of_memory_message(config, error)
    assert text.startswith("out of memory (DefaultCPUAllocator: can't allocate memory: ")
    assert f"n_embd 128, dtype {shown}; no checkpoint had been saved." in text
    assert ("dtype=bfloat16" in text) == bf16_advice
    assert "or set activation_checkpointing=true, " in text and "parallel=fsdp" in text


def test_ctrl_c_finishes_the_step_saves_and_exits(char_data, tmp_path):
    run = tmp_path / "run"
    proc, out = train_and_interfere(tiny_args(char_data, run, max_steps=100_000, eval_interval=0, log_interval=1),
                                    r"^step +2/", lambda proc, seen: proc.send_signal(signal.SIGINT))
    assert proc.returncode == 130, out[-3000:]
    assert "Ctrl-C: finishing this step, then saving a checkpoint" in out and "Traceback" not in out
    stopped = re.search(r"received a stop signal \(SIGINT\): saving a checkpoint at step (\d+) and exiting with code 130", out)
    assert stopped, out[-3000:]
    saved = ckpt.latest_checkpoint(run)
    ckpt.verify_checkpoint(saved)
    assert ckpt.read_state(saved)["step"] == int(stopped.group(1))


def test_ctrl_c_before_training_says_that_set_up_and_one_step_come_first(capfd):
    # Ctrl-C during set-up (an automatic data prep can take minutes) said "finishing this step"
    # while the run went on with the whole set-up and a first step before stopping.
    stop = StopFlag()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs at the next bytecode
    finally:
        stop.restore()
    assert stop.signal == signal.SIGINT
    assert ("Ctrl-C: training has not started; the run finishes its set-up and one step, then saves a "
            "checkpoint and exits") in capfd.readouterr().err


def test_second_ctrl_c_aborts_at_once(capsys):
    previous = signal.getsignal(signal.SIGINT)
    stop = StopFlag()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs at the next bytecode
        assert stop.signal == signal.SIGINT and stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is previous

    def interrupted():
        raise KeyboardInterrupt

    assert report_errors(interrupted) == 130  # what train.py prints then
    assert "interrupted: stopped at once, without saving; checkpoints already written are intact" in capsys.readouterr().err


def test_a_permission_error_says_what_to_check(capsys):
    # The OS's words alone ("[Errno 13] Permission denied: '…/manifest.json'") named the path but
    # gave no way forward, unlike every other error. (Tests run as root, which no permission
    # stops: the error is raised as a folder not readable to its user raises it.)
    def unreadable():
        raise PermissionError(13, "Permission denied", "/runs/x/checkpoints/step_0000010/manifest.json")

    assert report_errors(unreadable) == 2
    assert capsys.readouterr().err == (
        "error: [Errno 13] Permission denied: '/runs/x/checkpoints/step_0000010/manifest.json' (this user may not "
        "use it: check the permissions of it and of the folders above it, ls -ld, or run as the user who owns it)\n")

    def no_path():  # nothing for "it" to point at
        raise PermissionError(1, "Operation not permitted")

    assert report_errors(no_path) == 2
    assert capsys.readouterr().err == "error: [Errno 1] Operation not permitted\n"


def test_a_second_ctrl_c_during_the_first_ones_message_aborts(monkeypatch):
    # Two quick Ctrl-Cs: the second runs the handler again while the first is still writing its
    # message; it must see the first (it used to, only once the message was out: save and exit).
    import gpt.stop

    stop = StopFlag()
    nested = []

    def write_interrupted_by_a_second_ctrl_c(fd, data):
        if not nested:
            nested.append(True)
            stop._handle(signal.SIGINT, None)
        return len(data)

    monkeypatch.setattr(gpt.stop.os, "write", write_interrupted_by_a_second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
    assert nested and stop.signal == signal.SIGINT


def test_a_signal_during_set_up_is_not_fatal(char_data, tmp_path, monkeypatch):
    """StopFlag is installed before anything slow: a SIGUSR1 (SLURM's warning) that arrives while
    the run sets up stops it after its first step, with a checkpoint."""
    import gpt.trainer as trainer

    real = trainer.ensure_dataset

    def ensure_dataset_then_signal(config, info):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        return real(config, info)

    monkeypatch.setattr(trainer, "ensure_dataset", ensure_dataset_then_signal)
    handlers = {s: signal.getsignal(s) for s in StopFlag.SIGNALS}
    with pytest.raises(SystemExit) as e:
        train(tiny_config(char_data, tmp_path / "run"))
    assert e.value.code == 75
    assert ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "run"))["step"] == 1
    assert {s: signal.getsignal(s) for s in StopFlag.SIGNALS} == handlers  # put back afterwards


@pytest.mark.parametrize("second_ctrl_c", ["while the async save finishes", "during the save itself"])
def test_a_second_ctrl_c_says_whether_the_stops_checkpoint_was_saved(char_data, tmp_path, monkeypatch, capsys,
                                                                      second_ctrl_c):
    """A second Ctrl-C while the stop's async save was finishing said "stopped at once, without
    saving", though the save completed (the process waits for its thread) and the next run
    resumed from it. It now says which step was saved; a save itself cut short says as before."""
    import gpt.trainer as trainer

    real_ensure, real_close = trainer.ensure_dataset, ckpt.Checkpointer.close
    pressed = []

    def ensure_dataset_then_ctrl_c(config, info):
        os.kill(os.getpid(), signal.SIGINT)  # the first: stop after the first step, saving it
        time.sleep(0.01)
        return real_ensure(config, info)

    def close_then_ctrl_c(self):
        real_close(self)  # as Checkpointer.close's own finally does: waits for the save in flight
        if not pressed:  # once: the run's clean-up closes it again
            pressed.append(True)
            raise KeyboardInterrupt

    def save_cut_short(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "ensure_dataset", ensure_dataset_then_ctrl_c)
    if second_ctrl_c == "while the async save finishes":
        monkeypatch.setattr(ckpt.Checkpointer, "close", close_then_ctrl_c)
    else:
        monkeypatch.setattr(ckpt.Checkpointer, "save", save_cut_short)
    run = tmp_path / "run"

    def main():
        train(tiny_config(char_data, run, async_checkpoint=True))

    assert report_errors(main) == 130
    said = capsys.readouterr().err.strip().splitlines()[-1]
    if second_ctrl_c == "while the async save finishes":
        step = run / ckpt.CHECKPOINTS_DIR / ckpt.step_dir_name(1)
        assert said == (f"interrupted: stopped at once; the checkpoint of step 1 was complete by then ({step}): "
                        f"run again to resume from it"), said
        assert ckpt.latest_checkpoint(run) == step
    else:
        assert said.startswith("interrupted: stopped at once, without saving"), said
        assert not (run / ckpt.CHECKPOINTS_DIR).exists() or not list((run / ckpt.CHECKPOINTS_DIR).glob("step_*"))


# ----------------------------------------------------------------------------------------
# Disk


def read_only_folder(path: Path):
    """A folder no one may write into: chmod for a normal user, a read-only tmpfs for root."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("running as root and cannot mount a read-only tmpfs")
    return lambda: subprocess.run(["umount", str(path)], check=True)


def test_unwritable_out_dir_is_refused_before_training(char_data, tmp_path):
    undo = read_only_folder(tmp_path / "ro")
    try:
        with pytest.raises(ConfigError) as e:
            train(tiny_config(char_data, tmp_path / "ro"))
        assert f"out_dir {tmp_path / 'ro'} is not writable (Read-only file system" in str(e.value) or \
            f"out_dir {tmp_path / 'ro'} is not writable (Permission denied" in str(e.value)
        assert "Choose another --out_dir" in str(e.value)
        assert list((tmp_path / "ro").iterdir()) == []
    finally:
        undo()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match=f"out_dir {tmp_path / 'file' / 'run'} is not writable"):
        train(tiny_config(char_data, tmp_path / "file" / "run"))


def test_full_disk_during_shard_write_keeps_the_earlier_dataset(shakespeare, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(shakespeare[:300_000])
    data = tmp_path / "data"
    prep = ["data_prep/prepare.py", "--input", str(text), "--out", str(data), "--tokenizer", "char",
            "--val-fraction", "0.1", "--val-rule", "tail", "--no-progress"]
    assert run_script(*prep).returncode == 0
    before = files_of(data)

    def small_file_limit():
        # No file over 100 kB, as on a disk that fills up mid-write; the train shard is 541 kB.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    result = run_script(*prep, "--overwrite", "--val-fraction", "0.2", preexec_fn=small_file_limit)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: could not write shard {data / '.prepare-staging' / 'train_000000.bin'} (File too large)" in result.stderr
    assert "is the disk full" in result.stderr
    assert files_of(data) == before  # the earlier dataset, byte for byte; no staging left
    TokenLoader(data, "train", 8, 64).next_batch()


# ----------------------------------------------------------------------------------------
# Sampling


def test_sampling_edge_cases(trained, tmp_path, capsys):
    # An empty prompt is an unconditional sample.
    assert run_sample(["--out_dir", str(trained), "--prompt", "", "--max_new_tokens", "20", "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert len(printed.out) >= 20
    # The speed goes to stderr, so that stdout is the text alone.
    assert re.fullmatch(r"\[\d+ tokens in [\d.]+ s: [\d,]+ tokens/s, with KV cache, float32\]\n", printed.err)
    binary = tmp_path / "prompt.bin"
    binary.write_bytes(b"A\xff\x00")
    for argv, message in [
        (["--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
        (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0 is greedy), got nan"),
        (["--top_k", "-1"], "--top_k must be >= 0 (0 is off), got -1"),
        (["--num_samples", "0"], "--num_samples must be positive, got 0"),
        (["--prompt_file", str(tmp_path / "nope.txt")], f"--prompt_file {tmp_path / 'nope.txt'}: cannot read it (No such file or directory)"),
        (["--prompt_file", str(tmp_path)], f"--prompt_file {tmp_path}: cannot read it (Is a directory)"),
        (["--prompt_file", str(binary)], f"--prompt_file {binary}: not UTF-8 text (invalid start byte at byte 1)"),
        (["--prompt_file", str(binary), "--prompt", "A"], "give --prompt or --prompt_file, not both"),
        (["--seed", str(1 << 64)], f"--seed must be in 0..{(1 << 63) - 1}, got {1 << 64}"),
        (["--prompt", "Ω"], "Ω"),
    ]:
        assert run_sample(["--out_dir", str(trained), "--device", "cpu", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert run_sample(["--ckpt", str(tmp_path / "nope")]) == 2
    assert f"checkpoint path {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_tokenizer_file_is_data_never_code(trained, tmp_path, capsys):
    """tokenizer.json is parsed as JSON by `tokenizers`: anything else is refused, nothing runs."""
    marker = tmp_path / "pwned"
    bad = tmp_path / "tokenizer.json"
    for content in [f"__import__('os').system('touch {marker}')",
                    json.dumps({"model": {"type": "__import__('os').system('touch pwned')"}})]:
        bad.write_text(content)
        with pytest.raises(ValueError, match="cannot load tokenizer"):
            Tokenizer.from_file(bad)
    # The same through sample.py, with the manifest updated to match (a deliberate tampering).
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    latest = ckpt.latest_checkpoint(run)
    shutil.copyfile(bad, latest / ckpt.TOKENIZER_FILE)
    manifest = json.loads((latest / ckpt.MANIFEST_FILE).read_text())
    manifest[ckpt.TOKENIZER_FILE] = {"bytes": bad.stat().st_size, "sha256": ckpt_files.sha256(bad)}
    (latest / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    assert run_sample(["--out_dir", str(run), "--device", "cpu"]) == 2
    assert "cannot load tokenizer" in capsys.readouterr().err
    assert not marker.exists() and not Path("pwned").exists()


# ----------------------------------------------------------------------------------------
# The table


def test_every_test_in_docs_errors_exists():
    """docs/errors.md links each case to its test; a renamed or deleted test fails here."""
    table = (REPO / "docs" / "errors.md").read_text()
    named = sorted(set(re.findall(r"(tests/test_\w+\.py)::(test_\w+)", table)))
    assert len(named) >= 30
    defined = {file: {n.name for n in ast.walk(ast.parse((REPO / file).read_text()))
                      if isinstance(n, ast.FunctionDef)}
               for file in {file for file, _ in named}}
    assert [f"{file}::{name}" for file, name in named if name not in defined[file]] == []
    # and every test of this file is in the table
    here = {n.name for n in ast.parse(Path(__file__).read_text()).body
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    listed = {name for file, name in named if file == "tests/test_hardening.py"}
    assert here - listed == set()


def _guard(config, model):
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    info = type("Info", (), {"is_distributed": False, "is_main": True})()
    return NonFiniteGuard(config, model, optimizer, scaler_enabled=False, info=info, out_dir=Path("/nonexistent"))


def test_nan_gradients_under_a_finite_loss_stop_the_run_without_grad_clip(char_data, tmp_path):
    """With grad_clip = 0 the gradient norm was computed for the check only under
    nan_policy = 'skip': under 'stop' a step with a finite loss and NaN gradients (an overflow in
    the backward) went unseen, its update made every weight NaN, and a stop signal then saved
    that model as the last good checkpoint (review finding)."""
    config = tiny_config(char_data, tmp_path, nan_policy="stop", grad_clip=0.0)
    torch.manual_seed(0)
    model = GPT(gpt_config_for(config, 62))
    guard = _guard(config, model)
    x = torch.randint(0, 62, (4, 64))
    loss_sum = torch.zeros(())
    guard.begin_step(loss_sum)
    _, loss = model(x, x)
    (loss * float("nan")).backward()
    loss_sum += loss.detach()  # finite
    guard.end_step(7, loss_sum, None)  # grad_clip = 0: no norm from clipping
    with pytest.raises(TrainingError, match=r"not finite \(NaN/Inf\) at step 7 \(nan_policy = 'stop'\)"):
        guard.review()


def test_max_skipped_steps_lowered_at_a_resume_below_those_skipped_ends_the_run(char_data, tmp_path):
    """The limit was checked only when a new step was skipped: a run resumed with
    max_skipped_steps = 1 after 3 skips trained to the end (review finding)."""
    config = tiny_config(char_data, tmp_path, nan_policy="skip", max_skipped_steps=1)
    model = GPT(gpt_config_for(config, 62))
    guard = _guard(config, model)
    guard.skipped = 3  # as the checkpoint restores it
    loss_sum = torch.ones(())
    guard.begin_step(loss_sum)
    guard.end_step(9, loss_sum, torch.tensor(1.0))
    with pytest.raises(TrainingError, match=r"3 steps of this run were skipped .* more than max_skipped_steps = 1, "
                                            r"lowered since they were: set max_skipped_steps to 3 or more"):
        guard.review()
