"""Train a GPT: `python train.py [--config FILE] [--key=value ...]`.

With no arguments it runs configs/default.toml: the embedded Python-stdlib corpus (prepared on
first use, no download) and a model small enough for a laptop CPU. The same script runs under
`torchrun --nproc_per_node=N train.py ...`. See `python train.py --help` for every key.
"""

import sys
from pathlib import Path


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpt.config import early_config_error  # no torch
    from gpt.early_signals import EarlyStopSignals  # no torch: in place before torch imports

    early = EarlyStopSignals().install()
    exit_process = sys.exit  # gpt/cli.py's, once imported
    default_config = Path(__file__).resolve().parent / "configs" / "default.toml"
    try:
        code = early_config_error(sys.argv[1:], default_config)  # before torch imports: at once
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
