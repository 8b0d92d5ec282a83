"""The linear layer of the model: nn.Linear (same parameters, same state dict, same training
numbers), plus speed routes for decoding on a CPU, where each product has one row per sequence.

`linears_for_decoding(model, rows)` picks, while the block is active, how every `Linear` of a
model computes its no-grad products on a CPU: the route that ran fastest on this machine for
`rows` rows per product (see ROUTES); `gpt/generate.py` wraps its decoding loop in it, so the
block lasts as long as a generator is live, suspended between two tokens included (a no-grad
forward of the model made meanwhile takes the route too). Only forwards without autograd on a
CPU inside that block take the other routes: training, GPUs and every other forward are
nn.Linear's own.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

# How a no-grad product x W^T + b of a few rows can be computed on a CPU. Which is fastest
# depends on the CPU and its BLAS, so `linears_for_decoding` times them; the 24 block linears of
# 6 x 384, ms, plain / row_blocks / packed, fp32:
#   AMD EPYC (AVX-512, MKL), 1 row 4.1 / 1.3 / 2.2, 8 rows 6.1 / 4.0 / 2.0, 64 rows 13.6 / 12.0 / 7.4
#   Intel Xeon (AMX, MKL),   1 row 1.2 / 3.1 / 2.2, 8 rows 2.5 / 3.2 / 3.6
# (MKL's x W^T for a few rows streams W well on the Intel CPU and 2-3x slower on the AMD one.)
ROUTES = (
    "plain",  # nn.Linear's product
    # W's rows cut into up to 8 equal blocks (a view, no copy), multiplied with x^T as one batched
    # product: MKL's batched GEMM instead of its few-row kernel. fp32, 1-64 rows.
    "row_blocks",
    # A copy of W in oneDNN's blocked layout (bf16 under bf16 autocast), multiplied by oneDNN.
    # Costs the weights' memory once more (GPT-2 124M: ~490 MB in fp32) and ~0.2 s (124M).
    "packed",
)
# A route other than "plain" is taken only when it is this much faster: timings within noise of
# each other would otherwise pick another route (another summation order) from model to model.
MIN_GAIN = 1.10

# The route each model was measured fastest with, per (rows timed, autocast dtype, weight
# dtypes, number of CPU linears): measured at its first such decoding block only (it costs tens
# of milliseconds; sample.py decodes sample after sample), so one model's decodes also all sum in
# the same order. Module-level, keyed weakly by the model: it goes when the model goes, and the
# model itself is not changed.
_measured: weakref.WeakKeyDictionary[nn.Module, dict[tuple, str]] = weakref.WeakKeyDictionary()


@dataclass
class PackedWeight:
    """A Linear's weight (and bias) copied into oneDNN's blocked layout, for decoding."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    dtype: torch.dtype  # float32, or bfloat16 for decoding under bf16 autocast
    # The weight's and bias's version counters and storage addresses when copied: see `_versions`.
    versions: tuple[int, int, int, int]
    # The tensors copied (aliases, no memory of their own while they stay the module's): held so
    # that a replaced weight's memory cannot be reused by another tensor at the same address.
    sources: tuple[torch.Tensor, torch.Tensor | None] = ()


@dataclass
class Decoding:
    """How one Linear computes its no-grad CPU products inside a `linears_for_decoding` block."""

    route: str  # one of ROUTES
    packed: PackedWeight | None = None  # the "packed" route's copy of W


