"""Generate text from a trained run: `python sample.py --out_dir out/default --prompt "def "`.

Loads the run's latest checkpoint (or --ckpt), streams tokens as they are generated, and uses
a KV cache so each new token costs one position of compute (on a CUDA GPU each token after the
prompt is one CUDA-graph replay of the decode step: gpt/static_decode.py). `--help` lists every
option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    from gpt.sampling import run_sample  # imports torch: a second or more, when Ctrl-C often comes
except KeyboardInterrupt:
    # run_sample turns a Ctrl-C into one line; one before it exists was a traceback into torch.
    print("interrupted: stopped before generating", file=sys.stderr, flush=True)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(run_sample(sys.argv[1:]))
