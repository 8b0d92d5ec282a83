"""Multi-process failures as users hit them under torchrun on CPU (gloo), each found by hand
first: one test per bug, each starting real processes and killing every one it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--config=", "--prepare_source=none", "--device=cpu", "--dtype=float32", "--n_layer=1",
        "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=1",
        "--log_interval=5", "--warmup_steps=5"]

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(),
                                reason="finds torchrun's workers through /proc")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return sorted(found)


def _kill_all(proc: subprocess.Popen, workers: set[int]) -> None:
    """SIGKILL the launcher and every worker it ever had (each in a session of its own)."""
    try:
        workers |= set(_children(proc.pid))
    except OSError:
        pass
    for pid in [proc.pid, *workers]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _wait_for(predicate, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"exited early with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def test_launch_py_max_restarts_restarts_after_a_worker_is_killed(char_data, tmp_path):
    """`python slurm/launch.py --max-restarts=1 ...`, then kill -9 of one worker: torchrun
    restarts both and they resume from `latest`. Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    (which plain torchrun needs by hand, docs/checkpoints.md) the restarted workers hung in
    init_process_group, printing nothing, or failed there with gloo's "Connection refused" (the
    shared store still held the dead workers' addresses); launch.py now sets it when restarts
    are asked for."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    cmd = [sys.executable, "slurm/launch.py", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "train.py", *TINY, f"--data_dir={char_data}", f"--out_dir={out}", "--max_steps=100",
           "--eval_interval=10"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**env, **ENV})
    workers: set[int] = set()
    try:
        _wait_for(lambda: (out / "latest").exists() and len(_children(proc.pid)) == 2, 120, proc, log)
        first = _children(proc.pid)
        workers |= set(first)
        os.kill(first[1], signal.SIGKILL)
        try:
            code = proc.wait(timeout=150)
        except subprocess.TimeoutExpired:
            workers |= set(_children(proc.pid))
            pytest.fail("the restarted workers hung (no progress in 150 s):\n" + log.read_text()[-2000:])
        text = log.read_text()
        assert code == 0, text[-3000:]
        assert "resumed from" in text, text[-3000:]
        assert (out / "latest").read_text().strip() == "step_0000100"
    finally:
        _kill_all(proc, workers)


def test_async_sharded_save_group_times_out_with_training(tmp_path):
    """The background group of async sharded saves (gloo) must give up when training's
    collectives do (init_process_group's timeout: 10 minutes in gpt/distributed.py). It was made
    with new_group's default, 30 minutes for gloo: a hung rank during an async save held the
    other ranks (whose exit waits for the save's thread) 20 minutes longer than documented."""
    script = f"""
import datetime, os, socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
import torch, torch.distributed as dist
from gpt.checkpoint import Checkpointer
dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=3))
c = Checkpointer({str(tmp_path)!r}, format="sharded", async_save=True)
print("TIMEOUT", c.group._get_backend(torch.device("cpu")).options._timeout.total_seconds())
c.close()
dist.destroy_process_group()
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **ENV})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TIMEOUT 180.0" in done.stdout, done.stdout + done.stderr[-2000:]


def test_ddp_three_ranks_resume_is_bit_exact(char_data, tmp_path):
    """docs/checkpoints.md: same process count, fp32 on CPU, a resume is bit for bit. With 3 DDP
    ranks it was not (2 ranks hide it: a+b is exact in any order, a+b+c is not): DDP rebuilds
    its gradient buckets in the ready order after its first backward, so the uninterrupted run
    reduces step k+1 in the rebuilt layout and the resumed run, whose first step it is, in the
    initial one; gloo's ring then sums each gradient element in another order (1e-6 at once,
    1e-4 in the weights 25 steps later)."""
    args = [*TINY, f"--data_dir={char_data}", "--max_steps=20", "--eval_interval=5", "--keep_last=10"]

    def run(out: Path) -> None:
        log = out.parent / f"{out.name}.log"
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=3", "train.py", *args, f"--out_dir={out}"], cwd=REPO,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **ENV})
        workers: set[int] = set()
        try:
            deadline = time.monotonic() + 240
            while proc.poll() is None and time.monotonic() < deadline:
                workers |= set(_children(proc.pid))
                time.sleep(0.2)
            assert proc.returncode == 0, log.read_text()[-3000:]
        finally:
            _kill_all(proc, workers)

    import shutil

    first, second = tmp_path / "whole", tmp_path / "resumed"
    run(first)
    shutil.copytree(first, second)
    for step in (10, 15, 20):
        shutil.rmtree(second / "checkpoints" / f"step_{step:07d}")
    (second / "latest").write_text("step_0000005\n")
    run(second)
    name = "checkpoints/step_0000020/model.safetensors"
    assert (first / name).read_bytes() == (second / name).read_bytes()
