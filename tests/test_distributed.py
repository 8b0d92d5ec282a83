"""Scale-out: DDP and FSDP2 on 2 CPU processes (gloo, launched with torchrun) train the same model
as one process; mixed precision, gradient accumulation, checkpoints across world sizes, failures.

Every multi-process test launches `torchrun --standalone --nproc_per_node=2` as a subprocess, so
the process groups are real. The model is tiny (2 layers, 32 wide, block 32) and runs are a few
steps, to keep the file at about two minutes on 2 cores.

Tolerances (fp32): the gradient of a 2-rank run is the mean of two half-batch gradients instead
of one whole-batch gradient, so sums are added in another order: measured max abs differences
are ~1e-8 for gradients, ~5e-7 for losses and ~2e-6 for weights after 3-6 AdamW steps (Adam
divides by sqrt(v), which magnifies the last bits of small gradients). bf16/fp16 compare against
fp32 with loose tolerances stated at each test.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from gpt import checkpoint as ckpt
from gpt import parallel
from gpt.checkpoint.full_state import full_state_dicts, load_full_state_dicts
from gpt.config import ConfigError, TrainConfig, parse_args
from gpt.distributed import DistInfo
from gpt.metrics import read_metrics
from gpt.shards import write_shard

from conftest import child_pids, rewound_copy

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "scaleout_worker.py"

STEPS = 6
TOKENS_PER_STEP = 8 * 32  # 8 windows of 32 tokens: batch 8 on 1 process, 4 x 2, 2 x 2 x accum 2, ...
TINY = [
    "--prepare_source=none", "--device=cpu", "--dtype=float32", "--n_layer=2", "--n_head=2",
    "--n_embd=32", "--block_size=32", f"--tokens_per_step={TOKENS_PER_STEP}", f"--max_steps={STEPS}",
    "--log_interval=1", "--eval_interval=3", "--eval_iters=2", "--keep_last=2", "--warmup_steps=2",
    "--learning_rate=3e-3", "--min_lr=3e-4", "--peak_tflops=1",
]
FP32 = dict(rtol=0, atol=1e-5)  # losses, and weights after the worker's 3 steps (measured <= 2.5e-6)
# Weights after the 6 steps of a whole run: AdamW's 1/sqrt(v) magnifies last-bit gradient
# differences of near-zero elements (measured max 1.1e-5 at lr 3e-3).
RUN_WEIGHTS = dict(rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------
# Launching


def _aborted_at_exit(output: str) -> bool:
    # About 1 launch in 25 on these machines a gloo rank aborts (SIGABRT) at interpreter exit,
    # after all its work is done. torchrun's failure report names the signal.
    return "SIGABRT" in output


def torchrun(args: list[str], complete: Callable[[], bool], fresh: list[Path] = (), nproc: int = 2,
             timeout: float = 240) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc ARGS` from the repository root, via `launch`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return launch(cmd, complete, fresh, timeout)


def launch(cmd: list[str], complete: Callable[[], bool], fresh: list[Path] = (), timeout: float = 240,
           attempts: int = 3) -> subprocess.CompletedProcess:
    """Run `cmd`; a non-zero exit is retried (up to `attempts` runs in all) only when it is the
    exit-time gloo abort *and* the run's outputs are complete (`complete()`). Any other failure is
    returned as it is, for the test to report. `fresh` folders are emptied before each attempt."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for _ in range(attempts):
        for folder in fresh:
            shutil.rmtree(folder, ignore_errors=True)
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
        if result.returncode == 0 or not (_aborted_at_exit(result.stdout + result.stderr) and complete()):
            return result
    return result


def output_of(result: subprocess.CompletedProcess) -> str:
    return (result.stdout + result.stderr)[-6000:]


def run_complete(out_dir: Path, steps: int = STEPS) -> Callable[[], bool]:
    """A training run is complete when its metrics reach the last step and `latest` names it."""
    def complete() -> bool:
        try:
            return (read_metrics(out_dir)[-1]["step"] == steps
                    and (out_dir / "latest").read_text().strip() == ckpt.step_dir_name(steps))
        except (OSError, IndexError, ValueError):
            return False
    return complete


def train_torchrun(data: Path, out_dir: Path, *extra: str, fresh: bool = True, nproc: int = 2) -> str:
    """A train.py run under torchrun; returns its output."""
    result = torchrun(["train.py", f"--data_dir={data}", f"--out_dir={out_dir}", *TINY, *extra],
                      complete=run_complete(out_dir), fresh=[out_dir] if fresh else [], nproc=nproc)
    assert result.returncode == 0, output_of(result)
    assert run_complete(out_dir)(), output_of(result)
    return result.stdout


