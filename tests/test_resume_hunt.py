"""Resuming in unusual states, as a user gets there: a run rewound by hand (`latest` set back to
an earlier checkpoint, as the error about a damaged checkpoint advises), an emptied `latest`, a
full disk (its error in the full and sharded formats), a shorter block_size."""

from __future__ import annotations

import json
import resource
import shutil
import signal
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import safetensors.torch
import torch

from gpt import checkpoint as ckpt
from gpt.model import GPT, GPTConfig


def tiny_model() -> tuple[GPT, GPTConfig]:
    config = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)
    torch.manual_seed(0)
    return GPT(config), config


def save(run: Path, step: int, keep_last: int) -> Path:
    model, config = tiny_model()
    state = {"step": step, "tokens_seen": step, "model_config": asdict(config)}
    return ckpt.save_checkpoint(run, step, model, None, state, keep_last=keep_last)


def steps_in(run: Path) -> list[str]:
    return sorted(p.name for p in (run / ckpt.CHECKPOINTS_DIR).iterdir())


def test_pruning_after_a_rewind_keeps_the_runs_own_checkpoints(tmp_path):
    """A run rewound to step 20 (its step_30 left from before) saves step 25 with keep_last = 2.
    The checkpoints to keep are the run's two newest, 20 and 25. Pruning used to count the
    abandoned step_30 as the newest: it deleted step_20 (the one just resumed from) and kept
    step_30, which a lost `latest` would then resume from."""
    run = tmp_path / "run"
    for step in (10, 20, 30):
        save(run, step, keep_last=2)
    assert steps_in(run) == ["step_0000020", "step_0000030"]
    (run / ckpt.LATEST_FILE).write_text("step_0000020\n")  # rewound by hand

    save(run, 25, keep_last=2)
    assert ckpt.latest_checkpoint(run).name == "step_0000025"
    # The later one is not this run's history: left alone (not counted, not deleted).
    assert steps_in(run) == ["step_0000020", "step_0000025", "step_0000030"]

    # Reaching step 30 replaces the abandoned one with the run's own; then two are kept.
    save(run, 30, keep_last=2)
    assert steps_in(run) == ["step_0000025", "step_0000030"]
    assert ckpt.read_state(run / "checkpoints" / "step_0000030")["tokens_seen"] == 30


def test_an_empty_latest_says_so_and_names_the_checkpoint_to_write(tmp_path):
    """`latest` emptied (by hand, or a file system that lost its content) used to give
    "latest names checkpoint '', but RUN/checkpoints is missing or incomplete"; a `latest` naming
    a missing folder did not say which complete one there is to go back to."""
    run = tmp_path / "run"
    save(run, 10, keep_last=2)
    (run / ckpt.LATEST_FILE).write_text("")
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.latest_checkpoint(run)
    assert f"{run / 'latest'} is empty" in str(error.value)
    assert "write 'step_0000010' into it" in str(error.value)

    (run / ckpt.LATEST_FILE).write_text("step_0000099\n")
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.latest_checkpoint(run)
    assert "step_0000099 is missing or incomplete. Point" in str(error.value)
    assert "(the newest is step_0000010: write 'step_0000010' into it)" in str(error.value)


def test_a_full_disk_is_named_when_the_writer_hides_it(tmp_path, monkeypatch):
    """torch.save on a full disk fails with "unexpected pos 4096 vs 3988", not ENOSPC: the error
    now says the disk is full, with the free space and the size of a checkpoint."""
    run = tmp_path / "run"
    previous = save(run, 10, keep_last=2)
    size = sum(p.stat().st_size for p in previous.iterdir() if p.name != ckpt.MANIFEST_FILE)

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3988")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(ckpt.CheckpointError) as error:
        save(run, 20, keep_last=2)
    message = str(error.value)
    assert "unexpected pos 4096" in message and f"the previous checkpoint {previous} is intact" in message
    assert f"The disk is full: the file system holding {run} has 4,096 bytes free" in message
    assert f"previous checkpoint takes {size:,}" in message
    assert ckpt.latest_checkpoint(run) == previous
    assert steps_in(run) == ["step_0000010"]


