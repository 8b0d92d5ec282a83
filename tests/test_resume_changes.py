"""Resuming a run with changed settings: extending a finished run, another dtype, fine-tuning
from another run's weights (init_from), and what `--help` says about `resume`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gpt import checkpoint as ckpt
from gpt.config import build_parser
from gpt.metrics import read_metrics
from gpt.optim import learning_rate_at
from gpt.trainer import train

from conftest import learning_records, rewound_copy, tiny_config


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_extending_a_finished_run_says_in_numbers_how_the_learning_rate_jumps(char_data, tmp_path, capsys):
    """A larger max_steps stretches the cosine from the resumed step on, so the learning rate
    jumps from min_lr back up. The note used to say only that the schedule 'follows the new
    max_steps': now it gives both rates and how to stay at min_lr."""
    run = tmp_path / "run"
    done = train(tiny_config(char_data, run, max_steps=10))
    checkpoints = files_of(run / "checkpoints")

    # The same max_steps again: nothing is trained or written; the finished run's result is reported.
    capsys.readouterr()
    again = train(tiny_config(char_data, run, max_steps=10))
    out = capsys.readouterr().out
    assert "note: already at step 10, max_steps is 10: nothing to train" in out
    assert (again.step, again.val_loss, again.checkpoint) == (10, done.val_loss, done.checkpoint)
    assert f"final val loss {done.val_loss:.4f}" in out
    assert files_of(run / "checkpoints") == checkpoints
    # Rerun by mistake with a sweep's other values: still nothing trained, and the run's record
    # keeps the settings it trained with (config.json was rewritten with the unused values, and
    # the note said "the run goes on with the new values").
    record = (run / "config.json").read_bytes()
    train(tiny_config(char_data, run, max_steps=10, learning_rate=3e-2, dropout=0.1))
    out = capsys.readouterr().out
    assert ("note: settings differ from the checkpoint's (dropout 0.0 -> 0.1, learning_rate 0.003 -> 0.03), "
            "but nothing is left to train: they are not used, and config.json keeps the settings the run "
            "trained with") in out
    assert "goes on with the new values" not in out and "nothing to train" in out
    assert (run / "config.json").read_bytes() == record and files_of(run / "checkpoints") == checkpoints

    stay = tmp_path / "stay"
    shutil.copytree(run, stay)
    longer = tiny_config(char_data, run, max_steps=20)
    train(longer)
    out = capsys.readouterr().out
    old, new = learning_rate_at(10, tiny_config(char_data, run, max_steps=10)), learning_rate_at(10, longer)
    assert old == longer.min_lr < new
    assert (f"max_steps 10 -> 20; the run goes on with the new values (the learning-rate schedule, a "
            f"function of the step, follows the new max_steps from here: step 11 trains at lr {new:.2e}, "
            f"where the checkpoint's schedule gave {old:.2e}; that schedule had reached min_lr at step "
            f"10: to stay at min_lr, set lr_decay_steps = 10)") in out
    records = read_metrics(run)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert records[2]["lr"] == learning_rate_at(14, longer)

    # The advice does what it says: extended at min_lr, and no jump left to report.
    train(tiny_config(char_data, stay, max_steps=20, lr_decay_steps=10))
    out = capsys.readouterr().out
    assert "lr_decay_steps 0 -> 10" in out and "trains at lr" not in out
    assert [r["lr"] for r in read_metrics(stay)][2:] == [longer.min_lr] * 2


