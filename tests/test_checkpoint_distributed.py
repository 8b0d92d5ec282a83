"""Checkpoints under torchrun with real processes: kill -9 at random moments (mid-save too) during
a 2-process DDP run, sharded (torch.distributed.checkpoint) FSDP checkpoints resumed on 1 and 2
ranks, SIGTERM -> checkpoint -> exit code 75 -> torchrun --max-restarts restarts -> resume.
Marked slow (pytest -m slow): kill -9 of a 2-rank FSDP run saving sharded checkpoints
asynchronously, a 1-process sharded checkpoint resumed on 2 FSDP ranks, SIGTERM then a plain
rerun, and --max-restarts after a worker is killed.

Same world size, fp32 on CPU: the resumed run must equal the uninterrupted one bit for bit
(losses and final weights). Another world size sums the gradient in another order: losses agree
to 1e-5 (measured <= 5e-7, see tests/test_distributed.py).

Every launch costs ~10-15 s on 2 cores (torchrun and two workers importing torch); the model is
tiny (2 layers, 32 wide) so training itself is a second or two. The default tests make 7 launches.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt import checkpoint as ckpt

from conftest import learning_records, rewound_copy
from test_checkpoint import latest_step, wait_for_save_in_progress
from test_distributed import (  # noqa: F401  (data is a fixture)
    TINY, STEPS, _worker_pids, data, launch, losses, output_of, run_complete, train_1proc, train_torchrun,
)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(),
                                reason="finds torchrun's workers through /proc")

ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# 2-process DDP with dropout (the RNG states must come back too), a checkpoint every 3 steps
# (so kills often land mid-save), 40 steps of ~20-40 ms.
DDP_STEPS = 40
DDP = [*TINY, "--batch_size=4", f"--max_steps={DDP_STEPS}", "--eval_interval=3", "--eval_iters=1",
       "--dropout=0.1"]


def torchrun_cmd(args: list[str], nproc: int = 2, options: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *options, "train.py", *args]


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """torchrun in its own session; its workers get sessions of their own (torchrun starts them so)."""
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **ENV, **(env or {})})


def _dead(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status  # a zombie: it runs nothing and writes nothing any more


def kill_everything(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and all its workers (each a session leader) at once, and wait until none runs."""
    try:
        workers = list(_worker_pids(proc.pid).values())
    except OSError:
        workers = []
    for pid in [proc.pid, *workers]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 30
    while not all(_dead(pid) for pid in workers):
        assert time.monotonic() < deadline, "workers survived SIGKILL"
        time.sleep(0.01)


def wait_for_progress(proc: subprocess.Popen, run: Path, beyond: int, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while latest_step(run) <= beyond:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint after step {beyond} (exit code {proc.poll()}):\n"
                                 + log.read_text()[-3000:])
        time.sleep(0.01)


def assert_latest_is_complete(run: Path) -> None:
    found = ckpt.latest_checkpoint(run)  # raises if `latest` names a missing/incomplete folder
    if found is not None:
        ckpt.verify_checkpoint(found)


def finish(run: Path, args: list[str], steps: int) -> str:
    """Run to the end (resuming), retrying only gloo's rare abort at interpreter exit."""
    result = launch(torchrun_cmd(args), complete=run_complete(run, steps))
    assert result.returncode == 0, output_of(result)
    return result.stdout


def assert_same_run(run: Path, reference: Path) -> None:
    assert learning_records(run) == learning_records(reference)
    a = ckpt.read_model_state(ckpt.latest_checkpoint(reference))
    b = ckpt.read_model_state(ckpt.latest_checkpoint(run))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# Variants of the kill -9 test: 2-process DDP (full format, synchronous saves) by default; FSDP
# with sharded checkpoints written asynchronously (every rank writes in a background thread).
VARIANTS = {"ddp": DDP, "fsdp_sharded_async": [*DDP, "--batch_size=2", "--parallel=fsdp",
                                               "--async_checkpoint=true"]}


def reference_run(data: Path, run: Path, args: list[str]) -> Path:
    """The uninterrupted 2-process run of `args`."""
    result = launch(torchrun_cmd([f"--data_dir={data}", f"--out_dir={run}", *args]),
                    complete=run_complete(run, DDP_STEPS), fresh=[run])
    assert result.returncode == 0, output_of(result)
    return run


@pytest.fixture(scope="module")
def ddp_reference(data, tmp_path_factory) -> Path:
    """The uninterrupted 2-process DDP run with dropout."""
    run = reference_run(data, tmp_path_factory.mktemp("ddp") / "reference", DDP)
    state = ckpt.read_state(ckpt.latest_checkpoint(run))
    # Every rank's RNG state is saved, with the world size that chose them.
    assert sorted(state["rng"]) == ["0", "1"] and state["world_size"] == 2
    assert state["format"] == "full"
    return run


# ----------------------------------------------------------------------------------------
# kill -9


