"""Train a GPT: `python train.py [--config FILE] [--key=value ...]`.

With no arguments it runs configs/default.toml: the embedded Python-stdlib corpus (prepared on
first use, no download) and a model small enough for a laptop CPU. The same script runs under
`torchrun --nproc_per_node=N train.py ...`. See `python train.py --help` for every key.
"""

import sys
from pathlib import Path


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpt.early_signals import EarlyStopSignals  # no torch: in place before torch imports

    early = EarlyStopSignals().install()
    try:
        from gpt.cli import exit_process, run_train

        code = run_train(sys.argv[1:], default_config=Path(__file__).resolve().parent / "configs" / "default.toml")
    except SystemExit as e:  # the trainer's own exit code: 75 (or 130) after a stop signal, once saved
        # (raised after the process group was shut down: gpt/trainer.py train), ended the same way
        code = e.code
    finally:
        early.restore()
    exit_process(code)
