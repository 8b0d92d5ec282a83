"""One writer per folder: an exclusive `flock` on a lock file inside it.

Data prep locks its `--out` folder (`.prepare-lock`) and a training run its `out_dir`
(`.run-lock`, by the process that writes the run's files: global rank 0), so that a second prep
or run into the same folder is refused at once instead of interleaving its files with the first's.

    lock = acquire(folder / ".run-lock")     # FolderBusy when another process holds it
    ...
    lock.release()                           # or let it go: released when garbage-collected

What makes this safe to rely on:
- The kernel drops a flock when the last descriptor of its open file goes away, so a holder that
  dies (kill -9, out of memory, a node's torchrun restart) never leaves a stale lock: the next
  run goes ahead. A child forked while the lock is held (data prep's encoding pool) would keep
  it alive after the parent's death; its copy of the descriptor is closed right after the fork.
- The file is removed on release, while still locked. A process that opened it just before then
  finds, once it holds its lock, that the path names another file (or none) and tries again, so
  two holders never lock two different files under one name.
- A filesystem without flock (some NFS or Lustre mounts: ENOLCK, EOPNOTSUPP, ENOSYS) does not stop
  the work: the lock comes back unheld, with `warning` saying that the folder is not guarded.

No torch here: data prep uses this without it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import weakref
from pathlib import Path

try:
    import fcntl  # POSIX; elsewhere (Windows) folders are not guarded
except ImportError:  # pragma: no cover
    fcntl = None

# The locks this process holds, to close inherited copies in forked children. Weak: a lock
# nobody references is released and leaves. (A second acquire in the same process is refused
# by flock itself: it locks open files, not processes.)
_held: "weakref.WeakSet[FolderLock]" = weakref.WeakSet()


class FolderBusy(Exception):
    """Another process holds the lock; `holder` describes it ("pid 123 on node7 since 2026-01-05
    11:02:03 UTC"), or is "" when that process wrote nothing readable."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is locked by {holder or 'another process'}")
        self.path, self.holder = path, holder


class FolderLock:
    """A held (or, where the filesystem cannot lock, unheld) lock on `path`."""

    def __init__(self, path: Path, fd: int | None, warning: str | None = None) -> None:
        self.path = path
        self.warning = warning  # why the folder is not guarded, when it is not
        self._fd = fd
        self._owner = os.getpid()

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent; a no-op in a forked child)."""
        fd, self._fd = self._fd, None
        if fd is None or os.getpid() != self._owner:
            return
        try:
            os.unlink(self.path)  # while still locked: see the module docstring
        except OSError:
            pass  # moved or removed by hand: nothing to clean
        os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # at interpreter exit os may be half torn down; the kernel releases anyway
            pass

    def _forget_in_child(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the parent keeps its lock; this copy must not outlive it
            self._fd = None


def acquire(path: str | os.PathLike, *, wait: bool = False) -> FolderLock:
    """Lock `path` (created if missing) exclusively without waiting (FolderBusy if another holds
    it), or with `wait`, once the holder lets go.

    OSError when the file cannot be opened (a missing or unwritable folder). Where the
    filesystem cannot flock, an unheld FolderLock whose `warning` says so.
    """
    path = Path(path)
    while True:
        fd = _open_lock_file(path)
        try:
            if fcntl is None:  # pragma: no cover
                os.close(fd)
                return FolderLock(path, None, f"cannot lock {path} on this platform (no fcntl)")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FolderBusy(path, _read_holder(fd)) from None
            except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS...: this filesystem does not lock
                os.close(fd)
                try:
                    os.unlink(path)  # it guards nothing here; leave no trace of it
                except OSError:
                    pass
                return FolderLock(path, None, f"cannot lock {path} ({e.strerror or e}): this filesystem "
                                              f"does not support flock, so nothing stops a second process "
                                              f"from writing the same folder at the same time")
            if not names_file(path, fd):  # removed by its last holder after we opened it: try again
                os.close(fd)
                continue
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass  # closed above already
            raise
        _write_holder(fd)
        lock = FolderLock(path, fd)
        _held.add(lock)
        return lock


def _open_lock_file(path: Path) -> int:
    """The lock file, created if missing with the umask's permissions (a group folder's teammate
    can open it: fixed at 0o644, a teammate's run was refused as "not writable" while it held
    it, and again after a kill -9 left it). Another user's file that this one cannot write is
    opened read-only: flock needs no write access (the holder's pid is then not written)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # O_CLOEXEC: Python's default
    except PermissionError as e:
        try:
            return os.open(path, os.O_RDONLY)
        except OSError:
            raise e from None  # the folder itself is not writable: say that


def try_flock(fd: int, *, exclusive: bool) -> bool | None:
    """Lock the open file `fd` without waiting: True once locked, False while another open file
    description holds a conflicting lock, None where the platform or filesystem cannot flock."""
    if fcntl is None:  # pragma: no cover
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP, ENOSYS...
        return None
    return True


def names_file(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd` (not removed or replaced since it was opened)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _write_holder(fd: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    except OSError:
        pass  # only used to name the holder in a refusal


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {int(record['pid'])} on {record['host']} since {record['since']}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ""


def _after_fork_in_child() -> None:
    for lock in list(_held):
        lock._forget_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