@pytest.mark.parametrize("variant", ["ddp", pytest.param("fsdp_sharded_async", marks=pytest.mark.slow)])
def test_kill_9_during_two_process_run_then_resume_matches_uninterrupted(data, tmp_path, variant, request):
    args = VARIANTS[variant]
    reference = (request.getfixturevalue("ddp_reference") if variant == "ddp"
                 else reference_run(data, tmp_path / "reference", args))
    run = tmp_path / "killed"
    args = [f"--data_dir={data}", f"--out_dir={run}", *args]
    rng = random.Random(0)
    mid_save_kills = 0
    # Even attempts wait for a save in progress, odd ones land anywhere.
    for attempt in range(2 if variant == "ddp" else 4):
        log = tmp_path / f"attempt{attempt}.log"
        proc = start(torchrun_cmd(args), log)
        try:
            wait_for_progress(proc, run, beyond=latest_step(run), log=log)
            if attempt % 2 == 0:
                mid_save_kills += wait_for_save_in_progress(proc, run)
            else:
                time.sleep(rng.uniform(0.0, 0.4))
        finally:
            kill_everything(proc)
        assert_latest_is_complete(run)
    assert mid_save_kills >= 1, "the test meant to kill during saves but never caught one"

    output = finish(run, args, DDP_STEPS)
    assert "resumed from" in output
    assert_same_run(run, reference)
    leftovers = [p.name for p in (run / ckpt.CHECKPOINTS_DIR).iterdir() if p.name.startswith(".")]
    assert leftovers == []
    if variant != "ddp":
        assert ckpt.checkpoint_format(ckpt.latest_checkpoint(run)) == "sharded"


# ----------------------------------------------------------------------------------------
# Stop signals and restarts


def wait_until_training(proc: subprocess.Popen, run: Path, log: Path) -> None:
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists():  # both ranks are in the training loop
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)


def finished(proc: subprocess.Popen, run: Path, output: str) -> None:
    """torchrun exited 0, or with gloo's rare abort at interpreter exit after all the work
    (see test_distributed.py)."""
    if not (proc.returncode != 0 and "SIGABRT" in output and run_complete(run, DDP_STEPS)()):
        assert proc.returncode == 0, output[-4000:]


def signal_rank_1(proc: subprocess.Popen, run: Path, log: Path, sig: int, timeout: float) -> None:
    """Once the job trains, send `sig` to rank 1's worker alone and wait for torchrun to end."""
    try:
        wait_until_training(proc, run, log)
        os.kill(_worker_pids(proc.pid)[1], sig)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_everything(proc)


