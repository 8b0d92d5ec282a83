"""Bugs a SLURM user hit with slurm/*.sbatch, on the real local test cluster (tests/slurm/cluster.py)."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm.cluster import SlurmCluster  # noqa: E402 (tests/slurm: conftest.py's cluster fixture needs this path too)

REPO = Path(__file__).resolve().parents[1]


def tiny_args(data: Path, out_dir: Path, max_steps: int) -> list[str]:
    return [f"--data_dir={data}", f"--out_dir={out_dir}", "--prepare_source=none", "--device=cpu",
            "--dtype=float32", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
            "--batch_size=4", f"--max_steps={max_steps}", "--warmup_steps=2", "--eval_interval=1000",
            "--eval_iters=2", "--log_interval=10", "--peak_tflops=1"]


def wait_state(cluster: SlurmCluster, job_id: int, timeout: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.job(job_id)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return info
        time.sleep(0.3)
    pytest.fail(f"job {job_id} did not end within {timeout} s: {cluster.job(job_id)}")


@pytest.mark.slurm
def test_debug_sbatch_checkpoints_on_usr1_to_the_batch_shell(cluster, char_data, tmp_path):
    """`scancel --signal=USR1 --batch` (what docs/slurm.md says for a stop) on a debug job used to
    kill debug.sbatch's shell (no trap: SIGUSR1's default action), so the job failed with
    JobLaunchFailure (exit 0:10) and the training process got SIGTERM from the job's end."""
    logs = tmp_path / "logs"
    logs.mkdir()
    out_dir = tmp_path / "run"
    env = cluster.env(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    job_id = cluster.sbatch("--partition=debug", "--cpus-per-task=1", "--gpus-per-node=1", "--time=10",
                            f"--output={logs}/%x-%j.out", "slurm/debug.sbatch",
                            *tiny_args(char_data, out_dir, 100_000), env=env, cwd=REPO)
    log = logs / f"gpt-debug-{job_id}.out"
    deadline = time.monotonic() + 60
    while not (log.exists() and re.search(r"^step +10/", log.read_text(), re.MULTILINE)):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))
    info = wait_state(cluster, job_id)
    text = log.read_text()
    assert "SIGUSR1 received" in text, text
    assert re.search(r"received a stop signal \(SIGUSR1\): saving a checkpoint at step \d+", text), text
    assert "stopped with a checkpoint (exit 75" in text, text
    assert info["ExitCode"] == "75:0", (info, text)
    assert (out_dir / "latest").exists()


@pytest.mark.slurm
@pytest.mark.parametrize("script", ["debug", "train"])
def test_a_usr1_that_comes_as_the_step_starts_still_saves(cluster, char_data, tmp_path, script):
    """The batch shell passed SIGUSR1 on to the step at once: sent as the step appeared, it reached
    train.py (debug.sbatch) or launch.py (train.sbatch) in the moment before its handler was in
    place, whose default action killed the run (exit 138, job FAILED, no checkpoint, no requeue:
    this test failed so 4 of 4 times for debug.sbatch, 3 of 4 for train.sbatch, where the signal
    sometimes came before srun had started the launcher). The step now starts them with it
    ignored, and the shell repeats it every 30 s."""
    logs = tmp_path / "logs"
    logs.mkdir()
    out_dir = tmp_path / "run"
    env = cluster.env(PYTHON=sys.executable, OMP_NUM_THREADS="1", RDZV_PORT=str(20000 + os.getpid() % 20000))
    job_id = cluster.sbatch("--partition=debug", "--cpus-per-task=1", f"--gpus-per-node={int(script == 'debug')}",
                            "--time=10", f"--output={logs}/%x-%j.out", f"slurm/{script}.sbatch",
                            *tiny_args(char_data, out_dir, 100_000), env=env, cwd=REPO)
    deadline = time.monotonic() + 60
    while f"{job_id}.0" not in cluster.run("squeue", "-h", "-s", "-j", str(job_id), check=False).stdout:
        assert time.monotonic() < deadline, cluster.job(job_id)
        time.sleep(0.02)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))
    log = logs / f"gpt-{script}-{job_id}.out"
    saved = "stopped with a checkpoint (exit 75" if script == "debug" else "saved a checkpoint and stopped (exit 75)"
    deadline = time.monotonic() + 120
    while not re.search(rf"{re.escape(saved)}|training exited with", log.read_text()):
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.3)
    if script == "train":  # requeued: it would train on for 100,000 steps
        cluster.run("scancel", str(job_id))
    wait_state(cluster, job_id)
    text = log.read_text()
    assert saved in text, text
    assert re.search(r"received a stop signal \(SIGUSR1\): saving a checkpoint at step \d+", text), text
    assert (out_dir / "latest").exists()


