"""The GPU benchmark scripts, smoke-run on CPU: a session lent a GPU has minutes, so a bash or
flag mistake in them must show up here, not there."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def run_scaleout(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "DATA": str(tmp_path / "data"), "RUNS": str(tmp_path / "runs"),
           "OUT": str(tmp_path / "out"), "RESULTS": str(tmp_path / "results.json"), **env}
    return subprocess.run(["bash", "benchmarks/gpu_scaleout.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_gpu_scaleout_script_runs_fsdp_on_two_cpu_processes_and_summarizes(tmp_path):
    # The GPU shape, overridden by EXTRA_ARGS to a tiny model (as gpu.sh picks the optimizer);
    # synthetic shards of 100k tokens.
    r = run_scaleout(tmp_path, DEVICE="cpu", DTYPE="float32", NPROC="2", STRATEGIES="fsdp", STEPS="4",
                     SKIP="1", BATCH="2", COMPILE="false", TRAIN_TOKENS="100000",
                     EXTRA_ARGS="--n_layer=1 --n_head=2 --n_embd=32 --block_size=64 --optimizer=adamw")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 x 2 x 32, block 64, cpu float32, adamw" in r.stdout
    result = json.loads((tmp_path / "results.json").read_text())
    assert (result["nproc"], result["device"], result["dtype"], result["block"]) == (2, "cpu", "float32", 64)
    assert result["optimizer"] == "adamw"
    assert result["model"] == "1 x 2 x 32, vocab 50304"
    fsdp = result["results"]["fsdp"]
    assert fsdp["steps_timed"] == 3 and fsdp["tokens_per_s"] > 0 and 0 < fsdp["mfu"] < 1
    assert math.isfinite(fsdp["final_loss"]) and abs(fsdp["final_loss"] - math.log(50257)) < 0.5
    assert (tmp_path / "runs" / "fsdp" / "metrics.jsonl").exists()
    assert not (tmp_path / "out").exists()  # the GPU machine copies $OUT back: no checkpoints there


def test_gpu_scaleout_script_without_a_gpu_says_so(tmp_path):
    r = run_scaleout(tmp_path, PATH=f"{tmp_path}:/usr/bin:/bin")  # no nvidia-smi on this PATH
    assert r.returncode == 2 and "no GPU visible" in r.stderr
    assert not (tmp_path / "data").exists()  # stopped before writing anything


def test_busy_cores_counts_a_process_spinning_now():
    # The suite's --threads auto leaves out the cores other jobs use now; the 1-minute load
    # average it used before still read ~1 a minute after a job had ended.
    from benchmarks.common import busy_cores

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = busy_cores(window_s=1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.6 <= busy <= os.cpu_count()
