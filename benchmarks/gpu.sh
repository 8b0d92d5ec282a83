#!/usr/bin/env bash
# The GPU speed check, in one call of under 8 minutes on one H100/H200-class GPU:
#
#   bash benchmarks/gpu.sh            # everything below; the log goes to benchmarks/results/gpu.txt (or $GPU_LOG)
#
# 1. GPT-2 small (12 x 12 x 768, block 1024), bf16, torch.compile, trained by train.py itself
#    (fused AdamW, TF32, the chunked loss, pinned non-blocking batches) on synthetic shards with
#    the vocabulary padded to 50,304 as nanoGPT does: tokens/s and MFU against the datasheet
#    bf16 peak of the detected GPU (gpt/mfu.py). Goal: MFU >= 50%. AdamW, as llm.c's and
#    Megatron's figures are: Muon's Newton-Schulz matmuls (~10% more FLOPs here) are not model
#    FLOPs. Reuses benchmarks/gpu_scaleout.sh with one process and no DDP/FSDP wrapper.
# 2. The same shape against Hugging Face GPT2LMHeadModel (vocab 50,257), side by side, bf16
#    autocast, ours eager and compiled, peer eager, and ours eager with the vocabulary padded to
#    50,304 as train.py pads it (vocab_multiple 64): what the padding is worth (benchmarks/bench_train.py).
# 3. Generation at batch 1 and 8, ours vs the peer's `generate` (benchmarks/bench_generate.py).
# 4. Stage 1 with Muon (what configs/default.toml trains with): it runs on a GPU under compile
#    and bf16, its loss falls like AdamW's, and what its step costs.
# 5. Checkpoint save/load of the 124M model and its AdamW state from the GPU to this machine's
#    disk (benchmarks/bench_checkpoint.py --device cuda; the results name the filesystem). Goal:
#    a synchronous save under 2 s.
# 6. The 124M training step with the chunked loss, the plain one, and the plain one at batch 32,
#    each compiled afresh in one process (benchmarks/bench_mfu.py): what each is worth.
#
# Each stage has its own time limit (480 s in all, each with a kill -k grace after it: 590 s at
# worst) so that one slow stage cannot take the whole call. Stages 1-5 run once on one H200
# (torch 2.11, fresh inductor cache): 281 s in all; 64 / 53 / 58 / 47 / 55 s (stage 1's first
# step, the compile, 24 s; stage 4 reuses its inductor cache: 12 s). Run alone in later
# sessions: stage 3 (with the CUDA-graph rows, 2 rounds) 45 s, stage 5 (3 repeats) 53 s, stage
# 6's three variants ~65 s (each compile ~20 s). The whole script has not run since stage 6 was added.
set -uo pipefail
# The log's path is taken before the cd below: a relative GPU_LOG means from where it was run.
LOG=$(realpath -m "${GPU_LOG:-$(dirname "$0")/results/gpu.txt}")  # not $LOG: too common a name to read
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
STEPS=${STEPS:-40}
BATCH=${BATCH:-16}

# A failed stage does not stop the others (each is worth its GPU minutes), but the script's exit
# status says so: it was always 0, a run whose every stage failed included.
failed_stages=""
stage_failed() {
    echo "stage $1 failed or timed out (exit $2)"
    failed_stages+=" $1"
}

# Checked here, not inside the logged block below: an `exit` there leaves only the block's
# subshell (it is a pipeline into tee), so the script went on and exited 0, having replaced the
# last GPU log with this error.
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: no GPU visible (nvidia-smi -L failed); benchmarks/gpu.sh needs a CUDA GPU" >&2
    exit 2
fi
mkdir -p benchmarks/results "$(dirname "$LOG")"

{
    echo "=== $(date -u +%FT%TZ) benchmarks/gpu.sh"
    nvidia-smi -L
    "$PYTHON" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

    echo; echo "=== 1. train.py: GPT-2 124M, bf16, compile, batch $BATCH x 1024, $STEPS steps [t=${SECONDS}s]"
    NPROC=1 STRATEGIES=none STEPS="$STEPS" SKIP=$((STEPS / 2)) BATCH="$BATCH" COMPILE=true \
        RESULTS=benchmarks/results/gpu_train.json EXTRA_ARGS="--optimizer=adamw" \
        timeout -k 35 110 bash benchmarks/gpu_scaleout.sh || stage_failed 1 $?

    echo; echo "=== 2. ours vs Hugging Face GPT2LMHeadModel, GPT-2 124M, bf16 autocast [t=${SECONDS}s]"
    timeout -k 10 80 "$PYTHON" -m benchmarks.bench_train --device cuda --shapes gpt2_124m --dtypes bfloat16 \
        --compile --vocab-multiple 64 --budget-s 10 --out gpu_train_vs_peer || stage_failed 2 $?

    echo; echo "=== 3. generation, 6 x 384 char model, batch 1 and 8, 1 + 255 tokens [t=${SECONDS}s]"
    timeout -k 10 70 "$PYTHON" -m benchmarks.bench_generate --device cuda --batches 1 8 --no-cache-batches 1 \
        --rounds 2 --budget-s 6 --out gpu_generate \
        || stage_failed 3 $?

    echo; echo "=== 4. stage 1 with Muon, $STEPS steps [t=${SECONDS}s]"
    NPROC=1 STRATEGIES=none STEPS="$STEPS" SKIP=$((STEPS / 2)) BATCH="$BATCH" COMPILE=true \
        RESULTS=benchmarks/results/gpu_train_muon.json EXTRA_ARGS="--optimizer=muon" \
        timeout -k 35 60 bash benchmarks/gpu_scaleout.sh || stage_failed 4 $?

    echo; echo "=== 5. checkpoint save/load, GPT-2 124M + AdamW state, from the GPU [t=${SECONDS}s]"
    timeout -k 10 70 "$PYTHON" benchmarks/bench_checkpoint.py --device cuda --repeats 3 \
        --results gpu_checkpoint.json || stage_failed 5 $?

    echo; echo "=== 6. what the loss path and a larger batch are worth, one process [t=${SECONDS}s]"
    timeout -k 10 90 "$PYTHON" -m benchmarks.bench_mfu --variants chunked plain plain,batch=32 --out gpu_mfu \
        || stage_failed 6 $?
    echo "=== done $(date -u +%FT%TZ) [t=${SECONDS}s]${failed_stages:+; failed stages:$failed_stages}"
    # The block is a subshell (a pipeline into tee): its exit status carries the failures out.
    [ -z "$failed_stages" ]
} 2>&1 | tee "$LOG"
statuses=("${PIPESTATUS[@]}")
if [ "${statuses[1]}" != 0 ]; then
    echo "error: could not write the log $LOG" >&2
    exit 1
fi
echo "wrote $LOG and benchmarks/results/gpu_*.json (the CPU results beside them are left alone)"
exit "${statuses[0]}"
