"""The linear layer of the model: nn.Linear (same parameters, same state dict, same training
numbers), plus two speed paths for decoding on a CPU, where each product has one row per sequence.

`packed_for_decoding(model, rows)` gives every `Linear` of a model, while the block is active, a
copy of its weight in oneDNN's blocked layout; `gpt/generate.py` wraps its decoding loop in it.
Only forwards without autograd on a CPU take these paths (decoding; a small evaluation, 64 rows or
fewer per product, too); training and GPUs never do.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class PackedWeight:
    """A Linear's weight (and bias) copied into oneDNN's blocked layout, for decoding."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    dtype: torch.dtype  # float32, or bfloat16 for decoding under bf16 autocast
    min_rows: int  # products of fewer rows take Linear's other paths (faster there)
    # The weight's and bias's version counters and storage addresses when copied: see `_versions`.
    versions: tuple[int, int, int, int]
    # The tensors copied (aliases, no memory of their own while they stay the module's): held so
    # that a replaced weight's memory cannot be reused by another tensor at the same address.
    sources: tuple[torch.Tensor, torch.Tensor | None] = ()


class Linear(nn.Linear):
    """nn.Linear (y = x W^T + b; same parameters, same state dict) with two CPU speed paths for
    decoding, both only without autograd, so that training's numbers never depend on them (they
    sum in other orders: last-bit differences).

    Decoding feeds each linear one row per sequence (a short prompt: one row per token), where
    MKL's kernel for x W^T runs well below the speed of streaming W once:
    - While `packed_for_decoding` holds a copy of W in oneDNN's blocked layout: oneDNN's product
      with it. The 24 block linears of 6 x 384, ms, fp32, nn.Linear / batched (below) / packed:
      4 rows 5.9 / 2.7 / 1.6, 8 rows 6.1 / 4.0 / 2.0, 64 rows 13.6 / 12.0 / 7.4, 256 rows
      33 / 37 / 27; 12 x 768 at 8 rows 42 / 36 / 14. At 1-2 rows the batched product is faster
      in fp32 (1 row 1.3 vs 2.2 ms), so fp32 copies serve 3 rows or more. Under bf16 autocast a
      bf16 copy serves every row count: 1 row 1.7 ms (F.linear on bf16 weights cast once) vs
      0.8, 8 rows 2.2 vs 1.2 (and half the bytes: 6 x 384's weights then fit in a 32 MB L3).
    - fp32, 1-64 rows otherwise: cutting W's rows into `blocks` equal slices (a view, no copy)
      and multiplying them with x^T as one batched product goes through MKL's batched GEMM
      instead, which streams W 2-3x faster at one row (the 24 block linears of 6 x 384 and
      12 x 768: 1.2 vs 3.8 ms and 11.7 vs 23.3 ms; 8 blocks and 4 were within 5%, 16 slower, 1
      is the slow route again). Under bf16 autocast it was slower (0.84x at batch 8).
    """

    packed: PackedWeight | None = None  # set by `packed_for_decoding`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not x.is_cpu:  # training and GPUs: decided in one check
            return super().forward(x)
        rows = x.numel() // self.in_features
        autocast = torch.is_autocast_enabled("cpu")
        # A wrong last dimension goes to nn.Linear, whose error names both shapes; the reshapes
        # below would fail with a message about sizes that appear nowhere in the caller's code.
        fits = x.shape[-1:] == (self.in_features,)
        packed = self.packed
        # The version check: a weight changed in place since it was copied (an optimizer step
        # between two tokens) makes the copy stale; the other paths are then the right ones.
        # Not while torch.compile traces (a model compiled with Module.compile() or
        # torch.compile, decoding on a CPU): inductor lowers oneDNN's product only for a weight
        # that is a constant of the graph (freezing), and failed on the copy (InductorError).
        if (fits and packed is not None and not torch.compiler.is_compiling() and rows >= packed.min_rows
                and packed.dtype == (torch.get_autocast_dtype("cpu") if autocast else x.dtype)
                and packed.versions == _versions(self)):
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, self.in_features).to(packed.dtype),
                                                  packed.weight, packed.bias, "none", [], "")
            return y.view(*x.shape[:-1], self.out_features)
        fp32 = x.dtype == self.weight.dtype == torch.float32 and not autocast
        blocks = math.gcd(self.out_features, 8)
        if not (fits and fp32 and 1 <= rows <= 64 and blocks > 1):
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
def packed_for_decoding(model: nn.Module, rows: int) -> Iterator[None]:
    """While the block is active, every `Linear` of `model` whose weight is a plain fp32 CPU
    tensor also holds a copy of it in oneDNN's blocked layout (bf16 under bf16 autocast), which
    its no-grad forward uses (see `Linear`). `rows` is how many rows the products will mostly
    have (the batch, when decoding with a cache): where the copies would go unused (fp32 at 1-2
    rows), none is made. They cost the linears' weights once more in memory (GPT-2 124M: ~490
    MB in fp32, half in bf16) and ~0.2 s to make (124M); decoding hundreds of tokens repays
    that many times. Where this torch has no oneDNN, or the weights live elsewhere (a GPU,
    sharded, another dtype), nothing is packed and the forward takes its other paths."""
    if torch.is_autocast_enabled("cpu"):
        # bf16 only where the CPU has native bf16 (without, oneDNN emulates it: ~1 GFLOP/s)
        dtype = torch.get_autocast_dtype("cpu")
        usable = dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        min_rows = 1
    else:
        dtype, usable, min_rows = torch.float32, rows >= 3, 3
    # Weights made under torch.inference_mode (a model built or loaded in it) have no version
    # counter, so an in-place change to them could not be told from a fresh copy: not packed.
    linears = [m for m in model.modules()
               if isinstance(m, Linear) and _packable(m.weight) and -1 not in _versions(m)] if usable else []
    made: list[tuple[Linear, PackedWeight]] = []
    try:
        with torch.no_grad():
            for m in linears:
                # The batch-size hint only picks among layouts: 8 and the exact row count ran
                # within 5% of each other from 1 to 256 rows.
                weight = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach().to(dtype), 8)
                bias = None if m.bias is None else m.bias.detach().to(dtype)
                sources = (m.weight.detach(), None if m.bias is None else m.bias.detach())
                m.packed = PackedWeight(weight, bias, dtype, min_rows, _versions(m), sources)
                made.append((m, m.packed))
        yield
    finally:
        for m, packed in made:
            # Only this block's own copies: another decoder of the same model that packed after
            # this one (two generators interleaved) keeps using its copies until it ends itself.
            if m.packed is packed:
                m.packed = None


def _packable(weight: torch.Tensor) -> bool:
    return (weight.is_cpu and weight.dtype == torch.float32 and type(weight.data) is torch.Tensor
            and torch.backends.mkldnn.is_available()  # oneDNN's two ops are private (inductor's):
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")  # a torch without them
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))  # decodes on the other paths
