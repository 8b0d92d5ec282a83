"""Precision x strategy x nan_policy: float16's GradScaler together with nan_policy = 'skip', FSDP,
Muon, gradient accumulation and activation checkpointing, and exact resumes of such runs.

A NaN is put into the loss of one training micro-batch (one rank's, under torchrun) by wrapping
`GPT.forward`; the step must be skipped on every rank, GradScaler must halve its loss scale on
every rank (state.json's `grad_scaler`, saved by rank 0, speaks for all of them), and a resume
from the checkpoint after it must continue exactly as the run that never stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt import checkpoint as ckpt
from gpt import model as model_module
from gpt.metrics import read_metrics
from gpt.errors import TrainingError
from gpt.trainer import train

from conftest import latest_weights, learning_records, rewound_copy, tiny_config

REPO = Path(__file__).resolve().parents[1]
INITIAL_SCALE = 65536.0  # torch.amp.GradScaler's

# Injects a NaN into the loss of training forward call NAN_CALL (0-based, counting micro-batches)
# on rank NAN_RANK, then runs train.py's entry point with the given arguments.
NAN_TRAIN = """\
import os, sys
sys.path.insert(0, {repo!r})
from gpt import model as M
calls, original = [0], M.GPT.forward
def forward(self, *args, **kwargs):
    logits, loss = original(self, *args, **kwargs)
    if self.training and loss is not None:
        if calls[0] == int(os.environ["NAN_CALL"]) and os.environ.get("RANK", "0") == os.environ["NAN_RANK"]:
            loss = loss * float("nan")
        calls[0] += 1
    return logits, loss
