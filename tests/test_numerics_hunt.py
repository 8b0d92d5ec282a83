"""The training loop's numbers and saves against what they should be: found by a numerics hunt."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import replace

import pytest
import torch

import gpt.trainer as trainer
from gpt import checkpoint as ckpt
from gpt.config import TrainConfig
from gpt.distributed import DistInfo
from gpt.loader import TokenLoader
from gpt.metrics import MetricsLog, read_metrics
from gpt.mfu import measure_matmul_flops
from gpt.model import GPT
from gpt.nonfinite import NonFiniteGuard
from gpt.optim import build_optimizer
from gpt.resume import note_changed_settings
from gpt.dataset import load_meta
from gpt.stop import PREEMPTED_EXIT_CODE
from gpt.trainer import gpt_config_for, train, train_step

from conftest import tiny_config


def stop_signal_in_step(monkeypatch, index: int) -> list[int]:
    """SIGTERM at the start of the training loop's 0-based step `index` of a fresh run (the loop
    asks learning_rate_at for each step's rate in turn; a resume starts past it and is left
    alone). Returns the list that the steps of the run's saves go into."""
    real_lr, real_save = trainer.learning_rate_at, ckpt.Checkpointer.save
    asked, saved = [], []

    def rate(step, config):
        asked.append(step)
        if asked[-(index + 1):] == list(range(index + 1)):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr(step, config)

    def counted_save(self, step, *args, **kwargs):
        saved.append(step)
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(trainer, "learning_rate_at", rate)
    monkeypatch.setattr(ckpt.Checkpointer, "save", counted_save)
    return saved


def test_a_stop_signal_at_an_eval_step_saves_that_step_once(char_data, tmp_path, monkeypatch):
    """SIGTERM during an eval step (4): the eval's checkpoint of step 4 is the stop's checkpoint.
    The stop saved step 4 a second time, the same state again, which doubled the time a preempted
    job spends saving before it is killed. The resume goes on from it, each step logged once."""
    saved = stop_signal_in_step(monkeypatch, 3)
    run = tmp_path / "run"
    config = tiny_config(char_data, run, n_embd=32, block_size=32, batch_size=4, max_steps=6, log_interval=2,
                         eval_interval=4, eval_iters=2)
    with pytest.raises(SystemExit) as e:
        train(config)
    assert e.value.code == PREEMPTED_EXIT_CODE
    assert saved == [4]
    assert ckpt.read_state(ckpt.latest_checkpoint(run))["step"] == 4

    assert train(config).step == 6
    assert saved == [4, 6]
    assert [r["step"] for r in read_metrics(run)] == [2, 4, 6]


def test_a_stop_signal_during_the_last_step_ends_the_run_as_complete(char_data, tmp_path, monkeypatch, capsys):
    """SIGTERM during the last step: the run finishes (its final checkpoint saved once) and
    returns as a complete run. It exited with 75, "run again to resume", so a SLURM job
    preempted in its last step was requeued to wait in the queue for a run with nothing to do."""
    saved = stop_signal_in_step(monkeypatch, 3)
    run = tmp_path / "run"
    config = tiny_config(char_data, run, n_embd=32, block_size=32, batch_size=4, max_steps=4, log_interval=2,
                         eval_interval=0, eval_iters=2)
    result = train(config)
    assert result.step == 4 and result.val_loss is not None
    assert saved == [4]
    assert "the run is complete" in capsys.readouterr().out
    assert ckpt.read_state(ckpt.latest_checkpoint(run))["step"] == 4


