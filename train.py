"""Train a GPT: `python train.py [--config FILE] [--key=value ...]`.

With no arguments it runs configs/default.toml: the embedded Python-stdlib corpus (prepared on
first use, no download) and a model small enough for a laptop CPU. The same script runs under
`torchrun --nproc_per_node=N train.py ...`. See `python train.py --help` for every key.
"""

import os
import sys
from pathlib import Path


def early_config_error(argv: list[str], default_config: Path) -> int | None:
    """Parse the settings before torch imports (gpt.config imports no torch): `--help` and a
    typo in a key are answered at once, not after the seconds torch takes to import (gpt.cli
    imports it). Returns the exit status for a bad configuration in a single process, else None:
    under torchrun the error is left to run_train, which prints it once per job (gpt/cli.py
    say_error), and a good configuration is parsed again there. --help exits here (SystemExit)."""
    from gpt.config import ConfigError, parse_args

    try:
        parse_args(argv, default_config=str(default_config))
    except ConfigError as e:
        try:
            world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        except ValueError:  # what the error itself is about (gpt/config.py check_launch_environment)
            world_size = 1
        if world_size > 1:
            return None
        print(f"error: {e}", file=sys.stderr, flush=True)  # as gpt/cli.py report_errors prints it
        return 2
    return None


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpt.early_signals import EarlyStopSignals  # no torch: in place before torch imports

    early = EarlyStopSignals().install()
    exit_process = sys.exit  # gpt/cli.py's, once imported
    default_config = Path(__file__).resolve().parent / "configs" / "default.toml"
    try:
        code = early_config_error(sys.argv[1:], default_config)
        if code is None:
            from gpt.cli import exit_process, run_train

            code = run_train(sys.argv[1:], default_config=default_config)
    except SystemExit as e:
        # The trainer's exit code after a stop signal, once saved: 75 (or 130 for Ctrl-C), raised
        # after the process group was shut down (gpt/trainer.py train). Also --help's 0, or
        # argparse's 2 for a bad option, from early_config_error.
        code = e.code
    except KeyboardInterrupt:
        # Ctrl-C while torch imports (a few seconds; longer on a network file system), before
        # run_train's handler is in place: it printed a traceback into torch's import machinery.
        print("interrupted: stopped before training started; nothing was written", file=sys.stderr, flush=True)
        code = 130
    finally:
        early.restore()
    exit_process(code)
