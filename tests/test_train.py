"""End-to-end single-process training: learning, metrics, exact resume, checkpoints, sampling."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt import checkpoint as ckpt
from gpt.checkpoint import files as ckpt_files
from gpt.cli import run_train
from gpt.config import TrainConfig
from gpt.distributed import DistInfo
from gpt.metrics import read_metrics
from gpt.sampling import run_sample
from gpt.trainer import evaluate, train
from gpt.training_log import carried_loss_sum, evals_left

from conftest import REPO, latest_weights, learning_records, rewound_copy, run_script, tiny_config


def run_cli(capsys, script: str, *argv: str) -> subprocess.CompletedProcess:
    """What `python SCRIPT ARGV...` does, in this process: the entry function the script calls
    (same parsing, same error reporting and exit code) without 3-4 s of interpreter and torch
    start-up per call. One test per script still runs it as a real subprocess."""
    capsys.readouterr()
    if script == "sample.py":
        code = run_sample(list(argv))
    else:
        code = run_train(list(argv), default_config=REPO / "configs" / "default.toml")
    out = capsys.readouterr()
    return subprocess.CompletedProcess([script, *argv], code, out.out, out.err)


def test_short_run_learns_and_logs(char_data, tmp_path):
    config = tiny_config(char_data, tmp_path / "run", max_steps=100, eval_interval=50)
    result = train(config)
    vocab = json.loads((char_data / "meta.json").read_text())["vocab_size"]
    # Uniform guessing is ln(vocab) ~ 4.1 and character unigram statistics ~ 3.3 nats:
    # below 2.8 the model has learned which characters follow which.
    assert result.val_loss < 2.8 < math.log(vocab)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(5, 101, 5))
    for key in ("loss", "lr", "tokens", "tokens_per_s", "tokens_per_s_per_device", "mfu",
                "step_ms", "elapsed_s", "eta_s"):
        assert all(key in r for r in records), key
    assert [r["step"] for r in records if "val_loss" in r] == [50, 100]
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert records[-1]["tokens"] == 100 * 8 * 64
    assert (tmp_path / "run" / "latest").read_text().strip() == "step_0000100"

    # The default vocab_multiple 64 pads the character vocabulary's tables to the next multiple
    # of 64 rows; the padding rows get no gradient, so they are still the zeros they started as.
    saved = ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "run"))["model_config"]
    assert (saved["vocab_size"], saved["vocab_multiple"]) == (vocab, 64) and vocab % 64
    weights = latest_weights(tmp_path / "run")  # the tied table is saved under one of its names
    table = weights.get("tok_emb.weight", weights.get("lm_head.weight"))
    assert table.shape[0] == -(-vocab // 64) * 64 > vocab
    assert (table[vocab:] == 0).all() and (table[:vocab] != 0).all()
    with pytest.raises(ckpt.CheckpointError, match="vocab_multiple=64"):  # resumed unpadded: says how
        train(tiny_config(char_data, tmp_path / "run", max_steps=110, eval_interval=50, vocab_multiple=1))


@pytest.mark.parametrize("accum, optimizer", [(1, "adamw"), (2, "adamw"), (1, "muon")])
def test_resume_is_exact(char_data, tmp_path, accum, optimizer):
    """A run restarted from its step-20 checkpoint continues bit for bit like the original."""
    overrides = dict(dropout=0.1, tokens_per_step=8 * 64 * accum,  # dropout: the RNG must resume too
                     optimizer=optimizer)
    full = tmp_path / "full"
    train(tiny_config(char_data, full, **overrides))

    resumed = rewound_copy(full, tmp_path / "resumed", step=20)
    result = train(tiny_config(char_data, resumed, **overrides))
    assert result.step == 30

    assert learning_records(resumed) == learning_records(full)
    a, b = latest_weights(full), latest_weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_init_from_fine_tunes_from_weights(char_data, tmp_path):
    base = tmp_path / "base"
    first = train(tiny_config(char_data, base, max_steps=40, eval_interval=40))
    tuned = train(tiny_config(char_data, tmp_path / "tuned", init_from=str(base), max_steps=5,
                              eval_interval=5, warmup_steps=1, learning_rate=1e-4, min_lr=1e-5))
    # Starting from trained weights, the loss starts where the base run ended, not at ln(vocab).
    assert abs(tuned.val_loss - first.val_loss) < 0.15
    # A damaged source is found by its manifest before a weight of it is read.
    weights = ckpt.latest_checkpoint(base) / ckpt.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))  # same size, other bytes
    with pytest.raises(ckpt.CheckpointError, match="checksum does not match the manifest"):
        train(tiny_config(char_data, tmp_path / "again", init_from=str(base), max_steps=5))


def test_resume_refuses_another_model_shape(char_data, tmp_path):
    train(tiny_config(char_data, tmp_path / "run", max_steps=10))
    recorded = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ckpt.CheckpointError, match=r"n_embd: checkpoint 64 vs config 32"):
        train(tiny_config(char_data, tmp_path / "run", n_embd=32, max_steps=20))
    # The refused run leaves the run's record alone (it used to say n_embd 32 after this).
    assert (tmp_path / "run" / "config.json").read_text() == recorded


def test_resume_trains_with_the_optimizer_settings_it_is_given(char_data, tmp_path, capsys):
    """Loading the optimizer's state used to bring back the saved weight_decay, betas, Muon
    momentum and step size with it: the run logged the new values and trained with the old."""
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=10, optimizer="muon"))
    changed = dict(weight_decay=0.3, beta2=0.99, muon_momentum=0.8, muon_lr=0.05, learning_rate=4e-3)
    train(tiny_config(char_data, run, max_steps=12, optimizer="muon", **changed))
    groups = ckpt.read_optimizer_state(ckpt.latest_checkpoint(run))["param_groups"]
    assert ckpt.latest_checkpoint(run).name == "step_0000012"
    assert {g["weight_decay"] for g in groups} == {0.0, 0.3}
    assert {tuple(g["betas"]) for g in groups} == {(0.9, 0.99)}
    assert {g["momentum"] for g in groups} == {0.8}
    assert {g["lr_scale"] for g in groups if g["muon"]} == {0.05 / 4e-3}
    # and the run says what changed since the checkpoint (max_steps moves the cosine schedule)
    out = capsys.readouterr().out
    assert "note: resuming with settings changed since the checkpoint: " in out
    assert "max_steps 10 -> 12" in out and "weight_decay 0.1 -> 0.3" in out


def test_a_fresh_start_after_a_run_killed_before_its_first_checkpoint_logs_each_step_once(char_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=10, eval_interval=0))
    # as if killed during its first save: records of steps 5 and 10, no checkpoint
    shutil.rmtree(run / "checkpoints")
    (run / "latest").unlink()
    train(tiny_config(char_data, run, max_steps=10, eval_interval=0))
    assert [r["step"] for r in read_metrics(run)] == [5, 10]


def test_metrics_jsonl_is_strict_json_after_skipped_steps(char_data, tmp_path):
    """nan_policy = skip, every step of an interval skipped: that record's loss is not a number.
    It is written as null, not as a bare NaN token, which is not JSON: strict parsers (JavaScript's
    JSON.parse, Go, serde) would refuse the whole file over one line."""
    from gpt.errors import TrainingError

    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="max_skipped_steps = 2"):
        train(tiny_config(char_data, run, learning_rate=1e6, min_lr=0.0, warmup_steps=0, grad_clip=0.0,
                          nan_policy="skip", max_skipped_steps=2, log_interval=1, eval_interval=0))

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    assert [r.get("skipped_steps", 0) for r in records] == [0, 1, 2]
    assert math.isfinite(records[0]["loss"]) and [r["loss"] for r in records[1:]] == [None, None]
    assert read_metrics(run)[1]["loss"] is None


def test_readme_documents_every_metrics_key(char_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=2, log_interval=1, eval_interval=2, eval_iters=1))
    keys = {key for record in read_metrics(run) for key in record} | {"skipped_steps"}  # nan_policy=skip's
    assert {"val_loss", "mfu", "eta_s"} <= keys
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## A run folder"):readme.index("## On a GPU machine")]
    missing = sorted(key for key in keys if f"`{key}`" not in section)
    assert not missing, f"README's run folder section does not explain metrics.jsonl's {missing}"


def test_corrupt_and_malicious_checkpoints_are_refused(char_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=10))
    latest = ckpt.latest_checkpoint(run)

    # A truncated weights file is caught by the manifest before anything is loaded.
    model_file = latest / ckpt.MODEL_FILE
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        train(tiny_config(char_data, run, max_steps=20))
    model_file.write_bytes(data)

    # A pickle that would run code on load.
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"state": Evil()}, latest / ckpt.OPTIMIZER_FILE)
    manifest = json.loads((latest / ckpt.MANIFEST_FILE).read_text())
    manifest[ckpt.OPTIMIZER_FILE] = {"bytes": (latest / ckpt.OPTIMIZER_FILE).stat().st_size,
                                     "sha256": ckpt_files.sha256(latest / ckpt.OPTIMIZER_FILE)}
    (latest / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="refused to load"):
        train(tiny_config(char_data, run, max_steps=20))
    assert not (tmp_path / "pwned").exists()

    # `latest` naming a folder that is gone.
    (run / "latest").write_text("step_0000999\n")
    with pytest.raises(ckpt.CheckpointError, match="missing or incomplete"):
        train(tiny_config(char_data, run, max_steps=20))


def test_keep_last_prunes_only_older_checkpoints(char_data, tmp_path):
    run = tmp_path / "run"
    killed_prune = run / "checkpoints" / ".trash_step_0000005_4242"  # a process died deleting it
    killed_prune.mkdir(parents=True)
    (killed_prune / "optimizer.pt").write_bytes(b"half deleted")
    train(tiny_config(char_data, run, max_steps=40, eval_interval=10, keep_last=2))
    # Pruned folders are deleted in the background, and the run waits for that before it ends.
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_0000030", "step_0000040"]


def test_a_file_where_a_checkpoint_folder_goes_is_replaced_and_leaves_nothing_behind(char_data, tmp_path):
    """A step_N that is a file (the checkpoint replaced by hand, and `latest` set back to an earlier
    step, as an error's advice says): the save of step N moved it aside but could not delete it
    (rmtree removes no file), and the next save's prune, renaming the real step_N to the same
    trash name, failed after the new checkpoint was complete: "could not write checkpoint"."""
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=20, eval_interval=10))  # saves steps 10 and 20
    step_20 = run / "checkpoints" / "step_0000020"
    shutil.rmtree(step_20)
    step_20.write_text("hi\n")
    (run / "latest").write_text("step_0000010\n")
    (run / "checkpoints" / ".trash_step_0000007_1").write_text("a file, as a failed deletion left one")
    train(tiny_config(char_data, run, max_steps=30, eval_interval=10, keep_last=1))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000030"]
    assert ckpt.read_state(ckpt.latest_checkpoint(run))["step"] == 30


def test_an_old_checkpoint_that_cannot_be_moved_aside_is_kept_with_a_warning(char_data, tmp_path, monkeypatch):
    # After the new checkpoint is complete and `latest` names it, a prune that fails is no failed save.
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        if Path(src).name == "step_0000010" and Path(dst).name.startswith(ckpt.TRASH_PREFIX):
            raise PermissionError(13, "Permission denied", str(src))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"could not move .*step_0000010 aside to delete it \(\[Errno 13\] "
                                         r"Permission denied.*\); it is kept, and the next save tries again"):
        train(tiny_config(char_data, run, max_steps=20, eval_interval=10, keep_last=1))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000010", "step_0000020"]
    assert ckpt.latest_checkpoint(run).name == "step_0000020"


def test_an_old_checkpoint_this_user_may_not_read_is_kept_with_a_warning(char_data, tmp_path, monkeypatch):
    # A step folder made private (chmod 000): the prune's look for its manifest raised
    # PermissionError after the new checkpoint was complete, reported as "could not write
    # checkpoint". (Root, the tests' user in CI, passes every permission check: it is injected.)
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=20, eval_interval=10))  # saves steps 10 and 20
    private = run / "checkpoints" / "step_0000010" / ckpt.MANIFEST_FILE
    real_exists = Path.exists

    def exists(path, *args, **kwargs):
        if path == private:
            raise PermissionError(13, "Permission denied", str(path))
        return real_exists(path, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", exists)
    with pytest.warns(UserWarning, match=r"could not look into .*step_0000010 \(this user may not read it: "
                                         r"ls -ld\); it is kept, and the next save tries again"):
        train(tiny_config(char_data, run, max_steps=30, eval_interval=10, keep_last=1))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000010", "step_0000030"]
    assert ckpt.latest_checkpoint(run).name == "step_0000030"


def test_sigterm_saves_and_exits_then_resumes_exactly(char_data, tmp_path):
    """SIGTERM between log steps: the run saves at the end of its step and exits 75; run again,
    it resumes and its records equal an uninterrupted run's, the record whose log interval spans
    the stop included (the checkpoint carries the interval's summed losses)."""
    def args(run: Path, max_steps: int) -> list[str]:
        # lr_decay_steps fixed: the schedule must not depend on max_steps, which differs here.
        return ["train.py", f"--data_dir={char_data}", f"--out_dir={run}", "--prepare_source=none",
                "--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64",
                "--batch_size=8", f"--max_steps={max_steps}", "--lr_decay_steps=1000",
                "--eval_interval=0", "--log_interval=5", "--peak_tflops=1"]

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *args(run, 100000)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step      5/100000"):
            break
    proc.send_signal(signal.SIGTERM)  # lands a step or two after step 5: mid-interval
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out
    saved = ckpt.latest_checkpoint(run)
    stopped = ckpt.read_state(saved)["step"]
    assert stopped >= 5 and "received a stop signal" in out

    end = (stopped // 5 + 2) * 5
    done = run_script(*args(run, end))
    assert done.returncode == 0, done.stderr
    assert f"resumed from {saved}" in done.stdout
    reference = run_script(*args(tmp_path / "reference", end))
    assert reference.returncode == 0, reference.stderr
    assert learning_records(run) == learning_records(tmp_path / "reference")
    assert [r["step"] for r in learning_records(run)] == list(range(5, end + 1, 5))
    a, b = latest_weights(run), latest_weights(tmp_path / "reference")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_run_shorter_than_its_warmup_says_so(char_data, tmp_path, capsys):
    train(tiny_config(char_data, tmp_path / "run", max_steps=3, warmup_steps=10, eval_interval=3))
    peak_reached = 3e-3 * 3 / 10  # tiny_config's learning_rate, 3 of 10 warmup steps in
    assert (f"note: warmup_steps = 10 is more than max_steps = 3: the learning rate stops at "
            f"{peak_reached:.2e}, short of learning_rate = 3.00e-03") in capsys.readouterr().out


def test_a_log_interval_carried_to_another_world_size_keeps_its_mean():
    # Saved by 2 ranks, 2 micro-batches per step, 3 steps into the interval: per-rank sums of 6
    # micro-batch losses. The logged mean is sum / (steps * accum), averaged over ranks.
    saved = {"steps": 3, "skipped": 0, "accum": 2, "loss_sums": [12.0, 18.0]}
    def rank(r: int, world: int) -> DistInfo:
        return DistInfo(rank=r, local_rank=r, world_size=world, device=torch.device("cpu"))

    assert [carried_loss_sum(saved, rank(r, 2), accum=2) for r in (0, 1)] == [12.0, 18.0]  # its own
    # 1 rank, 4 micro-batches per step (the same tokens per step): the mean stays 2.5.
    one = carried_loss_sum(saved, rank(0, 1), accum=4)
    assert one / (3 * 4) == (12.0 + 18.0) / 2 / (3 * 2) == 2.5


def test_sample_cli_prints_text_from_a_trained_run(char_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=20))
    result = run_script("sample.py", f"--out_dir={run}", "--prompt", "ROMEO:", "--max-new-tokens", "60",
                        "--device", "cpu", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:")
    assert len(result.stdout) >= len("ROMEO:") + 60

    again = run_cli(capsys, "sample.py", f"--out_dir={run}", "--prompt", "ROMEO:", "--max-new-tokens", "60",
                    "--device", "cpu", "--seed", "1", "--no-kv-cache")
    assert again.stdout == result.stdout  # the KV cache changes speed, never the text

    bad = run_cli(capsys, "sample.py", f"--out_dir={run}", "--prompt", "héllo ✓", "--device", "cpu")
    assert bad.returncode == 2 and "error:" in bad.stderr and "✓" in bad.stderr

    for option, value in [("--max_new_tokens", "0"), ("--temperature", "-1"), ("--top_p", "1.5")]:
        bad = run_cli(capsys, "sample.py", f"--out_dir={run}", option, value)
        assert bad.returncode == 2 and option in bad.stderr, (option, bad.stderr)

    missing = run_cli(capsys, "sample.py", "--out_dir", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_sample_cli_draws_num_samples_as_one_batch(char_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=20))
    common = [f"--out_dir={run}", "--prompt", "ROMEO:", "--max_new_tokens", "40", "--device", "cpu"]
    one = run_cli(capsys, "sample.py", *common, "--temperature", "0")
    three = run_cli(capsys, "sample.py", *common, "--temperature", "0", "--num_samples", "3")
    assert one.returncode == three.returncode == 0, three.stderr
    # Greedy: each row of the batch is the one-sample text (rows never see each other).
    assert three.stdout.split("-" * 40 + "\n") == [one.stdout] * 3
    assert "[3 samples, 120 tokens in " in three.stderr and "[40 tokens in " in one.stderr

    drawn = run_cli(capsys, "sample.py", *common, "--num_samples", "3", "--seed", "1")
    samples = drawn.stdout.split("-" * 40 + "\n")
    assert len(samples) == 3 and all(t.startswith("ROMEO:") for t in samples)
    assert len(set(samples)) == 3  # each row draws its own tokens


def test_train_cli_errors_name_the_key(tmp_path, capsys):
    result = run_script("train.py", "--n_lyer=3")
    assert result.returncode == 2
    assert "unknown key 'n_lyer'" in result.stderr and "n_layer" in result.stderr

    result = run_cli(capsys, "train.py", "max_steps=2")
    assert result.returncode == 2 and "'max_steps=2' needs two dashes: --max_steps=2" in result.stderr

    result = run_cli(capsys, "train.py", "--n_head=3")
    assert result.returncode == 2 and "n_embd (128) must be divisible by n_head (3)" in result.stderr

    result = run_cli(capsys, "train.py", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "missing.toml does not exist" in result.stderr

    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text('n_layer = "four"\n')
    result = run_cli(capsys, "train.py", "--config", str(bad_toml))
    assert result.returncode == 2 and "n_layer must be an integer" in result.stderr

    result = run_cli(capsys, "train.py", f"--data_dir={tmp_path / 'nothing'}", "--prepare_source=none",
                     f"--out_dir={tmp_path / 'out'}")
    assert result.returncode == 2 and "prepare.py" in result.stderr

    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\nn_layer = 2\n")
    for config, message in [(tmp_path, f"cannot read config file {tmp_path} (Is a directory)"),
                            (tmp_path / "latin1.toml", f"{tmp_path / 'latin1.toml'}: not valid TOML")]:
        result = run_cli(capsys, "train.py", "--config", str(config))
        assert result.returncode == 2 and message in result.stderr, result.stderr
    result = run_cli(capsys, "train.py", f"--seed={1 << 64}", f"--out_dir={tmp_path / 'seed'}")
    assert result.returncode == 2 and f"seed = {1 << 64} is too large" in result.stderr
    assert not (tmp_path / "seed").exists()  # refused before anything is written


def test_help_lists_every_key():
    result = run_script("train.py", "--help")
    assert result.returncode == 0
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name}" in result.stdout, name


def test_shipped_configs_parse():
    from gpt.config import parse_args

    configs = sorted((REPO / "configs").glob("*.toml"))
    assert {p.name for p in configs} >= {"default.toml", "shakespeare_char.toml",
                                          "shakespeare_char_cpu.toml", "gpt2_124m.toml"}
    for path in configs:
        parse_args(["--config", str(path)])


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text()
    missing = [name for name in TrainConfig.__dataclass_fields__ if f"`{name}`" not in readme]
    assert not missing, f"README's config reference lacks {missing}"


def test_evals_left_counts_the_eval_steps_still_to_come():
    # The ETA prices each of them at the latest eval + save (they pause training).
    for max_steps in range(1, 13):
        for interval in range(0, 14):
            config = TrainConfig(max_steps=max_steps, eval_interval=interval)
            for step in range(0, max_steps + 1):
                expected = sum(1 for s in range(step + 1, max_steps + 1)
                               if s == max_steps or (interval and s % interval == 0))
                assert evals_left(step, config) == expected, (max_steps, interval, step)


def test_evaluate_runs_without_autograd():
    # With autograd on, the running total kept every eval batch's graph alive until the end:
    # eval memory grew to eval_iters training steps' activations.
    import contextlib

    from gpt.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    grad_modes = []
    forward = model.forward

    def recording_forward(*args, **kwargs):
        grad_modes.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)

    model.forward = recording_forward

    class Batches:
        def rewind(self):
            pass

        def next_batch(self):
            x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(len(grad_modes)))
            return x, x

    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    loss = evaluate(model, TrainConfig(eval_iters=3), info, contextlib.nullcontext(), Batches())
    assert grad_modes == [False, False, False] and math.isfinite(loss)
    assert model.training  # given back in training mode
