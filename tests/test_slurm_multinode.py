"""slurm/train.sbatch on a real SLURM cluster of two nodes, on this one machine.

Each node's slurmd runs in a network namespace of its own, with its own address, host name and
/etc/hosts (tests/slurm/cluster.py): the job step's `srun` reaches the other node over a
bridge, torchrun's rendezvous and gloo connect node to node by name, as on a real cluster.
node1 has 2 pretend GPUs and node2 has 1, so a job can be given nodes with different GPU counts.

The runs of world size 2 (one process on each node) must end exactly like the same run on one
node with two processes (fp32 on CPU: the same world size gives bit-identical results), also
when stopped by a signal, requeued and resumed on two nodes.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_slurm import (  # noqa: E402 (tests/ on sys.path first, as test_slurm.py does)
    MAX_STEPS, REFERENCE_RUNS, SIGNAL_AFTER_STEP, WORLD, Job, assert_same_end, run_sbatch_script,
    submit_train)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "slurm"))
import launch  # noqa: E402

# One process per node on two nodes: one thread each, as torchrun gives each of two processes on
# one node (the reference); more would oversubscribe the 2 cores and change the float sums.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def assert_completed(job: Job, info: dict[str, str]) -> None:
    if info["JobState"] != "COMPLETED" or info["ExitCode"] != "0:0":
        job.fail(f"job {job.id} ended {info['JobState']} with exit code {info['ExitCode']}")


@pytest.fixture(scope="module")
def reference(two_node_cluster, char_data, tmp_path_factory) -> Path:
    """The uninterrupted run's folder: tests/test_slurm.py's (one node, two processes) when it ran
    in this session, else the same job run here on node1 (the one with 2 GPUs)."""
    if char_data in REFERENCE_RUNS:
        return REFERENCE_RUNS[char_data]
    tmp = tmp_path_factory.mktemp("slurm_multinode_reference")
    job = submit_train(two_node_cluster, tmp / "logs", tmp / "run", char_data, sbatch=("--nodes=1",))
    info = job.wait_done()
    assert_completed(job, info)
    assert "1 node(s) [node1] x 2 process(es)" in job.text() and f"device cpu x {WORLD}" in job.text()
    return job.out_dir


def assert_ran_on_both_nodes(job: Job, info: dict[str, str], runs: int) -> None:
    """Each run of the job on node1 and node2, one process each, rank 0 (node1) alone printing."""
    text = job.text()
    assert info["NodeList"] == "node[1-2]", info
    assert text.count("2 node(s) [node[1-2]] x one process per GPU of each node") == runs, text
    assert text.count("rendezvous node1:") == runs and text.count(f"device cpu x {WORLD}") == runs
    assert text.count("\nconfig:\n") == runs


@pytest.mark.slurm
@pytest.mark.slow  # the signal test below runs the same on two nodes, and requeues
def test_two_nodes_one_process_each_end_like_one_node_with_two(two_node_cluster, char_data,
                                                               reference, tmp_path):
    job = submit_train(two_node_cluster, tmp_path / "logs", tmp_path / "run", char_data,
                       sbatch=("--nodes=2",), gpus="--gpus-per-node=1", env=ONE_THREAD)
    info = job.wait_done()
    assert_completed(job, info)
    assert_ran_on_both_nodes(job, info, runs=1)
    assert f"done: {MAX_STEPS} steps" in job.text()
    assert_same_end(job.out_dir, reference)


@pytest.mark.slurm
def test_signal_on_two_nodes_checkpoints_requeues_and_resumes_exactly(two_node_cluster, char_data,
                                                                      reference, tmp_path):
    """SIGUSR1 to the batch shell: srun passes it to both nodes' launchers and workers, both
    ranks stop at the same step with one checkpoint, the job requeues, and its second run, on
    both nodes again, ends exactly as the uninterrupted run on one node did."""
    job = submit_train(two_node_cluster, tmp_path / "logs", tmp_path / "run", char_data,
                       sbatch=("--nodes=2",), gpus="--gpus-per-node=1", env=ONE_THREAD)
    job.wait_for_log(rf"^step +{SIGNAL_AFTER_STEP}/{MAX_STEPS} ")
    two_node_cluster.run("scancel", "--signal=USR1", "--batch", str(job.id))
    info = job.wait_done()
    assert_completed(job, info)
    text = job.text()
    assert info["Restarts"] == "1", info
    stopped = re.search(r"saving a checkpoint at step (\d+) and exiting with code 75", text)
    assert "SIGUSR1 received" in text and stopped, text
    stop_step = int(stopped.group(1))
    assert SIGNAL_AFTER_STEP <= stop_step < MAX_STEPS
    assert f"requeueing job {job.id}" in text and "run 2 (SLURM_RESTART_COUNT=1)" in text
    assert_ran_on_both_nodes(job, info, runs=2)
    assert f"resumed from {job.out_dir}/checkpoints/step_{stop_step:07d} at step {stop_step}" in text
    assert f"done: {MAX_STEPS} steps" in text
    assert_same_end(job.out_dir, reference)


@pytest.mark.slurm
@pytest.mark.slow  # ~45 s: two FSDP jobs; the DDP signal test above runs the same batch-script path
def test_fsdp_on_two_nodes_with_sharded_async_checkpoints_resumes_exactly(two_node_cluster, char_data,
                                                                          tmp_path):
    """FSDP across the nodes, each rank writing its own shard of every checkpoint (asynchronously)
    into the shared out_dir: stopped by SIGUSR1, requeued and resumed on two nodes, the run ends
    exactly like the same FSDP run left alone."""
    fsdp = ("--parallel=fsdp", "--checkpoint_format=sharded", "--async_checkpoint=true")
    runs = {}
    for name in ("whole", "stopped"):
        job = submit_train(two_node_cluster, tmp_path / name / "logs", tmp_path / name / "run", char_data,
                           sbatch=("--nodes=2",), gpus="--gpus-per-node=1", env=ONE_THREAD, extra=fsdp)
        if name == "stopped":
            job.wait_for_log(rf"^step +{SIGNAL_AFTER_STEP}/{MAX_STEPS} ")
            two_node_cluster.run("scancel", "--signal=USR1", "--batch", str(job.id))
        info = job.wait_done()
        assert_completed(job, info)
        assert "parallel: fsdp" in job.text(), job.text()
        runs[name] = (job, info)
    job, info = runs["stopped"]
    assert info["Restarts"] == "1" and "resumed from" in job.text(), job.text()
    assert list(job.out_dir.glob("checkpoints/step_*/dcp/.metadata")), "no sharded checkpoint"
    assert_ran_on_both_nodes(job, info, runs=2)
    assert_same_end(job.out_dir, runs["whole"][0].out_dir)


def _worker_on_node(node_id: int, out_dir: Path) -> int:
    """The pid of a training process (not its launcher) of the run in out_dir on that node."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (f"--out_dir={out_dir}".encode() in argv and b"train.py" in argv[1:3]
                and f"SLURM_NODEID={node_id}".encode() in env):
            return int(proc.name)
    raise AssertionError(f"no training process of {out_dir} on node {node_id + 1}")


