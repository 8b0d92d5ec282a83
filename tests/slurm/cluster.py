"""A real single-node SLURM cluster on localhost, for tests: munged, slurmctld and slurmd.

No systemd and no cgroups are needed: the three daemons run in the foreground as children of
this process, with their config, state, spool, logs and munge socket in one temporary folder,
on free ports, so that several clusters (several test sessions) can run side by side.

    cluster = SlurmCluster.start()      # ~2 s; raises ClusterError with the daemons' logs
    cluster.run("sbatch", ...)          # client commands get SLURM_CONF from cluster.env()
    cluster.stop()                      # cancels jobs, ends the PIDs it started, then any
                                        # process left with its SLURM_CONF (job leftovers)

A cluster whose owner process died without `stop()` (a killed pytest) is cleaned up by the
next `start()`: each cluster records its owner and daemon PIDs under REGISTRY.

Run it by hand to try the slurm/ scripts (as root):
    .venv/bin/python tests/slurm/cluster.py      # prints `export SLURM_CONF=...`, Ctrl-C stops
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
# /tmp, not $TMPDIR: munged (user munge) must reach its socket folder through every parent, and
# a socket path must stay under 108 bytes.
REGISTRY = Path("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()) / "gpt-slurm-test-clusters"
CPUS = 2  # what the cluster offers; the CI machines have 2 cores
GPUS = 2  # pretend GPUs (gres/gpu on links to /dev/null)


class ClusterError(RuntimeError):
    pass


def missing_binaries() -> list[str]:
    """SLURM/munge programs that are not installed (the reason to skip, when not empty)."""
    found = {name: shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)
        for name in DAEMONS + CLIENTS}
    return [name for name, path in found.items() if path is None]


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (held together, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; treat it as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _environ_has(pid: int, needle: bytes) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _kill_and_wait(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is left after `timeout` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            for pid in pids:  # reap our own children so they do not linger as zombies
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            time.sleep(0.05)
        if not any(_alive(p) for p in pids):
            return


def _job_processes(conf: Path) -> list[int]:
    """Every process with this cluster's SLURM_CONF in its environment: the daemons, slurmstepd
    and the job processes (no other process has this path)."""
    needle = f"SLURM_CONF={conf}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and _environ_has(int(entry.name), needle):
            pids.append(int(entry.name))
    return pids


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    pids: dict[str, int] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    # ------------------------------------------------------------------------------------
    # start / stop

    @classmethod
    def start(cls, timeout: float = 60.0) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise ClusterError("starting slurmd needs root (it launches jobs as their user)")
        missing = missing_binaries()
        if missing:
            raise ClusterError(f"SLURM binaries missing: {', '.join(missing)}")
        cleanup_stale()
        REGISTRY.mkdir(mode=0o755, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="cluster-", dir=REGISTRY))
        root.chmod(0o755)  # munged (user munge) must reach its folder inside
        cluster = cls(root=root, conf=root / "slurm.conf")
        try:
            cluster._start_daemons(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_daemons(self, timeout: float) -> None:
        root = self.root
        for name in ("state", "spool", "log"):
            (root / name).mkdir()
        munge_dir = root / "munge"
        munge_dir.mkdir()
        munge_dir.chmod(0o755)  # munged: the socket folder must be reachable by everyone
        try:
            munge_user = pwd.getpwnam("munge")
        except KeyError:
            munge_user = None
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        if munge_user is not None:
            for path in (munge_dir, key):
                os.chown(path, munge_user.pw_uid, munge_user.pw_gid)
        socket_path = munge_dir / "munge.socket"
        self._record()
        self._spawn(
            "munged",
            [_which("munged"), "--foreground", f"--socket={socket_path}", f"--key-file={key}",
             f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
             f"--seed-file={munge_dir / 'munged.seed'}", "--num-threads=2"]
            + ([] if munge_user is not None else ["--force"]),
            user=munge_user,
        )
        self._wait_for(lambda: socket_path.exists(), timeout, "munged to create its socket")

        # SLURM 22.05 drops GPUs without device files; links to /dev/null are character devices.
        (root / "dev").mkdir()
        for i in range(GPUS):
            (root / "dev" / f"gpu{i}").symlink_to("/dev/null")
        (root / "gres.conf").write_text(
            f"AutoDetect=off\nNodeName=localhost Name=gpu File={root / 'dev'}/gpu[0-{GPUS - 1}]\n")
        self.conf.write_text(self._config(socket_path, *_free_ports(2)))
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait_for(self._node_idle, timeout, "the node to come up idle")

    def _config(self, munge_socket: Path, ctld_port: int, slurmd_port: int) -> str:
        root = self.root
        return f"""\
