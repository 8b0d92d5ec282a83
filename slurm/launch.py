"""torchrun, for batch jobs: `python slurm/launch.py [torchrun options] train.py [train options]`.

The same launcher as `torchrun` (it calls `torch.distributed.run.main`), with five changes
that let a SLURM job checkpoint and requeue itself (see slurm/train.sbatch and docs/slurm.md):

1. The launcher ignores SIGUSR1 and SIGTERM. SLURM signals every process of a job step; the
   workers (train.py) stop at the next step boundary, save a checkpoint and exit with 75,
   while the launcher keeps running and collects their exit codes. Left to itself, torchrun
   would die of SIGUSR1 (orphaning its workers) and answer SIGTERM by terminating them and
   killing them 30 s later, maybe in the middle of a checkpoint save. The workers inherit the
   ignored signals. train.py notes one that arrives while torch imports (the trainer then
   stops after its first step), and puts the inherited SIG_IGN back for its exit: a worker
   still exiting when another has exited ignores torchrun's clean-up SIGTERM and exits with
   75 itself, also when the other died of gloo's rare abort at exit (-6). Only a signal in
   the ~0.1 s before train.py runs is dropped; slurm/train.sbatch repeats it.
2. It exits with 75 when a worker exited with 75 (the trainer's "checkpoint saved, run me
   again"), so the batch script can tell a stop that asks for a requeue from a crash; torchrun
   itself exits with 1 in both cases. One 75 is enough: the trainer exits with 75 only after
   the checkpoint is complete on every rank, and torchrun's clean-up of a worker still
   exiting then (SIGTERM, which it ignores, and SIGKILL 30 s later) is harmless at that point.
3. Under srun, the node with SLURM_NODEID=0 hosts the c10d rendezvous store (is_host), so the
   rendezvous works even where node names are not the machines' host names (added to a
   --rdzv-conf of the user's). A rendezvous port already taken on that node is one line that
   says to set RDZV_PORT, not two tracebacks.
4. With --max-restarts above 0 it sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (unless set), which
   restarted workers need to reach the rendezvous (otherwise they hang silently).
5. Under srun without --nproc-per-node, it starts one worker per GPU SLURM gave this node
   (SLURM_GPUS_ON_NODE; 1 without GPUs), not torchrun's 1. Nodes of one job may have different
   GPU counts (`sbatch --nodes=2 --gpus=3` gives 2 and 1), which only each node itself knows:
   slurm/train.sbatch leaves the option out for a job of several nodes.
"""

from __future__ import annotations

import os
import signal
import sys

PREEMPTED_EXIT_CODE = 75  # gpt.stop.PREEMPTED_EXIT_CODE (not imported: keep start-up light)
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def _torchrun_options(argv: list[str]) -> tuple[set[str], int]:
    """The torchrun options before the training script (as spelled, without `=value`), and the
    index of the training script. A value may follow its option as the next argument
    (`--max-restarts 3`), so that argument is not the training script."""
    from torch.distributed.run import get_args_parser

    takes_value = {s: a.nargs != 0 for a in get_args_parser()._actions for s in a.option_strings}
    options = set()
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        key, eq, _ = argv[i].partition("=")
        options.add(key)
        i += 1 if eq or not takes_value.get(key, False) else 2
    return options, min(i, len(argv))


def _spellings(name: str) -> set[str]:
    return {f"--{name}", f"--{name.replace('-', '_')}"}


def _has_option(argv: list[str], name: str) -> bool:
    """Whether a torchrun option (spelled with '-' or '_') appears before the training script."""
    return bool(_spellings(name) & _torchrun_options(argv)[0])


def _torchrun_knows(option: str) -> bool:
    from torch.distributed.run import get_args_parser

    return any(option in action.option_strings for action in get_args_parser()._actions)


def _option_value(argv: list[str], name: str) -> str | None:
    """The value of a torchrun option (`--name=V` or `--name V`, '-' or '_') before the script;
    the last one where it is given twice, as torchrun takes the last."""
    value = None
    end = _torchrun_options(argv)[1]
    for i, arg in enumerate(argv[:end]):
        key, eq, v = arg.partition("=")
        if key in _spellings(name):
            value = v if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return value


