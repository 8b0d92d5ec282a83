"""slurm/*.sbatch on a real SLURM cluster (22.05: slurmctld, slurmd, munged) started on localhost.

The cluster (tests/slurm/cluster.py) has one node with 2 CPUs and 2 pretend GPUs, so the batch
scripts run exactly as on a GPU cluster: `--gpus-per-node=2` gives SLURM_GPUS_ON_NODE=2 and two
training processes; the training itself runs on CPU with gloo (`--device=cpu`). Partition
`urgent` preempts partition `debug` (partition priority, PreemptMode=REQUEUE, with a grace time
and the user's signal sent at preemption).

Every job trains the same tiny model for the same steps on 2 processes, so the interrupted runs
must end exactly (fp32 on CPU, same world size) where the uninterrupted one does.
Skipped where the SLURM binaries are absent or not root; .ci/run installs them.
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt import checkpoint as ckpt
from gpt.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm.cluster import SlurmCluster  # noqa: E402 (tests/slurm: conftest.py's cluster fixture needs this path too)

from conftest import latest_weights, learning_records  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

MAX_STEPS = 200  # ~40-70 ms each on 2 processes: the signal lands long before the end
LOG_INTERVAL = 10
EVAL_INTERVAL = 50
WORLD = 2  # = the cluster's pretend GPUs per node
SIGNAL_AFTER_STEP = LOG_INTERVAL  # signal once the log shows the first step line
JOB_TIMEOUT = 240  # seconds for any one job to finish (including requeues)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(data: Path, out_dir: Path, max_steps: int = MAX_STEPS) -> list[str]:
    return [
        f"--data_dir={data}", f"--out_dir={out_dir}", "--prepare_source=none", "--device=cpu",
        "--dtype=float32", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64",
        "--batch_size=8", f"--max_steps={max_steps}", "--learning_rate=3e-3", "--min_lr=3e-4",
        "--warmup_steps=5", f"--eval_interval={EVAL_INTERVAL}", "--eval_iters=4",
        f"--log_interval={LOG_INTERVAL}", "--keep_last=5", "--peak_tflops=1",
    ]


class Job:
    """A submitted job: its id, its log file, and waits that fail with the log and daemon logs."""

    def __init__(self, cluster: SlurmCluster, job_id: int, log: Path, out_dir: Path | None):
        self.cluster, self.id, self.log, self.out_dir = cluster, job_id, log, out_dir

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def info(self) -> dict[str, str]:
        return self.cluster.job(self.id)

    def fail(self, message: str) -> None:
        pytest.fail(f"{message}\n--- scontrol show job {self.id} ---\n{self.info()}\n"
                    f"--- job log {self.log} ---\n{self.text()}\n{self.cluster.logs()}")

    def wait_for_log(self, pattern: str, timeout: float = 90) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text(), re.MULTILINE)
            if found:
                return found
            if self.info().get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
                break
            time.sleep(0.2)
        self.fail(f"job {self.id}: no log line matching {pattern!r}")

    def wait_done(self, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info()
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                        "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
                self._check_no_leftovers()
                return info
            time.sleep(0.5)
        self.fail(f"job {self.id} did not finish within {timeout:.0f} s")

    def _check_no_leftovers(self) -> None:
        """No process of the job outlives it (launcher, workers, srun, the batch shell)."""
        if self.out_dir is None:
            return
        needle = f"--out_dir={self.out_dir}"
        deadline = time.monotonic() + 15
        while True:
            left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and needle in _cmdline(p)]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if left:
            self.fail(f"job {self.id} ended but left processes: "
                      + "; ".join(f"{p.name}: {_cmdline(p)[:200]}" for p in left))


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def submit_train(cluster: SlurmCluster, logs: Path, out_dir: Path, data: Path,
                 script: str = "slurm/train.sbatch", sbatch: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, max_steps: int = MAX_STEPS,
                 gpus: str = "--gpus-per-node=2", extra: tuple[str, ...] = ()) -> Job:
    """`gpus`: how the job asks for GPUs (tests/test_slurm_multinode.py asks for them in total);
    `extra`: more train.py options."""
    logs.mkdir(parents=True, exist_ok=True)
    # One thread per process whatever the caller exported: torchrun sets it only when unset, and
    # runs compared bit for bit must sum in the same order.
    job_env = cluster.env(PYTHON=sys.executable, RDZV_PORT=str(_free_port()),
                          **{"OMP_NUM_THREADS": "1", **(env or {})})
    job_id = cluster.sbatch(
        "--partition=debug", "--cpus-per-task=2", gpus, "--time=10",
        f"--output={logs}/%x-%j.out", *sbatch, script, *train_args(data, out_dir, max_steps), *extra,
        env=job_env, cwd=REPO,
    )
    name = "gpt-debug" if "debug" in script else "gpt-train"
    return Job(cluster, job_id, logs / f"{name}-{job_id}.out", out_dir)


def assert_same_end(run: Path, reference: Path) -> None:
    """A run stopped and resumed ends exactly like the uninterrupted reference: every log record
    (the one whose interval spans the stop too: the checkpoint carries the interval's losses),
    the val losses and the final weights."""
    assert learning_records(run) == learning_records(reference)
    assert learning_records(run)[-1]["step"] == MAX_STEPS
    a, b = latest_weights(run), latest_weights(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# The uninterrupted run's folder per dataset, once it completed: tests/test_slurm_multinode.py
# compares its two-node runs with it too, instead of training the same reference again.
REFERENCE_RUNS: dict[Path, Path] = {}


@pytest.fixture(scope="module")
def reference(cluster, char_data, tmp_path_factory) -> tuple[Job, dict]:
    """The uninterrupted run: `sbatch slurm/train.sbatch` with CPU overrides, to the end."""
    tmp = tmp_path_factory.mktemp("slurm_reference")
    job = submit_train(cluster, tmp / "logs", tmp / "run", char_data)
    info = job.wait_done()
    if info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0":
        REFERENCE_RUNS[char_data] = job.out_dir
    return job, info


@pytest.mark.slurm
def test_train_sbatch_runs_to_the_end_on_two_processes(reference):
    job, info = reference
    text = job.text()
    if info["JobState"] != "COMPLETED" or info["ExitCode"] != "0:0":
        job.fail(f"job {job.id} ended {info['JobState']} with exit code {info['ExitCode']}")
    # One log per job, named by the script's --output pattern (%x-%j).
    assert job.log.name == f"gpt-train-{job.id}.out"
    assert info["Restarts"] == "0"
    assert "run 1 (SLURM_RESTART_COUNT=unset): 1 node(s) [localhost] x 2 process(es)" in text
    assert f"device cpu x {WORLD}" in text  # the trainer saw a world of 2 ranks
    assert f"done: {MAX_STEPS} steps" in text and "training exited with 0" in text
    assert "requeue" not in text
    # Rank 0 alone prints: one config dump, one line per log step.
    assert text.count("\nconfig:\n") == 1
    assert len(re.findall(rf"^step +{MAX_STEPS}/{MAX_STEPS} ", text, re.MULTILINE)) == 1

    run = job.out_dir
    assert (run / "latest").read_text().strip() == f"step_{MAX_STEPS:07d}"
    state = ckpt.read_state(ckpt.latest_checkpoint(run))
    assert state["step"] == MAX_STEPS
    assert state["tokens_seen"] == MAX_STEPS * 8 * 64 * WORLD
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(LOG_INTERVAL, MAX_STEPS + 1, LOG_INTERVAL))
    assert math.isfinite(records[-1]["loss"]) and records[-1]["loss"] < records[0]["loss"]


@pytest.mark.slurm
def test_signal_checkpoints_requeues_and_resumes_exactly(cluster, char_data, reference, tmp_path):
    """SIGUSR1 to the batch shell (as --signal=B:USR1@... sends before the time limit): the
    training stops at a step boundary with a checkpoint, the job requeues itself, and the second
    run (SLURM_RESTART_COUNT=1) resumes and ends exactly as the uninterrupted run did.

    Here the processes per node come from NPROC_PER_NODE on a job without GPUs (the CPU path).
    """
    job = submit_train(cluster, tmp_path / "logs", tmp_path / "run", char_data,
                       sbatch=("--gpus-per-node=0",), env={"NPROC_PER_NODE": str(WORLD)})
    job.wait_for_log(rf"^step +{SIGNAL_AFTER_STEP}/{MAX_STEPS} ")
    cluster.run("scancel", "--signal=USR1", "--batch", str(job.id))
    info = job.wait_done()
    text = job.text()
    if info["JobState"] != "COMPLETED" or info["ExitCode"] != "0:0":
        job.fail(f"job {job.id} ended {info['JobState']} with exit code {info['ExitCode']}")
    assert info["Restarts"] == "1", info

    stopped = re.search(r"saving a checkpoint at step (\d+) and exiting with code 75", text)
    assert "SIGUSR1 received" in text and stopped, text
    stop_step = int(stopped.group(1))
    assert SIGNAL_AFTER_STEP <= stop_step < MAX_STEPS
    assert f"requeueing job {job.id}" in text
    assert "run 2 (SLURM_RESTART_COUNT=1)" in text
    assert f"resumed from {job.out_dir}/checkpoints/step_{stop_step:07d} at step {stop_step}" in text
    assert text.count("x 2 process(es)") == 2 and text.count(f"device cpu x {WORLD}") == 2
    assert f"done: {MAX_STEPS} steps" in text
    assert_same_end(job.out_dir, reference[0].out_dir)


@pytest.mark.slurm
def test_preemption_requeues_then_resumes_and_completes(cluster, char_data, reference, tmp_path):
    """A job in the higher-priority partition preempts ours: ours checkpoints (the cluster sends
    its --signal at preemption), is requeued, waits for the preemptor to finish, resumes and
    completes with the same final loss as the uninterrupted run."""
    job = submit_train(cluster, tmp_path / "logs", tmp_path / "run", char_data)
    job.wait_for_log(rf"^step +{SIGNAL_AFTER_STEP}/{MAX_STEPS} ")
    urgent_id = cluster.sbatch("--partition=urgent", "--cpus-per-task=2", "--time=5",
                               f"--output={tmp_path}/urgent-%j.out", "--wrap", "sleep 3",
                               cwd=tmp_path)
    urgent = Job(cluster, urgent_id, tmp_path / f"urgent-{urgent_id}.out", None)
    info = job.wait_done()
    urgent_info = urgent.wait_done(timeout=30)
    text = job.text()
    if info["JobState"] != "COMPLETED" or info["ExitCode"] != "0:0":
        job.fail(f"job {job.id} ended {info['JobState']} with exit code {info['ExitCode']}")
    assert urgent_info["JobState"] == "COMPLETED", urgent_info
    assert int(info["Restarts"]) >= 1, info
    # Ours was requeued for the urgent job, and started again only once it had ended.
    assert urgent_info["EndTime"] <= info["StartTime"], (urgent_info, info)
    # The cluster sends the job's --signal (B:USR1) at preemption: a checkpoint, then a requeue.
    assert "SIGUSR1 received" in text and f"requeueing job {job.id}" in text
    assert "run 2 (SLURM_RESTART_COUNT=1)" in text
    resumed = re.search(r"resumed from \S+ at step (\d+)", text)
    assert resumed, text
    assert f"done: {MAX_STEPS} steps" in text
    assert_same_end(job.out_dir, reference[0].out_dir)


@pytest.mark.slurm
def test_debug_sbatch_runs_one_process(cluster, char_data, tmp_path):
    job = submit_train(cluster, tmp_path / "logs", tmp_path / "run", char_data,
                       script="slurm/debug.sbatch", sbatch=("--gpus-per-node=1",), max_steps=20,
                       env={"OMP_NUM_THREADS": "1"})  # 2 threads on 2 shared cores thrash
    info = job.wait_done()
    text = job.text()
    if info["JobState"] != "COMPLETED" or info["ExitCode"] != "0:0":
        job.fail(f"job {job.id} ended {info['JobState']} with exit code {info['ExitCode']}")
    assert job.log.name == f"gpt-debug-{job.id}.out"
    assert "(GPUs: 1)" in text and "device cpu x 1" in text
    assert "done: 20 steps" in text and "training exited with 0" in text
    assert (job.out_dir / "latest").read_text().strip() == "step_0000020"


# ------------------------------------------------------------------------------------------
# The batch scripts' own logic, without a cluster: `srun` and `scontrol` are stand-ins on PATH
# that record how they were called, so these run everywhere in a second.

FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
exit "${FAKE_SRUN_EXIT:-0}"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_LOG/scontrol.calls"
if [ "$1 $2" = "show hostnames" ]; then echo node1; fi
"""


def run_sbatch_script(tmp_path: Path, script: str, *args: str, slurm: bool = True,
                      **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PYTHON", "VENV"))}
    base.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path), SLURM_SUBMIT_DIR=str(REPO))
    if slurm:
        base.update(SLURM_JOB_ID="1234", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node1",
                    SLURM_CPUS_PER_TASK="2", SLURM_GPUS_ON_NODE="2")
    return subprocess.run(["bash", script, *args], cwd=REPO, env={**base, **env},
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("script", ["slurm/train.sbatch", "slurm/debug.sbatch"])
def test_sbatch_script_outside_slurm_says_to_submit_it(tmp_path, script):
    # Under set -u the first unset SLURM_* variable used to end it with "unbound variable".
    r = run_sbatch_script(tmp_path, script, "--max_steps=1", slurm=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "not inside a SLURM job" in r.stderr and "sbatch" in r.stderr
    assert "unbound variable" not in r.stderr
    assert not (tmp_path / "srun.args").exists()


@pytest.mark.parametrize("script", ["slurm/train.sbatch", "slurm/debug.sbatch"])
def test_sbatch_script_runs_the_python_of_venv(tmp_path, script):
    # VENV (a path with a space here) must win over the repository's own .venv.
    venv = tmp_path / "my env"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("VIRTUAL_ENV_ACTIVATED=1\n")
    r = run_sbatch_script(tmp_path, script, "--out_dir=out/a b", VENV=str(venv))
    assert r.returncode == 0, r.stdout + r.stderr
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert str(venv / "bin" / "python") in args, args
    assert args[-2:] == ["train.py", "--out_dir=out/a b"]  # passed on as one argument


def test_train_sbatch_requeues_on_exit_75_and_reports_a_failed_requeue(tmp_path):
    r = run_sbatch_script(tmp_path, "slurm/train.sbatch", FAKE_SRUN_EXIT="75")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "requeueing job 1234" in r.stdout
    assert "requeue 1234" in (tmp_path / "scontrol.calls").read_text()
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert "--nproc-per-node=2" in args and "--rdzv-endpoint=node1:30734" in args  # 29500 + 1234

    r = run_sbatch_script(tmp_path, "slurm/train.sbatch", FAKE_SRUN_EXIT="3")
    assert r.returncode == 3 and "training exited with 3" in r.stdout