# Written by tests/slurm/cluster.py: a one-node test cluster, no systemd, no cgroups.
ClusterName=gpttest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again cred_expire + 1 s after its requeue (its old job
# credential must have expired), ~6 s instead of 121 s; 5 is the least SLURM accepts (below it
# warns "AuthInfo=cred_expire=N invalid" and falls back to 120).
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SlurmctldParameters=preempt_send_user_signal
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=10
MinJobAge=600
# Partition-priority preemption without accounting: jobs in `urgent` requeue jobs in `debug`.
# With GraceTime and preempt_send_user_signal (PreemptParameters=send_user_signal from 23.02),
# a preempted job first gets its --signal (B:USR1), as on a cluster set up for checkpointing
# jobs, and is requeued at the end of the grace time at the latest.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# Two pretend GPUs (device files that are links to /dev/null): jobs ask for them with
# --gpus-per-node as on a GPU cluster and SLURM sets SLURM_GPUS_ON_NODE; training runs on CPU.
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs={CPUS} Gres=gpu:{GPUS} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60
PartitionName=urgent Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
"""

    def _spawn(self, name: str, argv: list[str], user: pwd.struct_passwd | None = None) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        kwargs = {}
        if user is not None:
            kwargs = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        # SLURM_CONF in the daemons' environment marks their children (slurmstepd, jobs) as ours.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.root, env=self.env(), start_new_session=True, **kwargs)
        log.close()
        self.procs.append(proc)
        self.pids[name] = proc.pid
        self._record()

    def _record(self) -> None:
        """Note owner and daemons, so that a later start() can clean up after a killed session."""
        (self.root / "owner.json").write_text(json.dumps({"owner": os.getpid(), "pids": self.pids}))

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise ClusterError(f"{proc.args[0]} exited with {proc.returncode} while waiting "
                                       f"for {what}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.1)
        raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def _node_idle(self) -> bool:
        result = self.run("sinfo", "--noheader", "--format=%t", "--partition=debug", check=False)
        return result.returncode == 0 and result.stdout.strip() == "idle"

    def stop(self) -> None:
        """Cancel every job, end the daemons this cluster started, then any job leftovers."""
        if "slurmctld" in self.pids and _alive(self.pids["slurmctld"]):
            self.run("scancel", "--full", "--user=root", check=False, timeout=10)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.jobs_running():
                time.sleep(0.2)
        _kill_and_wait([self.pids[n] for n in ("slurmd", "slurmctld", "munged") if n in self.pids])
        # Whatever is left with our SLURM_CONF: job processes or a slurmstepd of a job that
        # did not end (normally nothing).
        stray = _job_processes(self.conf)
        if stray:
            _kill_and_wait(stray, timeout=5)
        for proc in self.procs:
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def jobs_running(self) -> bool:
        result = self.run("squeue", "--noheader", "--states=RUNNING,COMPLETING", check=False)
        return result.returncode == 0 and bool(result.stdout.strip())

    # ------------------------------------------------------------------------------------
    # clients

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def run(self, *argv: str, check: bool = True, timeout: float = 30, env: dict | None = None,
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                                env=env or self.env(), cwd=cwd)
        if check and result.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} failed ({result.returncode}): "
                               f"{result.stdout}{result.stderr}")
        return result

    def sbatch(self, *argv: str, env: dict | None = None, cwd=None) -> int:
        out = self.run("sbatch", "--parsable", *argv, env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.run("scontrol", "--oneliner", "show", "job", str(job_id)).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            parts.append(f"--- {path.name} (last 40 lines) ---\n" + "\n".join(text.splitlines()[-40:]))
        return "\n".join(parts)


def cleanup_stale() -> None:
    """Stop clusters whose owner process is gone (a test session killed before its teardown)."""
    if not REGISTRY.is_dir():
        return
    for root in REGISTRY.glob("cluster-*"):
        try:
            owner = json.loads((root / "owner.json").read_text())
        except (OSError, ValueError):
            owner = None
        if owner is not None and _alive(owner["owner"]):
            continue  # another live session's cluster: not ours to touch
        if owner is None and time.time() - root.stat().st_mtime < 60:
            continue  # being created right now
        conf = root / "slurm.conf"
        pids = [pid for pid in _job_processes(conf)] if conf.exists() else []
        for name, pid in (owner or {}).get("pids", {}).items():
            if _alive(pid) and name in _cmdline(pid) and str(root) in _cmdline(pid):
                pids.append(pid)
        _kill_and_wait(pids, timeout=5)
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    cluster = SlurmCluster.start()
    try:
        print(f"cluster up in {cluster.root}\n  export SLURM_CONF={cluster.conf}\n"
              f"partitions: debug (default), urgent (preempts debug); {CPUS} CPUs, {GPUS} pretend "
              f"GPUs. Ctrl-C stops it.", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