class Linear(nn.Linear):
    """nn.Linear (y = x W^T + b; same parameters, same state dict) with the CPU decoding routes
    of ROUTES, taken only without autograd and only inside `linears_for_decoding`, so that
    training's numbers never depend on them (they sum in other orders: last-bit differences)."""

    decoding: Decoding | None = None  # set by `linears_for_decoding` for its block

    @property
    def packed(self) -> PackedWeight | None:
        return None if self.decoding is None else self.decoding.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decoding = self.decoding
        if decoding is None or decoding.route == "plain" or torch.is_grad_enabled() or not x.is_cpu:
            return super().forward(x)
        rows = x.numel() // self.in_features
        autocast = torch.is_autocast_enabled("cpu")
        # A wrong last dimension goes to nn.Linear, whose error names both shapes; the reshapes
        # below would fail with a message about sizes that appear nowhere in the caller's code.
        fits = x.shape[-1:] == (self.in_features,)
        packed = decoding.packed
        # The version check: a weight changed in place since it was copied (an optimizer step
        # between two tokens) makes the copy stale; nn.Linear's product is then the right one.
        # Not while torch.compile traces (a model compiled with Module.compile() or
        # torch.compile, decoding on a CPU): inductor lowers oneDNN's product only for a weight
        # that is a constant of the graph (freezing), and failed on the copy (InductorError).
        if (decoding.route == "packed" and fits and packed is not None and not torch.compiler.is_compiling()
                and packed.dtype == (torch.get_autocast_dtype("cpu") if autocast else x.dtype)
                and packed.versions == _versions(self)):
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, self.in_features).to(packed.dtype),
                                                  packed.weight, packed.bias, "none", [], "")
            return y.view(*x.shape[:-1], self.out_features)
        fp32 = x.dtype == self.weight.dtype == torch.float32 and not autocast
        blocks = math.gcd(self.out_features, 8)
        if not (decoding.route == "row_blocks" and fits and fp32 and 1 <= rows <= 64 and blocks > 1):
            return super().forward(x)
        w = self.weight.view(blocks, self.out_features // blocks, self.in_features)
        xt = x.reshape(rows, self.in_features).t().expand(blocks, self.in_features, rows)
        if self.bias is None:
            y = torch.bmm(w, xt)
        else:
            y = torch.baddbmm(self.bias.view(blocks, -1, 1), w, xt)
        # y is [blocks, out / blocks, rows]: W x^T with its rows in order
        return y.view(self.out_features, rows).t().contiguous().view(*x.shape[:-1], self.out_features)


def _versions(linear: Linear) -> tuple[int, int, int, int]:
    """What tells a packed copy is stale: an in-place change bumps the version counter; a new
    tensor put in (`linear.weight = nn.Parameter(...)`, `weight.data = ...`, `load_state_dict(...,
    assign=True)`) may have the same count, but never the same address while the old one is held.
    (A change through `weight.data.add_(...)` is not seen: `.data` has a counter of its own.)
    An inference tensor (made under torch.inference_mode) has no counter: -1, which no copy has
    (none is made of one), so a weight put in from inference mode is never served by a copy."""
    weight, bias = linear.weight, linear.bias
    if bias is None:
        return _version(weight), weight.data_ptr(), 0, 0
    return _version(weight), weight.data_ptr(), _version(bias), bias.data_ptr()


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version


@contextlib.contextmanager
def linears_for_decoding(model: nn.Module, rows: int, route: str | None = None) -> Iterator[None]:
    """While the block is active, every `Linear` of `model` with a CPU weight computes its no-grad
    products by `route` (one of ROUTES), or, when route is None, by the route of those usable
    here that ran fastest over the model's linears at `rows` rows per product (the batch, when
    decoding with a cache). That is timed at 64 rows at most, once per model, rows, autocast
    dtype and weight dtypes (50-80 ms for 6 x 384, packing included). Usable: "plain" always;
    "row_blocks" outside autocast, for fp32 weights; "packed" where this torch has oneDNN's ops,
    for fp32 weights with a version counter, and under autocast only for bf16 on a CPU with
    native bf16 (else oneDNN emulates it: ~1 GFLOP/s). A route given that is not usable here is
    "plain". Packed copies exist only while "packed" is the route."""
    if route is not None and route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES} or None, got {route!r}")
    # Sharded (DTensor) and GPU weights keep nn.Linear's product.
    linears = [m for m in model.modules()
               if isinstance(m, Linear) and m.weight.is_cpu and type(m.weight.data) is torch.Tensor]
    usable = _usable_routes(linears)
    rows = min(rows, 64)
    # What the measurement depends on besides the machine: a model moved to the CPU or cast to
    # another dtype after its first decode is measured again.
    key = (rows, torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
           tuple(sorted({str(m.weight.dtype) for m in linears})), len(linears))
    measured = _measured.setdefault(model, {})
    if route is None:
        route = measured.get(key)
    packed: dict[Linear, PackedWeight] = {}
    if "packed" in usable and route in (None, "packed"):
        packed = _pack(linears)
        if not packed:
            usable = tuple(r for r in usable if r != "packed")
    if route is None and len(usable) == 1:
        route = usable[0]  # nothing to measure, nothing kept
    elif route is None:
        route = measured[key] = _fastest(linears, packed, rows, usable)
    elif route not in usable:
        route = "plain"
    if route != "packed":
        packed = {}  # the copies made for timing go now, not when the block ends
    mine = {m: Decoding(route, packed.get(m)) for m in linears}
    for m, decoding in mine.items():
        m.decoding = decoding
    try:
        yield
    finally:
        for m, decoding in mine.items():
            # Only this block's own: another decoder of the same model that began after this
            # one (two generators interleaved) keeps its route until it ends itself; one that
            # began before and is still live goes on with nn.Linear's product from here on.
            if m.decoding is decoding:
                m.decoding = None


