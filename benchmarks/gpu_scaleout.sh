#!/usr/bin/env bash
# GPT-2 small (124M) throughput under DDP and FSDP2 in bf16: tokens/s and MFU per strategy.
#
#   bash benchmarks/gpu_scaleout.sh                 # every visible GPU (or NPROC=N), 30 steps each
#   NPROC=1 STEPS=30 BATCH=16 COMPILE=true bash benchmarks/gpu_scaleout.sh
#
# DEVICE, DTYPE, TRAIN_TOKENS and EXTRA_ARGS (train.py options appended last, so they override
# the shape below) exist for the CPU smoke test of this script (tests/test_benchmark_scripts.py), which
# runs it on 2 CPU processes with a tiny model: a GPU session has minutes, not retries.
#
# Data: synthetic shards (uniform random ids below 50,257 in a 50,304-row vocabulary, as
# nanoGPT pads it) written once to $DATA: the throughput of a step does not depend on the text.
# Each strategy trains 12 layers x 12 heads x 768 wide, block 1024, from scratch for $STEPS
# steps under torchrun (even for one GPU, so DDP and FSDP really run), then this prints the
# median tokens/s, tokens/s per GPU and MFU of the logged steps after the first $SKIP (compile
# and warm-up), read from each run's metrics.jsonl, and writes them to benchmarks/results/.
# Not run in CI: it needs a CUDA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
# A stage limit in benchmarks/gpu.sh (`timeout`) signals this script and torchrun alike. Without a
# trap bash dies at once, `timeout` returns and gpu.sh starts its next stage while torchrun still
# stops its workers (train.py finishes its step and saves a checkpoint; torchrun kills them 30 s
# later), on the same GPU. With it, bash first waits for torchrun to exit, then exits itself.
trap 'echo "gpu_scaleout.sh: stopped by a signal; torchrun has exited" >&2; exit 143' TERM INT

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
# One line per GPU ("GPU 0: ..."); with MIG on, `nvidia-smi -L` adds an indented "MIG ..." line
# per instance, which are not more GPUs for torchrun.
NPROC=${NPROC:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)}
STEPS=${STEPS:-30}
SKIP=${SKIP:-10}            # logged steps to ignore: compilation and allocator warm-up
BATCH=${BATCH:-16}          # sequences of 1024 per GPU per micro-step (16 fits 80 GB in bf16)
COMPILE=${COMPILE:-true}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
TRAIN_TOKENS=${TRAIN_TOKENS:-50000000}   # per training shard (2 shards)
EXTRA_ARGS=${EXTRA_ARGS:-}
DATA=${DATA:-/tmp/gpt_scaleout_data}
RUNS=${RUNS:-/tmp/gpt_scaleout_runs}  # not $OUT: the GPU machine's tool sets OUT to the folder it copies back
STRATEGIES=${STRATEGIES:-"ddp fsdp"}
RESULTS=${RESULTS:-benchmarks/results/gpu_scaleout.json}

case $NPROC in
    '' | *[!0-9]*)
        echo "error: NPROC=$NPROC is not a number of processes: set NPROC to a whole number such as 1" >&2
        exit 2 ;;
esac
if [ "$NPROC" -lt 1 ]; then
    echo "error: no GPU visible (nvidia-smi -L lists none); set NPROC to override" >&2
    exit 2
fi

# 1. Synthetic shards: 2 x 50M training tokens (enough windows that no batch repeats) + 1M val.
"$PYTHON" - "$DATA" "$TRAIN_TOKENS" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
from gpt.shards import write_shard

out, n = Path(sys.argv[1]), int(sys.argv[2])
if not (out / "meta.json").exists():
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        write_shard(out / f"train_{i:06d}.bin", rng.integers(0, 50257, n, dtype=np.uint16))
    write_shard(out / "val_000000.bin", rng.integers(0, 50257, 1_000_000, dtype=np.uint16))
    meta = {"tokenizer": "synthetic", "vocab_size": 50304, "eos_id": None,
            "source": "uniform random ids (benchmarks/gpu_scaleout.sh)"}
    (out / "meta.json").write_text(json.dumps(meta))
print(f"data: {out}")
EOF

# 2. One run per strategy. tokens_per_step = one micro-batch per GPU: no accumulation, so
#    the step time is the forward+backward+optimizer cost alone.
for strategy in $STRATEGIES; do
    rm -rf "${RUNS:?}/$strategy"
    echo "=== $strategy on $NPROC x $DEVICE, $DTYPE, compile=$COMPILE, batch $BATCH per process"
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" train.py \
        --data_dir="$DATA" --out_dir="$RUNS/$strategy" --prepare_source=none --resume=never \
        --device="$DEVICE" --dtype="$DTYPE" --compile="$COMPILE" --parallel="$strategy" \
        --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --dropout=0 \
        --batch_size="$BATCH" --tokens_per_step=0 --max_steps="$STEPS" \
        --learning_rate=6e-4 --min_lr=6e-5 --warmup_steps=10 \
        --log_interval=1 --eval_interval=0 --eval_iters=1 --keep_last=1 $EXTRA_ARGS
done

# 3. Summary from metrics.jsonl (a figure logged as null, such as MFU on a GPU without a
#    datasheet peak, prints as n/a).
"$PYTHON" benchmarks/scaleout_summary.py "$RUNS" "$SKIP" "$RESULTS" "$NPROC" "$BATCH" $STRATEGIES
