"""The run folder: one live run per out_dir (a lock), and paths of every shape.

A second `train.py` into an out_dir that a live run is writing is refused at once (their
metrics.jsonl lines and checkpoints would interleave), while a rerun after kill -9, a torchrun
restart or a SLURM requeue is not: the lock is an flock (gpt/locks.py), which dies with its
process. The path tests cover spaces and non-ASCII names, relative paths from another working
directory, symlinks, a run folder moved elsewhere, and files where folders are expected.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt import locks
from gpt.cli import run_train
from gpt.config import ConfigError
from gpt.sampling import run_sample
from gpt.run_folder import RUN_LOCK_FILE
from gpt.trainer import train

from conftest import REPO, child_pids, run_script, tiny_args, tiny_config

fcntl = pytest.importorskip("fcntl")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(capsys, script: str, *argv: str) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGV...` in this process (same parsing, errors and exit code as the script)."""
    capsys.readouterr()
    code = run_sample(list(argv)) if script == "sample.py" else \
        run_train(list(argv), default_config=REPO / "configs" / "default.toml")
    out = capsys.readouterr()
    return subprocess.CompletedProcess([script, *argv], code, out.out, out.err)


def wait_until(condition, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.1)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def holder_pid(run: Path) -> int | None:
    try:
        return json.loads((run / RUN_LOCK_FILE).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


@contextlib.contextmanager
def held_by_another_process(lock_file: Path):
    """The lock on `lock_file`, held by a child process until the block ends."""
    script = (f"import sys, time\nsys.path.insert(0, {str(REPO)!r})\nfrom gpt import locks\n"
              f"lock = locks.acquire({str(lock_file)!r})\nprint('held', flush=True)\ntime.sleep(300)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------------------
# One live run per out_dir


def test_a_second_run_into_a_live_out_dir_is_refused_and_a_rerun_after_kill_9_is_not(char_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=10, eval_interval=10))
    assert not (run / RUN_LOCK_FILE).exists()  # a finished run leaves no lock file

    # Run A resumes it and trains on (it would for a long time); then it is frozen, lock held.
    log = tmp_path / "a.log"
    with open(log, "w") as out:
        a = subprocess.Popen([sys.executable, "train.py", *tiny_args(char_data, run, max_steps=100_000,
                                                                     eval_interval=100_000)],
                             cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=ENV)
    try:
        wait_until(lambda: "resumed from" in log.read_text(), a, log)
        assert holder_pid(run) == a.pid
        a.send_signal(signal.SIGSTOP)
        before = snapshot(run)

        # Run B, the same run started again: refused at once, in one line, touching nothing.
        started = time.monotonic()
        b = run_script("train.py", *tiny_args(char_data, run, max_steps=20), timeout=120)
        assert b.returncode == 2, b.stdout[-2000:] + b.stderr[-2000:]
        assert re.fullmatch(
            re.escape(f"error: out_dir {run} is in use by another training run right now (pid {a.pid} on "
                      f"{socket.gethostname()} since ") + r"[0-9-]+ [0-9:]+ UTC" + re.escape(
                "); two runs in one folder would mix their checkpoints and metrics. Wait for it to "
                "finish (run again then to resume), or use another --out_dir") + "\n", b.stderr), b.stderr
        assert "config:" not in b.stdout  # before anything else: no data, no model, no training
        assert time.monotonic() - started < 60
        assert snapshot(run) == before
    finally:
        a.kill()  # SIGKILL: no clean-up runs; the kernel drops the lock with the process
        a.wait()
    assert (run / RUN_LOCK_FILE).exists() and holder_pid(run) == a.pid  # stale file, no lock

    # The rerun after kill -9 goes ahead and resumes.
    c = run_script("train.py", *tiny_args(char_data, run, max_steps=20), timeout=300)
    assert c.returncode == 0, c.stdout[-2000:] + c.stderr[-2000:]
    assert "resumed from" in c.stdout and (run / "latest").read_text().strip() == "step_0000020"
    assert not (run / RUN_LOCK_FILE).exists()


def test_the_lock_is_not_inherited_by_forked_children(tmp_path):
    """A child forked while the lock is held (data prep's encoding pool, forked inside train.py)
    must not keep the lock after its parent is killed: the rerun would be refused for as long
    as the orphan lives."""
    lock_file = tmp_path / "folder" / ".run-lock"
    lock_file.parent.mkdir()
    script = (f"import os, sys, time\nsys.path.insert(0, {str(REPO)!r})\nfrom gpt import locks\n"
              f"lock = locks.acquire({str(lock_file)!r})\n"
              "child = os.fork()\n"
              "if child == 0:\n    os.write(1, b'ready\\n')\n    time.sleep(120)\n    os._exit(0)\n"
              "os.write(1, b'%d\\n' % child)\ntime.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    # Both lines, in either order: "ready" says the child runs its own code, so the fork hooks
    # (which drop its copy of the lock) have run; killing the parent before then tested a race.
    # Each line is one write(): print() under PYTHONUNBUFFERED writes the text and its newline
    # apart, and the two processes' pieces interleaved ("ready12345", "") on a loaded machine.
    lines = {parent.stdout.readline().strip(), parent.stdout.readline().strip()}
    lines.discard("ready")
    child = int(lines.pop())
    try:
        with pytest.raises(locks.FolderBusy):
            locks.acquire(lock_file)
        parent.kill()
        parent.wait()
        assert os.path.exists(f"/proc/{child}") or sys.platform != "linux"  # the orphan lives on
        locks.acquire(lock_file).release()
    finally:
        parent.kill()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_filesystem_without_flock_warns_and_trains(char_data, tmp_path, monkeypatch, capsys):
    for code in (errno.ENOLCK, errno.EOPNOTSUPP):
        def no_flock(fd, op, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(locks.fcntl, "flock", no_flock)
        run = tmp_path / f"run{code}"
        capsys.readouterr()
        train(tiny_config(char_data, run, max_steps=5, eval_interval=5))
        err = capsys.readouterr().err
        assert f"warning: cannot lock {run / RUN_LOCK_FILE} ({os.strerror(code)}): this filesystem does not " \
               f"support flock" in err, err
        assert (run / "latest").read_text().strip() == "step_0000005"


def test_data_prep_shares_the_lock_and_warns_without_flock(tmp_path, monkeypatch):
    from gpt.prepare import LOCK_FILE, PrepareError, prepare

    docs = ["To be, or not to be, that is the question. " * 200]
    SMALL = dict(tokenizer="char", progress=False, log=None, val_rule="tail", val_fraction=0.1,
                 min_val_tokens=10)
    out = tmp_path / "ds"
    out.mkdir()
    held = locks.acquire(out / LOCK_FILE)  # another prep, as this process sees it
    with pytest.raises(PrepareError, match=re.escape(f"--out {out}: another data prep is writing this folder "
                                                     f"right now (pid {os.getpid()} on ")):
        prepare(out, docs, **SMALL)
    held.release()
    monkeypatch.setattr(locks.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOLCK, "x")))
    with pytest.warns(UserWarning, match="does not support flock"):
        prepare(out, docs, **SMALL)
    assert not (out / LOCK_FILE).exists()


def test_in_process_reruns_after_an_error_are_not_refused(char_data, tmp_path):
    """A failed train() whose frame a traceback keeps alive (`pytest.raises(...) as e`) still holds
    its lock object: the next train() in the same process takes it over instead of refusing."""
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=5, eval_interval=5))
    with pytest.raises(ConfigError) as first:
        train(tiny_config(char_data, run, max_steps=10, resume="never"))
    with pytest.raises(Exception) as second:
        train(tiny_config(char_data, run, max_steps=10, seed=7))
    assert "seed" in str(second.value) and first.value is not None
    train(tiny_config(char_data, run, max_steps=10, eval_interval=5))
    assert (run / "latest").read_text().strip() == "step_0000010"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
