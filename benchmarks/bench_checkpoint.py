"""Checkpoint save/load time and size for the GPT-2 124M model (12 x 768, vocabulary 50304,
block 1024) with its AdamW state, on CPU (or a GPU), through the trainer's own `Checkpointer`.

    python benchmarks/bench_checkpoint.py [--repeats N] [--dir DIR] [--device cpu|cuda] [--results NAME]

Cases: full (model.safetensors + optimizer.pt) and sharded (torch.distributed.checkpoint, one
process), each synchronous and asynchronous. For a synchronous save the training loop waits for
the whole save; for an async one it waits only for the snapshot to CPU memory (the "stall"),
while the files are written in a background thread (its total is timed too). Loads are timed
into a fresh model and optimizer (manifest check + read + copy), from the page cache (the files
were just written). Also measured: the parts of a full save (serialize to the page cache, CRC-32
of the files, fsync, pruning an old checkpoint), the disk's durable write bandwidth, and sha256 vs
CRC-32 throughput (the manifest checksum). Medians of --repeats runs. Results go to benchmarks/results/checkpoint.json.

The checkpoint goes to --dir (default: a temporary folder under /tmp, i.e. local disk; the
results name its filesystem type); every save fsyncs, so the disk's write bandwidth bounds a
synchronous save. With --device cuda the model and optimizer live on the GPU (benchmarks/gpu.sh).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cli import device as device_name, positive_int, results_name  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from gpt import checkpoint as ckpt  # noqa: E402
from gpt.checkpoint import files as ckpt_files, load as ckpt_load, save as ckpt_save  # noqa: E402
from gpt.checkpoint.full_state import load_full_state_dicts  # noqa: E402
from gpt.config import TrainConfig  # noqa: E402
from gpt.model import GPT, GPTConfig  # noqa: E402
from gpt.optim import build_optimizer  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "checkpoint.json"
MODEL = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
GOAL_S = 2.0


def build(device: torch.device) -> tuple[GPT, torch.optim.Optimizer]:
    """The 124M model with a populated AdamW state (one step on random gradients: a real
    forward/backward at this size costs more than the benchmark itself on 2 cores)."""
    torch.manual_seed(0)
    model = GPT(MODEL).to(device)
    optimizer = build_optimizer(model, TrainConfig(), device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def state_json() -> dict:
    return {"step": 0, "tokens_seen": 0, "rng": ckpt.gather_rng_states(), "world_size": 1,
            "model_config": dataclasses.asdict(MODEL)}


def filesystem(path: Path) -> str:
    """The type of the filesystem holding `path` (ext4, xfs, tmpfs, overlay, ...) as /proc/mounts
    says: whether a figure is a disk's or memory's."""
    path, best, kind = str(path.resolve()), "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype = line.split()[:3]
            inside = path == mount or path.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def median(values: list[float]) -> float:
    return statistics.median(values)


def bench_save(root: Path, model, optimizer, fmt: str, async_save: bool, repeats: int) -> dict:
    out = root / f"{fmt}_{'async' if async_save else 'sync'}"
    saver = ckpt.Checkpointer(out, format=fmt, keep_last=1, async_save=async_save)
    stalls, totals = [], []
    for step in range(1, repeats + 1):
        # A synchronous save deletes the checkpoint it prunes in a background thread, which the
        # next save waits for: in training, steps run meanwhile, so it is not timed here.
        saver.wait()
        start = time.perf_counter()
        saver.save(step, model, optimizer, state_json())
        stalls.append(time.perf_counter() - start)
        saver.wait()
        totals.append(time.perf_counter() - start)
    saver.close()
    path = ckpt.latest_checkpoint(out)
    row = {"format": fmt, "async": async_save, "bytes": folder_bytes(path),
           "training_stall_s": median(stalls), "save_total_s": median(totals),
           "stall_repeats_s": stalls, "total_repeats_s": totals}
    print(f"save {fmt:7s} {'async' if async_save else 'sync ':5s}: training waits {row['training_stall_s']:.2f} s, "
          f"save complete after {row['save_total_s']:.2f} s, {row['bytes'] / 1e9:.3f} GB", flush=True)
    return row


def bench_load(root: Path, fmt: str, repeats: int, device: torch.device) -> dict:
    path = ckpt.latest_checkpoint(root / f"{fmt}_sync")
    verify, load = [], []
    for _ in range(repeats):
        model = GPT(MODEL).to(device)
        optimizer = build_optimizer(model, TrainConfig(), device)
        start = time.perf_counter()
        ckpt.verify_checkpoint(path)
        verify.append(time.perf_counter() - start)
        start = time.perf_counter()
        state = ckpt.read_state(path)
        if fmt == "sharded":
            ckpt_load._load_sharded(path, model, optimizer, state)
        else:
            load_full_state_dicts(model, optimizer, ckpt.read_model_state(path),
                                           ckpt.read_optimizer_state(path))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the copies to the GPU are done, not just queued
        load.append(time.perf_counter() - start)
        del model, optimizer
    row = {"format": fmt, "verify_s": median(verify), "read_and_load_s": median(load),
           "total_s": median(verify) + median(load), "verify_repeats_s": verify, "load_repeats_s": load}
    print(f"load {fmt:7s}: verify {row['verify_s']:.2f} s + read/load {row['read_and_load_s']:.2f} s", flush=True)
    return row


def bench_parts(root: Path, model, optimizer, repeats: int) -> dict:
    """Where a synchronous full save's time goes."""
    folder = root / "parts"
    gather, serialize, crc, fsync, prune = [], [], [], [], []
    saver = ckpt.Checkpointer(root / "unused")  # its gather: off a GPU into page-locked memory
    for _ in range(repeats):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        start = time.perf_counter()
        model_state, optimizer_state = saver._gather_full(model, optimizer)
        saver._staging.ready()
        gather.append(time.perf_counter() - start)
        start = time.perf_counter()
        files = list(ckpt_save.write_weight_files(folder, ckpt_save.full_writer(model_state, optimizer_state)))
        serialize.append(time.perf_counter() - start)
        start = time.perf_counter()
        for f in files:
            ckpt_files.crc32(f)
        crc.append(time.perf_counter() - start)
        start = time.perf_counter()
        for f in files:
            ckpt_files.fsync_file(f)
        fsync.append(time.perf_counter() - start)
        start = time.perf_counter()
        shutil.rmtree(folder)  # what pruning an old checkpoint costs
        prune.append(time.perf_counter() - start)
    saver.close()
    row = {"gather_s": median(gather), "serialize_to_page_cache_s": median(serialize),
           "crc32_s": median(crc), "fsync_s": median(fsync), "prune_old_checkpoint_s": median(prune)}
    print("full save parts: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    return row


def bench_disk(root: Path, repeats: int) -> dict:
    """The disk's durable write bandwidth (write 512 MiB, fsync): the floor of a synchronous save."""
    data = os.urandom(64 << 20)
    seconds = []
    for _ in range(repeats):
        path = root / "disk_probe"
        start = time.perf_counter()
        with open(path, "wb") as f:
            for _ in range(8):
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        seconds.append(time.perf_counter() - start)
        path.unlink()
    row = {"durable_write_GB_per_s": 8 * len(data) / median(seconds) / 1e9}
    print(f"disk: {row['durable_write_GB_per_s']:.2f} GB/s written and fsynced", flush=True)
    return row


def bench_checksums(repeats: int) -> dict:
    data = os.urandom(256 << 20)
    rows = {}
    for name, fn in [("sha256", lambda: hashlib.sha256(data).digest()), ("crc32", lambda: zlib.crc32(data)),
                     ("blake2b", lambda: hashlib.blake2b(data).digest())]:
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        rows[name + "_GB_per_s"] = len(data) / median(seconds) / 1e9
    print("checksums: " + ", ".join(f"{k} {v:.2f}" for k, v in rows.items()), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder in /tmp)")
    parser.add_argument("--device", type=device_name, default="cpu",
                        help="where the model and optimizer live (cpu, cuda): from a GPU, a save "
                             "includes copying the state to host memory and a load copying it back")
    parser.add_argument("--results", type=results_name, default=RESULTS.name,
                        help=f"file name in benchmarks/results/ (default: {RESULTS.name}); e.g. "
                             "checkpoint_tmpfs.json for a run with --dir /dev/shm, which shows what the "
                             "code costs when the disk is not the limit")
    args = parser.parse_args(argv)
    # Checked before the 124M model is built: a file or a missing folder ended in a traceback
    # from mkdtemp (NotADirectoryError, FileNotFoundError) after that.
    if args.dir is not None:
        if not args.dir.is_dir():
            parser.error(f"--dir {args.dir}: {'not a folder' if args.dir.exists() else 'no such folder'}")
        if not os.access(args.dir, os.W_OK | os.X_OK):
            parser.error(f"--dir {args.dir}: this user cannot write there")

    device = torch.device(args.device)
    model, optimizer = build(device)
    n_params = model.num_params()
    print(f"model: {n_params / 1e6:.1f}M parameters (+ AdamW exp_avg, exp_avg_sq)", flush=True)
    root = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.dir or "/tmp"))
    fs = filesystem(root)
    print(f"state on {device}; writing to {root} ({fs})", flush=True)
    load_before = os.getloadavg()
    try:
        saves = [bench_save(root, model, optimizer, fmt, async_save, args.repeats)
                 for fmt in ("full", "sharded") for async_save in (False, True)]
        loads = [bench_load(root, fmt, args.repeats, device) for fmt in ("full", "sharded")]
        parts = bench_parts(root, model, optimizer, args.repeats)
        checksums = bench_checksums(args.repeats)
        disk = bench_disk(root, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    sync_full = next(r for r in saves if r["format"] == "full" and not r["async"])
    report = {
        "benchmark": "checkpoint",
        "model": {"n_layer": MODEL.n_layer, "n_embd": MODEL.n_embd, "vocab_size": MODEL.vocab_size,
                  "block_size": MODEL.block_size, "parameters": n_params},
        "repeats": args.repeats,
        "statistic": "median over repeats",
        "goal": f"synchronous save of the 124M model state under {GOAL_S} s on local disk",
        # What training waits for: a synchronous save returns once the new checkpoint is durable
        # and `latest` names it; deleting the pruned one goes on in the background.
        "goal_met": sync_full["training_stall_s"] < GOAL_S,
        "dir": str(args.dir or "/tmp"),
        "filesystem": fs,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "saves": saves,
        "loads": loads,
        "full_save_parts": parts,
        "checksums": checksums,
        "disk": disk,
        "floor_s": "a synchronous save cannot beat bytes / durable_write_GB_per_s (every file is fsynced)",
        "machine": {
            "platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "torch": torch.__version__, "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
    }
    results = write_json(args.results, report)
    print(f"goal ({report['goal']}): {'met' if report['goal_met'] else 'not met'} "
          f"({sync_full['training_stall_s']:.2f} s; floor on this disk "
          f"{sync_full['bytes'] / 1e9 / disk['durable_write_GB_per_s']:.2f} s); wrote {results}")


if __name__ == "__main__":
    main()