def test_sigterm_under_torchrun_max_restarts_saves_exits_75_restarts_and_resumes(data, ddp_reference, tmp_path):
    """SIGTERM to rank 1 only: the ranks agree at the next step boundary, save (rank 0 writes)
    and exit with 75; torchrun (--max-restarts=1) counts that as a worker failure and restarts
    both, which resume from that checkpoint and end exactly where the uninterrupted run does."""
    run = tmp_path / "run"
    args = [f"--data_dir={data}", f"--out_dir={run}", *DDP]
    log = tmp_path / "run.log"
    # Without this, the restarted workers may fail to reach the rendezvous store.
    proc = start(torchrun_cmd(args, options=("--max-restarts=1",)), log,
                 env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    signal_rank_1(proc, run, log, signal.SIGTERM, timeout=180)
    output = log.read_text()
    finished(proc, run, output)
    assert "received a stop signal" in output and "exiting with code 75" in output, output[-4000:]
    # torchrun's report before restarting: 75, or -6 where gloo's rare abort at interpreter exit
    # (see `finished`) ended the worker after it had saved and said so
    assert "failed (exitcode: 75)" in output or (
        "failed (exitcode: -6)" in output and "SIGABRT" in output), output[-4000:]
    resumed = [line for line in output.splitlines() if "resumed from" in line]
    assert len(resumed) == 1, output[-4000:]
    stopped = int(resumed[0].rsplit("at step ", 1)[1].split()[0])
    assert 0 < stopped < DDP_STEPS
    assert_same_run(run, ddp_reference)


@pytest.mark.slow
def test_sigterm_to_one_rank_saves_exits_75_and_a_rerun_resumes_exactly(data, ddp_reference, tmp_path):
    """Without restarts: torchrun exits (its workers with 75); running it again resumes."""
    run = tmp_path / "run"
    args = [f"--data_dir={data}", f"--out_dir={run}", *DDP]
    log = tmp_path / "first.log"
    proc = start(torchrun_cmd(args), log)
    signal_rank_1(proc, run, log, signal.SIGTERM, timeout=120)
    output = log.read_text()
    assert proc.returncode != 0, output[-3000:]  # torchrun: a worker exited non-zero
    assert "exitcode  : 75" in output, output[-3000:]
    assert "received a stop signal" in output
    stopped = latest_step(run)
    assert 0 < stopped < DDP_STEPS, output[-3000:]
    assert_latest_is_complete(run)

    output = finish(run, args, DDP_STEPS)
    assert f"resumed from {run / 'checkpoints' / ckpt.step_dir_name(stopped)} at step {stopped}" in output
    assert_same_run(run, ddp_reference)


def test_ctrl_c_to_one_worker_stops_every_rank_as_interrupted(data, tmp_path):
    """SIGINT to rank 1 alone (`kill -INT` on one worker): that rank exited 130 and the others,
    told to stop by its vote, 75, so one job reported both "interrupted" and "requeue me". The
    vote now says which: every rank saves the same step and exits 130."""
    run = tmp_path / "run"
    log = tmp_path / "run.log"
    proc = start(torchrun_cmd([f"--data_dir={data}", f"--out_dir={run}", *DDP]), log)
    signal_rank_1(proc, run, log, signal.SIGINT, timeout=120)
    output = log.read_text()
    assert proc.returncode != 0, output[-3000:]
    assert "received a stop signal (SIGINT on another rank)" in output, output[-3000:]
    assert "exiting with code 130" in output and "exiting with code 75" not in output, output[-3000:]
    assert "exitcode  : 130" in output and "exitcode  : 75" not in output, output[-3000:]
    assert 0 < latest_step(run) < DDP_STEPS, output[-3000:]
    assert_latest_is_complete(run)


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_after_a_worker_is_killed(data, ddp_reference, tmp_path):
    """kill -9 of one worker: torchrun restarts both (--max-restarts=1), they resume from the
    latest checkpoint and finish exactly as the uninterrupted run."""
    run = tmp_path / "run"
    args = [f"--data_dir={data}", f"--out_dir={run}", *DDP]
    log = tmp_path / "run.log"
    proc = start(torchrun_cmd(args, options=("--max-restarts=1",)), log,
                 env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    try:
        wait_for_progress(proc, run, beyond=3, log=log)
        os.kill(_worker_pids(proc.pid)[1], signal.SIGKILL)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            kill_everything(proc)
    output = log.read_text()
    finished(proc, run, output)
    assert "resumed from" in output, output[-4000:]
    assert_same_run(run, ddp_reference)


# ----------------------------------------------------------------------------------------
# Sharded checkpoints across world sizes


def from_step_3(run: Path, copy: Path) -> Path:
    """A copy of `run` as it was when its step-3 checkpoint was the latest."""
    return rewound_copy(run, copy, step=3)


def test_fsdp_sharded_checkpoints_resume_on_one_and_two_ranks(data, tmp_path):
    """FSDP on 2 ranks saves sharded checkpoints (every rank writes its shard). Resumed on 2 FSDP
    ranks it continues bit for bit; on 1 plain process (DCP reads the shards into full tensors)
    within 1e-5."""
    fsdp = tmp_path / "fsdp"
    train_torchrun(data, fsdp, "--batch_size=2", "--parallel=fsdp")  # 2 ranks x 2 x accum 2
    saved = fsdp / "checkpoints" / ckpt.step_dir_name(3)
    assert ckpt.checkpoint_format(saved) == "sharded"
    manifest = ckpt.read_manifest(saved)
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "state.json"} <= set(manifest)
    assert not (saved / ckpt.MODEL_FILE).exists()

    same = from_step_3(fsdp, tmp_path / "fsdp_2_to_2")
    output = train_torchrun(data, same, "--batch_size=2", "--parallel=fsdp", fresh=False)
    assert "resumed from" in output
    assert losses(same) == losses(fsdp)  # exactly
    a, b = ckpt.read_model_state(fsdp / "checkpoints" / ckpt.step_dir_name(STEPS)), \
        ckpt.read_model_state(same / "checkpoints" / ckpt.step_dir_name(STEPS))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert_states_close(ckpt.read_optimizer_state(fsdp / "checkpoints" / ckpt.step_dir_name(STEPS)),
                        ckpt.read_optimizer_state(same / "checkpoints" / ckpt.step_dir_name(STEPS)), atol=0)

    one = from_step_3(fsdp, tmp_path / "fsdp_2_to_1")
    train_1proc(data, one, "--batch_size=8")  # the plain model, no process group
    np.testing.assert_allclose(losses(one), losses(fsdp), rtol=0, atol=1e-5)
    # The 1-process run keeps saving in the full format (checkpoint_format = auto), with the
    # optimizer state it continued from.
    final = one / "checkpoints" / ckpt.step_dir_name(STEPS)
    assert ckpt.checkpoint_format(final) == "full"
    assert_states_close(ckpt.read_optimizer_state(final),
                        ckpt.read_optimizer_state(fsdp / "checkpoints" / ckpt.step_dir_name(STEPS)), atol=1e-5)


def assert_states_close(a: dict, b: dict, atol: float) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, fields in a["state"].items():
        for key, value in fields.items():
            torch.testing.assert_close(value, b["state"][index][key], rtol=0, atol=atol)


@pytest.mark.slow
def test_one_process_sharded_checkpoint_resumes_on_two_fsdp_ranks(data, tmp_path):
    single = tmp_path / "single"
    train_1proc(data, single, "--batch_size=8", "--checkpoint_format=sharded")
    two = from_step_3(single, tmp_path / "single_1_to_2")
    train_torchrun(data, two, "--batch_size=2", "--parallel=fsdp", fresh=False)
    np.testing.assert_allclose(losses(two), losses(single), rtol=0, atol=1e-5)