@pytest.mark.slurm
def test_a_worker_killed_on_one_node_ends_the_job_at_once_with_one_line(two_node_cluster, char_data,
                                                                        tmp_path):
    """A process lost on node2 (killed: out of memory, its node gone): the job must end within
    seconds, not at the collective timeout, and node1's rank 0, whose all-reduce failed, printed
    25 lines of gloo traceback ("Connection reset by peer ... GLHF!"); one line now, that says the
    checkpoints are intact."""
    job = submit_train(two_node_cluster, tmp_path / "logs", tmp_path / "run", char_data,
                       sbatch=("--nodes=2",), gpus="--gpus-per-node=1", env=ONE_THREAD, max_steps=100_000)
    job.wait_for_log(rf"^step +{SIGNAL_AFTER_STEP}/")
    os.kill(_worker_on_node(1, job.out_dir), signal.SIGKILL)
    info = job.wait_done(timeout=60)
    text = job.text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
    # "stopped: told to stop (SIGTERM), ..." where node1's launcher stopped rank 0 before its
    # collective failed (gpt/errors.py FollowOnFailure): the same line otherwise.
    assert re.search(r"^(error: |stopped: told to stop \(SIGTERM\), this process then )lost the connection "
                     r"to another process of this run \((Connection (reset|closed) by peer|Broken pipe)\)",
                     text, re.MULTILINE), text
    assert "Checkpoints already written are intact" in text
    assert "Traceback" not in text and "GLHF" not in text, text


@pytest.mark.slurm
def test_uneven_nodes_each_start_their_own_gpus_also_under_export_none(two_node_cluster, char_data,
                                                                       tmp_path):
    """`--gpus=3` on two nodes: SLURM gives node1 2 GPUs and node2 1, and the run has 3 ranks.
    train.sbatch used to count the batch node's GPUs and start that many on every node: 4 ranks,
    two of them on node2's one GPU.

    The same job is submitted with `--export=NONE,VENV=...,PYTHON=python`: the batch shell
    activates VENV and finds `python` on the PATH that gives it. Its srun inherited
    SLURM_EXPORT_ENV and started the launchers with an empty environment, so both nodes failed
    with "execve(): python: No such file or directory"."""
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").exists():
        pytest.skip(f"the tests' python is not in a virtual environment ({sys.prefix})")
    export = f"--export=NONE,VENV={venv},PYTHON=python,OMP_NUM_THREADS=1"
    # --gpus-per-node=0 clears the script's #SBATCH --gpus-per-node, which sbatch refuses with
    # --gpus=3 ("Failed to ensure --gpus >= --gres=gpu/--gpus-per-node").
    job = submit_train(two_node_cluster, tmp_path / "logs", tmp_path / "run", char_data,
                       sbatch=("--nodes=2", "--gpus-per-node=0", export), gpus="--gpus=3",
                       max_steps=20)
    info = job.wait_done()
    assert_completed(job, info)
    text = job.text()
    # One rank per GPU SLURM gave the job (2 on node1, 1 on node2).
    assert info["TresPerJob"] == "gres:gpu:3" and info["NodeList"] == "node[1-2]", info
    assert ", python" in text.splitlines()[0]  # PYTHON=python reached the batch shell
    assert "launch.py: node1: 2 training process(es)" in text, text
    assert "launch.py: node2: 1 training process(es)" in text, text
    world = re.search(r"device cpu x (\d+)", text)
    assert world and world[1] == "3", f"world size {world and world[1]}, not the 3 GPUs:\n{text}"
    assert "done: 20 steps" in text