def test_a_resume_at_a_shorter_context_points_to_init_from(tmp_path):
    """block_size cannot change on resume; a shorter one can start a new run from the weights
    (init_from crops the position table), which the error now says."""
    model, config = tiny_model()
    saved = asdict(config)
    with pytest.raises(ckpt.CheckpointError, match=r"block_size: checkpoint 8 vs config 4\).*--init_from=CK "
                                                   r"--out_dir=ANOTHER_FOLDER, which crops"):
        ckpt.check_model_config(Path("CK"), saved, dict(saved, block_size=4))
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.check_model_config(Path("CK"), saved, dict(saved, block_size=16))
    assert "init_from" not in str(error.value)


def test_a_failed_sharded_save_says_each_ranks_error_in_one_line(tmp_path):
    """DCP's CheckpointException prints every failed rank's whole traceback; the save error used
    to carry it (~90 lines under torchrun on a full disk). Now: each rank's exception, one line."""
    run = tmp_path / "run"
    model, config = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"step": 10, "tokens_seen": 10, "model_config": asdict(config)}
    saver = ckpt.Checkpointer(run, format="sharded", keep_last=2)
    previous = saver.save(10, model, optimizer, state)
    saver.close()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))  # a disk that fills up mid-save
    try:
        with pytest.raises(ckpt.CheckpointError) as error:
            saver.save(20, model, optimizer, dict(state, step=20))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
        saver.close()
    message = str(error.value)
    assert "Traceback" not in message and "\n" not in message, message
    assert "rank 0: " in message and "CheckpointException" not in message
    assert f"the previous checkpoint {previous} is intact" in message
    assert ckpt.latest_checkpoint(run) == previous and steps_in(run) == ["step_0000010"]


# ----------------------------------------------------------------------------------------
# What a refused start leaves behind, and what a resume on another number of processes says


def test_a_refused_resume_leaves_config_json_as_it_was(char_data, tmp_path):
    """config.json was rewritten with the new settings before the checkpoint's files were
    verified: a resume refused for a damaged checkpoint left the run's record saying it had
    trained with settings it never ran. A first start refused (init_from at a longer context)
    left an out_dir holding only a config.json."""
    from conftest import tiny_config
    from gpt.trainer import train

    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=10, eval_interval=10))
    recorded = (run / "config.json").read_text()
    model_file = run / ckpt.CHECKPOINTS_DIR / "step_0000010" / ckpt.MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncated
    with pytest.raises(ckpt.CheckpointError):
        train(tiny_config(char_data, run, max_steps=20, eval_interval=10, learning_rate=1e-3))
    assert (run / "config.json").read_text() == recorded

    other = tmp_path / "other"
    with pytest.raises(ckpt.CheckpointError):  # a larger block_size than the checkpoint's
        train(tiny_config(char_data, other, block_size=128, init_from=str(run / ckpt.CHECKPOINTS_DIR / "step_0000010")))
    assert not (other / "config.json").exists()


def test_a_read_only_checkpoints_folder_is_refused_before_training(char_data, tmp_path):
    """out_dir was proved writable at start, but its checkpoints/ (an earlier run's) was not:
    the run trained every step and failed at its first save."""
    from conftest import tiny_config
    from gpt.config import ConfigError
    from gpt.trainer import train
    from test_hardening import read_only_folder

    run = tmp_path / "run"
    run.mkdir()
    undo = read_only_folder(run / ckpt.CHECKPOINTS_DIR)
    try:
        with pytest.raises(ConfigError) as error:
            train(tiny_config(char_data, run, max_steps=10, eval_interval=10))
        assert f"{run / ckpt.CHECKPOINTS_DIR}, where the run saves its checkpoints, is not writable" in str(error.value)
        assert not (run / "metrics.jsonl").exists()  # refused before any step
    finally:
        undo()


