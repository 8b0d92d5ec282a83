"""slurm/launch.py as a cluster user calls it: torchrun options in either spelling, and a taken
rendezvous port. In-process or short subprocesses; no cluster needed."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from torch.distributed.run import _parse_rendezvous_config, get_args_parser

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "slurm"))
import launch  # noqa: E402


def test_max_restarts_after_an_option_with_a_separate_value_still_unshares_the_store():
    # `--nproc-per-node 2` (value as the next argument, as torchrun accepts) used to end the scan
    # at "2", so --max-restarts was not seen and restarted workers hung in init_process_group.
    for argv in (["--nproc-per-node", "2", "--max-restarts=3", "train.py"],
                 ["--nnodes", "1", "--max-restarts", "3", "train.py", "--max_steps=4"]):
        assert launch.torchrun_env(argv, {}) == {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}, argv
    # The training script's own options are not torchrun's.
    assert launch.torchrun_env(["--nnodes", "1", "train.py", "--max-restarts=3"], {}) == {}


def _rdzv_config(args: list[str]) -> dict:
    parsed = get_args_parser().parse_args(args)
    assert parsed.training_script == "train.py"
    return _parse_rendezvous_config(parsed.rdzv_conf)


def test_a_users_rdzv_conf_keeps_is_host_from_slurm_nodeid():
    # With a --rdzv-conf of the user's (a longer join_timeout), is_host was dropped: torchrun then
    # guessed the host from host names, and where node names are not host names nobody hosted.
    for node, want in (("0", "1"), ("1", "0")):
        for argv in (["--rdzv-conf=join_timeout=900", "train.py"],
                     ["--nproc-per-node", "2", "--rdzv_conf", "join_timeout=900", "train.py"]):
            args = launch.torchrun_args(argv, {"SLURM_NODEID": node})
            assert _rdzv_config(args) == {"join_timeout": "900", "is_host": want}, args
    # One the user gave wins; PET_RDZV_CONF (torchrun's environment form) is kept too.
    args = launch.torchrun_args(["--rdzv-conf=is_host=1", "train.py"], {"SLURM_NODEID": "1"})
    assert _rdzv_config(args) == {"is_host": "1"}
    args = launch.torchrun_args(["train.py"], {"SLURM_NODEID": "1", "PET_RDZV_CONF": "read_timeout=9"})
    assert _rdzv_config(args) == {"read_timeout": "9", "is_host": "0"}


def test_rendezvous_port_in_use_is_one_line_naming_rdzv_port(tmp_path):
    # Another job on the first node holds the port: torchrun printed two tracebacks ending in
    # "The connection to the C10d store has failed. See inner exception for details."
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PET_"))}
        env.update(SLURM_NODEID="0", OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, "slurm/launch.py", "--nnodes=1", "--nproc-per-node=1",
                            "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=1",
                            "--max-restarts=0", "train.py", f"--out_dir={tmp_path}"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert f"rendezvous port of localhost:{port} is in use" in r.stderr and "RDZV_PORT" in r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    # The port suggested is one train.sbatch's default could take, below the ephemeral ports
    # (the kernel's own pick, port 0, is an ephemeral one).
    suggested = re.search(r"free port \(e\.g\. (\d+)\)", r.stderr)
    assert suggested and 29500 <= int(suggested[1]) <= 32499, r.stderr


def test_a_crashed_worker_exits_1_naming_its_code_not_75(tmp_path):
    """A worker that fails (not the trainer's 75, "checkpoint saved, run again") makes the
    launcher exit 1, so train.sbatch does not requeue a crash; its code is named in one line."""
    crash = tmp_path / "crash.py"
    crash.write_text("import sys\nsys.exit(3)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PET_"))}
    r = subprocess.run([sys.executable, "slurm/launch.py", "--standalone", "--nproc-per-node=1",
                        "--max-restarts=0", str(crash)],
                       cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1, r.stderr
    assert "launch.py: workers failed with exit codes [3]" in r.stderr, r.stderr


def _run_script(tmp_path: Path, script: str, **env: str) -> subprocess.CompletedProcess:
    # `srun` and `scontrol` stand-ins on PATH; the SLURM_* variables are those sbatch sets.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "{tmp_path}/srun.args"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PYTHON", "VENV"))}
    base.update(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="1234",
                SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node1", SLURM_CPUS_PER_TASK="2")
    return subprocess.run(["bash", script, "--max_steps=1"], cwd=REPO, env={**base, **env},
                          capture_output=True, text=True, timeout=30)


def test_sbatch_scripts_name_a_missing_venv_or_python(tmp_path):
    # A mistyped VENV ended the job with "line 77: .../bin/activate: No such file or directory";
    # a mistyped PYTHON reached srun and failed on every node.
    for script in ("slurm/train.sbatch", "slurm/debug.sbatch"):
        r = _run_script(tmp_path, script, VENV=str(tmp_path / "no env"))
        assert r.returncode == 2 and "VENV=" in r.stderr and "not a virtual environment" in r.stderr, r.stderr
        r = _run_script(tmp_path, script, PYTHON=str(tmp_path / "no python"))
        assert r.returncode == 2 and "PYTHON=" in r.stderr and "not a python" in r.stderr, r.stderr
        assert not (tmp_path / "srun.args").exists()
        r = _run_script(tmp_path, script, PYTHON=sys.executable)
        assert r.returncode == 0, r.stdout + r.stderr
        (tmp_path / "srun.args").unlink()


def test_train_sbatch_names_a_bad_nproc_per_node_or_rdzv_port(tmp_path):
    # Both went to torchrun as given: NPROC_PER_NODE=0 ended in a bare AssertionError traceback,
    # "two" and RDZV_PORT=70000 in ValueError tracebacks, on every node.
    for env, named in [({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE=0 is not a positive whole number"),
                       ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE=two is not a positive whole number"),
                       ({"RDZV_PORT": "70000"}, "RDZV_PORT=70000 is not a port number (1-65535)"),
                       ({"RDZV_PORT": "99999999999999999999"}, "RDZV_PORT=99999999999999999999 is not a port number"),
                       ({"RDZV_PORT": "0"}, "RDZV_PORT=0 is not a port number")]:
        r = _run_script(tmp_path, "slurm/train.sbatch", PYTHON=sys.executable, **env)
        assert r.returncode == 2 and f"error: {named}" in r.stderr, (env, r.stderr)
        assert not (tmp_path / "srun.args").exists()
    for env, arg in [({"NPROC_PER_NODE": "4", "RDZV_PORT": "29600"}, "--nproc-per-node=4"),
                     ({"NPROC_PER_NODE": "gpu"}, "--nproc-per-node=gpu")]:
        r = _run_script(tmp_path, "slurm/train.sbatch", PYTHON=sys.executable, **env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert arg in (tmp_path / "srun.args").read_text().split()
        (tmp_path / "srun.args").unlink()


def test_the_head_node_of_a_long_node_list_is_read_without_a_broken_pipe(tmp_path):
    """`scontrol show hostnames | head -n 1` under `set -euo pipefail`: with a node list longer
    than the pipe's buffer, scontrol died of SIGPIPE once head had its line, and the batch script
    ended there (exit 141, an empty log, no requeue). The script's own line, run as it runs."""
    line = next(l for l in (REPO / "slurm" / "train.sbatch").read_text().splitlines() if l.startswith("HEAD_NODE="))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/usr/bin/env bash\nseq -f 'gpu-node-%05g' 1 20000\n")  # ~300 kB
    scontrol.chmod(0o755)
    run = subprocess.run(["bash", "-c", f"set -euo pipefail\n{line}\necho \"head=$HEAD_NODE\""],
                         env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                              "SLURM_JOB_NODELIST": "gpu-node-[00001-20000]"},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout == "head=gpu-node-00001\n", (run.returncode, run.stderr)
