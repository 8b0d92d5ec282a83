"""Autoregressive sampling from a GPT: pick the next token, append it, repeat.

Two ways to get the next token's logits, which give the same numbers:
- with a KV cache (default): the prompt is run once (prefill), then each step feeds only the
  newest token, which attends to the keys/values cached from the earlier ones;
- without (`use_cache=False`, `generate_no_cache`): every step re-runs the whole context. It is
  the reference the cached path is tested against, and the baseline of the speed benchmark.

Sliding window. The model has learned *absolute* position embeddings for positions
0 .. block_size-1, so once the context is longer than block_size it is cropped to its last
block_size tokens, which then sit at positions 0 .. block_size-1. Cropping shifts every token's
position, so every cached key and value is stale: when the cache is full and another token
comes, the cache is emptied and rebuilt by prefilling the last block_size tokens of the
context (the newest included). This is exact (it matches full recomputation step for step) and
costs one full-window forward per step once the context is full, like the uncached path.

CUDA graphs (`cuda_graph`, on by default for a model on a CUDA device with the cache). Each
token after the prompt is then one replay of a recorded decode step (`gpt.static_decode`)
instead of ~80 kernel launches from Python. The prompt is prefilled on the ordinary path,
into the same cache, and so is every step of the sliding window once the context is full
(a rebuild of the whole cache: the step of fixed shapes only appends one token). Sampling
runs outside the graph. The step's logits equal the ordinary path's to float rounding.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from gpt.linear import ROUTES, linears_for_decoding
from gpt.model import GPT, TOKEN_DTYPES, KVCache
from gpt.static_decode import StaticDecoder
from gpt.tokenizer import as_integer


def _check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> int | None:
    """Raise on a bad argument; returns top_k as an int (or None)."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None:
        k = as_integer(top_k)
        if k is None or k < 1:
            raise ValueError(f"top_k must be an integer >= 1 (or None), got {top_k!r}")
        top_k = k
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] (or None), got {top_p!r}")
    return top_k


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits [B, V]; returns token ids [B, 1] (int64).

    temperature 0 is greedy (argmax; top_k and top_p are then irrelevant). Otherwise the logits
    are divided by the temperature, then top_k keeps exactly the k largest (ties at the edge are
    broken by torch.topk), then top_p keeps the smallest set of most likely tokens whose
    probabilities sum to at least top_p (always at least the most likely one), and one token is
    drawn from what is left. `generator` (on the logits' device) makes the draw reproducible.
    """
    top_k = _check_sampling_args(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [batch, vocab], got {tuple(logits.shape)}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)

    # Shifted so the largest logit is 0 before dividing (softmax does not change): a tiny
    # temperature (1e-40) then sends the others to -inf, not every logit to +-inf and NaN; one
    # below fp32's range (1e-300 would round to 0 and give 0/0) is taken as its smallest normal.
    overflows = logits.dtype == torch.float16  # its range (65,504) is the one a logit can leave
    logits = logits.float()
    temperature = max(temperature, torch.finfo(torch.float32).tiny)
    top = logits.amax(dim=-1, keepdim=True)
    shifted = logits - top
    if overflows:
        # A row with +inf logits draws among those alone: shifted, inf - inf was NaN and
        # multinomial refused the row. (torch.where: no host sync per token.)
        shifted = torch.where(torch.isposinf(top), torch.where(torch.isposinf(logits), 0.0, float("-inf")), shifted)
    logits = shifted / temperature
    if top_k is not None and top_k < logits.size(-1):
        kept = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, kept.indices, kept.values)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        # A token is dropped when the more likely tokens already reach top_p; never the first
        # (its mass_before is 0, but a top_p below fp32's range, 1e-300, compares as 0 too: every
        # token was dropped, and multinomial refused the row of NaNs).
        drop = mass_before >= top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def next_token_logits(
    model: GPT, context: torch.Tensor, kv_cache: KVCache | None, n_new: int
) -> torch.Tensor:
    """Logits [B, V] for the token after `context` [B, T] (T >= 1).

    Without a cache the last block_size tokens are run in full. With one, the cache must hold
    the window's tokens except the last `n_new` of `context`; those are fed and cached. When
    they would not fit, the cache is rebuilt from the last block_size tokens (sliding window,
    see the module docstring).
    """
    block_size = model.config.block_size
    if kv_cache is None:
        logits, _ = model(context[:, -block_size:], last_only=True)
    else:
        if kv_cache.length + n_new > block_size:
            kv_cache.reset()
            n_new = min(context.size(1), block_size)
        logits, _ = model(context[:, -n_new:], kv_cache=kv_cache, last_only=True)
    return logits[:, -1, :]


def kv_cache_dtype(model: GPT) -> torch.dtype:
    """The dtype keys and values come out of the qkv matmul in: the autocast dtype when autocast
    is on for the model's device, else the parameters' dtype. Keeping the cache in it is exact
    and spares converting the whole cache for every layer at every step."""
    return _autocast_dtype(model) or next(model.parameters()).dtype


def _autocast_dtype(model: GPT) -> torch.dtype | None:
    device_type = next(model.parameters()).device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    cuda_graph: bool | None = None,
    cpu_route: str | None = None,
) -> Iterator[torch.Tensor]:
    """Continue the prompts idx [B, T] (T >= 1; int64 or int32 ids below vocab_size), yielding each
    new token [B, 1] as it is chosen.

    Yields at most max_new_tokens tokens; max_new_tokens = 0 yields nothing. With eos_id, a row
    that has produced eos_id keeps emitting eos_id from then on, and generation stops as soon as
    every row has produced it. Prompts longer than block_size are cropped to their last
    block_size tokens. The model runs in eval mode (dropout off) while the iterator is live and
    gets its previous mode back when it is exhausted or closed (with several generators live on
    one model: when the last of them is). The KV cache is kept on the
    device of the model's parameters, in `kv_cache_dtype(model)` as of the first token. For bf16,
    call generate() and iterate under torch.autocast. On a CPU the linear layers compute by the
    route measured fastest on this machine at the first generate() of each model and batch size
    (`gpt.linear.linears_for_decoding`), or by `cpu_route` (one of gpt.linear.ROUTES) where given:
    the routes sum in other orders, so logits agree between them only to float rounding, and
    the one measured fastest may vary from process to process on a busy machine; on the "packed" route their weights are copied once
    more for the loop, in oneDNN's layout. A weight changed in place between two tokens
    (an optimizer step, `load_state_dict`, `with torch.no_grad(): w.add_(...)`) is used from the
    next token on (the packed route then takes nn.Linear's product); a change made through
    `.data` (`w.data.add_(...)`) is not seen by the packed copies (it bypasses the version
    counter they are checked by): make it under torch.no_grad() instead. Under autocast,
    PyTorch keeps its cast copies of the weights for the whole autocast region, so a change is
    seen only from the next region on (the CUDA-graph step, which runs without that cache, sees
    it at once).

    cuda_graph: decode each token after the prompt with one replay of a CUDA graph (see the
    module docstring). None (default): when the model's parameters are on a CUDA device and
    use_cache is on. True elsewhere runs the same fixed-shape step eagerly (for tests; on a
    CPU the ordinary path is as fast). It needs use_cache. The graph is captured at the first
    token after the prompt (a few steps' time) and freed with the iterator.
    """
    top_k = _check_sampling_args(temperature, top_k, top_p)
    n = as_integer(max_new_tokens)
    if n is None or n < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    max_new_tokens = n
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"idx must be a tensor of token ids [batch, time], got {type(idx).__name__}: "
                         f"pass torch.tensor([ids]) for one prompt's ids (torch.tensor(rows) for a batch)")
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must have shape [batch, time] with time >= 1, got {tuple(idx.shape)}")
    vocab_size = model.config.vocab_size
    if idx.dtype not in TOKEN_DTYPES:
        raise ValueError(f"idx must hold token ids as int64 or int32, got {idx.dtype}")
    # With vocab_multiple the tables have padding rows, so an id from a larger vocabulary (a
    # mismatched tokenizer) would be embedded as zeros without any error: check the range here.
    if idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < vocab_size:
        raise ValueError(f"idx holds token ids outside the model's vocabulary 0..{vocab_size - 1} "
                         f"(min {int(idx.min())}, max {int(idx.max())}): encode the prompt with the "
                         f"tokenizer the model was trained with")
    if eos_id is not None:
        eos = as_integer(eos_id)
        if eos is None or not 0 <= eos < vocab_size:
            # Such an id is never sampled, so generation would silently never stop early.
            raise ValueError(f"eos_id must be a token id in 0..{vocab_size - 1} (or None), got {eos_id!r}")
        eos_id = eos
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        # A string from a config or command line ("false", "off") is truthy: it turned graphs on.
        raise ValueError(f"cuda_graph must be True, False or None (automatic), got {cuda_graph!r}")
    if cpu_route is not None and cpu_route not in ROUTES:
        raise ValueError(f"cpu_route must be one of {', '.join(ROUTES)} or None (the fastest, measured), "
                         f"got {cpu_route!r}")
    if cuda_graph is None:
        cuda_graph = next(model.parameters()).is_cuda and use_cache
    elif cuda_graph and not use_cache:
        raise ValueError("cuda_graph=True replays a decode step with the KV cache: it needs use_cache=True")
    # Inference mode is lighter per op than no_grad (no version counters; decode is many small
    # ops: ~9% faster here), but autocast does not keep its bf16 copies of the weights for
    # inference-mode calls and would re-cast every weight at every token: under autocast, no_grad.
    decode = _decode_no_grad if _autocast_dtype(model) else _decode_inference
    # cuda_graph becomes _decode's static_step: the fixed-shape step, a CUDA graph only on a GPU.
    return decode(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, use_cache, cuda_graph,
                  cpu_route)


def _decode(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    generator: torch.Generator | None,
    use_cache: bool,
    static_step: bool,
    cpu_route: str | None,
) -> Iterator[torch.Tensor]:
    # A separate generator function so that bad arguments raise when generate() is called,
    # not at the first next().
    if max_new_tokens == 0:
        return

    # Several generators may be live on one model (interleaved): the first records the mode,
    # the last to end restores it, so that none of them decodes with dropout on because
    # another one ended first (and the model gets back the mode it had before them all).
    live = _live_decoders.setdefault(model, [0, model.training])
    live[0] += 1
    model.eval()
    try:
        # How the CPU linears compute in the loop (gpt.linear.Linear). Its products have a row
        # per sequence with the cache, up to a row per context position without.
        rows = idx.size(0) * (1 if use_cache else model.config.block_size)
        with linears_for_decoding(model, rows, route=cpu_route):
            block_size = model.config.block_size
            kv_cache = None
            if use_cache:
                param = next(model.parameters())
                kv_cache = KVCache(model.config, idx.size(0), device=param.device, dtype=kv_cache_dtype(model))
            # The fixed-shape step (replayed as a CUDA graph on a GPU, run as it is elsewhere)
            # for each single new token that still fits the cache; the ordinary path otherwise.
            step = StaticDecoder(model, kv_cache, graph=kv_cache.k[0].is_cuda) if static_step else None
            context = idx[:, -block_size:]
            n_new = context.size(1)
            finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
            for _ in range(max_new_tokens):
                if model.training:  # set by the caller between two tokens
                    model.eval()
                if step is not None and n_new == 1 and kv_cache.length < block_size:
                    logits = step.step(context[:, -1:])
                else:
                    logits = next_token_logits(model, context, kv_cache, n_new)
                token = sample_next(logits, temperature, top_k, top_p, generator)
                if eos_id is not None:
                    token = torch.where(finished[:, None], torch.full_like(token, eos_id), token)
                    finished |= token[:, 0] == eos_id
                # Only the last block_size tokens can ever be attended to again.
                context = torch.cat([context, token], dim=1)[:, -block_size:]
                n_new = 1
                with torch.inference_mode(False):
                    # A normal tensor for the caller: an inference tensor could not be saved for
                    # backward if the tokens were later trained on.
                    out = token.clone()
                yield out
                if eos_id is not None and bool(finished.all()):
                    return
    finally:
        live[0] -= 1
        if live[0] == 0:
            if _live_decoders.get(model) is live:
                del _live_decoders[model]
            model.train(live[1])


# model -> [generators live on it, its mode before the first of them]. Module-level on purpose:
# generators started from different places on one model must find each other, and the count
# belongs to the model, which stays a plain nn.Module (weak keys: nothing outlives the model).
_live_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# Each wraps every resumption of the generator (the caller's own code between tokens keeps its mode).
_decode_inference = torch.inference_mode()(_decode)
_decode_no_grad = torch.no_grad()(_decode)


def generate_no_cache(model: GPT, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> Iterator[torch.Tensor]:
    """`generate` recomputing the whole (cropped) context every step: the reference path."""
    return generate(model, idx, max_new_tokens, use_cache=False, **kwargs)
