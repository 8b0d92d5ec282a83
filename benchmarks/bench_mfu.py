"""What each GPU speed option is worth for GPT-2 small (124M) training: tokens/s and MFU of the
same training step under several variants, one after another in one process.

    python -m benchmarks.bench_mfu --variants chunked plain plain,cudnn plain,batch=32

The step is train.py's: the model compiled whole (torch.compile), bf16 autocast, TF32, the
fused AdamW of gpt/optim.py, vocabulary padded to 50,304, block 1024, synthetic token ids. A
variant is a comma-separated list of:

    chunked | plain            the loss (TrainConfig.loss; gpt/loss.py's chunks, or one
                               cross-entropy over the whole logits, which inductor fuses)
    flash | cudnn | efficient  the only SDPA backend allowed (default: PyTorch's choice)
    batch=N                    sequences per step (default --batch)
    mode=M                     torch.compile mode (default, max-autotune-no-cudagraphs, ...)

Each variant compiles afresh (its first step, reported as compile_s), runs --warmup more steps,
then --groups groups of --steps steps each timed as a whole (one synchronize per group); the
step time is the median group's. MFU = flops_per_token (6N + 12 L H D T) x tokens/s / the
datasheet peak of the detected GPU (gpt/mfu.py). Writes benchmarks/results/gpu_mfu.json
(--out names another). Needs a CUDA GPU (benchmarks/gpu.sh runs it).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cli import non_negative_int, positive_int, results_name  # noqa: E402
from benchmarks.common import median, write_json  # noqa: E402
from gpt.config import TrainConfig  # noqa: E402
from gpt.mfu import peak_flops  # noqa: E402
from gpt.model import GPT, GPTConfig  # noqa: E402
from gpt.optim import build_optimizer  # noqa: E402
from gpt.trainer import use_tf32  # noqa: E402

MODEL = GPTConfig(vocab_size=50257, vocab_multiple=64, block_size=1024, n_layer=12, n_head=12, n_embd=768)
BACKENDS = ("flash", "cudnn", "efficient")


def parse_variant(text: str, batch: int) -> dict:
    variant = {"name": text, "loss": "chunked", "backend": None, "batch": batch, "mode": None}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if part in ("chunked", "plain"):
            variant["loss"] = part
        elif part in BACKENDS:
            variant["backend"] = part
        elif key == "batch" and value.isdigit() and int(value) > 0:
            variant["batch"] = int(value)
        elif key == "mode" and value:
            variant["mode"] = value
        else:
            raise SystemExit(f"error: --variants {text!r}: unknown part {part!r} (expected chunked, plain, "
                             f"{', '.join(BACKENDS)}, batch=N or mode=M)")
    return variant


def sdpa_backend(name: str | None):
    from contextlib import nullcontext

    if name is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    return sdpa_kernel([kinds[name]])


def run_variant(variant: dict, args, device: torch.device, peak: float) -> dict:
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = GPT(MODEL).to(device)
    model.chunked_loss = variant["loss"] == "chunked"
    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw"), device)
    compiled = torch.compile(model, mode=variant["mode"])
    B, T = variant["batch"], MODEL.block_size
    x = torch.randint(0, MODEL.vocab_size, (B, T), device=device)
    y = torch.randint(0, MODEL.vocab_size, (B, T), device=device)

    def step() -> None:
        with sdpa_backend(variant["backend"]), torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = compiled(x, y, return_logits=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()
    torch.cuda.synchronize(device)
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    groups = []
    for _ in range(args.groups):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize(device)
        groups.append((time.perf_counter() - start) / args.steps)
    step_s = median(groups)
    tokens_per_s = B * T / step_s
    row = {**variant, "compile_s": round(compile_s, 1), "step_ms": round(step_s * 1e3, 2),
           "group_step_ms": [round(g * 1e3, 2) for g in groups], "tokens_per_s": round(tokens_per_s),
           "mfu": round(model.flops_per_token() * tokens_per_s / peak, 4),
           "peak_memory_GB": round(torch.cuda.max_memory_allocated(device) / 1e9, 1)}
    print(f"{variant['name']:<32} {row['tokens_per_s']:>9,} tok/s  {row['step_ms']:7.2f} ms/step  "
          f"MFU {row['mfu']:.1%}  (compile {row['compile_s']} s, peak memory {row['peak_memory_GB']} GB)",
          flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["chunked", "plain"],
                        help="variants to measure, each a comma-separated list (module docstring)")
    parser.add_argument("--batch", type=positive_int, default=16, help="sequences of 1024 per step (default: 16)")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="steps after the compiling one (default: 3)")
    parser.add_argument("--steps", type=positive_int, default=5, help="steps per timed group (default: 5)")
    parser.add_argument("--groups", type=positive_int, default=3, help="timed groups (default: 3)")
    parser.add_argument("--out", type=results_name, default="gpu_mfu",
                        help="results file: benchmarks/results/OUT.json (default: gpu_mfu)")
    args = parser.parse_args(argv)
    variants = [parse_variant(v, args.batch) for v in args.variants]
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks/bench_mfu.py needs a CUDA GPU")
    device = torch.device("cuda")
    use_tf32(device)
    peak, source = peak_flops(device, torch.bfloat16)
    print(f"GPT-2 124M, bf16, compile, fused AdamW; peak {peak / 1e12:.1f} TFLOP/s ({source})", flush=True)
    rows = []
    for variant in variants:
        try:
            rows.append(run_variant(variant, args, device, peak))
        except Exception as e:  # one variant failing (a backend this GPU lacks) is a result too
            print(f"{variant['name']:<32} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append({**variant, "error": f"{type(e).__name__}: {str(e)[:1000]}"})
    path = write_json(args.out, {"benchmark": "mfu variants", "device": torch.cuda.get_device_name(device),
                                 "torch": torch.__version__, "peak_flops": peak, "peak_source": source,
                                 "model": {"n_layer": MODEL.n_layer, "n_embd": MODEL.n_embd,
                                           "block_size": MODEL.block_size,
                                           "padded_vocab_size": MODEL.padded_vocab_size},
                                 "variants": rows})
    print(f"wrote {path}")
    if all("error" in row for row in rows):  # nothing measured: gpu.sh counts the stage as failed
        raise SystemExit(f"error: every variant failed ({len(rows)}); see {path}")


if __name__ == "__main__":
    main()
