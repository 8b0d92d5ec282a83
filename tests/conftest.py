"""Fixtures shared by the test files: a small real dataset and tiny run configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import replace
from pathlib import Path

import pytest

from gpt.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def run_script(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`python ARGS...` run from the repository root, its output captured as text."""
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def need_shakespeare() -> None:
    """Skip where ../shared's tiny-Shakespeare is absent (a clone elsewhere); under .ci/run, which
    sets GPT_TESTS_NEED_SHARED=1, fail instead: a green CI with 400 tests skipped would hide them."""
    if SHAKESPEARE.exists():
        return
    if os.environ.get("GPT_TESTS_NEED_SHARED") == "1":
        pytest.fail(f"{SHAKESPEARE} not found: CI clones the repository beside ../shared/data")
    pytest.skip(f"{SHAKESPEARE} not found")


@pytest.fixture(scope="session", autouse=True)
def subprocess_tmpdir(tmp_path_factory):
    """TMPDIR for every process the tests start, inside pytest's own temporary folder (which it
    prunes to the last three sessions): torchrun leaves a torchelastic_* folder in the system's
    /tmp at each launch, about twenty a session. The test process's own tempfile.gettempdir()
    was fixed at its first use and stays /tmp."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmpdir")))
        yield


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """The whole tiny-Shakespeare text from ../shared (the tests skip where it is absent)."""
    need_shakespeare()
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def char_data(tmp_path_factory) -> Path:
    """A char-level tiny-Shakespeare dataset (the first 300 kB) made by the real prep code."""
    from gpt.prepare import prepare

    need_shakespeare()
    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    text = SHAKESPEARE.read_text()[:300_000]
    prepare(out, [text], tokenizer="char", val_fraction=0.1, val_rule="tail", progress=False)
    return out


@pytest.fixture(scope="session")
def code_data(tmp_path_factory) -> Path:
    """A char-level dataset of 300 kB of this Python's standard library, for the tests that run on
    a GPU machine: it is lent a copy of the repository alone (../shared, with tiny-Shakespeare,
    stays behind, so char_data would skip there)."""
    from gpt.prepare import prepare

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    text = "".join(f.read_text(encoding="utf-8", errors="replace") for f in files[:40])[:300_000]
    assert len(text) == 300_000
    out = tmp_path_factory.mktemp("data") / "code_char"
    prepare(out, [text], tokenizer="char", val_fraction=0.1, val_rule="tail", progress=False)
    return out


def _slurm_cluster(**shape):
    """A started SlurmCluster of this shape (SlurmCluster.start's arguments), or a skip saying
    what is missing here."""
    from slurm.cluster import (ClusterError, SlurmCluster, missing_binaries, missing_network_tools,
                               network_namespaces_refused)

    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM is not installed (missing {', '.join(missing)}); .ci/run installs it: "
                    "apt-get install --no-install-recommends slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root (slurmd launches jobs as their user)")
    missing = missing_network_tools() if shape.get("nodes", 1) > 1 else []
    if missing:
        pytest.skip(f"a cluster of several nodes needs {', '.join(missing)} (.ci/run installs iproute2)")
    refused = network_namespaces_refused() if shape.get("nodes", 1) > 1 else None
    if refused:
        pytest.skip(f"a cluster of several nodes needs network namespaces, which this machine refuses "
                    f"({refused}): a container needs CAP_SYS_ADMIN and CAP_NET_ADMIN")
    try:
        return SlurmCluster.start(**shape)
    except ClusterError as e:
        pytest.fail(f"could not start the SLURM test cluster: {e}")


@pytest.fixture(scope="module")
def cluster():
    """A real SLURM cluster on localhost (tests/slurm/cluster.py), one per test module using it.
    Those modules put tests/ first on sys.path, so that `slurm` is tests/slurm, not the
    repository's slurm/ folder of batch scripts."""
    c = _slurm_cluster()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def two_node_cluster():
    """A real SLURM cluster of two nodes on this machine, each in a network namespace of its own
    (tests/slurm/cluster.py): node1 with 2 pretend GPUs, node2 with 1, 2 CPUs each."""
    c = _slurm_cluster(nodes=2, gpus=(2, 1))
    yield c
    c.stop()


def tiny_config(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    """A 2-layer, 64-wide model on CPU in fp32: a few milliseconds per step."""
    base = TrainConfig(
        out_dir=str(out_dir), data_dir=str(data_dir), prepare_source="none", device="cpu",
        dtype="float32", n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=8,
        max_steps=30, learning_rate=3e-3, min_lr=3e-4, warmup_steps=5, eval_interval=10,
        eval_iters=4, log_interval=5, keep_last=5, peak_tflops=1.0,
    )
    return replace(base, **overrides).validate()


@pytest.fixture(scope="module")
def trained(char_data, tmp_path_factory) -> Path:
    """A finished 10-step tiny run (checkpoints at steps 5 and 10) to resume, fine-tune, sample
    and read with the tools; one per test module."""
    from gpt.trainer import train

    run = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(char_data, run, max_steps=10, eval_interval=5))
    return run


def tiny_args(data_dir: Path, out_dir: Path, **overrides) -> list[str]:
    """The same tiny run as `train.py` command-line arguments: every key that differs from what
    `train.py` alone would use (configs/default.toml over the dataclass defaults)."""
    from gpt.cli import parse_args

    config = tiny_config(data_dir, out_dir, **overrides)
    defaults = parse_args([], default_config=str(REPO / "configs" / "default.toml"))
    return [f"--{k}={v}" for k, v in config.to_dict().items() if v != getattr(defaults, k)]


def rewound_copy(run: Path, copy: Path, step: int) -> Path:
    """A copy of the run folder `run` as it was when its step-`step` checkpoint was the latest:
    the later checkpoints removed, `latest` naming that one. Resuming it redoes the steps after."""
    from gpt.checkpoint import step_dir_name

    shutil.copytree(run, copy)
    for folder in (copy / "checkpoints").glob("step_*"):
        if int(folder.name.removeprefix("step_")) > step:
            shutil.rmtree(folder)
    (copy / "latest").write_text(step_dir_name(step) + "\n")
    return copy


TIMING_KEYS = {"tokens_per_s", "tokens_per_s_per_device", "mfu", "step_ms", "elapsed_s", "eta_s"}


def learning_records(run: Path) -> list[dict]:
    """metrics.jsonl without its timing fields, which differ from run to run."""
    from gpt.metrics import read_metrics

    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run)]


def latest_weights(run: Path) -> dict:
    """The model weights of the run's latest checkpoint (state dict of CPU tensors, either format)."""
    from gpt import checkpoint as ckpt

    return ckpt.read_model_state(ckpt.latest_checkpoint(run))


def child_pids(pid: int) -> list[int]:
    """The processes `pid` started (from any of its threads), read from /proc; [] once it is gone."""
    try:
        return [int(c) for task in os.listdir(f"/proc/{pid}/task")
                for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
    except OSError:
        return []


def staged_dtensor(tmp_path: Path, device_type: str):
    """A sharded weight (a DTensor on a one-process mesh of `device_type`) staged for a save as
    FSDP's are (gpt.staging.Staging.snapshot): (the original, the staged copy). Runs its own
    one-process group (nccl for cuda, gloo for cpu) and ends it."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from gpt.staging import Staging

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh(device_type, (1,))
        weight = distribute_tensor(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), mesh, [Shard(0)])
        staging = Staging()
        staged = staging.snapshot({"w": weight}, live={weight.to_local().untyped_storage().data_ptr()})["w"]
        staging.ready()
        return weight, staged, staging
    finally:
        dist.destroy_process_group()