def test_under_torchrun_rank_0_locks_a_second_job_is_refused_once_and_a_restart_is_not(char_data, tmp_path):
    run = tmp_path / "run"
    args = [*tiny_args(char_data, run, max_steps=100_000, eval_interval=0, batch_size=4), "--log_interval=1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    log = tmp_path / "a.log"
    with open(log, "w") as out:
        a = subprocess.Popen([*torchrun, "--max-restarts=1", "train.py", *args], cwd=REPO, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True,
                             # without it the restarted workers may fail to reach the rendezvous store
                             env={**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    ranks: dict[int, int] = {}
    try:
        wait_until(lambda: (run / "metrics.jsonl").exists(), a, log)
        for pid in child_pids(a.pid):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ranks.update({int(e[5:]): pid for e in env if e.startswith(b"RANK=")})
        assert holder_pid(run) == ranks[0]  # rank 0 holds it (rank 1 does not: it would be refused)

        # Job a's workers are paused while b runs (their lock stays held): training flat out on
        # both cores, they left b's rank 1 so little CPU that on CI it met its own error only
        # after torchrun's SIGTERM, and printed it as well as rank 0's.
        for pid in ranks.values():
            os.kill(pid, signal.SIGSTOP)
        try:
            b = subprocess.run([*torchrun, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                               env=ENV, timeout=180)
        finally:
            for pid in ranks.values():
                os.kill(pid, signal.SIGCONT)
        assert b.returncode != 0
        assert b.stderr.count(f"error: out_dir {run} is in use by another training run right now") == 1, \
            b.stderr[-3000:]
        assert "rank 1: error:" not in b.stderr

        os.kill(ranks[0], signal.SIGKILL)  # torchrun restarts both workers; the new rank 0 locks again
        wait_until(lambda: holder_pid(run) not in (None, ranks[0]) and log.read_text().count("config:") == 2,
                   a, log)
        time.sleep(1)
        assert a.poll() is None and "in use by another training run" not in log.read_text()
    finally:
        # torchrun's workers run in sessions of their own: killing torchrun's group left the
        # restarted ones training (max_steps 100,000) through the rest of the suite.
        for pid in [a.pid, *child_pids(a.pid), *ranks.values()]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        a.wait()


# ----------------------------------------------------------------------------------------
# Paths


def test_out_dir_that_is_a_file_or_a_dangling_symlink_is_one_line(char_data, tmp_path, capsys):
    (tmp_path / "file").write_text("precious")
    r = run_cli(capsys, "train.py", *tiny_args(char_data, tmp_path / "file"))
    assert r.returncode == 2 and r.stderr == (
        f"error: out_dir {tmp_path / 'file'} is a file, not a folder: the run keeps its checkpoints and "
        f"metrics in a folder. Choose another --out_dir, or move that file away\n")
    assert (tmp_path / "file").read_text() == "precious"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    r = run_cli(capsys, "train.py", *tiny_args(char_data, tmp_path / "dangling"))
    assert r.returncode == 2 and r.stderr == (
        f"error: out_dir {tmp_path / 'dangling'} is a symbolic link to {tmp_path / 'nowhere'}, which does "
        f"not exist. Create that folder, or choose another --out_dir\n")
    r = run_cli(capsys, "sample.py", "--out_dir", str(tmp_path / "file"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(tmp_path / "file") in r.stderr, r.stderr


def test_data_dir_that_is_a_file_is_one_line(char_data, tmp_path, capsys):
    (tmp_path / "data.txt").write_text("not a dataset")
    r = run_cli(capsys, "train.py", *tiny_args(tmp_path / "data.txt", tmp_path / "run"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(tmp_path / "data.txt") in r.stderr, r.stderr
    assert (tmp_path / "data.txt").read_text() == "not a dataset"


@pytest.mark.parametrize("prepare_source", ["none", "stdlib"])
def test_data_dir_that_is_a_file_is_called_a_file(tmp_path, capsys, prepare_source):
    (tmp_path / "data.txt").write_text("not a dataset")
    r = run_cli(capsys, "train.py", f"--data_dir={tmp_path / 'data.txt'}", f"--out_dir={tmp_path / 'run'}",
                f"--prepare_source={prepare_source}", "--device=cpu")
    assert r.returncode == 2 and f"data_dir {tmp_path / 'data.txt'} is a file" in r.stderr, r.stderr
    assert "does not exist" not in r.stdout + r.stderr and "is not a folder" not in r.stderr


def test_spaces_non_ascii_symlinks_and_a_moved_run(char_data, tmp_path, capsys):
    data = tmp_path / "dätä sét" / "chär data"
    shutil.copytree(char_data, data)
    run = tmp_path / "rüns ✓" / "my run"
    r = run_cli(capsys, "train.py", *tiny_args(data, run, max_steps=10, eval_interval=10))
    assert r.returncode == 0, r.stderr
    assert run_cli(capsys, "sample.py", "--out_dir", str(run), "--max_new_tokens=5", "--device=cpu").returncode == 0

    # Through a symlink to the folder: the same run (and the same lock).
    link = tmp_path / "link ✓"
    link.symlink_to(run)
    r = run_cli(capsys, "train.py", *tiny_args(data, link, max_steps=15, eval_interval=5))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    assert (run / "latest").read_text().strip() == "step_0000015"
    with held_by_another_process(run / RUN_LOCK_FILE):  # held under the real name, seen through the link
        r = run_cli(capsys, "train.py", *tiny_args(data, link, max_steps=20, eval_interval=5))
    assert r.returncode == 2 and "is in use by another training run" in r.stderr

    # Moved (run and data both), then resumed and sampled from the new place.
    moved = tmp_path / "elsewhere" / "môved run"
    moved.parent.mkdir()
    shutil.move(run, moved)
    shutil.move(tmp_path / "dätä sét", tmp_path / "elsewhere" / "data")
    new_data = tmp_path / "elsewhere" / "data" / "chär data"
    r = run_cli(capsys, "train.py", *tiny_args(new_data, moved, max_steps=20, eval_interval=5))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    assert (moved / "latest").read_text().strip() == "step_0000020"
    r = run_cli(capsys, "sample.py", "--out_dir", str(moved), "--max_new_tokens=5", "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert not run.exists()


def test_relative_out_dir_is_taken_from_the_working_directory(char_data, tmp_path):
    work = tmp_path / "work dir"
    work.mkdir()
    rel_data = os.path.relpath(char_data, work)
    args = [a for a in tiny_args(char_data, Path("runs/rel"), max_steps=5, eval_interval=5)
            if not a.startswith("--data_dir=")]
    r = subprocess.run([sys.executable, str(REPO / "train.py"), f"--data_dir={rel_data}", *args],
                       cwd=work, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "runs" / "rel" / "latest").read_text().strip() == "step_0000005"
    assert not (REPO / "runs" / "rel").exists()
    s = subprocess.run([sys.executable, str(REPO / "sample.py"), "--out_dir=runs/rel", "--max_new_tokens=5",
                        "--device=cpu"], cwd=work, capture_output=True, text=True, timeout=300, env=ENV)
    assert s.returncode == 0, s.stderr[-3000:]


# ----------------------------------------------------------------------------------------
# A new data_dir prepared by the default corpus


def test_a_run_waits_for_another_prep_of_its_new_data_dir_and_trains_on_that_dataset(char_data, tmp_path):
    """Two runs started at once on one new data_dir: the second finds the first's prep holding
    the folder, waits for it and trains on what it published (it failed before, naming prep's
    --out). The other prep is played by a process holding the lock and a copy into the folder."""
    data = tmp_path / "data"
    data.mkdir()
    log = tmp_path / "run.log"
    args = [arg for arg in tiny_args(data, tmp_path / "run", max_steps=5, eval_interval=5)
            if not arg.startswith("--prepare_source")]  # the default: prepare the stdlib corpus
    with held_by_another_process(data / ".prepare-lock"):
        proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, env=ENV)
        wait_until(lambda: "waiting for it to finish" in log.read_text(), proc, log)
        for file in char_data.iterdir():  # what the other prep publishes before it lets go
            shutil.copy(file, data / file.name)
    assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    output = log.read_text()
    assert f"a data prep is writing {data}; waiting for it to finish" in output
    assert "was prepared by another process meanwhile; training on that dataset" in output
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in char_data.iterdir())


def test_a_half_copied_data_dir_is_named_not_prepared_over(char_data, tmp_path, capsys):
    """A data_dir holding part of a dataset is not one to prepare the default corpus into (prep
    refuses it, asking for an --overwrite train.py does not have): the error names what is missing."""
    data = tmp_path / "data"
    data.mkdir()
    for file in char_data.glob("val_*.bin"):
        shutil.copy(file, data / file.name)
    args = [arg for arg in tiny_args(data, tmp_path / "run") if not arg.startswith("--prepare_source")]
    r = run_cli(capsys, "train.py", *args)
    assert r.returncode == 2 and "the dataset here is incomplete" in r.stderr, r.stderr
    assert "preparing" not in r.stdout and sorted(p.name for p in data.iterdir()) == sorted(
        p.name for p in char_data.glob("val_*.bin"))


def test_a_missing_data_dir_gets_the_default_corpus_prepared_once(tmp_path, capsys):
    """train.py alone on a new data_dir prepares the embedded corpus there (char vocabulary
    here, for speed: ~5 s), says so, trains on it; the next run uses it as it is."""
    data, run = tmp_path / "new data", tmp_path / "run"
    args = [f"--data_dir={data}", f"--out_dir={run}", "--prepare_tokenizer=char",
            "--max_steps=1", "--eval_interval=1", "--eval_iters=1", "--batch_size=2", "--device=cpu"]
    r = run_cli(capsys, "train.py", *args)
    assert r.returncode == 0, r.stderr
    assert f"{data} does not exist; preparing the 'stdlib' corpus there (char; " in r.stdout  # no BPE size
    meta = json.loads((data / "meta.json").read_text())
    assert meta["tokenizer"] == "char" and meta["source"].startswith("stdlib:")
    r = run_cli(capsys, "train.py", *args[:1], f"--out_dir={tmp_path / 'again'}", *args[2:])
    assert r.returncode == 0 and "preparing" not in r.stdout, r.stderr