def test_a_float16_run_resumes_with_its_loss_scale(char_data, tmp_path, monkeypatch):
    """GradScaler's state was not saved: a resumed float16 run started again at the initial
    loss scale and skipped (overflowing) steps the uninterrupted run did not, so its losses
    differed. A high initial scale makes the first steps overflow and back off, as a long run's
    scale drifts from the initial one."""
    init = torch.amp.GradScaler.__init__

    def high_initial_scale(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "init_scale": 2.0 ** 24})

    monkeypatch.setattr(torch.amp.GradScaler, "__init__", high_initial_scale)
    SMALL = dict(batch_size=2, block_size=32)  # float16 matmuls are slow on CPUs (36 s at the tiny default)
    full = tmp_path / "full"
    train(tiny_config(char_data, full, max_steps=20, dtype="float16", **SMALL))
    saved = ckpt.read_state(full / "checkpoints" / "step_0000010")["grad_scaler"]
    assert 0 < saved["scale"] < 2.0 ** 24  # it backed off from the initial scale

    resumed = rewound_copy(full, tmp_path / "resumed", step=10)
    train(tiny_config(char_data, resumed, max_steps=20, dtype="float16", **SMALL))
    assert learning_records(resumed) == learning_records(full)
    assert ckpt.read_state(ckpt.latest_checkpoint(resumed))["grad_scaler"] == \
        ckpt.read_state(ckpt.latest_checkpoint(full))["grad_scaler"]

    # Other dtypes hold no scaler state; switching dtypes either way resumes (a fresh scaler for float16).
    train(tiny_config(char_data, resumed, max_steps=25, dtype="float32", **SMALL))
    assert ckpt.read_state(ckpt.latest_checkpoint(resumed))["grad_scaler"] is None
    train(tiny_config(char_data, resumed, max_steps=30, dtype="float16", **SMALL))
    assert ckpt.read_state(ckpt.latest_checkpoint(resumed))["grad_scaler"]["scale"] > 0
    assert [r["step"] for r in read_metrics(resumed)][-2:] == [25, 30]


def test_a_state_json_with_a_bad_grad_scaler_is_refused(char_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=5, eval_interval=5, dtype="float16"))
    path = ckpt.latest_checkpoint(run) / ckpt.STATE_FILE
    state = ckpt.read_state(path.parent)
    state["grad_scaler"] = {"scale": -1.0, "_growth_tracker": 0}
    path.write_text(json.dumps(state))
    with pytest.raises(ckpt.CheckpointError, match="'grad_scaler' should be null or an object"):
        ckpt.read_state(path.parent)


def test_init_from_a_model_of_another_shape_says_to_use_its_settings(char_data, tmp_path):
    """The refusal used to advise 'another --out_dir for a new run', which a fine-tune into a
    new folder already is."""
    base = tmp_path / "base"
    train(tiny_config(char_data, base, max_steps=5, eval_interval=5))
    with pytest.raises(ckpt.CheckpointError) as refused:
        train(tiny_config(char_data, tmp_path / "tuned", init_from=str(base), n_embd=32, n_head=4))
    message = str(refused.value)
    assert message.startswith(f"init_from: {ckpt.latest_checkpoint(base)} holds a different model "
                              f"(n_head: checkpoint 2 vs config 4; n_embd: checkpoint 64 vs config 32)"), message
    assert "Fine-tune it with its model settings (--n_head=2 --n_embd=64)" in message
    assert "--out_dir" not in message
    assert not (tmp_path / "tuned" / "checkpoints").exists()


def test_resume_help_says_what_each_choice_does():
    help_text = " ".join(build_parser().format_help().split())  # argparse wraps lines
    assert "starts fresh if there is none" in help_text
    assert "'never' always starts fresh, and refuses an out_dir that already holds checkpoints" in help_text


def test_init_from_at_a_shorter_context_crops_the_position_table(char_data, tmp_path, capsys):
    """Fine-tuning at a smaller block_size (as nanoGPT's crop_block_size): the first rows of the
    trained position table; the fine-tune then saves and resumes at its own context."""
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    train(tiny_config(char_data, base, max_steps=5, eval_interval=5))
    capsys.readouterr()
    train(tiny_config(char_data, tuned, init_from=str(base), block_size=32, max_steps=4, eval_interval=2))
    assert "cropped the position embeddings from block_size 64 to 32" in capsys.readouterr().out
    state = ckpt.read_state(ckpt.latest_checkpoint(tuned))
    assert state["model_config"]["block_size"] == 32
    assert ckpt.read_model_state(ckpt.latest_checkpoint(tuned))["pos_emb.weight"].shape[0] == 32
    result = train(tiny_config(char_data, tuned, init_from=str(base), block_size=32, max_steps=6, eval_interval=2))
    assert result.step == 6 and "resumed from" in capsys.readouterr().out
