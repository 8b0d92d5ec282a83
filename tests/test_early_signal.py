"""A stop signal (SIGTERM, SIGUSR1) in the second or so while train.py imports torch, before the
trainer installs its own handler: the run still stops after its first step with a checkpoint and
exit code 75 (it was killed, -15, with nothing for a requeue to act on), and the process exits
with the dispositions it inherited (under slurm/launch.py SIGTERM stays ignored while a worker
exits, so torchrun's SIGTERM to the workers still running cannot turn a saved stop into -15).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, tiny_args

# Printed at interpreter exit (atexit runs after train.py's own clean-up, before Python resets
# its handlers): the dispositions the process exits with.
PROBE = """\
import atexit, runpy, signal, sys
def dispositions():
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)]
    print("exit dispositions:", *(signal.Handlers(h).name if isinstance(h, int) else h for h in handlers), flush=True)
atexit.register(dispositions)
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (/proc's SigCgt mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def torch_loaded(pid: int) -> bool:
    return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()


def start_with(cmd: list[str], inherited, log: Path) -> subprocess.Popen:
    """`cmd` with SIGTERM and SIGUSR1 set to `inherited` (SIG_IGN is what slurm/launch.py's
    workers inherit), its output in `log`."""

    def preexec() -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, inherited)

    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def signal_in_window(proc: subprocess.Popen, pids, sig: int, count: int = 1, timeout: float = 60) -> None:
    """Send `sig` to each of the `count` processes `pids()` lists as soon as it catches `sig`,
    while it is still loading torch."""
    deadline, signalled = time.monotonic() + timeout, set()
    while time.monotonic() < deadline and proc.poll() is None and len(signalled) < count:
        for pid in pids():
            try:
                if pid not in signalled and catches(pid, sig):
                    assert not torch_loaded(pid), "the early handler came only after torch loaded"
                    os.kill(pid, sig)
                    signalled.add(pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
        time.sleep(0.002)
    assert len(signalled) == count, f"signalled {sorted(signalled)} of {count} within {timeout} s"


def test_early_handler_hands_over_to_the_trainer_and_restores_what_it_replaced():
    from gpt.stop import StopFlag

    from gpt.early_signals import EarlyStopSignals as early_cls
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        for inherited in (signal.SIG_DFL, signal.SIG_IGN):
            for sig in early_cls.SIGNALS:
                signal.signal(sig, inherited)
            early = early_cls().install()
            os.kill(os.getpid(), signal.SIGUSR1)
            deadline = time.monotonic() + 5
            while not early.caught and time.monotonic() < deadline:
                time.sleep(0.001)  # Python runs the handler between bytecodes of the main thread
            assert early.caught == [signal.SIGUSR1]
            stop = StopFlag()
            stop.install()
            assert stop.signal == signal.SIGUSR1, "StopFlag.install did not take over train.py's caught signal"
            stop.restore()
            early.restore()
            assert signal.getsignal(signal.SIGTERM) == inherited
            assert signal.getsignal(signal.SIGUSR1) == inherited
            # A handler set after the early one is left as it is.
            early = early_cls().install()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            early.restore()
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
            assert signal.getsignal(signal.SIGUSR1) == inherited
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("inherited,sig", [(signal.SIG_DFL, signal.SIGTERM), (signal.SIG_IGN, signal.SIGUSR1)],
                         ids=["sigterm-default", "sigusr1-ignored-as-under-launch.py"])
def test_signal_while_torch_imports_saves_and_exits_75(char_data, tmp_path, inherited, sig):
    run = tmp_path / "run"
    log = tmp_path / "log.txt"
    proc = start_with([sys.executable, "-c", PROBE, *tiny_args(char_data, run, max_steps=50)], inherited, log)
    try:
        signal_in_window(proc, lambda: [proc.pid], sig)
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text(errors="replace")
    name = signal.Signals(sig).name
    assert proc.returncode == 75, output[-4000:]
    assert f"received a stop signal ({name}): saving a checkpoint at step 1 " in output, output[-4000:]
    assert (run / "latest").read_text().strip() == "step_0000001"
    expected = signal.Handlers(inherited).name
    assert f"exit dispositions: {expected} {expected}" in output, output[-4000:]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_signal_while_torch_imports_under_launch_py_saves_and_exits_75(char_data, tmp_path):
    """Two workers under slurm/launch.py (which ignores SIGUSR1 and SIGTERM, as its workers do
    until train.py starts), each sent SIGUSR1 as SLURM sends it to every process of a job step,
    while they import torch: they agree, save at step 1, and launch.py exits with 75."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    log = tmp_path / "log.txt"
    cmd = [sys.executable, "slurm/launch.py", "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=early", "--max-restarts=0",
           "train.py", *tiny_args(char_data, run, max_steps=50)]
    proc = start_with(cmd, signal.SIG_DFL, log)
    try:
        signal_in_window(proc, lambda: _children(proc.pid), signal.SIGUSR1, count=2, timeout=120)
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            for pid in _children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
    output = log.read_text(errors="replace")
    assert proc.returncode == 75, output[-4000:]
    # The ranks agree one step late (StopFlag.agreed): the stop is at step 2.
    stopped = re.search(r"received a stop signal \(SIGUSR1\): saving a checkpoint at step (\d+) ", output)
    assert stopped and int(stopped.group(1)) <= 2, output[-4000:]
    assert (run / "latest").read_text().strip() == f"step_{int(stopped.group(1)):07d}"
