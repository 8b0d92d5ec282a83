"""A real SLURM cluster on this machine, for tests: munged, slurmctld and one slurmd per node.

No systemd and no cgroups are needed: the daemons run in the foreground as children of this
process, with their config, state, spool, logs and munge socket in one temporary folder, on
free ports, so that several clusters (several test sessions) can run side by side.

    cluster = SlurmCluster.start()      # ~2 s; raises ClusterError with the daemons' logs
    cluster.run("sbatch", ...)          # client commands get SLURM_CONF from cluster.env()
    cluster.stop()                      # cancels jobs, ends the PIDs it started, then any
                                        # process left with its SLURM_CONF (job leftovers)

`start()` gives one node, `localhost` (127.0.0.1), with GPUS pretend GPUs. `start(nodes=2,
gpus=(2, 1))` gives node1 and node2, each a slurmd in a Linux network namespace of its own
(needs `ip` from iproute2, and nsenter/unshare): a bridge here holds the controller's address
10.x.y.1 (a /24 no route here uses), node k has 10.x.y.(k+1) on a veth pair into it, its node
name as host name (a UTS namespace) and an /etc/hosts naming every node (a mount namespace with
the cluster's `hosts` bound over it). So jobs span nodes as on a real cluster: srun reaches the
other node's slurmd, torchrun and gloo connect node to node by name, and a port taken on one
node is free on the other. The processes stay in this PID namespace, so stop() finds them.

A cluster whose owner process died without `stop()` (a killed pytest) is cleaned up by the
next `start()`: each cluster records its owner, daemon PIDs and network links under REGISTRY.

Run it by hand to try the slurm/ scripts (as root):
    .venv/bin/python tests/slurm/cluster.py      # prints `export SLURM_CONF=...`, Ctrl-C stops
    .venv/bin/python tests/slurm/cluster.py --nodes 2 --gpus 2,1
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import random
import re
import secrets
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


def network_namespaces_refused() -> str | None:
    """Why this machine will not make a network namespace (a container without CAP_SYS_ADMIN /
    CAP_NET_ADMIN, say), or None: a probe, so that such a machine skips the multi-node tests
    while a failure in building the cluster's network itself still fails them."""
    probe = f"gsprobe{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


def missing_network_tools() -> list[str]:
    """What a cluster of several nodes needs besides SLURM: `ip` (iproute2) for the network
    namespaces, `nsenter` and `unshare` (util-linux) to start a slurmd in one."""
    return [name for name in ("ip", "nsenter", "unshare") if not shutil.which(name)
            and not any(os.path.exists(f"{d}/{name}") for d in ("/usr/sbin", "/usr/bin", "/sbin"))]


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
class Node:
    """One slurmd: its node name, the address slurmctld reaches it on, its pretend GPUs, and the
    network namespace it runs in (None for the one-node cluster's `localhost`)."""
    name: str
    address: str
    gpus: int
    netns: str | None = None
    cpus: int = CPUS