def train_1proc(data: Path, out_dir: Path, *extra: str) -> None:
    from gpt.trainer import train

    # train.py's own defaults (configs/default.toml), so that only the launcher differs.
    train(parse_args([f"--data_dir={data}", f"--out_dir={out_dir}", *TINY, *extra],
                     default_config=str(REPO / "configs" / "default.toml")))
    assert run_complete(out_dir)()


def losses(out_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out_dir)]


def final_weights(out_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    # Either format: FSDP runs save sharded checkpoints (checkpoint_format = auto).
    return ckpt.read_model_state(out_dir / "checkpoints" / ckpt.step_dir_name(step))


def assert_weights_close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------
# Fixtures: one dataset, one launch of the step-by-step worker, and the three reference runs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A char-sized (65) vocabulary over a noisy repeating pattern: learnable in a few steps."""
    out = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    pattern = np.tile(np.arange(65), 400)
    tokens = np.where(rng.random(pattern.size) < 0.2, rng.integers(0, 65, pattern.size), pattern)
    write_shard(out / "train_000000.bin", tokens[:24000])
    write_shard(out / "val_000000.bin", tokens[24000:])
    (out / "meta.json").write_text(json.dumps({"tokenizer": "char", "vocab_size": 65, "eos_id": None}))
    return out


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> dict:
    """tests/scaleout_worker.py's records: every strategy vs the single-process reference."""
    out = tmp_path_factory.mktemp("worker") / "results.pt"
    result = torchrun([str(WORKER), str(out)], complete=out.exists)
    assert result.returncode == 0, output_of(result)
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    """The same recipe (seed, tokens_per_step) on 1 process and on 2 (DDP, FSDP + accumulation)."""
    root = tmp_path_factory.mktemp("runs")
    train_1proc(data, root / "single", "--batch_size=8")
    ddp = train_torchrun(data, root / "ddp", "--batch_size=4")  # parallel=auto -> ddp on 2 processes
    assert "parallel: ddp over 2 process(es)" in ddp
    fsdp = train_torchrun(data, root / "fsdp", "--batch_size=2", "--parallel=fsdp")  # 2 x 2 x accum 2
    assert "parallel: fsdp (FSDP2) over 2 process(es); float32 compute" in fsdp
    return {name: root / name for name in ("single", "ddp", "fsdp")}


def max_abs(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ----------------------------------------------------------------------------------------
# Step-level equivalence (one launch of the worker)


def test_ddp_step_equals_single_process_step(steps):
    ref = steps["reference"]
    for name in ("ddp", "ddp_accum2"):
        got = steps[name]
        # The first step's gradients, already averaged over ranks, are the whole-batch gradient.
        assert_weights_close(got["grads"], ref["grads"], rtol=1e-5, atol=1e-7)  # measured 9e-9
        torch.testing.assert_close(got["norms"], ref["norms"], rtol=1e-6, atol=0)
        torch.testing.assert_close(got["losses"], ref["losses"], **FP32)
        assert_weights_close(got["weights"], ref["weights"], **FP32)
    assert ref["norms"][0] > 0.5  # grad_clip=1.0 vs norms ~0.5-0.7: the clip factor is computed, not 1 by luck


def test_muon_step_under_ddp_and_fsdp_equals_single_process_muon_step(steps):
    """Under FSDP each rank holds some rows of every matrix; Muon gathers the whole momentum,
    orthogonalizes it and keeps its rows (with CPU offload and accumulation too)."""
    ref = steps["reference_muon"]
    for variant in ("ddp_muon", "fsdp_muon", "fsdp_muon_offload"):
        got = steps[variant]
        torch.testing.assert_close(got["losses"], ref["losses"], **FP32)
        assert_weights_close(got["weights"], ref["weights"], **FP32)
    # What `torchrun train.py --parallel=fsdp` runs on GPUs by default: bf16 compute under the
    # MixedPrecisionPolicy, fp32 master weights and momentum (losses as close as the AdamW case's).
    torch.testing.assert_close(steps["fsdp_muon_bf16"]["losses"], ref["losses"], rtol=0, atol=2e-3)
    got = steps["ddp_muon"]
    # Muon moved the block matrices elsewhere than AdamW did (the optimizer really changed).
    name = "blocks.0.mlp.fc.weight"
    assert (got["weights"][name] - steps["reference"]["weights"][name]).abs().max() > 1e-3


def test_fsdp_muon_skips_a_nan_step_on_every_rank(steps):
    """A NaN in one rank's gradient shard: every rank skips on the device (no host sync), and the
    gathered weights, momentum and AdamW moments are bit for bit those before the step."""
    skip = steps["nan_skip_muon"]
    assert skip["on_device"] and skip["unchanged"] and skip["kept"] > 40


def test_fsdp_matches_ddp_and_single_process(steps):
    ref, ddp = steps["reference"], steps["ddp"]
    for name in ("fsdp", "fsdp_accum2"):
        got = steps[name]
        assert_weights_close(got["grads"], ref["grads"], rtol=1e-5, atol=1e-7)
        # clip_grad_norm_ over DTensor shards gives the global norm.
        torch.testing.assert_close(got["norms"], ddp["norms"], rtol=1e-6, atol=0)
        torch.testing.assert_close(got["losses"], ddp["losses"], **FP32)
        # Gathered for a checkpoint: full tensors under the plain model's names.
        assert_weights_close(got["weights"], ref["weights"], **FP32)


def test_memory_options_do_not_change_the_result(steps):
    """Activation checkpointing, CPU offload and no resharding move tensors, not values."""
    ref = steps["reference"]
    for name in ("fsdp_options", "ddp_checkpointing"):
        got = steps[name]
        assert_weights_close(got["grads"], ref["grads"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["losses"], ref["losses"], **FP32)
        assert_weights_close(got["weights"], ref["weights"], **FP32)


def test_mixed_precision_fsdp_matches_ddp(steps):
    """FSDP's MixedPrecisionPolicy (bf16/fp16 weights in compute, fp32 master weights and
    reduction) vs DDP under autocast vs fp32. Measured max abs differences: losses <= 3e-4,
    gradients <= 6e-4 (largest gradient ~0.1). Weights are not compared: after an AdamW step a
    gradient element near zero whose sign rounding flips moves by +-lr either way."""
    ref = steps["reference"]
    for low in ("bf16", "fp16"):
        fsdp, ddp = steps[f"fsdp_{low}"], steps[f"ddp_{low}"]
        for got in (fsdp, ddp):
            torch.testing.assert_close(got["losses"], ref["losses"], rtol=0, atol=2e-3)
            assert_weights_close(got["grads"], ref["grads"], rtol=0, atol=3e-3)
        torch.testing.assert_close(fsdp["losses"], ddp["losses"], rtol=0, atol=2e-3)
        assert_weights_close(fsdp["grads"], ddp["grads"], rtol=0, atol=3e-3)
    # fp16: an overflow in one rank's gradient shard makes both ranks skip the step and halve
    # the loss scale, so shards and scales stay in step.
    overflow = steps["fp16_overflow"]
    assert overflow["changed"] == [] and overflow["scales"] == [32768.0, 32768.0]


# ----------------------------------------------------------------------------------------
# Whole runs through train.py


def test_one_and_two_processes_give_the_same_loss_curve(runs):
    single = losses(runs["single"])
    assert len(single) == STEPS and single[-1] < single[0]
    for name in ("ddp", "fsdp"):
        np.testing.assert_allclose(losses(runs[name]), single, rtol=0, atol=1e-5)  # measured <= 5e-7
        assert [r["tokens"] for r in read_metrics(runs[name])] == [TOKENS_PER_STEP * s for s in range(1, STEPS + 1)]
        assert_weights_close(final_weights(runs[name]), final_weights(runs["single"]), **RUN_WEIGHTS)
        # Each rank draws its own dropout masks: their generators were seeded apart (seed + rank).
        rng = ckpt.read_state(ckpt.latest_checkpoint(runs[name]))["rng"]
        assert rng["0"]["torch"] != rng["1"]["torch"]


def test_gradient_accumulation_equals_one_big_batch(data, runs, tmp_path):
    """Batch 2 x accum 4 consumes the same 8 windows per step as batch 8 (the loader counts
    windows globally), and averaging 4 quarter-batch losses is the whole-batch mean."""
    train_1proc(data, tmp_path / "accum", "--batch_size=2")
    np.testing.assert_allclose(losses(tmp_path / "accum"), losses(runs["single"]), rtol=0, atol=1e-5)
    assert_weights_close(final_weights(tmp_path / "accum"), final_weights(runs["single"]), **RUN_WEIGHTS)


def test_fsdp_on_one_torchrun_process(data, runs, tmp_path):
    """Under torchrun a process group exists even for one process, so parallel=fsdp really runs
    FSDP (over one rank): CPU offload on one GPU, or a multi-GPU config tried on one device."""
    out = tmp_path / "run"
    output = train_torchrun(data, out, "--batch_size=8", "--parallel=fsdp", nproc=1)
    assert "parallel: fsdp (FSDP2) over 1 process(es)" in output
    np.testing.assert_allclose(losses(out), losses(runs["single"]), rtol=0, atol=1e-5)


def test_checkpoints_resume_across_strategies_and_world_sizes(data, runs, tmp_path):
    """One file format for every strategy: a 1-process checkpoint resumes under 2-process FSDP
    and an FSDP checkpoint on 1 process, each continuing the uninterrupted curve."""
    def from_step_3(run: Path, name: str) -> Path:
        return rewound_copy(run, tmp_path / name, step=3)

    fsdp_from_single = from_step_3(runs["single"], "fsdp_from_single")
    train_torchrun(data, fsdp_from_single, "--batch_size=2", "--parallel=fsdp", fresh=False)
    np.testing.assert_allclose(losses(fsdp_from_single), losses(runs["single"]), rtol=0, atol=1e-5)
    assert_weights_close(final_weights(fsdp_from_single), final_weights(runs["single"]), **RUN_WEIGHTS)

    single_from_fsdp = from_step_3(runs["fsdp"], "single_from_fsdp")
    train_1proc(data, single_from_fsdp, "--batch_size=8")
    np.testing.assert_allclose(losses(single_from_fsdp), losses(runs["fsdp"]), rtol=0, atol=1e-5)
    assert_weights_close(final_weights(single_from_fsdp), final_weights(runs["fsdp"]), **RUN_WEIGHTS)


def test_init_from_under_fsdp_starts_every_rank_from_rank_0s_checkpoint(data, runs, tmp_path):
    """init_from a run: rank 0 resolves its latest and the others take that folder (trainer
    init_source), each pinned for reading; FSDP ranks keep the shards of their own load, so two
    resolutions of a run still saving could have mixed two checkpoints. The fine-tune starts
    from the trained weights: its first loss is the trained run's level, not a fresh model's."""
    out = tmp_path / "finetune"
    output = train_torchrun(data, out, "--batch_size=2", "--parallel=fsdp", f"--init_from={runs['single']}")
    assert f"initialized weights from {runs['single'] / 'checkpoints' / ckpt.step_dir_name(STEPS)}" in output
    assert losses(out)[0] < losses(runs["single"])[0] - 0.1


def test_a_bad_init_from_under_torchrun_is_one_error_line(data, tmp_path):
    """Rank 0 resolves init_from; its error goes to every rank with the broadcast. The other
    ranks were left waiting in it and died with gloo tracebacks of their own ("Connection closed
    by peer") under the one line that said what was wrong."""
    (tmp_path / "empty").mkdir()
    result = torchrun(["train.py", f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", *TINY,
                       "--batch_size=4", f"--init_from={tmp_path / 'empty'}"], complete=lambda: False)
    output = output_of(result)
    assert result.returncode != 0
    assert f"error: {tmp_path / 'empty'} holds no checkpoint" in output, output
    # (torchrun prints a traceback of its own for any failed worker: the ranks' are what count)
    assert "broadcast_object_list" not in output and "Connection closed" not in output, output


# ----------------------------------------------------------------------------------------
# Failures


def _worker_pids(torchrun_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (its children), from their environment."""
    ranks = {}
    for pid in child_pids(torchrun_pid):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0])] = pid
    return ranks


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
@pytest.mark.parametrize("failure", ["killed", "raises"])
def test_a_failing_rank_fails_the_whole_job_quickly(data, tmp_path, failure):
    """killed: rank 1 dies by SIGKILL mid-training. raises: rank 0 raises while writing its first
    checkpoint (the checkpoints folder is a file) while rank 1 waits for it in a collective.
    Either way torchrun must exit non-zero within seconds, not at the 10-minute collective timeout."""
    out = tmp_path / "run"
    out.mkdir()
    args = ["train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, "--batch_size=4",
            "--max_steps=100000", "--eval_interval=" + ("0" if failure == "killed" else "5")]
    if failure == "raises":
        (out / "checkpoints").write_text("not a folder")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():  # both ranks are in the training loop
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
            time.sleep(0.1)
        start = time.monotonic()
        if failure == "killed":
            os.kill(_worker_pids(proc.pid)[1], signal.SIGKILL)
        output = proc.communicate(timeout=90)[0]
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, output[-4000:]
    assert elapsed < 60, f"torchrun took {elapsed:.0f}s to exit after the failure"
    if failure == "raises":
        assert "FileExistsError" in output or "NotADirectoryError" in output, output[-4000:]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
def test_a_rank_told_to_stop_before_its_peer_died_says_stopped_not_error(data, tmp_path):
    """torchrun stops the other workers (SIGTERM) when one fails; a worker whose collective fails
    only after that SIGTERM is not the run's failure. It said `rank 1: error: lost the connection`
    (after its 5 s delay) beside rank 0's own error: a second job refused by rank 0's out_dir lock
    read as refused twice (tests/test_out_dir.py, on a loaded CI machine). Here the order is made
    certain: rank 0 is frozen, rank 1 (waiting for it in a collective) gets SIGTERM, then rank 0
    dies."""
    out = tmp_path / "run"
    args = ["train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, "--batch_size=4", "--max_steps=100000",
            "--eval_interval=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
            time.sleep(0.1)
        ranks = _worker_pids(proc.pid)
        os.kill(ranks[0], signal.SIGSTOP)
        time.sleep(1)  # rank 1 is now waiting for rank 0 in the step's all-reduce
        os.kill(ranks[1], signal.SIGTERM)
        time.sleep(0.5)
        os.kill(ranks[0], signal.SIGKILL)
        output = proc.communicate(timeout=90)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, output[-4000:]
    assert re.search(r"^rank 1: stopped: told to stop \(SIGTERM\), this process then lost the connection to "
                     r"another process of this run \((Connection (reset|closed) by peer|Broken pipe)\), which had failed",
                     output, re.M), output[-4000:]
    assert not re.search(r"^(rank \d+: )?error:", output, re.M), output[-4000:]


def test_impossible_tokens_per_step_names_the_key_under_two_processes(data, tmp_path):
    out = tmp_path / "run"
    # 8 x 32 x 2 processes = 512 tokens per micro-step; 768 is 1.5 of them.
    result = torchrun(["train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, "--batch_size=8",
                       "--tokens_per_step=768"], complete=lambda: False)
    assert result.returncode != 0
    assert "tokens_per_step (768) must be a multiple of batch_size x block_size x processes" in result.stderr
    assert "8 x 32 x 2 = 512" in result.stderr
    assert not (out / "metrics.jsonl").exists()
    # Both ranks met it; rank 0 says it once and torchrun stops rank 1 before it repeats it.
    assert result.stderr.count("must be a multiple of batch_size") == 1, result.stderr[-4000:]
    assert "rank 1: error:" not in result.stderr


def test_an_error_on_one_rank_alone_is_printed_by_that_rank(tmp_path):
    """The other half of say_error: when rank 0 does not fail, the rank that did still prints its
    error (after its delay), naming itself."""
    script = tmp_path / "one_rank_fails.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from gpt.cli import report_errors\n"
        "from gpt.config import ConfigError\n"
        "def main():\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise ConfigError('only rank 1 has this problem')\n"
        "    time.sleep(30)\n"  # rank 0 goes on working until torchrun stops it
        "sys.exit(report_errors(main))\n")
    result = torchrun([str(script)], complete=lambda: False, timeout=120)
    assert result.returncode != 0
    assert "rank 1: error: only rank 1 has this problem" in result.stderr, result.stderr[-4000:]


# ----------------------------------------------------------------------------------------
# Single-process units


def test_launch_retries_only_the_exit_time_abort(tmp_path):
    """The retry in `launch` must never hide a real failure."""
    count = tmp_path / "count"

    def script(output: str, code: int) -> list[str]:
        return [sys.executable, "-c", f"import sys; open({str(count)!r}, 'a').write('x'); "
                                      f"print({output!r}); sys.exit({code})"]

    for output, complete, runs in [("Signal 6 (SIGABRT) received", True, 3),  # retried, still failing
                                   ("Signal 6 (SIGABRT) received", False, 1),  # outputs incomplete
                                   ("RuntimeError: boom", True, 1)]:  # a real failure
        count.write_text("")
        result = launch(script(output, 1), complete=lambda: complete)
        assert result.returncode == 1 and len(count.read_text()) == runs, (output, complete)
    count.write_text("")
    assert launch(script("ok", 0), complete=lambda: False).returncode == 0
    assert len(count.read_text()) == 1


def test_full_state_matches_the_single_process_checkpoint_format():
    from gpt.model import GPT, GPTConfig
    from gpt.optim import build_optimizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32))
    optimizer = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    x = torch.randint(0, 65, (2, 16))
    model(x, x)[1].backward()
    optimizer.step()

    model_state, optim_state = full_state_dicts(model, optimizer)
    # The names safetensors.save_model writes: one name for the tied embedding / lm_head.
    assert sorted(model_state) == sorted(k for k in model.state_dict() if k != "tok_emb.weight")
    native = optimizer.state_dict()
    assert optim_state["param_groups"] == native["param_groups"]
    assert optim_state["state"].keys() == native["state"].keys()
    for index, fields in native["state"].items():
        for key, value in fields.items():
            assert torch.equal(optim_state["state"][index][key], value)

    torch.manual_seed(1)
    other = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32))
    other_opt = build_optimizer(other, TrainConfig(), torch.device("cpu"))
    load_full_state_dicts(other, other_opt, model_state, optim_state)
    assert other.lm_head.weight is other.tok_emb.weight  # loading keeps the tie
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    for index, fields in native["state"].items():
        for key, value in fields.items():
            assert torch.equal(other_opt.state_dict()["state"][index][key], value)


def test_one_process_runs_the_plain_model():
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    for strategy in ("auto", "none", "ddp", "fsdp"):
        assert parallel.resolve_strategy(TrainConfig(parallel=strategy), info) == "none"
    two = DistInfo(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"), process_group=True)
    assert parallel.resolve_strategy(TrainConfig(), two) == "ddp"
    # torchrun with one process: a process group exists, so an explicit strategy applies.
    torchrun_one = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), process_group=True)
    assert parallel.resolve_strategy(TrainConfig(parallel="fsdp"), torchrun_one) == "fsdp"
    assert parallel.resolve_strategy(TrainConfig(), torchrun_one) == "none"
    assert parallel.autocast_dtype("fsdp", torch.bfloat16) is None  # the policy casts
    assert parallel.autocast_dtype("ddp", torch.bfloat16) is torch.bfloat16
    assert parallel.autocast_dtype("none", torch.float32) is None
    assert [parallel.reshard_after_forward("auto", i, 3) for i in range(3)] == [True, True, False]


def test_parallel_none_on_several_processes_is_refused():
    """Each rank would train its own copy without ever averaging gradients, while the logs and
    checkpoints show rank 0's alone: refused, naming the key and what to use instead."""
    two = DistInfo(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"), process_group=True)
    with pytest.raises(ConfigError, match=r"parallel = 'none' but 2 processes were launched.*Use "
                                          r"parallel = 'ddp', 'fsdp' or 'auto'"):
        parallel.resolve_strategy(TrainConfig(parallel="none"), two)


def test_activation_checkpointing_keeps_names_and_gradients():
    from gpt.model import GPT, GPTConfig

    def grads(checkpointing: bool) -> dict:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1))
        info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
        model = parallel.parallelize(model, TrainConfig(activation_checkpointing=checkpointing), info, torch.float32)
        torch.manual_seed(1)
        x = torch.randint(0, 65, (2, 16))
        model(x, x)[1].backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys()
    for name in plain:  # dropout replays the same masks in the recomputation
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-7)


@pytest.mark.parametrize("key, value", [("fsdp_cpu_offload", "true"), ("fsdp_reduce_dtype", "bfloat16"),
                                        ("fsdp_reshard_after_forward", "never")])
def test_fsdp_keys_require_parallel_fsdp(key, value):
    with pytest.raises(ConfigError, match=f"{key} = .* applies only with parallel = 'fsdp'"):
        parse_args([f"--{key}={value}", "--parallel=ddp"])
    parse_args([f"--{key}={value}", "--parallel=fsdp"])  # fine


# ----------------------------------------------------------------------------------------
# torch.compile (slow: inductor compiles C++ kernels for each process)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_compiled_runs_give_the_same_loss_curve(data, runs, tmp_path, strategy):
    """compile + activation checkpointing + accumulation 2 (gradient sync toggled on a compiled
    module) still trains the 1-process model."""
    out = tmp_path / strategy
    train_torchrun(data, out, "--batch_size=2", f"--parallel={strategy}", "--compile=true",
                   "--activation_checkpointing=true")
    np.testing.assert_allclose(losses(out), losses(runs["single"]), rtol=0, atol=1e-4)
