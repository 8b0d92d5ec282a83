"""Checkpoints never lose work: kill -9 at random moments (mid-save too), full disks, resume exactly;
the full and sharded formats, async saves and consolidation, in one process.
(tests/test_checkpoint_distributed.py does the same under torchrun.)"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from gpt import checkpoint as ckpt
from gpt.checkpoint import files as ckpt_files
from gpt.model import GPT, GPTConfig
from gpt.trainer import train

from conftest import REPO, latest_weights, learning_records, staged_dtensor, tiny_args, tiny_config

def assert_latest_is_complete(run: Path) -> None:
    """`latest` either does not exist yet or names a checkpoint whose every file checks out."""
    found = ckpt.latest_checkpoint(run)  # raises if `latest` names a missing/incomplete folder
    if found is not None:
        ckpt.verify_checkpoint(found)


def start(args: list[str], log: Path | None = None) -> subprocess.Popen:
    """train.py with `args`, its output appended to `log` (thrown away without one)."""
    out = open(log, "a") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    finally:
        if log:
            out.close()


def records_differ(run: Path, reference: Path, logs: list[Path]) -> str:
    """Why the run's learning records differ from the reference's, for a failing assert: the
    steps that differ, whether the final weights do too, and where each attempt resumed."""
    mine, theirs = learning_records(run), learning_records(reference)
    steps = [b["step"] for a, b in zip(mine, theirs) if a != b]
    a, b = latest_weights(run), latest_weights(reference)
    resumed = [re.findall(r"resumed from .* at step (\d+)", log.read_text()) if log.exists() else "no log" for log in logs]
    return (f"{len(mine)} vs {len(theirs)} records; steps that differ: {steps[:20]}; final weights "
            f"{'equal' if all(torch.equal(a[k], b[k]) for k in a) else 'differ'}; each attempt: {resumed}")


def latest_step(run: Path) -> int:
    """The step of the run's latest checkpoint (0 for none), read while the run saves and prunes."""
    for _ in range(100):
        try:
            found = ckpt.latest_checkpoint(run)
            return ckpt.read_state(found)["step"] if found else 0
        # `latest` named a checkpoint pruned (keep_last) before it was read, on a loaded machine
        # two saves later: look again.
        except (OSError, ValueError, ckpt.CheckpointError):
            time.sleep(0.01)
    raise AssertionError(f"cannot read the latest checkpoint of {run}")


def wait_for_progress(proc: subprocess.Popen, run: Path, beyond: int, timeout: float = 120) -> None:
    """Wait until the run has saved a checkpoint newer than step `beyond`, so each attempt
    moves the run forward before it is killed."""
    deadline = time.monotonic() + timeout
    while latest_step(run) <= beyond:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint after step {beyond} (exit code {proc.poll()})")
        time.sleep(0.01)


def wait_for_save_in_progress(proc: subprocess.Popen, run: Path, timeout: float = 60) -> bool:
    """Poll until a checkpoint is being assembled (its temporary folder exists)."""
    deadline = time.monotonic() + timeout
    root = run / ckpt.CHECKPOINTS_DIR
    while time.monotonic() < deadline and proc.poll() is None:
        if root.exists() and any(p.name.startswith(".tmp_step") for p in root.iterdir()):
            return True
        time.sleep(0.0005)
    return False