@dataclass
class Network:
    """The links of a multi-node cluster: a bridge in this (root) network namespace that holds
    the controller's address, and one network namespace per node joined to it by a veth pair.
    Recorded in owner.json, so that cleanup_stale() can remove them after a killed session."""
    bridge: str
    controller: str  # the bridge's address, where slurmctld listens for the nodes
    netns: list[str]
    veths: list[str]  # the root-namespace ends; the other ends die with their namespace


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([_which("ip"), *argv], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise ClusterError(f"ip {' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _free_subnet() -> str:
    """A private /24 (10.x.y, else 172.16-31.y, else 192.168.y: a host may route all of 10/8)
    that no route or address here overlaps, picked at random so that clusters of test sessions
    side by side do not choose the same one."""
    listed = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "addr").stdout
    taken = [ipaddress.ip_network(net, strict=False)
             for net in re.findall(r"\b\d+\.\d+\.\d+\.\d+(?:/\d+)?", listed)]
    ranges = (lambda: f"10.{random.randint(64, 254)}.{random.randint(0, 254)}",
              lambda: f"172.{random.randint(16, 31)}.{random.randint(0, 254)}",
              lambda: f"192.168.{random.randint(0, 254)}")
    for pick in ranges:
        for _ in range(100):
            prefix = pick()
            if not any(ipaddress.ip_network(f"{prefix}.0/24").overlaps(net) for net in taken):
                return prefix
    raise ClusterError("found no free private /24 subnet for the cluster's bridge")


def _remove_network(network: Network) -> None:
    """Undo _make_network, whatever part of it was done (each step may fail: already gone)."""
    for ns in network.netns:
        _ip("netns", "delete", ns, check=False)
    for veth in network.veths:
        _ip("link", "delete", veth, check=False)
    _ip("link", "delete", network.bridge, check=False)


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    nodes: list[Node] = field(default_factory=list)
    network: Network | None = None
    pids: dict[str, int] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    # ------------------------------------------------------------------------------------
    # start / stop

    @classmethod
    def start(cls, nodes: int = 1, gpus: tuple[int, ...] | None = None,
              timeout: float = 60.0) -> "SlurmCluster":
        """One node (`localhost`, GPUS pretend GPUs), or `nodes` nodes named node1, node2, ...
        each in its own network namespace, with gpus[k] pretend GPUs on node k+1."""
        gpus = tuple(gpus) if gpus is not None else (GPUS,) * nodes
        if len(gpus) != nodes or nodes < 1:
            raise ValueError(f"gpus={gpus} must give one GPU count for each of the {nodes} nodes")
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
            if nodes == 1:
                cluster.nodes = [Node("localhost", "127.0.0.1", gpus[0])]
            else:
                cluster._make_network(gpus)
            cluster._start_daemons(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _make_network(self, gpus: tuple[int, ...]) -> None:
        """A bridge here with the controller's address, and per node a network namespace joined
        to it by a veth pair, with the node's address; and the nodes' /etc/hosts (root/hosts).
        Names carry a random tag, so clusters side by side do not clash (at most 15 characters:
        the kernel's limit for interface names)."""
        tag = secrets.token_hex(2)
        subnet = _free_subnet()
        n = len(gpus)
        self.network = Network(bridge=f"gsb{tag}", controller=f"{subnet}.1",
                               netns=[f"gs{tag}n{k}" for k in range(n)],
                               veths=[f"gs{tag}v{k}" for k in range(n)])
        self.nodes = [Node(f"node{k + 1}", f"{subnet}.{k + 2}", g, netns=self.network.netns[k])
                      for k, g in enumerate(gpus)]
        self._record()  # before anything exists, so that a killed session's links are found
        net = self.network
        _ip("link", "add", net.bridge, "type", "bridge")
        _ip("addr", "add", f"{net.controller}/24", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        # torchrun and gloo resolve the node names (the rendezvous host, each agent's own host
        # name); `localhost` must stay 127.0.0.1.
        (self.root / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n" + "".join(
            f"{node.address} {node.name}\n" for node in self.nodes))
        for k, node in enumerate(self.nodes):
            veth, peer = net.veths[k], f"gs{tag}p{k}"
            _ip("netns", "add", node.netns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", veth, "master", net.bridge)
            _ip("link", "set", veth, "up")
            _ip("link", "set", peer, "netns", node.netns)
            _ip("-n", node.netns, "addr", "add", f"{node.address}/24", "dev", peer)
            _ip("-n", node.netns, "link", "set", peer, "up")
            _ip("-n", node.netns, "link", "set", "lo", "up")

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
        gres = "AutoDetect=off\n"
        for node in self.nodes:
            if node.gpus == 0:
                continue
            dev = root / "dev" if self.network is None else root / "dev" / node.name
            dev.mkdir(parents=True)
            for i in range(node.gpus):
                (dev / f"gpu{i}").symlink_to("/dev/null")
            gres += f"NodeName={node.name} Name=gpu File={dev}/gpu[0-{node.gpus - 1}]\n"
        (root / "gres.conf").write_text(gres)
        self.conf.write_text(self._config(socket_path, *_free_ports(2)))
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        if self.network is None:
            self._spawn("slurmd", [_which("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])
        else:
            for node in self.nodes:
                self._spawn_node(node)
        self._wait_for(self._node_idle, timeout, "the nodes to come up idle")

    def _spawn_node(self, node: Node) -> None:
        """The node's slurmd in its network namespace, with its own host name (UTS namespace):
        torchrun's agents tell each other their host names, so two nodes both named like this
        machine would all connect to the first one. And with its own /etc/hosts (mount
        namespace) that names every node. Not `ip netns exec`, which would do the last itself
        but also mounts a fresh /sys without /sys/fs/cgroup, where slurmd fails to start
        ("Unable to initialize cgroup plugin")."""
        (self.root / "spool" / node.name).mkdir()
        self._spawn(f"slurmd@{node.name}", [
            _which("nsenter"), f"--net=/var/run/netns/{node.netns}",
            _which("unshare"), "--uts", "--mount",
            "sh", "-c", 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"',
            "sh", node.name, str(self.root / "hosts"),
            _which("slurmd"), "-D", "-N", node.name, "-f", str(self.conf)])

    def _config(self, munge_socket: Path, ctld_port: int, slurmd_port: int) -> str:
        root = self.root
        names = ",".join(node.name for node in self.nodes)
        # Each node's own Gres line (no Gres= on a node without GPUs).
        node_lines = "\n".join(
            f"NodeName={node.name} NodeAddr={node.address} CPUs={node.cpus}"
            + (f" Gres=gpu:{node.gpus}" if node.gpus else "") + " State=UNKNOWN"
            for node in self.nodes)
        if self.network is None:
            controller = "127.0.0.1"
            slurmd_files = f"""\
SlurmdSpoolDir={root / 'spool'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}"""
        else:
            # The nodes reach slurmctld on the bridge; the slurmds share this file, so their own
            # files are told apart by %n (the node name, as slurmd -N gives it).
            controller = self.network.controller
            slurmd_files = f"""\
SlurmdSpoolDir={root / 'spool' / '%n'}
SlurmdPidFile={root / 'slurmd-%n.pid'}
SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}"""
        return f"""\
# Written by tests/slurm/cluster.py: a test cluster of {len(self.nodes)} node(s), no systemd, no cgroups.
ClusterName=gpttest
SlurmctldHost=localhost({controller})
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
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
{slurmd_files}
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
# Pretend GPUs (device files that are links to /dev/null): jobs ask for them with
# --gpus-per-node as on a GPU cluster and SLURM sets SLURM_GPUS_ON_NODE; training runs on CPU.
GresTypes=gpu
{node_lines}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60
PartitionName=urgent Nodes={names} MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
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
        """Note owner, daemons and network, so that a later start() can clean up after a killed
        session."""
        record = {"owner": os.getpid(), "pids": self.pids}
        if self.network is not None:
            record["network"] = vars(self.network)
        # Written aside, then renamed: another session's cleanup_stale() must never read it half
        # written, which would leave only the 60-second "being created" rule between this live
        # cluster and its daemons being killed.
        partial = self.root / "owner.json.partial"
        partial.write_text(json.dumps(record))
        os.replace(partial, self.root / "owner.json")

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
        result = self.run("sinfo", "--noheader", "--Node", "--format=%t", "--partition=debug",
                          check=False)
        states = result.stdout.split()
        return result.returncode == 0 and states == ["idle"] * len(self.nodes)

    def stop(self) -> None:
        """Cancel every job, end the daemons this cluster started, then any job leftovers."""
        if "slurmctld" in self.pids and _alive(self.pids["slurmctld"]):
            self.run("scancel", "--full", "--user=root", check=False, timeout=10)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.jobs_running():
                time.sleep(0.2)
        slurmds = [pid for name, pid in self.pids.items() if name.split("@")[0] == "slurmd"]
        _kill_and_wait(slurmds + [self.pids[n] for n in ("slurmctld", "munged") if n in self.pids])
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
        if self.network is not None:
            _remove_network(self.network)
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
        try:
            young = time.time() - root.stat().st_mtime < 60
        except FileNotFoundError:
            continue  # stopped by its own session (another pytest-xdist worker) since the glob
        if owner is None and young:
            continue  # being created right now
        conf = root / "slurm.conf"
        pids = [pid for pid in _job_processes(conf)] if conf.exists() else []
        for name, pid in (owner or {}).get("pids", {}).items():
            # "slurmd@node1": the slurmd of node1 (its command line says slurmd)
            if _alive(pid) and name.split("@")[0] in _cmdline(pid) and str(root) in _cmdline(pid):
                pids.append(pid)
        _kill_and_wait(pids, timeout=5)
        if (owner or {}).get("network"):
            _remove_network(Network(**owner["network"]))
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description="A SLURM test cluster on this machine (as root).")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus", help="pretend GPUs of each node, comma-separated (default: "
                        f"{GPUS} each)")
    args = parser.parse_args()
    gpus = tuple(int(g) for g in args.gpus.split(",")) if args.gpus else None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    cluster = SlurmCluster.start(nodes=args.nodes, gpus=gpus)
    try:
        nodes = ", ".join(f"{n.name} ({n.address}: {n.cpus} CPUs, {n.gpus} pretend GPUs)"
                          for n in cluster.nodes)
        print(f"cluster up in {cluster.root}\n  export SLURM_CONF={cluster.conf}\n"
              f"partitions: debug (default), urgent (preempts debug); nodes: {nodes}. "
              f"Ctrl-C stops it.", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