def _usable_routes(linears: list[Linear]) -> tuple[str, ...]:
    if not any(m.weight.dtype == torch.float32 for m in linears):  # row blocks and copies: fp32 weights
        return ("plain",)
    onednn = (torch.backends.mkldnn.is_available()  # oneDNN's two ops are private (inductor's):
              and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")  # a torch without them
              and hasattr(torch.ops.mkldnn, "_linear_pointwise"))  # decodes on the other routes
    if torch.is_autocast_enabled("cpu"):
        bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return ("plain", "packed") if onednn and bf16 else ("plain",)
    row_blocks = ("row_blocks",) if all(m.weight.dtype == torch.float32 for m in linears) else ()
    return ("plain",) + row_blocks + (("packed",) if onednn else ())


def _pack(linears: list[Linear]) -> dict[Linear, PackedWeight]:
    """A oneDNN copy of each linear's fp32 weight (bf16 under bf16 autocast)."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
    packed = {}
    with torch.no_grad():
        for m in linears:
            # Weights made under torch.inference_mode (a model built or loaded in it) have no
            # version counter, so an in-place change could not be told from a fresh copy.
            if m.weight.dtype != torch.float32 or -1 in _versions(m):
                continue
            # The batch-size hint only picks among layouts: 8 and the exact row count ran
            # within 5% of each other from 1 to 256 rows.
            weight = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach().to(dtype), 8)
            bias = None if m.bias is None else m.bias.detach().to(dtype)
            sources = (m.weight.detach(), None if m.bias is None else m.bias.detach())
            packed[m] = PackedWeight(weight, bias, dtype, _versions(m), sources)
    return packed


def _fastest(linears: list[Linear], packed: dict[Linear, PackedWeight], rows: int, routes: tuple[str, ...]) -> str:
    """The route that runs one no-grad pass over all `linears` (in model order, as a decoding
    step does, so that the weights stream through the caches as they will) fastest at `rows`
    rows per product: best of 3 after a warm-up, "plain" unless another is MIN_GAIN faster."""
    g = torch.Generator().manual_seed(0)  # the caller's random stream (sampling) is left alone
    inputs = {key: torch.randn(rows, key[0], generator=g, dtype=key[1])
              for key in {(m.in_features, m.weight.dtype) for m in linears}}
    saved = [m.decoding for m in linears]

    def one_pass(route: str) -> float:
        for m in linears:
            m.decoding = Decoding(route, packed.get(m))
        start = time.perf_counter()
        for m in linears:
            # forward itself, not the module's call: a user's forward hooks must not see these
            Linear.forward(m, inputs[m.in_features, m.weight.dtype])
        return time.perf_counter() - start

    best = {route: math.inf for route in routes}
    try:
        with torch.no_grad():
            for round_ in range(4):  # the first is the warm-up
                for route in routes:
                    seconds = one_pass(route)
                    if round_:
                        best[route] = min(best[route], seconds)
    finally:
        for m, decoding in zip(linears, saved):
            m.decoding = decoding
    return _pick(best)


def _pick(seconds: dict[str, float]) -> str:
    """The fastest route of `seconds` (each route's time), or "plain" unless that is MIN_GAIN faster."""
    fastest = min(seconds, key=seconds.get)
    return fastest if seconds["plain"] >= MIN_GAIN * seconds[fastest] else "plain"