def torchrun_env(argv: list[str], env: dict[str, str]) -> dict[str, str]:
    """Environment variables to add for torchrun. With --max-restarts above 0, torchrun's
    default of sharing its rendezvous TCP store with the workers makes the restarted workers
    hang in init_process_group (seen for minutes, nothing printed) or fail there with gloo's
    "Connection refused" (the store still holds the first workers' addresses; torch 2.13), so the
    restart promised by --max-restarts never trains; TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (see
    docs/checkpoints.md) makes them start their own store, and the restart resumes from `latest`."""
    restarts = _option_value(argv, "max-restarts") or env.get("PET_MAX_RESTARTS", "0")
    try:
        restarting = int(restarts) > 0
    except ValueError:
        restarting = False  # torchrun itself names the bad value
    if restarting and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env:
        return {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return {}


def gpus_on_node(env: dict[str, str]) -> int:
    """The GPUs SLURM gave this node: SLURM_GPUS_ON_NODE ("8", or "a100:8" on some versions),
    else SLURM_GPUS_PER_NODE (--gpus-per-node, the same on every node); 0 without either."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        count = env.get(name, "").rpartition(":")[2]
        if count.isdigit():
            return int(count)
    return 0


def torchrun_args(argv: list[str], env: dict[str, str]) -> list[str]:
    extra = []
    # torchrun handles SIGTERM itself unless told otherwise (in versions that have the option).
    if (not _has_option(argv, "signals-to-handle") and "PET_SIGNALS_TO_HANDLE" not in env
            and _torchrun_knows("--signals-to-handle")):
        extra.append("--signals-to-handle=SIGINT,SIGHUP,SIGQUIT")
    if "SLURM_NODEID" not in env:
        return extra + argv
    if not _has_option(argv, "nproc-per-node") and "PET_NPROC_PER_NODE" not in env:
        extra.append(f"--nproc-per-node={max(gpus_on_node(env), 1)}")
    # A --rdzv-conf of the user's (join_timeout=..., say) must not drop is_host: without it
    # torchrun guesses the host from host names, and where node names are not host names no node
    # hosts the store and every node waits out the join timeout. torchrun takes the last one.
    conf = _option_value(argv, "rdzv-conf")
    if conf is None:
        conf = env.get("PET_RDZV_CONF", "")
    if any(item.split("=", 1)[0].strip() == "is_host" for item in conf.split(",")):
        return extra + argv
    is_host = f"is_host={int(env['SLURM_NODEID'] == '0')}"
    end = _torchrun_options(argv)[1]
    merged = f"--rdzv-conf={conf},{is_host}" if conf.strip() else f"--rdzv-conf={is_host}"
    return extra + argv[:end] + [merged] + argv[end:]


def _free_port_hint() -> int | str:
    """A port free on this node now, in the range train.sbatch's default takes (29500-32499): the
    kernel's own pick (port 0) is an ephemeral port, which outgoing connections may take by the
    time the job runs again."""
    import random
    import socket

    for port in random.sample(range(29500, 32500), 50):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    return "one between 29500 and 32499"


def main(argv: list[str]) -> int:
    for sig in IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.run import main as torchrun

    os.environ.update(torchrun_env(argv, dict(os.environ)))
    args = torchrun_args(argv, dict(os.environ))
    if "SLURM_NODEID" in os.environ:
        # The batch script's header cannot say it for nodes with different GPU counts.
        node = os.environ.get("SLURMD_NODENAME") or f"node {os.environ['SLURM_NODEID']}"
        count = _option_value(args, "nproc-per-node") or os.environ.get("PET_NPROC_PER_NODE", "1")
        print(f"launch.py: {node}: {count} training process(es)", file=sys.stderr, flush=True)
    try:
        torchrun(args)
    except RendezvousConnectionError as e:
        # The node that hosts the rendezvous cannot listen on its port: another job on this
        # node (or another program) holds it. torchrun prints two tracebacks ending in "See
        # inner exception for details", and the other nodes wait out the join timeout.
        if "EADDRINUSE" not in str(e.__cause__):
            raise
        endpoint = _option_value(argv, "rdzv-endpoint") or os.environ.get("PET_RDZV_ENDPOINT", "")
        print(f"launch.py: the rendezvous port of {endpoint} is in use on this node (another job "
              f"or program holds it): set RDZV_PORT to a free port (e.g. {_free_port_hint()}) and "
              f"submit again", file=sys.stderr, flush=True)
        return 1
    except ChildFailedError as e:
        codes = sorted({failure.exitcode for failure in e.failures.values()})
        if PREEMPTED_EXIT_CODE in codes:
            print(f"launch.py: workers stopped with exit code {PREEMPTED_EXIT_CODE} (checkpoint "
                  f"saved; run again to resume); exit codes {codes}", file=sys.stderr, flush=True)
            return PREEMPTED_EXIT_CODE
        print(f"launch.py: workers failed with exit codes {codes}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