@pytest.mark.slurm
def test_train_sbatch_warns_when_the_time_limit_is_shorter_than_the_signal_lead(cluster, char_data, tmp_path):
    """`sbatch --time=2 slurm/train.sbatch ...` (a quick try) gets --signal=B:USR1@300 at once: each
    run trained a step or so, checkpointed and requeued, over and over, and the log never said why."""
    logs = tmp_path / "logs"
    logs.mkdir()
    env = cluster.env(PYTHON=sys.executable, OMP_NUM_THREADS="1", RDZV_PORT=str(20000 + os.getpid() % 20000))
    job_id = cluster.sbatch("--partition=debug", "--cpus-per-task=1", "--gpus-per-node=0", "--time=2",
                            f"--output={logs}/%x-%j.out", "slurm/train.sbatch",
                            *tiny_args(char_data, tmp_path / "run", 5), env=env, cwd=REPO)
    log = logs / f"gpt-train-{job_id}.out"
    # The warning comes after a squeue call (munge, a round trip to slurmctld): wait for it, not
    # for a fixed time, or a loaded machine's scancel kills the batch shell before it prints.
    deadline = time.monotonic() + 90
    while not (log.exists() and "=== warning:" in log.read_text()):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.2)
    cluster.run("scancel", str(job_id))
    wait_state(cluster, job_id)
    text = log.read_text()
    assert re.search(r"=== warning: the job has [0-9:]+ left of its time limit", text), text
    assert "--time" in text


@pytest.mark.slurm
def test_requeue_of_an_array_task_leaves_the_other_tasks_alone(cluster, char_data, tmp_path):
    """In an array job the last task's SLURM_JOB_ID equals SLURM_ARRAY_JOB_ID, and
    `scontrol requeue $SLURM_JOB_ID` requeued the whole array: a task that had already finished
    (or failed) ran again. The script must requeue `<array id>_<task id>`."""
    logs = tmp_path / "logs"
    logs.mkdir()
    # The launcher's python, per task: its own out_dir, and task 0 ends after 5 steps.
    wrapper = tmp_path / "python"
    wrapper.write_text(f"""#!/bin/bash
if [ "$SLURM_ARRAY_TASK_ID" = 0 ]; then steps=5; else steps=100000; fi
exec {sys.executable} "$@" --out_dir={tmp_path}/task$SLURM_ARRAY_TASK_ID --max_steps=$steps
""")
    wrapper.chmod(0o755)
    env = cluster.env(PYTHON=str(wrapper), OMP_NUM_THREADS="1")
    array_id = cluster.sbatch("--partition=debug", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10",
                              "--array=0-1", f"--output={logs}/%x-%j.out", "slurm/train.sbatch",
                              *tiny_args(char_data, tmp_path / "unused", 1), env=env, cwd=REPO)
    deadline = time.monotonic() + 120
    while True:  # which job id each task got: task 0 is the one that trains 5 steps
        texts = {int(f.stem.rsplit("-", 1)[1]): f.read_text() for f in logs.glob("gpt-train-*.out")}
        done = [j for j, t in texts.items() if "done: 5 steps" in t]
        if len(texts) == 2 and done:
            break
        assert time.monotonic() < deadline, texts
        time.sleep(0.3)
    first = done[0]
    last = next(j for j in texts if j != first)
    first_log, last_log = logs / f"gpt-train-{first}.out", logs / f"gpt-train-{last}.out"
    deadline = time.monotonic() + 120
    while not re.search(r"^step +10/", last_log.read_text(), re.MULTILINE):
        assert time.monotonic() < deadline, last_log.read_text()
        time.sleep(0.2)
    time.sleep(1)
    cluster.run("scancel", "--signal=USR1", "--batch", f"{array_id}_1")
    # Stop, save, requeue, the requeued job's wait (cred_expire + 1 s) and a scheduler pass; the
    # bounds only cap a wait (the assertions are about the other task), so they are generous.
    deadline = time.monotonic() + 120
    while "run 2 (SLURM_RESTART_COUNT=1)" not in last_log.read_text():
        assert time.monotonic() < deadline, last_log.read_text()
        time.sleep(0.3)
    time.sleep(3)
    cluster.run("scancel", str(array_id))
    # The task that had finished was not started again.
    assert "run 2" not in first_log.read_text(), first_log.read_text()
    record = next(line for line in cluster.run("scontrol", "--oneliner", "show", "job", str(first)).stdout
                  .splitlines() if line.startswith(f"JobId={first} "))
    assert "Restarts=0 " in record and "JobState=COMPLETED" in record, record
