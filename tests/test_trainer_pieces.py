"""Unit tests for the small pieces `_train` is told with (gpt/trainer.py): fast, no training run."""

import time

import torch

from gpt.config import TrainConfig
from gpt.distributed import DistInfo
from gpt.trainer import grad_scaler
from gpt.training_log import Clock, LogInterval, carried_interval, interval_step_time, log_record

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def test_carried_interval_fresh_and_resumed():
    fresh = carried_interval({}, CPU, accum=2)
    assert (fresh.loss_sum.item(), fresh.steps, fresh.skipped) == (0.0, 0, 0)
    saved = {"log_interval": {"steps": 3, "skipped": 1, "accum": 2, "loss_sums": [5.5]}}
    resumed = carried_interval(saved, CPU, accum=2)
    assert (resumed.loss_sum.item(), resumed.steps, resumed.skipped) == (5.5, 3, 1)
    # Another accumulation: the saved sum rescaled to this run's micro-batches per step.
    assert carried_interval(saved, CPU, accum=4).loss_sum.item() == 11.0


def test_grad_scaler_restores_float16_scale_only():
    saved = {"grad_scaler": {"scale": 1024.0, "_growth_tracker": 7}}
    scaler = grad_scaler(torch.device("cpu"), torch.float16, saved)
    assert scaler.is_enabled() and scaler.get_scale() == 1024.0
    assert scaler.state_dict()["_growth_tracker"] == 7
    assert not grad_scaler(torch.device("cpu"), torch.float32, saved).is_enabled()
    assert grad_scaler(torch.device("cpu"), torch.float16, {}).get_scale() == 65536.0


def test_interval_step_time_leaves_warm_up_out_of_the_eta():
    now = time.perf_counter()
    clock = Clock(elapsed_before=0.0, timed_from=0, interval_start=now - 20, run_start=now - 20)
    clock.first_step_done = now - 10  # a 10 s first step (compile), then 10 steps in 10 s
    step_time, steady = interval_step_time(clock, step=11)
    assert abs(step_time - 20 / 11) < 0.05 and abs(steady - 1.0) < 0.05


def test_log_record_fields_and_line():
    config = TrainConfig(max_steps=100, eval_interval=50, eval_iters=2)
    now = time.perf_counter()
    clock = Clock(elapsed_before=5.0, timed_from=0, interval_start=now, run_start=now)
    record, message = log_record(
        10, config, CPU, lr=1e-3, tokens_seen=4096, train_loss=2.5, val_loss=None, step_time=0.1,
        steady=0.1, clock=clock, accum=1, tokens_per_step=1024, flops_per_token=1e6, peak=1e12,
        skipped=0, loss_scale=None)
    assert list(record) == ["step", "loss", "lr", "tokens", "tokens_per_s", "tokens_per_s_per_device", "mfu",
                            "step_ms", "elapsed_s", "eta_s"]
    assert record["tokens_per_s"] == 10240.0 and record["elapsed_s"] >= 5.0
    assert message.startswith("step     10/100 | loss 2.5000 | lr 1.00e-03 | 10,240 tok/s | MFU 1.0% | 100 ms/step")
    assert "skipped" not in message and "val loss" not in message

    record, message = log_record(
        50, config, CPU, lr=1e-3, tokens_seen=4096, train_loss=2.5, val_loss=2.25, step_time=0.1,
        steady=0.1, clock=clock, accum=1, tokens_per_step=1024, flops_per_token=1e6, peak=1e12,
        skipped=2, loss_scale=512.0)
    assert list(record)[-3:] == ["skipped_steps", "val_loss", "loss_scale"]
    assert message.endswith(" | skipped 2 | val loss 2.2500")
    assert (record["skipped_steps"], record["val_loss"], record["loss_scale"]) == (2, 2.25, 512.0)


def test_log_interval_is_a_plain_holder():
    interval = LogInterval(torch.zeros(()))
    interval.loss_sum += 1.0
    assert interval.loss_sum.item() == 1.0 and interval.steps == 0
