#!/usr/bin/env bash
# GPT-2 small (124M) throughput under DDP and FSDP2 in bf16: tokens/s and MFU per strategy.
#
#   bash benchmarks/gpu_scaleout.sh                 # every visible GPU (or NPROC=N), 30 steps each
#   NPROC=1 STEPS=30 BATCH=16 COMPILE=true bash benchmarks/gpu_scaleout.sh
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

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
STEPS=${STEPS:-30}
SKIP=${SKIP:-10}            # logged steps to ignore: compilation and allocator warm-up
BATCH=${BATCH:-16}          # sequences of 1024 per GPU per micro-step (16 fits 80 GB in bf16)
COMPILE=${COMPILE:-true}
DATA=${DATA:-/tmp/gpt_scaleout_data}
OUT=${OUT:-/tmp/gpt_scaleout_runs}
STRATEGIES=${STRATEGIES:-"ddp fsdp"}
RESULTS=${RESULTS:-benchmarks/results/gpu_scaleout.json}

if [ "$NPROC" -lt 1 ]; then
    echo "error: no GPU visible (nvidia-smi -L lists none); set NPROC to override" >&2
    exit 2
fi

# 1. Synthetic shards: 2 x 50M training tokens (enough windows that no batch repeats) + 1M val.
"$PYTHON" - "$DATA" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
from gpt.shards import write_shard

out = Path(sys.argv[1])
if not (out / "meta.json").exists():
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        write_shard(out / f"train_{i:06d}.bin", rng.integers(0, 50257, 50_000_000, dtype=np.uint16))
    write_shard(out / "val_000000.bin", rng.integers(0, 50257, 1_000_000, dtype=np.uint16))
    meta = {"tokenizer": "synthetic", "vocab_size": 50304, "eos_id": None,
            "source": "uniform random ids (benchmarks/gpu_scaleout.sh)"}
    (out / "meta.json").write_text(json.dumps(meta))
print(f"data: {out}")
EOF

# 2. One run per strategy. tokens_per_step = one micro-batch per GPU: no accumulation, so
#    the step time is the forward+backward+optimizer cost alone.
for strategy in $STRATEGIES; do
    rm -rf "${OUT:?}/$strategy"
    echo "=== $strategy on $NPROC GPU(s), bf16, compile=$COMPILE, batch $BATCH x 1024 per GPU"
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" train.py \
        --data_dir="$DATA" --out_dir="$OUT/$strategy" --prepare_source=none --resume=never \
        --device=cuda --dtype=bfloat16 --compile="$COMPILE" --parallel="$strategy" \
        --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --dropout=0 \
        --batch_size="$BATCH" --tokens_per_step=0 --max_steps="$STEPS" \
        --learning_rate=6e-4 --min_lr=6e-5 --warmup_steps=10 \
        --log_interval=1 --eval_interval=0 --eval_iters=1 --keep_last=1
done

# 3. Summary from metrics.jsonl.
"$PYTHON" - "$OUT" "$SKIP" "$RESULTS" "$NPROC" "$BATCH" "$COMPILE" $STRATEGIES <<'EOF'
import json, statistics, sys
from pathlib import Path
import torch

out, skip, results, nproc, batch, compile_ = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), *sys.argv[4:7]
rows = {}
for strategy in sys.argv[7:]:
    records = [json.loads(l) for l in (out / strategy / "metrics.jsonl").read_text().splitlines() if l.strip()]
    timed = records[skip:] or records
    rows[strategy] = {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "tokens_per_s_per_gpu": statistics.median(r["tokens_per_s_per_device"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed),
        "step_ms": statistics.median(r["step_ms"] for r in timed),
        "final_loss": records[-1]["loss"],
        "steps_timed": len(timed),
    }
print(f"\n{'strategy':<8} {'tokens/s':>12} {'per GPU':>12} {'MFU':>7} {'ms/step':>9} {'loss':>7}")
for strategy, r in rows.items():
    print(f"{strategy:<8} {r['tokens_per_s']:>12,.0f} {r['tokens_per_s_per_gpu']:>12,.0f} "
          f"{r['mfu'] * 100:>6.1f}% {r['step_ms']:>9.1f} {r['final_loss']:>7.3f}")
results.parent.mkdir(parents=True, exist_ok=True)
results.write_text(json.dumps({
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "torch": torch.__version__, "nproc": int(nproc), "batch_per_gpu": int(batch), "block": 1024,
    "compile": compile_ == "true", "dtype": "bfloat16", "model": "12 x 12 x 768, vocab 50304",
    "results": rows,
}, indent=1))
print(f"wrote {results}")
EOF
