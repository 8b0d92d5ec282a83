"""The figures a user reads: loss, tokens/s, MFU, ETA and elapsed time in the log line and
metrics.jsonl, checked against hand computations on tiny runs."""

from __future__ import annotations

import time

import pytest
import torch

from gpt.metrics import read_metrics
from gpt.model import GPT, GPTConfig
from gpt.trainer import train
from gpt.training_log import eta_seconds, evals_left

from conftest import tiny_config


class VirtualClock:
    """The trainer's clock (gpt.trainer's `time`), moved only by `advance`: the ETA tests then
    compute exact figures instead of timing real work on a shared machine."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name: str):
        return getattr(time, name)


def virtual_clock(monkeypatch) -> VirtualClock:
    clock = VirtualClock()
    monkeypatch.setattr("gpt.trainer.time", clock)
    monkeypatch.setattr("gpt.training_log.time", clock)  # the log interval's timing
    return clock


def count_forwards(monkeypatch, sleep_s: float = 0.0, clock: VirtualClock | None = None) -> dict[str, list]:
    """Patch GPT.forward to record every training micro-batch's loss (and each eval forward),
    optionally taking `sleep_s` in each (on `clock` when given, else really sleeping) so that
    step times are long enough to check to a few percent."""
    seen: dict[str, list] = {"train": [], "eval": [], "rows": []}
    forward = GPT.forward

    def recording(self, idx, targets=None, **kwargs):
        if sleep_s and clock is not None:
            clock.advance(sleep_s)
        elif sleep_s:
            time.sleep(sleep_s)
        out = forward(self, idx, targets, **kwargs)
        if torch.is_grad_enabled():
            seen["train"].append(out[1].item())
            seen["rows"].append(idx.numel())
        else:
            seen["eval"].append(out[1].item())
        return out

    monkeypatch.setattr(GPT, "forward", recording)
    return seen


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_flops_per_token_is_the_hand_count_of_the_matmuls(tie, bias):
    """6N + 12LHDT against the matmuls written out: per token and layer qkv (3C^2), proj (C^2),
    MLP (8C^2), the lm_head (VC), attention's QK^T and AV (2 x T x C multiply-adds each), x 2 FLOPs
    x 3 (forward + backward); the formula adds only 6 per LayerNorm gain and bias, as nanoGPT does."""
    L, C, T, V = 2, 64, 32, 62
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=4, n_embd=C, tie_weights=tie, bias=bias))
    matmul_weights = L * 12 * C * C + V * C
    forward = 2 * matmul_weights + L * 2 * (2 * T * C)
    vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert model.flops_per_token() == 3 * forward + 6 * vectors
    assert 6 * vectors < 0.02 * model.flops_per_token()


def test_loss_tokens_per_s_and_mfu_are_what_the_steps_did(char_data, tmp_path, monkeypatch):
    """Grad accumulation 2, log_interval 3, an eval step (5) between log steps: each record's loss
    is the mean of its interval's micro-batch losses; tokens, tokens/s and MFU follow from the
    batches consumed and the step time."""
    seen = count_forwards(monkeypatch, sleep_s=0.01)
    config = tiny_config(char_data, tmp_path / "run", tokens_per_step=2 * 8 * 64, max_steps=8,
                         log_interval=3, eval_interval=5, eval_iters=2, peak_tflops=1.0)
    train(config)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [3, 5, 6, 8]
    assert len(seen["train"]) == 2 * 8 and set(seen["rows"]) == {8 * 64}
    flops = GPT(GPTConfig(vocab_size=62, block_size=64, n_layer=2, n_head=2, n_embd=64,
                          vocab_multiple=config.vocab_multiple)).flops_per_token()
    previous = 0
    for record in records:
        micro = seen["train"][2 * previous:2 * record["step"]]
        assert record["loss"] == pytest.approx(sum(micro) / len(micro), rel=1e-5)
        assert record["tokens"] == 2 * record["step"] * 8 * 64
        # tokens/s = tokens per step / step time, for the whole run and (one process) per device
        assert record["tokens_per_s"] * record["step_ms"] / 1000 == pytest.approx(2 * 8 * 64, rel=1e-3)
        assert record["tokens_per_s_per_device"] == record["tokens_per_s"]
        assert record["step_ms"] >= 2 * 10  # two sleeping micro-batches per step; no eval counted in
        assert record["mfu"] == pytest.approx(flops * record["tokens_per_s"] / 1e12, rel=1e-3, abs=1e-5)
        assert record["eta_s"] >= 0
        previous = record["step"]
    assert len(seen["eval"]) == 2 * config.eval_iters
    assert records[-1]["eta_s"] < 5  # the last line's: its final save, priced at the one of step 5
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed)


def test_eta_counts_the_evals_to_come_before_the_first_one(char_data, tmp_path, monkeypatch):
    """The first log line (no eval timed yet) used to leave evals out of the ETA: the 5 steps
    left alone (0.1 s here), while the two evals to come (30 forward passes each) take 0.6 s
    more; now they are priced at a third of a micro-step per forward pass. Once an eval has been
    timed, the evals to come cost what it took. (Forward passes take 10 ms on a virtual clock.)"""
    clock = virtual_clock(monkeypatch)
    count_forwards(monkeypatch, sleep_s=0.01, clock=clock)
    config = tiny_config(char_data, tmp_path / "run", tokens_per_step=2 * 8 * 64, max_steps=8,
                         log_interval=3, eval_interval=5, eval_iters=30)
    train(config)
    first, after_eval = read_metrics(tmp_path / "run")[:2]
    assert (first["step"], after_eval["step"]) == (3, 5)
    assert first["step_ms"] == pytest.approx(20)  # accumulation 2: two forward passes a step
    assert evals_left(3, config) == 2 and evals_left(5, config) == 1
    # 5 steps of 20 ms, and 2 evals of 30 forward passes priced at 20 ms / 2 / 3 each
    assert first["eta_s"] == pytest.approx(round(5 * 0.02 + 2 * 30 * 0.01 / 3, 1))
    # 3 steps, and one eval at the 30 x 10 ms the one at step 5 took
    assert after_eval["eta_s"] == pytest.approx(round(3 * 0.02 + 30 * 0.01, 1))


def test_eta_seconds():
    # Timed eval and save: each eval step to come costs both.
    assert eta_seconds(0.1, 10, 2, 1.0, 0.5, 20, 1) == pytest.approx(1.0 + 3.0)
    # None timed yet: eval_iters forward passes of a micro-batch, a third of a micro-step each.
    assert eta_seconds(0.3, 10, 2, None, 0.0, 20, 2) == pytest.approx(3.0 + 2 * 20 * 0.05)
    assert eta_seconds(0.1, 0, 0, None, 0.0, 20, 1) == 0.0
    assert eta_seconds(0.1, 0, 0, -5.0, 0.0, 20, 1) == 0.0  # never negative
    # An eval step's line comes before its save: the last line's ETA is that save, not 0.
    assert eta_seconds(0.1, 0, 0, 1.0, 0.5, 20, 1, saving_now=True) == pytest.approx(0.5)
    assert eta_seconds(0.1, 10, 2, 1.0, 0.5, 20, 1, saving_now=True) == pytest.approx(1.0 + 3.0 + 0.5)


def test_first_interval_after_a_resume_times_only_the_resumed_steps(char_data, tmp_path, monkeypatch):
    """Resumed at step 5 with log_interval 3: the record at step 6 times the one step this process
    ran (not 6 steps in its wall time), elapsed_s goes on from the checkpoint, and no step is
    recorded twice."""
    seen = count_forwards(monkeypatch, sleep_s=0.02)
    config = tiny_config(char_data, tmp_path / "run", max_steps=5, log_interval=3, eval_interval=5, eval_iters=1)
    train(config)
    before = read_metrics(tmp_path / "run")
    train(tiny_config(char_data, tmp_path / "run", max_steps=8, log_interval=3, eval_interval=5, eval_iters=1))
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [3, 5, 6, 8]
    assert records[:2] == before
    resumed = records[2]
    assert resumed["step_ms"] >= 20  # one step of one sleeping micro-batch, not 1/6 of it
    assert resumed["tokens_per_s"] * resumed["step_ms"] / 1000 == pytest.approx(8 * 64, rel=1e-3)
    assert resumed["loss"] == pytest.approx(seen["train"][5], rel=1e-5)  # step 6's alone
    assert before[-1]["elapsed_s"] < resumed["elapsed_s"] < records[3]["elapsed_s"]


def test_activation_checkpointing_says_mfu_leaves_out_the_recompute(char_data, tmp_path, capsys):
    train(tiny_config(char_data, tmp_path / "run", max_steps=1, activation_checkpointing=True))
    assert "MFU counts model FLOPs only" in capsys.readouterr().out


def test_wandb_resume_after_a_kill_fills_the_steps_wandb_lost(char_data, tmp_path, monkeypatch):
    """wandb keeps up to 15 s of records in memory; kill -9 loses them (the run file of a short
    run killed so held its 7-byte header alone). The resumed run logged only the steps after its
    checkpoint, so the wandb run had a hole up to it; it now logs the missing ones from
    metrics.jsonl first, and none twice."""
    from dataclasses import replace

    from test_interop import finished_records, wandb_history

    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    config = tiny_config(char_data, run, wandb_mode="offline", wandb_project="logging-test", max_steps=4,
                         eval_interval=2, log_interval=2, eval_iters=1)
    train(config)
    run_id = (run / "wandb_run_id").read_text().strip()
    (first,) = run.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    assert sorted(wandb_history(finished_records(first))) == [2, 4]
    # As a kill -9 leaves it: the header only, the records never flushed.
    first.write_bytes(first.read_bytes()[:7])
    time.sleep(1.1)  # wandb names offline folders by the second
    train(replace(config, max_steps=6))
    files = sorted(run.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    # The header-only folder is set aside: `wandb sync out_dir/wandb/offline-run-*` stopped at it.
    assert len(files) == 1 and len(list(run.glob(f"wandb/empty-offline-run-*-{run_id}"))) == 1
    history = wandb_history(finished_records(files[-1]))
    assert sorted(history) == [2, 4, 6]
    records = {r["step"]: r for r in read_metrics(run)}
    for step in (2, 4, 6):
        assert history[step]["loss"] == pytest.approx(records[step]["loss"])
    # Resumed once more after a clean end: every step is on disk already, none is logged again.
    time.sleep(1.1)
    train(replace(config, max_steps=8))
    files = sorted(run.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2 and sorted(wandb_history(finished_records(files[-1]))) == [8]


def test_eta_leaves_out_the_first_steps_warm_up(char_data, tmp_path, monkeypatch):
    """The first step of a process also warms up (torch.compile: a minute on a GPU). The ETA
    priced every step to come at the first interval's mean, warm-up included: here 1 s of it
    over 4 steps of 10 ms made the ETA at step 4 ~1 s for 4 steps of 10 ms. The record's step_ms
    and tokens/s stay what the interval took. (On a virtual clock: exact figures.)"""
    clock = virtual_clock(monkeypatch)
    count_forwards(monkeypatch, sleep_s=0.01, clock=clock)
    forward = GPT.forward
    calls = []

    def first_slow(self, *args, **kwargs):
        if not calls:
            clock.advance(1.0)  # a compile's worth of warm-up, scaled down
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", first_slow)
    train(tiny_config(char_data, tmp_path / "run", max_steps=8, log_interval=4, eval_interval=0, eval_iters=1))
    first = read_metrics(tmp_path / "run")[0]
    assert first["step"] == 4 and first["step_ms"] == pytest.approx((1.0 + 4 * 0.01) / 4 * 1000)
    assert first["eta_s"] < 0.1  # 4 steps of 10 ms (and one eval of one forward pass), not 4 x 260 ms


def test_wandb_resume_from_an_older_checkpoint_logs_no_step_twice(char_data, tmp_path, monkeypatch, capsys):
    """Killed after wandb flushed steps past the checkpoint: offline, the resumed process logged
    them again (the same steps in two files of one run); online wandb drops such steps, and now
    offline does the same, from the steps the earlier files hold."""
    import shutil
    from dataclasses import replace

    from gpt.checkpoint import step_dir_name
    from test_interop import finished_records, wandb_history

    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    config = tiny_config(char_data, run, wandb_mode="offline", wandb_project="logging-test", max_steps=8,
                         eval_interval=2, log_interval=2, eval_iters=1)
    train(config)
    for folder in (run / "checkpoints").glob("step_*"):  # as if killed before the step-6 save
        if int(folder.name.removeprefix("step_")) > 4:
            shutil.rmtree(folder)
    (run / "latest").write_text(step_dir_name(4) + "\n")
    time.sleep(1.1)
    capsys.readouterr()
    train(replace(config, max_steps=10))
    # wandb cannot replace those steps: it says which it keeps from the process that ended.
    out = capsys.readouterr().out
    assert "already holds steps up to 8" in out and "keeps that process's values for steps 5-8" in out, out
    run_id = (run / "wandb_run_id").read_text().strip()
    files = sorted(run.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2
    assert sorted(wandb_history(finished_records(files[-1]))) == [10]
    assert [r["step"] for r in read_metrics(run)] == [2, 4, 6, 8, 10]


def test_durations_read_in_days_past_one_and_never_fail():
    from gpt.training_log import format_duration

    assert [format_duration(s) for s in (0, 45, 725, 25_380, 86_399, 273_600, 9600 * 3600)] == \
        ["0s", "45s", "12m05s", "7h03m", "23h59m", "3d04h", "400d00h"]
    assert format_duration(float("inf")) == format_duration(float("nan")) == "?"  # was OverflowError/ValueError


def test_an_interval_of_the_warm_up_step_alone_gives_no_eta(char_data, tmp_path, monkeypatch, capsys):
    """log_interval 1 (or a resume one step before a log step): the interval's only step is the
    process's first, which also warms up (compile: a minute), and the ETA priced every step to
    come at it (`40464 ms/step | ETA 3m49s` for a run that ended 12 s later). It is "?" (null in
    metrics.jsonl) until a steady step is timed. (A virtual clock: the first step takes 5 s.)"""
    clock = virtual_clock(monkeypatch)
    forward = GPT.forward
    calls = []

    def slow_first(self, idx, targets=None, **kwargs):
        if torch.is_grad_enabled():
            clock.advance(5.0 if not calls else 0.01)
            calls.append(1)
        return forward(self, idx, targets, **kwargs)

    monkeypatch.setattr(GPT, "forward", slow_first)
    train(tiny_config(char_data, tmp_path / "run", max_steps=6, log_interval=1, eval_interval=0, eval_iters=1))
    records = read_metrics(tmp_path / "run")
    assert records[0]["step_ms"] == pytest.approx(5000) and records[0]["eta_s"] is None
    assert "ETA ?" in capsys.readouterr().out
    assert records[1]["eta_s"] == pytest.approx(round(4 * 0.01 + 1 * 0.01 / 3, 1))  # 4 steps and the last eval
    assert records[-1]["eta_s"] < 5  # the last line's: its final save, priced at the one of step 5


def test_a_peak_raised_again_and_again_says_so_once(monkeypatch):
    """Each log step that beat the measured peak appended ", raised to training's own speed" once
    more; the chain went into state.json and every resume's model line."""
    from gpt.distributed import DistInfo
    from gpt.training_log import RAISED, peak_at_least

    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    peak, source = 1e9, "measured cpu float32 matmul"
    for achieved in (2e9, 3e9, 4e9):
        peak, source = peak_at_least(peak, source, achieved, info)
    assert peak == 4e9 and source == "measured cpu float32 matmul" + RAISED