M.GPT.forward = forward
from gpt.cli import run_train
sys.exit(run_train(sys.argv[1:], default_config={default!r}))
"""


def nan_at_call(monkeypatch, call: int) -> None:
    """In this process: the loss of training micro-batch `call` (0-based) becomes NaN."""
    original, calls = model_module.GPT.forward, [0]

    def forward(self, *args, **kwargs):
        logits, loss = original(self, *args, **kwargs)
        if self.training and loss is not None:
            if calls[0] == call:
                loss = loss * float("nan")
            calls[0] += 1
        return logits, loss

    monkeypatch.setattr(model_module.GPT, "forward", forward)


def scaler_state(run: Path, step: int) -> tuple[float, int]:
    saved = ckpt.read_state(run / "checkpoints" / ckpt.step_dir_name(step))["grad_scaler"]
    return saved["scale"], saved["_growth_tracker"]


def test_float16_skip_halves_the_loss_scale_and_a_resume_stays_exact(char_data, tmp_path, monkeypatch):
    """One process, float16, AdamW, nan_policy = skip: a NaN loss at step 2 is skipped (by
    GradScaler, which halves its scale) and counted; resumed from step 3, the run continues bit
    for bit, loss scale and its growth count included."""
    config = dict(dtype="float16", optimizer="adamw", nan_policy="skip", max_steps=6, eval_interval=3,
                  log_interval=1, eval_iters=1, batch_size=4, block_size=32, n_embd=32)
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        nan_at_call(patch, 1)  # step 2
        train(tiny_config(char_data, run, **config))
    records = read_metrics(run)
    assert [r["loss"] is None for r in records] == [False, True, False, False, False, False]
    assert records[-1]["skipped_steps"] == 1
    assert scaler_state(run, 3) == (INITIAL_SCALE / 2, 1)  # halved at step 2, one good step since
    assert scaler_state(run, 6) == (INITIAL_SCALE / 2, 4)

    resumed = rewound_copy(run, tmp_path / "resumed", step=3)
    train(tiny_config(char_data, resumed, **config))
    assert learning_records(resumed) == learning_records(run)
    assert scaler_state(resumed, 6) == scaler_state(run, 6)
    ours, theirs = latest_weights(resumed), latest_weights(run)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def launch(args: list[str], script: Path, nproc: int, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), *args] if nproc else [sys.executable, str(script), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def assert_finished(result: subprocess.CompletedProcess, run: Path, steps: int = 6) -> None:
    """The run exited 0, or it finished (its last checkpoint is `latest`) and only then a gloo
    rank crashed at interpreter exit (about 1 launch in 25 here: SIGABRT or SIGSEGV)."""
    output = result.stdout + result.stderr
    finished = (run / "latest").exists() and (run / "latest").read_text().strip() == ckpt.step_dir_name(steps)
    assert finished and (result.returncode == 0 or "SIG" in output), output[-4000:]


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"--data_dir={data}", f"--out_dir={out}", "--prepare_source=none", "--device=cpu",
            "--dtype=float16", "--optimizer=muon", "--nan_policy=skip", "--n_layer=2", "--n_head=2",
            "--n_embd=32", "--block_size=32", "--tokens_per_step=256", "--max_steps=6", "--log_interval=1",
            "--eval_interval=3", "--eval_iters=1", "--warmup_steps=2", "--learning_rate=3e-3",
            "--min_lr=3e-4", "--peak_tflops=1", *extra]


@pytest.mark.slow
def test_fsdp_float16_muon_skip_on_one_rank_then_resume_on_two_and_one(char_data, tmp_path):
    """FSDP on 2 ranks, float16 (MixedPrecisionPolicy + GradScaler on DTensor gradients), Muon,
    accumulation 2, activation checkpointing: a NaN in rank 1's first micro-batch of step 2 makes
    both ranks skip the step and halve the scale. The run tracks one process with the same NaN;
    resumed from step 3 on 2 ranks it is bit for bit the same run, on 1 plain process within the
    float16 tolerance."""
    script = tmp_path / "nan_train.py"
    script.write_text(NAN_TRAIN.format(repo=str(REPO), default=str(REPO / "configs" / "default.toml")))
    fsdp = ["--batch_size=2", "--parallel=fsdp", "--activation_checkpointing=true"]
    two, one = tmp_path / "two", tmp_path / "one"
    assert_finished(launch(run_args(char_data, two, *fsdp), script, 2, NAN_CALL="2", NAN_RANK="1"), two)
    assert_finished(launch(run_args(char_data, one, "--batch_size=8"), script, 0, NAN_CALL="1", NAN_RANK="0"), one)

    for run in (two, one):
        records = read_metrics(run)
        assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6], run
        assert records[1]["loss"] is None and records[-1]["skipped_steps"] == 1
        assert scaler_state(run, 3) == (INITIAL_SCALE / 2, 1) and scaler_state(run, 6) == (INITIAL_SCALE / 2, 4)
    losses = {run: [r["loss"] for r in read_metrics(run)] for run in (two, one)}
    for a, b in zip(losses[two], losses[one]):
        assert (a is None and b is None) or abs(a - b) < 1e-4  # measured <= 2e-5

    again = rewound_copy(two, tmp_path / "again", step=3)
    assert_finished(launch(run_args(char_data, again, *fsdp), REPO / "train.py", 2), again)
    assert learning_records(again) == learning_records(two)
    assert scaler_state(again, 6) == scaler_state(two, 6)
    ours, theirs = latest_weights(again), latest_weights(two)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    single = rewound_copy(two, tmp_path / "single", step=3)
    assert_finished(launch(run_args(char_data, single, "--batch_size=8"), REPO / "train.py", 0), single)
    assert scaler_state(single, 6) == scaler_state(two, 6)
    for a, b in zip([r["loss"] for r in read_metrics(single)][3:], losses[two][3:]):
        assert abs(a - b) < 1e-4


# ----------------------------------------------------------------------------------------
# FSDP's CPU offload on a GPU: the shards live in CPU memory, so the collectives over them
# (clip_grad_norm_'s norm, GradScaler's overflow flag, Muon's gather, the full checkpoint's
# gather) need gloo beside NCCL; NCCL alone fails at the first step with "No backend type
# associated with device type cpu" (pytorch/pytorch#148532).


def test_cpu_offload_gets_a_cpu_backend_beside_nccl(monkeypatch):
    from gpt import distributed, trainer
    from gpt.config import TrainConfig

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert distributed.process_group_backend(cuda) == "nccl"
    assert distributed.process_group_backend(cuda, cpu_collectives=True) == "cuda:nccl,cpu:gloo"
    assert distributed.process_group_backend(cpu, cpu_collectives=True) == "gloo"

    asked = {}

    def init_distributed(device, **kwargs):
        asked.update(kwargs)
        raise SystemExit(0)  # what the trainer asked for is all this test needs

    monkeypatch.setattr(trainer, "init_distributed", init_distributed)
    for offload in (False, True):
        config = TrainConfig(device="cpu", parallel="fsdp", fsdp_cpu_offload=offload).validate()
        with pytest.raises(SystemExit):
            train(config)
        assert asked.get("cpu_collectives", False) is offload


@pytest.mark.device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_fsdp_cpu_offload_on_a_gpu_trains_with_clipping_muon_and_float16(code_data, tmp_path):
    """One GPU under torchrun, FSDP with CPU offload: gradient clipping, GradScaler (float16),
    Muon and nan_policy = skip (Muon's skip flag is on the GPU, its shards in CPU memory), and a
    full-format checkpoint, all collectives over CPU tensors."""
    out = tmp_path / "run"
    args = [f"--data_dir={code_data}", f"--out_dir={out}", "--prepare_source=none", "--device=cuda",
            "--compile=false", "--dtype=float16", "--optimizer=muon", "--nan_policy=skip", "--grad_clip=1.0",
            "--parallel=fsdp", "--fsdp_cpu_offload=true", "--checkpoint_format=full", "--n_layer=2",
            "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--max_steps=6",
            "--log_interval=1", "--eval_interval=3", "--eval_iters=1", "--warmup_steps=2", "--peak_tflops=1"]
    result = launch(args, REPO / "train.py", 1)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    losses = [r["loss"] for r in read_metrics(out)]
    assert len(losses) == 6 and all(loss is not None and loss < 5 for loss in losses)


def test_float16_gradients_that_always_overflow_stop_the_run_once_the_loss_scale_falls_below_1(
        char_data, tmp_path, monkeypatch):
    """A finite loss whose gradients overflow at every step: GradScaler skips each step and halves
    its scale, and nothing non-finite reaches the loss for nan_policy to count, so the run went
    on to max_steps without learning. Once the scale is below 1 it stops, naming the cause."""
    original = model_module.GPT.forward

    def forward(self, *args, **kwargs):
        logits, loss = original(self, *args, **kwargs)
        if self.training and loss is not None:
            loss.register_hook(lambda grad: grad * float("inf"))
        return logits, loss

    monkeypatch.setattr(model_module.GPT, "forward", forward)
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as stopped:
        train(tiny_config(char_data, run, dtype="float16", max_steps=40, log_interval=1, eval_interval=10,
                          eval_iters=1, batch_size=2, block_size=16, n_embd=32))
    # 65536 = 2^16 halved 17 times: 0.5, at step 17
    assert str(stopped.value).startswith("the float16 loss scale fell to 0.5 by step 17: the gradients "
                                         "overflow float16 even unscaled"), stopped.value
    assert "use dtype bfloat16 or float32 instead of float16" in str(stopped.value)
    scales = [r["loss_scale"] for r in read_metrics(run)]
    assert scales == [INITIAL_SCALE / 2 ** n for n in range(1, 18)]
