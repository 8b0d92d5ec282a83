"""Shared pieces of the speed suite: side-by-side timing, the peer model, machine facts, results.

Timing rule: every comparison runs its contenders in one process, round-robin (A B A B ...,
the order reversed every other round so neither side always runs first), after warm-up, and
reports the median of the rounds. Background load (other jobs on a shared machine) then hits
both sides alike, so the *ratio* of medians is the figure to trust; absolute figures are
quoted with the load average at the time. The ratio is also taken round by round
(`per_round_ratio`): the two calls of one round run back to back, so a VM that moves between
fast and slow phases (a 2-core VM here: ~250 and ~420 ms for one training step) moves both.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.cli import RESULTS_DIR, write_results
from gpt import allocator
from gpt.metrics import finite_or_null

REPO = Path(__file__).resolve().parents[1]
# The suite's budget per product when it measures a peak (gpt/mfu.py measure_matmul_flops): up to
# 4096 x 4096, where train.py's quick start-up budget (0.25 s) stops at 2048 and, on a busy
# moment, read 67 GFLOP/s of a CPU that does 180 (an MFU of 132%).
PEAK_MAX_SECONDS = 1.5


def load_average() -> float:
    """1-minute load average (runnable processes); on 2 cores anything above ~2 is contention."""
    return round(os.getloadavg()[0], 2)


def busy_cores(window_s: float = 1.0) -> float:
    """How many cores other processes keep busy now: CPU time spent outside idle over a short
    window, from /proc/stat. Unlike the load average (a 1-minute decaying mean, still ~1 a
    minute after a job ends) it is zero once the machine is idle. Linux; elsewhere the load
    average."""
    def sample() -> tuple[int, int]:
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])  # busy, total (steal counts as busy; guest is
        # inside user already)
    try:
        busy0, total0 = sample()
        time.sleep(window_s)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return load_average()
    cores = os.cpu_count() or 1
    return round(cores * (busy1 - busy0) / max(total1 - total0, 1), 2)


MALLOC_CHOICES = ("trainer", "system")
MALLOC_HELP = ("C allocator for both contenders: 'trainer' (default) as train.py sets it on a CPU "
               "(gpt/allocator.py: freed blocks kept for reuse), 'system' the C library's defaults")


def check_malloc_env() -> None:
    """A bad GPT_CPU_MALLOC (gpt/allocator.py) as one line before any timing, not a traceback
    after minutes of it."""
    from gpt.config import ConfigError

    try:
        allocator.choice()
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def use_malloc(choice: str, device: torch.device) -> str:
    """Set the process's allocator as `choice` says (see MALLOC_HELP); returns what it is, for
    the results. Process-wide, so both contenders run under it: without it the peer's [N, V]
    logits (32 MB at the default shape) are mmap()ed and page-faulted in afresh every step."""
    if choice == "trainer" and device.type == "cpu":
        return allocator.keep_freed_memory()
    return "the C library's defaults"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "")
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in flags]
    except OSError:
        isa = []
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_isa": isa,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleave(
    contenders: dict[str, Callable[[], Any]],
    *,
    rounds: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Seconds per call of each contender, measured round-robin; see the module docstring."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    sync(device)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            contenders[name]()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def per_round_ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Median and quartiles of numerator[r] / denominator[r] over the rounds of one `interleave`
    (the peer's seconds over ours: how many times faster we are). The ratio of the medians can
    pair a fast phase of one side with a slow phase of the other: the same step timed as both
    contenders gave medians up to 13% apart over 40 rounds, its round-by-round ratios a median
    of 0.99x."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    # "inclusive": quartiles within the ratios measured (the default method extrapolates past
    # them from few rounds: 2 rounds of 2x and 3x gave quartiles of 1.75x and 3.25x).
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"median": round(statistics.median(ratios), 3), "q1": round(q1, 3), "q3": round(q3, 3)}


def format_per_round(ratio: dict[str, float]) -> str:
    return f"{ratio['median']:.2f}x round by round (quartiles {ratio['q1']:.2f}-{ratio['q3']:.2f}x)"


# ----------------------------------------------------------------------------------------
# The peer: Hugging Face transformers' GPT-2, built locally from a config (no hub access)


def peer_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def build_peer(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int):
    """GPT2LMHeadModel of our shape: same widths, vocabulary, positions, biases, tied head,
    exact GELU (ours is nn.GELU(); GPT-2's default 'gelu_new' is the tanh approximation),
    LayerNorm eps 1e-5, dropout 0, SDPA attention. Returns (model, attention implementation)."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, n_inner=None, activation_function="gelu", layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    transformers.logging.set_verbosity_error()  # its notes about unset token ids are noise here
    try:
        model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    except (TypeError, ValueError, ImportError):
        model = transformers.GPT2LMHeadModel(config)
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    return model, implementation


def count_params(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied matrix counted once), the same rule for both models."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# ----------------------------------------------------------------------------------------
# Results


def write_json(name: str, record: dict[str, Any]) -> Path:
    """Write benchmarks/results/NAME.json atomically; returns the path."""
    # Strict JSON, as metrics.jsonl is: a NaN or Inf figure (a diverged loss, a zero-time
    # division) is written as null, not as the bare NaN that JSON readers other than Python's reject.
    text = json.dumps(finite_or_null(record), indent=1, default=str, allow_nan=False) + "\n"
    return write_results(name, text, RESULTS_DIR)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
