"""Train a GPT: `python train.py [--config FILE] [--key=value ...]`.

With no arguments it runs configs/default.toml: the embedded Python-stdlib corpus (prepared on
first use, no download) and a model small enough for a laptop CPU. The same script runs under
`torchrun --nproc_per_node=N train.py ...`. See `python train.py --help` for every key.
"""

import signal
import sys
from pathlib import Path


class EarlyStopSignals:
    """Remembers SIGTERM/SIGUSR1 (a preemption, SLURM's warning) that arrive while torch imports,
    the second or so before the trainer installs its own handler: by default they would kill the
    run with no checkpoint and no requeue exit code. The trainer's StopFlag takes over what was
    `caught` (see StopFlag.install)."""

    def __init__(self) -> None:
        self.caught: list[int] = []

    def __call__(self, signum, frame) -> None:
        self.caught.append(signum)

    def install(self) -> "EarlyStopSignals":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self)
        return self


if __name__ == "__main__":
    EarlyStopSignals().install()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpt.cli import run_train

    sys.exit(run_train(sys.argv[1:], default_config=Path(__file__).resolve().parent / "configs" / "default.toml"))
