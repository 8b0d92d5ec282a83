"""Writing files so that a crash never leaves half of one: fsync, checksums, permissions.

What the rest of the package builds its guarantee on: a file counts as written once it is
fsynced (`seal`), a folder entry once the folder is (`fsync_dir`), and a small file is replaced
whole or not at all (`write_text_atomic`)."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..crc import file_crc32


def failed_write(error: BaseException) -> bool:
    """Whether `error` is a writer's failure to put bytes on the disk (full, read-only, over a
    size limit): an OSError, or what the writers raise instead of one. torch.save's zip writer
    raises RuntimeError ("unexpected pos 4096 vs 3988", "PytorchStreamWriter failed writing
    file"), safetensors a SafetensorError ("I/O error: No space left on device (os error 28)"),
    tokenizers' save a bare Exception ("No space left on device (os error 28)")."""
    if isinstance(error, OSError):
        return True
    text = str(error)
    if type(error).__name__ == "SafetensorError" or type(error) is Exception:  # (the Rust libraries')
        return "I/O error" in text or "(os error " in text
    return isinstance(error, RuntimeError) and any(
        sign in text for sign in ("unexpected pos", "PytorchStreamWriter failed", "file write failed"))


def unfinished_copy(target: Path) -> Path:
    """The hidden folder beside `target` that a copy into it (consolidate, export) is written in
    and then renamed from: named for this host and process, so that `remove_abandoned` knows
    whose it is."""
    return target.parent / f".tmp_{target.name}_{socket.gethostname()}_{os.getpid()}"


def remove_abandoned(target: Path) -> None:
    """Remove the unfinished copies into `target` that processes on this host left when killed
    outright (kill -9, the out-of-memory killer: a whole model's copy, in a hidden folder nothing
    else cleans); one whose process still runs is being written."""
    for tmp in target.parent.glob(f"{glob.escape(f'.tmp_{target.name}_{socket.gethostname()}')}_*"):
        pid = tmp.name.rsplit("_", 1)[-1]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


BLOCK = 16 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def crc32(path: Path) -> str:
    return f"{file_crc32(path):08x}"  # big files in parallel ranges (gpt/crc.py)


def seal(path: Path) -> dict[str, Any]:
    """Manifest entry of a just-written file (size and CRC-32, read back while it is still in
    the page cache), after fsyncing it to disk.

    CRC-32 (zlib, ~1.5 GB/s per thread, and a big file is read in parallel ranges) rather
    than sha256 (~1.2 GB/s, one thread per file): the manifest detects truncated and
    corrupted files, and cannot prove authenticity anyway (it lies beside them)."""
    entry = {"bytes": path.stat().st_size, "crc32": crc32(path)}
    fsync_file(path)
    return entry


@contextlib.contextmanager
def writeback(folder: Path, pattern: str = "*", every_s: float = 0.1):
    """Make the disk write files while they are still being serialized: a thread fsyncs the
    files in `folder` matching `pattern` every `every_s` seconds until the body is done.

    Left alone, the kernel starts writing dirty pages only when they pass
    vm.dirty_background_ratio (10% of RAM) or are 30 s old, so a 1.5 GB checkpoint first fills
    the page cache and then waits in fsync for the whole of it: serialize + write, instead of
    about the slower of the two. A synchronous save of the 124M model and its AdamW state on
    the development machine's disk (~0.5 GB/s durable, so a floor of ~2.9 s): 3.20 vs 3.71 s
    (medians of 8, alternated). On tmpfs, with no disk behind the page cache, fsync is free."""
    stop = threading.Event()
    failed: list[OSError] = []

    def flush() -> None:
        while not stop.wait(every_s) and not failed:
            for path in folder.glob(pattern):
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:  # not created yet, or gone
                    continue
                try:
                    os.fsync(fd)
                except OSError as e:
                    # Linux reports a write error to the fsyncs of the descriptors open when it
                    # happened, so a later fsync on a fresh descriptor may not see it: keep it.
                    failed.append(e)
                    break
                finally:
                    os.close(fd)

    thread = threading.Thread(target=flush, name="checkpoint-writeback", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if failed:
        raise failed[0]


def seal_all(paths: list[Path], base: Path) -> dict[str, dict[str, Any]]:
    """`seal` for several files in parallel threads; keys are paths relative to `base`."""
    if not paths:
        return {}
    with ThreadPoolExecutor(max_workers=min(4, len(paths))) as pool:
        entries = list(pool.map(seal, paths))
    return {p.relative_to(base).as_posix(): e for p, e in zip(paths, entries)}


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# The process's umask, read once at import. os.umask can only be read by setting it, so it is
# set and put back at once; at import, before the trainer starts any thread, no other thread
# can create a file in that instant with the wrong permissions.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def give_ordinary_permissions(path: str | os.PathLike) -> None:
    """Give a file the permissions the user's umask gives ordinary new files (0644 under umask
    022). safetensors' save_file and tempfile create theirs 0600, and on a shared cluster file
    system the user's group could then not read the weights beside the other files."""
    os.chmod(path, 0o666 & ~_UMASK)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a small text file so readers see either the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk, or path a folder: leave no half-written copy
        raise
    fsync_dir(path.parent)
