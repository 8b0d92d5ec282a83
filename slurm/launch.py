"""torchrun, for batch jobs: `python slurm/launch.py [torchrun options] train.py [train options]`.

The same launcher as `torchrun` (it calls `torch.distributed.run.main`), with four changes
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
   rendezvous works even where node names are not the machines' host names.
4. With --max-restarts above 0 it sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (unless set), which
   restarted workers need to reach the rendezvous (otherwise they hang silently).
"""

from __future__ import annotations

import os
import signal
import sys

PREEMPTED_EXIT_CODE = 75  # gpt.stop.PREEMPTED_EXIT_CODE (not imported: keep start-up light)
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def _has_option(argv: list[str], name: str) -> bool:
    """Whether a torchrun option (spelled with '-' or '_') appears before the training script."""
    spellings = {f"--{name}", f"--{name.replace('-', '_')}"}
    for arg in argv:
        if not arg.startswith("-"):
            return False  # the training script: what follows are its own options
        if arg.split("=", 1)[0] in spellings:
            return True
    return False


def _torchrun_knows(option: str) -> bool:
    from torch.distributed.run import get_args_parser

    return any(option in action.option_strings for action in get_args_parser()._actions)


def _option_value(argv: list[str], name: str) -> str | None:
    """The value of a torchrun option (`--name=V` or `--name V`, '-' or '_') before the script."""
    spellings = {f"--{name}", f"--{name.replace('-', '_')}"}
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            return None
        key, eq, value = arg.partition("=")
        if key in spellings:
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


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


def torchrun_args(argv: list[str], env: dict[str, str]) -> list[str]:
    extra = []
    # torchrun handles SIGTERM itself unless told otherwise (in versions that have the option).
    if (not _has_option(argv, "signals-to-handle") and "PET_SIGNALS_TO_HANDLE" not in env
            and _torchrun_knows("--signals-to-handle")):
        extra.append("--signals-to-handle=SIGINT,SIGHUP,SIGQUIT")
    if not _has_option(argv, "rdzv-conf") and "SLURM_NODEID" in env:
        extra.append(f"--rdzv-conf=is_host={int(env['SLURM_NODEID'] == '0')}")
    return extra + argv


def main(argv: list[str]) -> int:
    for sig in IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    os.environ.update(torchrun_env(argv, dict(os.environ)))
    try:
        torchrun(torchrun_args(argv, dict(os.environ)))
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
