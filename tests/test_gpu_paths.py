"""CUDA-only code paths checked on the CPU: what a GPU session would otherwise find out on the
GPU, in minutes it does not have (the datasheet peaks for MFU, device selection, and how
benchmarks/gpu.sh's stage limits stop a stage)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest
import torch

from gpt import device, mfu
from gpt.config import ConfigError

from conftest import REPO


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H200", 989.5),  # SXM: 1,979 with sparsity
    ("NVIDIA H200 NVL", 835.5),  # PCIe: 1,671 with sparsity (it matched the SXM's "H200" before)
    ("NVIDIA GH200 480GB", 989.5),
    ("NVIDIA H100 80GB HBM3", 989.5),
    ("NVIDIA H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA H800 PCIe", 756.5),
    ("NVIDIA A10G", 70.0),
    ("NVIDIA L4", 121.0),
])
def test_bf16_datasheet_peak_is_the_dense_figure(name, tflops):
    assert mfu.gpu_peak_flops(name, torch.bfloat16) == tflops * 1e12


@pytest.mark.parametrize("name", ["NVIDIA RTX A1000", "NVIDIA RTX A1000 6GB Laptop GPU", "NVIDIA T400 4GB",
                                  "NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA L40X"])
def test_a_gpu_the_table_lacks_gets_no_other_gpus_datasheet(name):
    # The names were matched as substrings: an RTX A1000 read the A100's 312 TFLOP/s, a T400 the
    # T4's, a laptop RTX 4090 the desktop card's; each is measured instead.
    assert mfu.gpu_peak_flops(name, torch.bfloat16) is None and mfu.gpu_peak_flops(name, torch.float32) is None


def test_peak_flops_on_cuda_reads_the_datasheet_of_the_named_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    peak, source = mfu.peak_flops(torch.device("cuda", 0), torch.bfloat16)
    assert (peak, source) == (989.5e12, "NVIDIA H200 datasheet")
    # float32 under TF32 (the trainer turns it on for CUDA): the TF32 dense rate.
    assert mfu.peak_flops(torch.device("cuda", 0), torch.float32)[0] == 494.7e12


def test_cuda_device_is_picked_by_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device.pick_device("auto", local_rank=0) == torch.device("cuda", 0)
    assert device.pick_device("cuda", local_rank=1) == torch.device("cuda", 1)
    # More processes than GPUs: two ranks on one GPU, which NCCL refuses at the first collective
    # with a traceback on every rank (rank 3 of 2 GPUs was put on cuda:1). One line instead.
    with pytest.raises(ConfigError, match=r"^this process is local rank 3 of its node, but only 2 CUDA GPUs are "
                                          r"visible here .*\(torchrun --nproc_per_node=2; NPROC_PER_NODE=2 "):
        device.pick_device("auto", local_rank=3)


FAKE_PYTHON = """#!/usr/bin/env bash
# python, except torchrun: that one, like train.py under a stop signal, takes 1 s to finish
# after SIGTERM (it ends its step and saves), then says so in $MARK. (A `timeout` that returned
# at the signal is read back within milliseconds, long before that second is over.)
if [ "${1:-}" = "-m" ] && [ "${2:-}" = "torch.distributed.run" ]; then
    exec >/dev/null 2>&1  # not the test's pipes: their end must not wait for this process
    trap 'sleep 1; echo stopped > "$MARK"; exit 75' TERM
    echo started > "$MARK"
    for _ in $(seq 600); do sleep 0.1; done
    exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def test_a_stage_limit_returns_only_once_torchrun_has_stopped(tmp_path):
    """gpu.sh runs each stage under `timeout`. bash used to die at the signal, so `timeout`
    returned and the next stage started on the GPU while torchrun was still stopping its workers."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    mark = tmp_path / "mark"
    env = {**os.environ, "PYTHON": str(fake), "REAL_PYTHON": sys.executable, "MARK": str(mark), "NPROC": "1",
           "STRATEGIES": "none", "TRAIN_TOKENS": "10000", "DATA": str(tmp_path / "data"),
           "RUNS": str(tmp_path / "runs"), "RESULTS": str(tmp_path / "results.json")}
    start = time.monotonic()
    r = subprocess.run(["timeout", "-k", "30", "8", "bash", "benchmarks/gpu_scaleout.sh"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 124, r.stdout + r.stderr
    assert mark.read_text().strip() == "stopped", "timeout returned while torchrun was still running"
    assert time.monotonic() - start < 30  # not the -k limit: the trap waited for torchrun alone


def test_gpu_script_stage_limits_fit_its_budget_and_kill_after_a_grace():
    """Each stage's `timeout` has a -k grace (a stage that ignores SIGTERM cannot hold the call),
    and the stage limits with their graces stay inside the GPU call's 10 minutes."""
    import re

    text = (REPO / "benchmarks" / "gpu.sh").read_text()
    limits = re.findall(r"\btimeout (-k (\d+) )?(\d+) ", text)
    assert len(limits) == 6 and all(grace for grace, _, _ in limits), limits
    assert sum(int(s) for _, _, s in limits) <= 480
    assert sum(int(s) + int(k) for _, k, s in limits) <= 600


@pytest.mark.device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_muon_resumed_from_a_cpu_checkpoint_steps_on_the_gpu():
    """A checkpoint is read onto the CPU; Optimizer.load_state_dict moves AdamW's `step` counts to
    the parameter's device only for param groups with "fused" (or "capturable") set, which
    MuonAdamW keeps out of its groups: its fused AdamW part then got CPU steps next to CUDA
    parameters ("state_steps is on cpu", seen on an H200 in test_resume_continues_the_same_run)."""
    from gpt.muon import MuonAdamW

    def build():
        torch.manual_seed(0)
        params = [torch.randn(32, 64, device="cuda", requires_grad=True),
                  torch.randn(64, device="cuda", requires_grad=True)]
        return params, MuonAdamW([{"params": params[:1], "muon": True}, {"params": params[1:]}], lr=1e-3,
                                 fused=True)

    def step(params, optimizer):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()

    params, optimizer = build()
    step(params, optimizer)
    saved = {"state": {i: {k: v.cpu() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()},
             "param_groups": optimizer.state_dict()["param_groups"]}
    params, optimizer = build()
    optimizer.load_state_dict(saved)
    step(params, optimizer)
    assert all(s["step"].device == p.device for p, s in optimizer.state.items() if "step" in s)


def test_the_stop_vote_beside_nccl_times_out_with_the_other_collectives(tmp_path, monkeypatch):
    """On GPUs the stop vote goes over a gloo group of its own, made with gloo's default timeout
    (30 minutes): a vote a dead rank never joined held the others three times as long as any
    other collective. Here a one-process gloo group stands in for NCCL's."""
    import datetime

    import torch.distributed as dist

    from gpt.distributed import COLLECTIVE_TIMEOUT_MINUTES, DistInfo
    from gpt.stop import StopFlag

    made = []
    real_new_group = dist.new_group
    monkeypatch.setattr(dist, "new_group", lambda *a, **kw: made.append(kw) or real_new_group(*a, **kw))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        info = DistInfo(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"), process_group=True)
        stop = StopFlag()
        assert stop.agreed(info) is False and stop.agreed(info) is False
        stop.settle()
    finally:
        dist.destroy_process_group()
    assert made == [{"backend": "gloo", "timeout": datetime.timedelta(minutes=COLLECTIVE_TIMEOUT_MINUTES)}]