def test_a_resume_on_another_number_of_processes_says_the_batch_changed(capsys):
    """Without tokens_per_step the tokens per optimizer step follow the number of processes: a
    run saved on 2 and resumed on 1 trained on half the batch, and nothing said so."""
    from gpt.config import TrainConfig
    from gpt.distributed import DistInfo
    from gpt.resume import note_changed_batch

    config = TrainConfig(batch_size=8, block_size=64)
    saved = {"train_config": config.to_dict(), "world_size": 2, "log_interval": {"accum": 1}}
    one = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    note_changed_batch(saved, config, one)
    assert capsys.readouterr().out == (
        "note: 512 tokens per optimizer step, the checkpoint's run took 1,024 (2 process(es) then, 1 now); "
        "the learning-rate schedule is unchanged. To keep its batch, set tokens_per_step = 1024\n")
    note_changed_batch(saved, replace(config, tokens_per_step=1024), one)  # accumulation keeps it
    note_changed_batch({**saved, "world_size": 1}, config, one)  # the same
    note_changed_batch({"train_config": {}}, config, one)  # an older checkpoint: nothing to compare
    assert capsys.readouterr().out == ""


def test_the_advice_to_keep_the_batch_on_more_processes_is_a_setting_that_is_accepted(capsys):
    """A 1-process run of 16 x 128 resumed on 2 processes: "set tokens_per_step = 2048" alone
    was then refused (not a multiple of 16 x 128 x 2 = 4096); the advice names a batch_size too,
    and the config it gives is one that validates and trains on that many tokens."""
    from gpt.config import TrainConfig
    from gpt.distributed import DistInfo
    from gpt.config import tokens_per_optimizer_step
    from gpt.resume import keep_batch_advice, note_changed_batch

    config = TrainConfig(batch_size=16, block_size=128)
    saved = {"train_config": config.to_dict(), "world_size": 1, "log_interval": {"accum": 1}}
    two = DistInfo(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
    note_changed_batch(saved, config, two)
    out = capsys.readouterr().out
    assert out.endswith("To keep its batch, set tokens_per_step = 2048 and batch_size = 8\n"), out
    advised = replace(config, tokens_per_step=2048, batch_size=8).validate()
    assert tokens_per_optimizer_step(advised, 2) == 2048
    # Where no batch_size fits (3 processes: 2,048 is not a multiple of 128 x 3), it says so.
    assert keep_batch_advice(2048, config, 3).startswith("No batch_size keeps its batch on 3 processes")
    # A batch that divides as it is: tokens_per_step alone, as before.
    assert keep_batch_advice(8192, config, 2) == "To keep its batch, set tokens_per_step = 8192"
    assert keep_batch_advice(3 * 256, replace(config, batch_size=4), 2) == (
        "To keep its batch, set tokens_per_step = 768 and batch_size = 3")


def test_a_state_json_whose_log_interval_lacks_a_key_is_refused_naming_it(tmp_path):
    """Only 'an object' was checked: a log_interval without 'loss_sums' (or 'accum', 'steps',
    'skipped') failed the resume with a bare KeyError deep in the trainer."""
    run = tmp_path / "run"
    ckpt_dir = save(run, 10, keep_last=2)
    path = ckpt_dir / ckpt.STATE_FILE
    state = json.loads(path.read_text())
    good = {"steps": 3, "skipped": 0, "accum": 1, "loss_sums": [12.5]}
    for bad in ({k: v for k, v in good.items() if k != "loss_sums"}, {**good, "accum": 0},
                {**good, "loss_sums": []}, {**good, "steps": "3"}):
        path.write_text(json.dumps({**state, "log_interval": bad}))
        with pytest.raises(ckpt.CheckpointError, match="'log_interval' should be an object with whole numbers"):
            ckpt.read_state(ckpt_dir)
    path.write_text(json.dumps({**state, "log_interval": good}))
    assert ckpt.read_state(ckpt_dir)["log_interval"] == good


def test_a_run_refused_during_set_up_leaves_no_empty_out_dir(char_data, tmp_path):
    """A new out_dir was made (and locked) before the dataset and tokens_per_step were checked:
    a refused run left an empty folder behind that looked like a run's. One that existed before
    the run is left as it was."""
    from conftest import tiny_config
    from gpt.config import ConfigError
    from gpt.shards import ShardError
    from gpt.trainer import train

    run = tmp_path / "new" / "run"
    with pytest.raises(ConfigError, match="tokens_per_step"):
        train(tiny_config(char_data, run, tokens_per_step=1000))  # not a multiple of 8 x 64
    assert not run.exists() and not (tmp_path / "new").exists()  # made by the run too: gone with it
    with pytest.raises(ShardError, match="dataset folder does not exist"):
        train(tiny_config(tmp_path / "no_data", run))
    assert not run.exists()
    run.mkdir(parents=True)
    with pytest.raises(ShardError):
        train(tiny_config(tmp_path / "no_data", run))
    assert run.is_dir()  # the user's own folder stays
    train(tiny_config(char_data, tmp_path / "ok", max_steps=5, eval_interval=5))
    assert (tmp_path / "ok" / "latest").exists()


def test_the_done_line_of_a_resumed_run_gives_the_whole_runs_time(char_data, tmp_path, capsys):
    """`done:` counted the whole run's steps and tokens but only this process's time (7s where
    metrics.jsonl said 21 s): it now gives the whole run's, this process's beside it."""
    import re

    from conftest import tiny_config
    from gpt.metrics import read_metrics
    from test_checkpoint import reseal
    from gpt.trainer import train

    config = tiny_config(char_data, tmp_path / "run", max_steps=4, eval_interval=4)
    train(config)
    first = capsys.readouterr().out
    assert re.search(r"^done: 4 steps, [\d,]+ tokens, \d+s, final val loss", first, re.M), first
    # The first process's time, as if it had taken a minute: the resumed run's total includes it.
    state_file = ckpt.latest_checkpoint(tmp_path / "run") / ckpt.STATE_FILE
    state = json.loads(state_file.read_text())
    state["elapsed_s"] = 61.0
    state_file.write_text(json.dumps(state))
    reseal(state_file.parent)  # past the manifest's checksums
    train(replace(config, max_steps=6, eval_interval=6))
    second = capsys.readouterr().out
    done = re.search(r"^done: 6 steps, [\d,]+ tokens, (\d+)m(\d+)s \((\d+)s in this process\)", second, re.M)
    assert done, second
    assert int(done[1]) * 60 + int(done[2]) >= 61 > int(done[3])
    assert read_metrics(tmp_path / "run")[-1]["elapsed_s"] >= 61


def test_mfu_stays_at_most_100_percent_when_the_peak_was_measured_on_a_busy_machine(char_data, tmp_path,
                                                                                    capsys, monkeypatch):
    """The CPU peak is a brief matmul at start: measured while another job ran (two busy loops),
    it came out at 0.07 TFLOP/s and the run logged MFU 160.3%. A peak measured below what training
    then achieves is raised to it, once said; a configured peak_tflops is kept as given."""
    from conftest import tiny_config
    from gpt import mfu
    from gpt.metrics import read_metrics
    from gpt.trainer import train

    # The matmul as a busy machine would have timed it: far below what the cores do.
    monkeypatch.setattr(mfu, "measure_matmul_flops", lambda *args, **kwargs: 1e6)
    train(tiny_config(char_data, tmp_path / "measured", max_steps=20, log_interval=5, peak_tflops=0.0))
    out = capsys.readouterr().out
    assert "peak 0.00 TFLOP/s per device (measured cpu float32 matmul)" in out
    assert out.count("faster than the 0.000 TFLOP/s peak measured at start") == 1, out
    mfus = [r["mfu"] for r in read_metrics(tmp_path / "measured") if "mfu" in r]
    assert mfus and max(mfus) <= 1.0 and mfus[0] == 1.0, mfus
    # A configured peak is the user's: MFU against it, whatever it gives.
    train(tiny_config(char_data, tmp_path / "configured", max_steps=5, log_interval=5, peak_tflops=1e-6))
    assert "faster than" not in capsys.readouterr().out
    assert read_metrics(tmp_path / "configured")[-1]["mfu"] > 1.0


def test_a_setting_whose_step_takes_minutes_even_at_the_peak_is_said_at_start(char_data, tmp_path, capsys):
    """block_size = 100,000 on a CPU: accepted without a word, minutes per step, and a stop signal
    waited for the step. The note comes from the FLOPs per step and the peak (here a configured
    1 kFLOP/s, so that the tiny model's step counts as long)."""
    from conftest import tiny_config
    from gpt.trainer import train

    train(tiny_config(char_data, tmp_path / "slow", max_steps=1, peak_tflops=1e-9))
    out = capsys.readouterr().out
    assert "note: one optimizer step takes at least " in out and "waits for the step to end" in out, out
    train(tiny_config(char_data, tmp_path / "quick", max_steps=1))
    assert "one optimizer step takes" not in capsys.readouterr().out


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_a_float32_run_on_a_cpu_with_native_bf16_says_bfloat16_is_faster(char_data, tmp_path, capsys, monkeypatch,
                                                                         fast_bf16):
    # dtype auto stays float32 on a CPU; on one with AVX512-BF16/AMX bf16 trained 1.15-2.7x faster
    # per step (docs/speed.md), which a user would not know to ask for. Said once, at start.
    from conftest import tiny_config
    import gpt.trainer
    from gpt.trainer import train

    monkeypatch.setattr(gpt.trainer, "has_fast_bf16", lambda device: fast_bf16)
    train(tiny_config(char_data, tmp_path / "run", max_steps=1))
    out = capsys.readouterr().out
    assert out.count("dtype=bfloat16 trains faster here") == (1 if fast_bf16 else 0), out
    train(tiny_config(char_data, tmp_path / "bf16", max_steps=1, dtype="bfloat16"))
    assert "trains faster here" not in capsys.readouterr().out


def test_a_resume_with_another_batch_size_says_its_evals_score_other_val_windows(char_data, tmp_path, capsys):
    """An eval scores the first eval_iters x batch_size x processes windows of the val sequence:
    resumed with batch_size 8 -> 4 (tokens per step kept), the train losses went on exactly but
    the val losses were over half as many windows, and compared with nothing before (review
    finding). The note says so, and its advice scores the same windows again."""
    from conftest import learning_records, rewound_copy, tiny_config
    from gpt.metrics import read_metrics
    from gpt.trainer import train

    full = tmp_path / "full"
    config = tiny_config(char_data, full, max_steps=20, eval_interval=10, eval_iters=4, log_interval=5)
    train(config)
    val = {r["step"]: r["val_loss"] for r in read_metrics(full) if "val_loss" in r}
    capsys.readouterr()

    halved = replace(config, out_dir=str(rewound_copy(full, tmp_path / "halved", 10)), batch_size=4,
                     tokens_per_step=512)
    train(halved)
    out = capsys.readouterr().out
    assert ("note: each eval now scores 16 val windows (eval_iters 4 x batch_size 4 x 1 process(es)), the "
            "checkpoint's run 32: val losses from here compare with each other, not with those before; to score "
            "the same 32 windows, set eval_iters = 8\n") in out, out
    assert abs([r for r in read_metrics(tmp_path / "halved") if "val_loss" in r][-1]["val_loss"] - val[20]) > 1e-4

    advised = replace(halved, out_dir=str(rewound_copy(full, tmp_path / "advised", 10)), eval_iters=8)
    train(advised)
    assert "val windows" not in capsys.readouterr().out
    again = [r for r in read_metrics(tmp_path / "advised") if "val_loss" in r][-1]
    assert again["step"] == 20 and abs(again["val_loss"] - val[20]) < 1e-5
    losses = [{r["step"]: r["loss"] for r in learning_records(run) if "loss" in r} for run in (tmp_path / "advised", full)]
    assert losses[0].keys() == losses[1].keys() and all(abs(losses[0][k] - losses[1][k]) < 1e-5 for k in losses[0])