@pytest.mark.slurm
def test_debug_sbatch_under_export_none_runs_the_python_its_venv_gives(two_node_cluster, char_data,
                                                                       tmp_path):
    """As above for slurm/debug.sbatch: its srun also started train.py with an empty
    environment ("execve(): python: No such file or directory")."""
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").exists():
        pytest.skip(f"the tests' python is not in a virtual environment ({sys.prefix})")
    export = f"--export=NONE,VENV={venv},PYTHON=python,OMP_NUM_THREADS=1"
    job = submit_train(two_node_cluster, tmp_path / "logs", tmp_path / "run", char_data,
                       script="slurm/debug.sbatch", sbatch=(export,), gpus="--gpus-per-node=1",
                       max_steps=20)
    info = job.wait_done()
    assert_completed(job, info)
    assert "device cpu x 1" in job.text() and "done: 20 steps" in job.text()


# ------------------------------------------------------------------------------------------
# Without a cluster: the script's arithmetic and the launcher's per-node count.

def test_default_rendezvous_port_is_below_the_ephemeral_ports(tmp_path):
    # 29500 + job id % 10000 reached 39499, inside Linux's ephemeral ports (32768-60999), which
    # outgoing connections on the node take at random: one could hold the rendezvous port.
    for job_id in (9999, 123_456_789):  # 39499 and 36289 before
        r = run_sbatch_script(tmp_path, "slurm/train.sbatch", SLURM_JOB_ID=str(job_id))
        assert r.returncode == 0, r.stdout + r.stderr
        port = int(re.search(r"--rdzv-endpoint=node1:(\d+)", (tmp_path / "srun.args").read_text())[1])
        assert 29500 <= port <= 32499, (job_id, port)
    r = run_sbatch_script(tmp_path, "slurm/train.sbatch", SLURM_JOB_ID="9999", RDZV_PORT="45678")
    assert "--rdzv-endpoint=node1:45678" in (tmp_path / "srun.args").read_text()


def test_launcher_on_each_node_starts_one_process_per_gpu_of_that_node():
    for env, want in (({"SLURM_GPUS_ON_NODE": "2"}, "2"), ({"SLURM_GPUS_ON_NODE": "a100:1"}, "1"),
                      ({"SLURM_GPUS_PER_NODE": "4"}, "4"), ({}, "1")):
        args = launch.torchrun_args(["--nnodes=2", "train.py"], {"SLURM_NODEID": "1", **env})
        assert f"--nproc-per-node={want}" in args, (env, args)
    # Given (train.sbatch passes NPROC_PER_NODE on, or one node's count), it is left alone.
    env = {"SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "2"}
    assert launch.torchrun_args(["--nproc-per-node=3", "train.py"], env).count("--nproc-per-node=3") == 1
    assert not any(a.startswith("--nproc") for a in launch.torchrun_args(
        ["train.py"], {**env, "PET_NPROC_PER_NODE": "3"}))
    # Outside srun it is plain torchrun.
    assert not any(a.startswith("--nproc") for a in launch.torchrun_args(["train.py"], {}))


def test_train_sbatch_leaves_the_count_to_each_node_on_several_nodes(tmp_path):
    r = run_sbatch_script(tmp_path, "slurm/train.sbatch", SLURM_JOB_NUM_NODES="2",
                          SLURM_JOB_NODELIST="node[1-2]")
    assert r.returncode == 0, r.stdout + r.stderr
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert "--export=ALL" in args
    assert not any(a.startswith("--nproc") for a in args), args
    assert "x one process per GPU of each node" in r.stdout
    r = run_sbatch_script(tmp_path, "slurm/train.sbatch", SLURM_JOB_NUM_NODES="2",
                          SLURM_JOB_NODELIST="node[1-2]", NPROC_PER_NODE="3")
    assert "--nproc-per-node=3" in (tmp_path / "srun.args").read_text().splitlines()