def test_a_resume_leaves_no_line_that_read_metrics_refuses(tmp_path):
    """Cutting the file back at a resume kept damaged lines that are JSON objects without an
    integer step ({}, a float or bool step); read_metrics refuses those, so gpt.plot (and wandb's
    backfill) could never read the run's metrics again."""
    lines = [{"step": 2, "loss": 1.0}, {}, {"loss": 3.0}, {"step": 3.5}, {"step": True}, {"step": 4, "loss": 0.5},
             {"step": 6, "loss": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    MetricsLog(tmp_path, resume_step=4)
    assert read_metrics(tmp_path) == [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.5}]



def _step_gradients(data_dir, tmp_path, batch_size: int, accum: int, grad_clip: float) -> tuple[float, dict]:
    """One real train_step of a fresh tiny model: its logged loss sum / micro-batches, and the
    gradients the optimizer steps with (read by a step pre-hook, after clipping)."""
    torch.manual_seed(0)
    config = tiny_config(data_dir, tmp_path, n_embd=32, block_size=32, batch_size=batch_size, grad_clip=grad_clip)
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    model = GPT(gpt_config_for(config, vocab_size=load_meta(data_dir)["vocab_size"]))
    optimizer = build_optimizer(model, config, info.device)
    seen = {}
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.update({n: p.grad.clone() for n, p in model.named_parameters()}))
    loader = TokenLoader(data_dir, "train", batch_size, config.block_size, seed=config.seed)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    guard = NonFiniteGuard(config, model, optimizer, False, info, tmp_path)
    loss_sum = torch.zeros(())
    train_step(model, model, optimizer, scaler, loader, guard, loss_sum, contextlib.nullcontext(), accum, config,
               step=0, lr=1e-3)
    return loss_sum.item() / accum, seen


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_two_micro_batches_of_4_give_the_gradients_of_one_batch_of_8(char_data, tmp_path, grad_clip):
    """Gradient accumulation: the same 8 windows, each micro-batch's loss divided by the
    micro-batches, clipped once on the whole step's gradient (0.05: the step clips), give the
    gradients of one batch of 8. (Compared as gradients: AdamW and Muon updates are blind to
    their scale, so the weights alone would not show a wrong division.)"""
    loss, grads = _step_gradients(char_data, tmp_path, batch_size=8, accum=1, grad_clip=grad_clip)
    accumulated_loss, accumulated = _step_gradients(char_data, tmp_path, batch_size=4, accum=2, grad_clip=grad_clip)
    assert accumulated_loss == pytest.approx(loss, rel=1e-6)
    norm = torch.nn.utils.get_total_norm(list(grads.values())).item()
    if grad_clip:
        assert norm == pytest.approx(grad_clip, rel=1e-4)
    for name, grad in grads.items():
        assert torch.allclose(accumulated[name], grad, rtol=1e-4, atol=1e-6 * norm), name


def test_the_schedule_note_says_min_lr_was_reached_only_when_it_was(capsys):
    """A run of 20 steps with warmup_steps 100 never left its warmup, so it never reached min_lr;
    extended with --max_steps=40 --warmup_steps=2 the note said it had "reached min_lr at step
    20" (it compared the old decay's end with the new warmup). With a warmup that did end, the
    note still says it."""
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    base = TrainConfig(max_steps=20, warmup_steps=100)
    note_changed_settings(base.to_dict(), replace(base, max_steps=40, warmup_steps=2), info, step=20)
    note = capsys.readouterr().out
    assert "step 21 trains at lr" in note and "reached min_lr" not in note
    finished = replace(base, warmup_steps=2)
    note_changed_settings(finished.to_dict(), replace(finished, max_steps=40), info, step=20)
    assert "that schedule had reached min_lr at step 20" in capsys.readouterr().out


def test_measuring_the_peak_leaves_the_random_stream_alone():
    """peak_tflops = 0 measures a matmul at every start, after a resume has restored the RNG
    state: drawing its matrices from torch's global generator shifted the dropout masks by a
    load-dependent amount (how many sizes it tried), so resumes and even two fresh runs with
    dropout differed from the third step on."""
    torch.manual_seed(1337)
    expected = torch.rand(4)
    for budget in (1e-9, 0.05):  # one size tried, or several
        torch.manual_seed(1337)
        measure_matmul_flops(torch.device("cpu"), torch.float32, n=1024, max_seconds=budget)
        assert torch.equal(torch.rand(4), expected)