def test_kill_9_at_random_moments_then_resume_matches_uninterrupted(char_data, tmp_path):
    # Dropout makes the RNG state part of what must survive; a save every 3 steps makes kills
    # land in the middle of saves often.
    args = dict(max_steps=60, eval_interval=3, eval_iters=1, log_interval=1, dropout=0.1,
                keep_last=2)
    full = tmp_path / "full"
    subprocess.run([sys.executable, "train.py", *tiny_args(char_data, full, **args)], cwd=REPO,
                   check=True, capture_output=True, timeout=300)

    run = tmp_path / "killed"
    rng = random.Random(0)
    mid_save_kills = 0
    logs = [tmp_path / f"attempt_{attempt}.log" for attempt in range(5)]
    for attempt in range(4):
        proc = start(tiny_args(char_data, run, **args), logs[attempt])
        wait_for_progress(proc, run, beyond=latest_step(run))
        if attempt % 2 == 0:
            mid_save_kills += wait_for_save_in_progress(proc, run)
        else:
            time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()
        assert_latest_is_complete(run)
    assert mid_save_kills >= 2, "the test meant to kill during saves but never caught one"

    done = subprocess.run([sys.executable, "train.py", *tiny_args(char_data, run, **args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout
    logs[4].write_text(done.stdout)
    # Failed once in a full suite run (Intel VM, 2026-12-01): step 37's loss 3.044814 vs 3.044802,
    # not seen again in 30 runs of this test and resumes from every checkpoint of such a run.
    assert learning_records(run) == learning_records(full), records_differ(run, full, logs)
    a, b = latest_weights(full), latest_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    leftovers = [p.name for p in (run / ckpt.CHECKPOINTS_DIR).iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_full_disk_during_save_keeps_previous_checkpoint(char_data, tmp_path):
    """A save that cannot be written fails with a clear error; the last checkpoint survives."""
    run = tmp_path / "run"
    first = subprocess.run([sys.executable, "train.py", *tiny_args(char_data, run, max_steps=10)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = ckpt.latest_checkpoint(run)
    size = (before / ckpt.MODEL_FILE).stat().st_size

    def small_file_limit():
        # Files larger than half a model cannot be written, as on a disk that fills up mid-save.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    second = subprocess.run([sys.executable, "train.py", *tiny_args(char_data, run, max_steps=20)],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            preexec_fn=small_file_limit)
    assert second.returncode != 0
    assert "error:" in second.stderr and "checkpoint" in second.stderr.lower()
    assert "Traceback" not in second.stderr
    assert ckpt.latest_checkpoint(run) == before
    ckpt.verify_checkpoint(before)
    assert not [p for p in (run / ckpt.CHECKPOINTS_DIR).iterdir() if p.name.startswith(".tmp")]

    # With room again, the run resumes from the surviving checkpoint and finishes.
    third = subprocess.run([sys.executable, "train.py", *tiny_args(char_data, run, max_steps=20)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert f"resumed from {before}" in third.stdout


# ----------------------------------------------------------------------------------------
# Formats (full / sharded), async saves, consolidate: one process


def run_state(ckpt_dir: Path) -> tuple[dict, dict]:
    """(weights, optimizer.state_dict()) of a checkpoint of either format, as CPU tensors."""
    return ckpt.read_model_state(ckpt_dir), ckpt.read_optimizer_state(ckpt_dir)


def assert_states_equal(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    (wa, oa), (wb, ob) = a, b
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for index, fields in oa["state"].items():
        assert fields.keys() == ob["state"][index].keys()
        assert all(torch.equal(v, ob["state"][index][k]) for k, v in fields.items())


FORMAT_RUN = dict(max_steps=8, eval_interval=4, log_interval=1, dropout=0.1)


@pytest.fixture(scope="module")
def full_sync_run(char_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("formats") / "full_sync"
    train(tiny_config(char_data, run, **FORMAT_RUN))
    return run


@pytest.mark.parametrize("fmt, async_save", [("sharded", False), ("full", True), ("sharded", True)])
def test_sharded_and_async_checkpoints_hold_the_same_state_and_resume_exactly(
        char_data, full_sync_run, tmp_path, fmt, async_save):
    run = tmp_path / "run"
    train(tiny_config(char_data, run, **FORMAT_RUN, checkpoint_format=fmt, async_checkpoint=async_save))
    assert learning_records(run) == learning_records(full_sync_run)
    for step in (4, 8):
        name = ckpt.step_dir_name(step)
        saved, reference = run / "checkpoints" / name, full_sync_run / "checkpoints" / name
        assert ckpt.checkpoint_format(saved) == fmt
        ckpt.verify_checkpoint(saved)
        assert_states_equal(run_state(saved), run_state(reference))
        if fmt == "full":  # written from a snapshot in a thread: the very same bytes
            for file in (ckpt.MODEL_FILE, ckpt.OPTIMIZER_FILE):
                assert (saved / file).read_bytes() == (reference / file).read_bytes()
    state = ckpt.read_state(run / "checkpoints" / ckpt.step_dir_name(8))
    assert state["format"] == fmt and state["world_size"] == 1 and list(state["rng"]) == ["0"]

    # Resume from step 4: the continuation equals the uninterrupted full/sync run.
    shutil.rmtree(run / "checkpoints" / ckpt.step_dir_name(8))
    (run / "latest").write_text(ckpt.step_dir_name(4) + "\n")
    train(tiny_config(char_data, run, **FORMAT_RUN, checkpoint_format=fmt, async_checkpoint=async_save))
    assert learning_records(run) == learning_records(full_sync_run)
    assert_states_equal(run_state(ckpt.latest_checkpoint(run)), run_state(ckpt.latest_checkpoint(full_sync_run)))
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_consolidate_a_sharded_checkpoint_and_sample_from_either(char_data, tmp_path, capsys):
    from gpt.sampling import run_sample

    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=10, checkpoint_format="sharded"))
    sharded = ckpt.latest_checkpoint(run)

    done = subprocess.run([sys.executable, "-m", "gpt.checkpoint", "consolidate", str(run)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = run / "consolidated" / sharded.name  # the default: outside checkpoints/, never pruned
    assert f"wrote {out}" in done.stdout
    assert ckpt.checkpoint_format(out) == "full" and not (out / ckpt.OPTIMIZER_FILE).exists()
    assert sorted(ckpt.verify_checkpoint(out)) == [ckpt.MODEL_FILE, ckpt.STATE_FILE, ckpt.TOKENIZER_FILE]
    consolidated = ckpt.read_model_state(out)
    original = ckpt.read_model_state(sharded)
    assert consolidated.keys() == original.keys()
    assert all(torch.equal(consolidated[k], original[k]) for k in original)
    assert ckpt.read_state(out)["step"] == 10

    capsys.readouterr()
    assert ckpt.main(["consolidate", str(run)]) == 2
    assert "already exists" in capsys.readouterr().err
    # Never inside a checkpoint or checkpoints/: keep_last would delete it with them.
    for inside in (sharded / "copy", run / ckpt.CHECKPOINTS_DIR / "copy"):
        assert ckpt.main(["consolidate", str(run), "--out", str(inside)]) == 2
        assert f"--out {inside} is inside the checkpoint" in capsys.readouterr().err
        assert not inside.exists()

    # With the optimizer: a full checkpoint that resumes like the sharded one.
    with_opt = tmp_path / "with_optimizer"
    assert ckpt.main(["consolidate", str(sharded), "--out", str(with_opt), "--optimizer"]) == 0
    assert_states_equal(run_state(with_opt), run_state(sharded))

    # sample.py's code reads either format and prints the same text.
    texts = []
    for source in (["--out_dir", str(run)], ["--ckpt", str(out)]):
        capsys.readouterr()
        assert run_sample([*source, "--prompt", "ROMEO:", "--max_new_tokens", "40", "--device", "cpu",
                           "--seed", "1"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("ROMEO:") and len(texts[0]) > 40


def test_unsafe_or_corrupt_sharded_checkpoints_are_refused(char_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=5, eval_interval=5, checkpoint_format="sharded"))
    saved = ckpt.latest_checkpoint(run)
    metadata = saved / ckpt.DCP_DIR / ckpt.DCP_METADATA
    shard = saved / ckpt.DCP_DIR / "__0_0.distcp"

    def rewrite_manifest() -> None:
        manifest = json.loads((saved / ckpt.MANIFEST_FILE).read_text())
        for name in manifest:
            manifest[name] = {"bytes": (saved / name).stat().st_size, "crc32": ckpt_files.crc32(saved / name)}
        (saved / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))

    # A truncated shard is caught by the manifest before anything is read.
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        train(tiny_config(char_data, run, max_steps=10, checkpoint_format="sharded"))
    shard.write_bytes(data)
    # A bit flipped in .metadata: the manifest's checksum says so before it is unpickled (a
    # review's flip at byte 10 made the unpickler ask for a huge buffer: MemoryError, called
    # "out of memory" by the resume).
    original = metadata.read_bytes()
    flipped = bytearray(original)
    flipped[10] ^= 0x40
    metadata.write_bytes(bytes(flipped))
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata: checksum does not match the manifest"):
        ckpt.verify_checkpoint(saved)
    (saved / ckpt.DCP_DIR / "._.metadata").write_text("x")  # beside it, a stray file was blamed instead
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata: checksum does not match the manifest"):
        ckpt.verify_checkpoint(saved)
    (saved / ckpt.DCP_DIR / "._.metadata").unlink()
    metadata.write_bytes(original)

    # DCP itself would pickle.load this metadata file and run the code in it.
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    original = metadata.read_bytes()
    metadata.write_bytes(pickle.dumps(Evil()))
    rewrite_manifest()
    with pytest.raises(ckpt.CheckpointError, match="refused to load"):
        train(tiny_config(char_data, run, max_steps=10, checkpoint_format="sharded"))
    with pytest.raises(ckpt.CheckpointError, match="refused to load"):
        ckpt.read_model_state(saved)
    assert not (tmp_path / "pwned").exists()

    metadata.write_bytes(original)
    rewrite_manifest()
    # A shard the manifest does not list cannot be checked, so it is not read.
    listed = json.loads((saved / ckpt.MANIFEST_FILE).read_text())
    (saved / ckpt.MANIFEST_FILE).write_text(json.dumps({k: v for k, v in listed.items() if k != "dcp/__0_0.distcp"}))
    with pytest.raises(ckpt.CheckpointError, match="manifest.json: lists no size and checksum for dcp/__0_0.distcp"):
        ckpt.verify_checkpoint(saved)
    (saved / ckpt.MANIFEST_FILE).write_text(json.dumps(listed))
    # A file that no reader reads, left in dcp/ by a file system or a copy (NFS's .nfs*, macOS's
    # ._*): not a damaged checkpoint. It was refused as "edited", to be restored from a copy.
    (saved / ckpt.DCP_DIR / ".nfs0001").write_text("x")
    (saved / ckpt.DCP_DIR / "._.metadata").write_text("x")
    ckpt.verify_checkpoint(saved)
    result = train(tiny_config(char_data, run, max_steps=10, eval_interval=5, checkpoint_format="sharded"))
    assert result.step == 10


def test_each_rank_draws_its_own_masks_after_a_resume_on_another_world_size():
    # Restoring rank 0's state on every rank gave all ranks the same dropout masks.
    torch.manual_seed(5)
    first = ckpt.capture_rng_state()
    torch.rand(3)
    state = {"rng": {"0": first, "1": ckpt.capture_rng_state()}, "world_size": 2}
    draws = {}
    for world, rank in [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]:
        ckpt.restore_rank_rng(state, rank, world)
        draws[world, rank] = torch.rand(4)
    assert not torch.equal(draws[2, 0], draws[2, 1])  # the same world size: each its own state
    assert torch.equal(draws[3, 0], draws[2, 0])  # rank 0 goes on with rank 0's stream
    assert not torch.equal(draws[3, 1], draws[3, 0]) and not torch.equal(draws[3, 1], draws[3, 2])
    ckpt.restore_rank_rng(state, 1, 3)
    assert torch.equal(torch.rand(4), draws[3, 1])  # deterministic


def test_rng_states_per_rank_and_across_world_sizes():
    state = {"rng": {"0": "rank0", "1": "rank1"}, "world_size": 2}
    assert [ckpt.rng_state_for(state, r, 2) for r in (0, 1)] == ["rank0", "rank1"]  # same world size
    assert [ckpt.rng_state_for(state, r, 4) for r in range(4)] == ["rank0"] * 4  # another: rank 0's
    assert ckpt.rng_state_for(state, 0, 1) == "rank0"
    old = {"rng": {"0": "rank0"}}  # written before every rank's state was saved, by 2 ranks
    assert ckpt.rng_state_for(old, 1, 2) == "rank0"
    assert ckpt.gather_rng_states().keys() == {"0"}  # one process, no process group
    assert ckpt.resolve_format("auto", "fsdp") == "sharded"
    assert ckpt.resolve_format("auto", "ddp") == ckpt.resolve_format("auto", "none") == "full"
    assert ckpt.resolve_format("sharded", "none") == "sharded"


@pytest.mark.parametrize("fmt", ["full", "sharded"])
def test_saves_skip_the_zip_crc_and_files_still_check_and_load(fmt, tmp_path):
    """torch.save's per-record zip CRC is skipped (optimizer.pt; DCP's tensors), since the
    manifest's CRC-32 covers each file; the process-wide switch is restored, the state loads
    back equal, and a flipped byte is still caught."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    optimizer.step()
    assert torch.serialization.get_crc32_options()
    saver = ckpt.Checkpointer(tmp_path / "run", format=fmt)
    folder = saver.save(1, model, optimizer, {"step": 1, "model_config": dataclasses.asdict(model.config)})
    saver.close()
    assert torch.serialization.get_crc32_options()  # switched back on for everyone else

    biggest = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if fmt == "full":
        assert biggest.name == ckpt.OPTIMIZER_FILE
        with zipfile.ZipFile(biggest) as z:
            tensor_records = [i for i in z.infolist() if "/data/" in i.filename]
            assert tensor_records and all(i.CRC == 0 for i in tensor_records)
    ckpt.verify_checkpoint(folder)
    loaded = ckpt.read_optimizer_state(folder)
    for index, entry in optimizer.state_dict()["state"].items():
        assert torch.equal(loaded["state"][index]["exp_avg_sq"], entry["exp_avg_sq"])

    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=biggest.name):
        ckpt.verify_checkpoint(folder)


def test_checkpoints_from_before_vocab_padding_resume_when_the_tables_match():
    """Checkpoints written before vocab_multiple existed have no such key (no padding): one
    whose vocabulary is already a multiple of 64 resumes under the default; one that is not is
    refused with the setting to use."""
    config = dataclasses.asdict(GPTConfig(vocab_size=4096, block_size=8, n_layer=1, n_head=2, n_embd=16))
    old = {k: v for k, v in config.items() if k != "vocab_multiple"}
    ckpt.check_model_config(Path("old"), old, {**config, "vocab_multiple": 64})  # 4096 rows either way
    old_char, char = {**old, "vocab_size": 65}, {**config, "vocab_size": 65, "vocab_multiple": 64}
    with pytest.raises(ckpt.CheckpointError, match="65 rows .* config 128; set --vocab_multiple=1"):
        ckpt.check_model_config(Path("old"), old_char, char)


def test_file_crc32_in_parallel_ranges_equals_zlib(tmp_path, monkeypatch):
    import zlib

    from gpt import crc

    rng = random.Random(0)
    for _ in range(200):  # the combination rule on its own, empty parts included
        a, b = rng.randbytes(rng.randrange(0, 200)), rng.randbytes(rng.randrange(0, 200))
        assert crc.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    # Ranges of at least 1 kB instead of 64 MB, so that small files split the way big ones do.
    monkeypatch.setattr(crc, "MIN_RANGE", 1024)
    for size in (0, 1, 1023, 4096, 100_003):
        path = tmp_path / f"f{size}"
        data = rng.randbytes(size)
        path.write_bytes(data)
        for threads in (1, 2, 3, 7):
            assert crc.file_crc32(path, threads) == zlib.crc32(data), (size, threads)


def test_a_save_flushes_files_to_disk_while_they_are_still_being_written(tmp_path, monkeypatch):
    """The writeback thread fsyncs a file before its writer is done with it (so a synchronous
    save writes to disk during serialization), and a write error it meets is raised, not lost."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = tmp_path / "optimizer.pt"
    with ckpt_files.writeback(tmp_path, every_s=0.01):
        with open(path, "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            deadline = time.monotonic() + 10
            while str(path) not in synced and time.monotonic() < deadline:
                time.sleep(0.01)
            assert str(path) in synced  # while the file is still open for writing

    met = threading.Event()

    def failing_fsync(fd):
        met.set()
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="injected"):
        with ckpt_files.writeback(tmp_path, every_s=0.01):
            assert met.wait(10)  # not a fixed sleep: on a loaded machine the thread may start late


# ----------------------------------------------------------------------------------------
# Damaged or mistaken input: a CheckpointError naming the file and what is wrong


def copy_of_run(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of `run` to damage, and its latest checkpoint."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy, ckpt.latest_checkpoint(copy)


def reseal(folder: Path) -> None:
    """Rewrite a checkpoint's manifest for its files as they are now, as if saved so."""
    manifest = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "crc32": ckpt_files.crc32(p)}
                for p in ckpt_files.files_under(folder) if p.name != ckpt.MANIFEST_FILE}
    (folder / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))


def _without(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def sample_args(*source: str) -> list[str]:
    return [*source, "--prompt", "A", "--max_new_tokens", "2", "--device", "cpu"]


def test_a_latest_file_that_names_nothing_readable_says_what_to_do(char_data, full_sync_run, tmp_path, capsys):
    from gpt.sampling import run_sample

    run, _ = copy_of_run(full_sync_run, tmp_path)
    latest = run / ckpt.LATEST_FILE
    how_to_fix = re.escape(f". Point {latest} at a complete folder in {run / 'checkpoints'}, or start over "
                           f"in another --out_dir")
    latest.write_bytes(b"\x00\xffgarbage")
    not_text = re.escape(f"{latest} should be a text file holding the name of the newest checkpoint (such as "
                         f"'step_0000250'), but it is not text (byte 0xff at offset 1 is not UTF-8)") + how_to_fix
    with pytest.raises(ckpt.CheckpointError, match=not_text):
        train(tiny_config(char_data, run, **FORMAT_RUN))  # resume
    capsys.readouterr()
    assert run_sample(sample_args("--out_dir", str(run))) == 2
    assert re.fullmatch(f"error: {not_text}\n", capsys.readouterr().err)

    latest.unlink()
    latest.mkdir()
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{latest} should be a text file") + ".*"
                       + re.escape("but it is a folder") + how_to_fix):
        ckpt.latest_checkpoint(run)


@pytest.mark.parametrize("manifest, problem", [
    ([1, 2], "expected an object mapping file names to their size and checksum, got an array"),
    ({"model.safetensors": None}, 'the entry for model.safetensors should be an object with "bytes" and "crc32", got null'),
    ({"model.safetensors": {"bytes": "5", "crc32": "0"}}, 'the entry for model.safetensors has no size ("bytes": a whole number)'),
    ({"model.safetensors": {"bytes": 5}}, 'the entry for model.safetensors has no checksum ("crc32")'),
    ({"../../elsewhere": {"bytes": 5, "crc32": "0"}}, "'../../elsewhere' is not the name of a file in the checkpoint folder"),
    ({}, "lists no size and checksum for state.json, so that file cannot be checked"),
])
def test_a_manifest_of_the_wrong_shape_is_refused(full_sync_run, tmp_path, manifest, problem):
    _, saved = copy_of_run(full_sync_run, tmp_path)
    (saved / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match=re.escape(
            f"{saved / ckpt.MANIFEST_FILE}: {problem}; it was edited or not written by this project. "
            f"Restore the checkpoint from a copy, or use another one")):
        ckpt.verify_checkpoint(saved)


def test_a_checkpoint_of_a_newer_format_is_refused_by_every_reader(char_data, full_sync_run, tmp_path, capsys):
    """state.json carries the format it was written in: a checkpoint from a newer version of the code
    (format_version above STATE_VERSION) is refused by name, not read as if it were the old layout.
    Checkpoints from before the key (no format_version) are version 1."""
    from gpt.sampling import run_sample

    run, saved = copy_of_run(full_sync_run, tmp_path)
    state = json.loads((saved / ckpt.STATE_FILE).read_text())
    assert state["format_version"] == ckpt.STATE_VERSION == 1
    del state["format_version"]  # as written before the key existed
    (saved / ckpt.STATE_FILE).write_text(json.dumps(state))
    reseal(saved)
    assert ckpt.read_state(saved)["step"] == state["step"]

    # A newer format may rename what this code reads (a key, the weights file): the version is
    # what it is told, not "damaged, restore it from a copy".
    state["config_of_the_model"] = state.pop("model_config")
    (saved / ckpt.MODEL_FILE).rename(saved / "weights.safetensors")
    (saved / ckpt.STATE_FILE).write_text(json.dumps({**state, "format_version": ckpt.STATE_VERSION + 1}))
    reseal(saved)
    newer = re.escape(f"{saved / ckpt.STATE_FILE}: the checkpoint is in format version 2, written by a newer "
                      f"version of this code, which reads versions up to 1: update this code (git pull) to read it")
    with pytest.raises(ckpt.CheckpointError, match=newer):
        train(tiny_config(char_data, run, **FORMAT_RUN))  # resume
    with pytest.raises(ckpt.CheckpointError, match=newer):
        train(tiny_config(char_data, tmp_path / "new", init_from=str(run), **FORMAT_RUN))
    with pytest.raises(ckpt.CheckpointError, match=newer):
        ckpt.read_state(saved)
    capsys.readouterr()
    assert run_sample(sample_args("--out_dir", str(run))) == 2
    assert re.fullmatch(f"error: {newer}\n", capsys.readouterr().err)
    from gpt.prepare import PrepareError, reused_tokenizer
    with pytest.raises((PrepareError, ckpt.CheckpointError), match=newer):
        reused_tokenizer(run)  # data prep's --tokenizer-from
    # The listing reads no weights, so it says so of the checkpoint rather than refusing it.
    from gpt.checkpoint.listing import format_listing, list_checkpoints
    rows = {Path(row["path"]): row for row in list_checkpoints(run)}
    assert rows[saved]["newer_format_version"] == 2
    assert [row["newer_format_version"] for path, row in rows.items() if path != saved] == [None] * (len(rows) - 1)
    assert "format version 2, newer than this code reads: git pull" in format_listing(run, [rows[saved]])

    # A version changed by damage, not by newer code (the manifest's checksum disagrees): corrupt,
    # also where the resume reads state.json before it checks the files. Data prep, which reads
    # the tokenizer.json alone, does not mind a damaged state.json.
    text = (saved / ckpt.STATE_FILE).read_text()
    (saved / ckpt.STATE_FILE).write_text(text.replace('"format_version": 2', '"format_version": 3'))
    corrupt = "state.json: checksum does not match the manifest"
    with pytest.raises(ckpt.CheckpointError, match=corrupt):
        ckpt.verify_checkpoint(saved)
    with pytest.raises(ckpt.CheckpointError, match=corrupt):
        train(tiny_config(char_data, run, **FORMAT_RUN))  # resume
    assert reused_tokenizer(run).vocab_size > 0
    assert all(row["newer_format_version"] is None for row in list_checkpoints(run))
    # Nor is the version read from what is not a plain file: a FIFO hung the reader.
    (saved / ckpt.STATE_FILE).unlink()
    os.mkfifo(saved / ckpt.STATE_FILE)
    checked = subprocess.run([sys.executable, "-c", "import sys; from gpt import checkpoint as c; "
                              "c.verify_checkpoint(sys.argv[1])", str(saved)],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 1 and "CheckpointError" in checked.stderr, checked.stderr  # not a hang
    assert "missing from the checkpoint" in checked.stderr, checked.stderr  # (the renamed weights, first)


@contextlib.contextmanager
def unreadable_to_this_user(folder: Path):
    """`folder` chmod 000 while the code inside runs. Root, whom no permission stops (the tests'
    user in CI), runs it as nobody: the folders above must then be open to all."""
    folder.chmod(0)
    try:
        if os.geteuid() != 0:
            yield
            return
        os.setegid(65534)
        os.seteuid(65534)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)
    finally:
        folder.chmod(0o755)


def test_the_listing_shows_a_checkpoint_this_user_may_not_read_and_lists_the_others():
    # One step folder another user made private (or chmod 000) stopped `gpt.checkpoint list` with
    # the PermissionError: no row of the run's readable checkpoints was shown.
    from gpt.checkpoint.listing import format_listing, list_checkpoints

    with tempfile.TemporaryDirectory() as top:
        run = Path(top) / "run"
        for step, loss in ((10, 4.0), (20, 3.5), (30, 3.0)):
            folder = run / ckpt.CHECKPOINTS_DIR / ckpt.step_dir_name(step)
            folder.mkdir(parents=True)
            (folder / ckpt.STATE_FILE).write_text(json.dumps({"step": step, "val_loss": loss, "val_loss_step": step}))
            (folder / ckpt.MANIFEST_FILE).write_text("{}")
        for path in (Path(top), run, run / ckpt.CHECKPOINTS_DIR):
            path.chmod(0o755)
        private = run / ckpt.CHECKPOINTS_DIR / ckpt.step_dir_name(20)
        (run / ckpt.LATEST_FILE).write_text(private.name)
        with unreadable_to_this_user(private):
            with pytest.raises(PermissionError):  # a resume or a save: this user cannot use the run
                ckpt.complete_checkpoints(run)
            rows = list_checkpoints(run)
            listing = format_listing(run, rows)
        assert [(row["step"], row["val_loss"], row["unreadable"], row["latest"]) for row in rows] == [
            (10, 4.0, False, False), (20, None, True, True), (30, 3.0, False, False)]
        assert f"(latest, this user may not read it: ls -ld {private})" in listing, listing
        assert rows[2]["best"] and "the best is not the latest" in listing, listing


def test_the_manifest_must_list_every_file_that_is_read(full_sync_run, tmp_path, capsys):
    from gpt.sampling import run_sample

    _, saved = copy_of_run(full_sync_run, tmp_path)
    listed = json.loads((saved / ckpt.MANIFEST_FILE).read_text())
    for name in (ckpt.MODEL_FILE, ckpt.OPTIMIZER_FILE, ckpt.STATE_FILE, ckpt.TOKENIZER_FILE):
        (saved / ckpt.MANIFEST_FILE).write_text(json.dumps(_without(listed, name)))
        with pytest.raises(ckpt.CheckpointError, match=f"manifest.json: lists no size and checksum for {name},"):
            ckpt.verify_checkpoint(saved)

    # Truncated weights the manifest does not list: refused before safetensors reads them.
    weights = saved / ckpt.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    (saved / ckpt.MANIFEST_FILE).write_text(json.dumps(_without(listed, ckpt.MODEL_FILE)))
    capsys.readouterr()
    assert run_sample(sample_args("--ckpt", str(saved))) == 2
    assert capsys.readouterr().err.startswith(f"error: {saved / ckpt.MANIFEST_FILE}: lists no size and checksum "
                                              f"for {ckpt.MODEL_FILE}")
    weights.unlink()
    with pytest.raises(ckpt.CheckpointError, match=re.escape(
            f"{weights}: missing from the checkpoint (a full checkpoint needs it)")):
        ckpt.verify_checkpoint(saved)
    # Read without verifying (a tool reading the weights alone), damaged weights are named all the same.
    weights.write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{weights}: not a readable safetensors file")):
        ckpt.read_model_state(saved)


@pytest.mark.parametrize("change, problem", [
    (lambda s: [s], "expected an object, got an array"),
    (lambda s: {**s, "step": "x"}, "'step' should be a whole number >= 0, got \"x\""),
    (lambda s: _without(s, "model_config"), "the key 'model_config' is missing"),
    (lambda s: {**s, "model_config": {**s["model_config"], "n_layer": 0}},
     "'model_config' is not a model configuration (GPTConfig.n_layer must be a positive integer, got 0)"),
    (lambda s: {**s, "model_config": {**s["model_config"], "n_layers": 2}},
     "'model_config' is not a model configuration (GPTConfig.__init__() got an unexpected keyword argument 'n_layers')"),
    (lambda s: _without(s, "loader"), "the key 'loader' is missing"),  # needed to resume only
    (lambda s: {**s, "rng": {"0": [1]}}, "'rng' holds no usable RNG state"),
])
def test_a_state_json_of_the_wrong_shape_names_the_key(char_data, full_sync_run, tmp_path, change, problem):
    """state.json is covered by the manifest, so only an edited or foreign checkpoint can hold
    such a file: reseal the manifest to get past the checksums."""
    run, saved = copy_of_run(full_sync_run, tmp_path)
    state_file = saved / ckpt.STATE_FILE
    state_file.write_text(json.dumps(change(json.loads(state_file.read_text()))))
    reseal(saved)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{state_file}: {problem}")):
        train(tiny_config(char_data, run, **FORMAT_RUN))  # resume


def test_a_file_given_for_a_checkpoint_folder_is_named_for_what_it_is(full_sync_run, capsys):
    from gpt.sampling import run_sample

    saved = ckpt.latest_checkpoint(full_sync_run)
    expected = ("{} is a file, not a checkpoint folder: give a run folder (its latest checkpoint is used) "
                "or a checkpoint folder (checkpoints/step_N) (did you mean {}?)")
    for path, meant in ((saved / ckpt.MODEL_FILE, saved), (full_sync_run / ckpt.LATEST_FILE, full_sync_run)):
        with pytest.raises(ckpt.CheckpointError, match=re.escape(expected.format(path, meant))):
            ckpt.resolve_checkpoint(path)
    weights = str(saved / ckpt.MODEL_FILE)
    for command in (lambda: ckpt.main(["consolidate", weights]), lambda: run_sample(sample_args("--ckpt", weights)),
                    lambda: run_sample(sample_args("--out_dir", weights))):
        capsys.readouterr()
        assert command() == 2
        assert capsys.readouterr().err == f"error: {expected.format(weights, saved)}\n"


def test_checkpoint_files_get_the_permissions_of_ordinary_files(tmp_path):
    """Under umask 002 (a group sharing a cluster file system) every file is 0664, the weights
    too (safetensors creates its files 0600)."""
    script = """
import dataclasses, sys, torch
from gpt import checkpoint as ckpt
from gpt.model import GPT, GPTConfig
model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))
optimizer = torch.optim.AdamW(model.parameters())
state = {"step": 1, "model_config": dataclasses.asdict(model.config)}
for fmt in ("full", "sharded"):
    saver = ckpt.Checkpointer(f"{sys.argv[1]}/{fmt}", format=fmt)
    saver.save(1, model, optimizer, state)
    saver.close()
ckpt.consolidate(f"{sys.argv[1]}/sharded", f"{sys.argv[1]}/consolidated")
"""
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, check=True, timeout=120,
                   capture_output=True, preexec_fn=lambda: os.umask(0o002))
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in ckpt_files.files_under(tmp_path)}
    assert "full/checkpoints/step_0000001/model.safetensors" in modes and "consolidated/model.safetensors" in modes
    assert modes == dict.fromkeys(modes, "0o664")


def test_a_run_whose_latest_file_was_deleted_resumes_from_its_newest_checkpoint(char_data, tmp_path, capsys):
    """Without `latest` (deleted by hand, or a kill between the first save's rename and `latest`)
    the run used to start over at step 0 in the same folder: it logged every step twice and kept
    the earlier run's step_N folders as if they were its own (then pruned them)."""
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=20, eval_interval=10))
    saved = (run / "checkpoints" / "step_0000020" / "model.safetensors").read_bytes()
    (run / "latest").unlink()
    result = train(tiny_config(char_data, run, max_steps=30, eval_interval=10))
    out = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoints' / 'step_0000020'} at step 20" in out
    assert f"note: {run / 'latest'} is missing; resuming from the newest complete checkpoint" in out
    assert result.step == 30 and (run / "latest").read_text() == "step_0000030\n"
    assert [r["step"] for r in learning_records(run)] == [5, 10, 15, 20, 25, 30]
    assert (run / "checkpoints" / "step_0000020" / "model.safetensors").read_bytes() == saved


def test_a_complete_checkpoint_that_latest_does_not_name_is_replaced_not_adopted(char_data, tmp_path):
    """A step_N left by another run (or a kill between rename and `latest`) is not this run's
    state: saving step N writes the run's own (it used to point `latest` at the old folder)."""
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=20, eval_interval=10))
    other = ckpt.read_state(run / "checkpoints" / "step_0000020")
    (run / "latest").write_text("step_0000010\n")  # resume at 10, now with another learning rate
    train(tiny_config(char_data, run, max_steps=20, eval_interval=10, learning_rate=1e-3))
    state = ckpt.read_state(ckpt.latest_checkpoint(run))
    assert state["train_config"]["learning_rate"] == 1e-3 != other["train_config"]["learning_rate"]
    ckpt.verify_checkpoint(ckpt.latest_checkpoint(run))


# ----------------------------------------------------------------------------------------
# Damaged checkpoints and odd inputs: every error names the file and says what to do


def tiny_saved_run(run: Path, fmt: str, steps: tuple[int, ...]) -> list[Path]:
    """A run folder with a checkpoint of a tiny model at each of `steps`, saved in `fmt`."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    optimizer.step()
    saver = ckpt.Checkpointer(run, format=fmt, keep_last=len(steps))
    folders = [saver.save(step, model, optimizer, {"step": step, "model_config": dataclasses.asdict(model.config)})
               for step in steps]
    saver.close()
    return folders


@pytest.mark.parametrize("damage, problem", [
    (lambda c: (c / ckpt.MODEL_FILE).write_bytes(b"x"), "model.safetensors: 1 bytes, the manifest says"),
    (lambda c: (c / ckpt.STATE_FILE).unlink(), "state.json: missing from the checkpoint"),
    (lambda c: (c / ckpt.MANIFEST_FILE).write_text('{"model.saf'), "manifest.json: unreadable manifest"),
    (lambda c: (c / ckpt.TOKENIZER_FILE).write_text('{"model": "bpe!"}'), "tokenizer.json: checksum does not match"),
])
def test_a_damaged_latest_checkpoint_names_the_previous_one_to_go_back_to(tmp_path, damage, problem):
    run = tmp_path / "run"
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"model": "char"}')
    earlier, latest = tiny_saved_run(run, "full", (4, 8))
    shutil.copyfile(tokenizer, latest / ckpt.TOKENIZER_FILE)  # (the tiny run has none)
    reseal(latest)
    damage(latest)
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.verify_checkpoint(latest)
    message = str(caught.value)
    assert problem in message
    assert message.endswith(f"go back to the previous one: write '{earlier.name}' into {run / ckpt.LATEST_FILE} "
                            f"and run again")
    # The oldest has none before it; a folder outside a run has no run to go back in.
    (earlier / ckpt.STATE_FILE).unlink()
    for folder in (earlier, shutil.copytree(earlier, tmp_path / "loose")):
        with pytest.raises(ckpt.CheckpointError, match=re.escape(
                f"{folder / ckpt.STATE_FILE}: missing from the checkpoint; restore the checkpoint from a "
                f"copy, or use another one")):
            ckpt.verify_checkpoint(folder)


@pytest.mark.parametrize("lost", [f"{ckpt.DCP_DIR}/{ckpt.DCP_METADATA}", ckpt.DCP_DIR])
def test_a_sharded_checkpoint_that_lost_its_metadata_is_still_named_sharded(tmp_path, lost):
    """Format detection used to look for dcp/.metadata alone, so a sharded checkpoint without
    it was taken for a full one and the error named a model.safetensors it never had."""
    (folder,) = tiny_saved_run(tmp_path / "run", "sharded", (3,))
    path = folder / lost
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert ckpt.checkpoint_format(folder) == "sharded"
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.verify_checkpoint(folder)
    assert str(caught.value).startswith(f"{folder / ckpt.DCP_DIR / ckpt.DCP_METADATA}: missing from the checkpoint")
    assert ckpt.MODEL_FILE not in str(caught.value)


def test_consolidate_into_a_folder_it_cannot_write_says_so_and_leaves_nothing(tmp_path, capsys):
    (folder,) = tiny_saved_run(tmp_path / "run", "sharded", (3,))
    before = {p: p.read_bytes() for p in ckpt_files.files_under(tmp_path / "run")}
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "copy"  # its parent is a file: mkdir fails as on a read-only or full disk
    capsys.readouterr()
    assert ckpt.main(["consolidate", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not write {out} (FileExistsError") or \
        err.startswith(f"error: could not write {out} (NotADirectoryError"), err
    assert f"{folder} is unchanged" in err and "choose another --out" in err
    assert {p: p.read_bytes() for p in ckpt_files.files_under(tmp_path / "run")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "run"]


def test_tensors_carved_from_one_staging_block_save_only_their_own_bytes():
    """The GPU staging block (page-locked, one allocation) is cut into tensors with storages of
    their own: views of the block made torch.save write the whole block into optimizer.pt."""
    import io

    shapes = [((100_000,), torch.float32), ((300, 500), torch.bfloat16), ((), torch.float32),
              ((0, 4), torch.float32), ((7,), torch.int64)]
    from gpt.staging import carve, packed_bytes

    block = torch.zeros(packed_bytes(shapes), dtype=torch.uint8)
    tensors = carve(block, shapes)
    assert [(tuple(t.shape), t.dtype) for t in tensors] == shapes
    for t in tensors:
        t.fill_(3)
        data = io.BytesIO()
        torch.save(t, data)
        assert len(data.getvalue()) < t.numel() * t.element_size() + 2000  # not the block's 700 kB
    assert int(block.sum()) > 0  # the writes landed in the block itself
    del block  # the tensors keep its memory alive
    assert all(torch.equal(t, torch.full_like(t, 3)) for t in tensors)


def test_a_staged_shard_stays_where_staging_copied_it(tmp_path):
    """FSDP's sharded save stages each DTensor's local shard in host memory. Rebuilt with
    DTensor.from_local, the staged shard was moved to the mesh's device type: on GPUs every shard
    went straight back to the GPU (a copy of the rank's whole state there at each save; with
    fsdp_cpu_offload all of it). The staged DTensor holds the staging copy itself (on a CPU mesh
    from_local wrapped it instead, which is how this test sees the old code; tests/test_device.py
    checks the device on a GPU) with the original's spec."""
    weight, staged, staging = staged_dtensor(tmp_path, "cpu")
    assert staged._local_tensor is staging.buffers[("w",)]
    assert staged.to_local().data_ptr() != weight.to_local().data_ptr()  # a copy, not the live shard
    assert torch.equal(staged.to_local(), weight.to_local())
    assert (staged.placements, staged.shape, staged.device_mesh) == (weight.placements, weight.shape,
                                                                     weight.device_mesh)


def test_the_page_locked_block_is_whole_pages_of_its_own(monkeypatch):
    """cudaHostRegister locks whole pages. A block straight from malloc shares its first and last
    pages with other memory, so a second block registered beside it (two Checkpointers, one left
    open after an error) failed with "already registered" and its saves copied slowly."""
    from types import SimpleNamespace

    from gpt.staging import PAGE, Staging

    registered = []
    fake = SimpleNamespace(cudaHostRegister=lambda ptr, size, flags: registered.append((ptr, size)) or 0,
                           cudaHostUnregister=lambda ptr: 0)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    stagings = [Staging() for _ in range(3)]
    for n, staging in enumerate(stagings):
        staging._pin_for({("a",): torch.zeros(1000 + n), ("b",): torch.zeros(7, dtype=torch.bfloat16)})
    pages = [set(range(ptr // PAGE, (ptr + size) // PAGE)) for ptr, size in registered]
    assert all(ptr % PAGE == 0 and size % PAGE == 0 for ptr, size in registered), registered
    assert not (pages[0] & pages[1]) and not (pages[1] & pages[2]) and not (pages[0] & pages[2])
    for staging, (ptr, size) in zip(stagings, registered):
        for buffer in staging.buffers.values():  # every copy lands inside the registered pages
            assert ptr <= buffer.data_ptr() and buffer.data_ptr() + buffer.nbytes <= ptr + size
        staging.release()


def test_a_new_staging_block_drops_every_view_of_the_old_one(monkeypatch):
    """When the state's layout changes, entries gone from it must not keep tensors carved from
    the old block (each holds that whole block allocated for the Checkpointer's life)."""
    from types import SimpleNamespace

    from gpt.staging import Staging

    registered = []
    fake = SimpleNamespace(cudaHostRegister=lambda ptr, size, flags: registered.append(size) or 0,
                           cudaHostUnregister=lambda ptr: 0)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    staging = Staging()
    staging._pin_for({("a",): torch.zeros(1000), ("b",): torch.zeros(250_000)})
    staging._pin_for({("a",): torch.zeros(1000), ("c",): torch.zeros(10)})
    assert set(staging.buffers) == {("a",), ("c",)} and len(registered) == 2
    staging.release()


@pytest.mark.parametrize("fmt", ["full", "sharded"])
def test_an_error_in_training_waits_for_the_async_save_in_flight(char_data, tmp_path, fmt):
    """Training failed while the step-2 checkpoint was still being written in the background:
    nothing waited for it, and at interpreter exit its thread could no longer start its checksum
    pool, so the checkpoint was dropped without a word (review finding). It is completed first."""
    run = tmp_path / "run"
    script = (
        "import sys, time\n"
        "import gpt.checkpoint.save as save\n"
        "full_writer, dcp_save = save.full_writer, save.Checkpointer._dcp_save\n"
        "def slow_writer(model, optimizer):\n"
        "    write = full_writer(model, optimizer)\n"
        "    def slowly(folder):\n"
        "        time.sleep(2)\n"
        "        yield from write(folder)\n"
        "    return slowly\n"
        "def slow_dcp(self, payload, folder):\n"
        "    time.sleep(2)\n"
        "    return dcp_save(self, payload, folder)\n"
        "save.full_writer, save.Checkpointer._dcp_save = slow_writer, slow_dcp\n"
        "import gpt.trainer as trainer\n"
        "evaluate, calls = trainer.timed_evaluate, []\n"
        "def failing(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        raise RuntimeError('simulated failure in training')\n"
        "    return evaluate(*args, **kwargs)\n"
        "trainer.timed_evaluate = failing\n"
        "from gpt.cli import exit_process, run_train\n"
        "exit_process(run_train(sys.argv[1:]))\n")
    args = tiny_args(char_data, run, max_steps=12, eval_interval=2, eval_iters=1, log_interval=2,
                     async_checkpoint=True, checkpoint_format=fmt)
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and "simulated failure in training" in done.stderr, done.stderr[-3000:]
    assert ckpt.latest_checkpoint(run) == run / ckpt.CHECKPOINTS_DIR / "step_0000002"
    ckpt.verify_checkpoint(run / ckpt.CHECKPOINTS_DIR / "step_0000002")
    assert not [p for p in (run / ckpt.CHECKPOINTS_DIR).iterdir() if p.name.startswith(".")]
