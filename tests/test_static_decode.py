"""The fixed-shape decode step (gpt/static_decode.py) against the ordinary cached path: the
same logits at every position up to block_size, in fp32 and under bf16 autocast, and the
same tokens from generate(). On a CPU the step runs eagerly; the device test replays it as a
CUDA graph (deselected by default: `python -m pytest -q -m device tests/test_static_decode.py`)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from gpt.generate import generate, kv_cache_dtype, next_token_logits, sample_next
from gpt.model import GPT, GPTConfig, KVCache
from gpt.static_decode import StaticDecoder

# vocab_multiple: padding rows in the head, which the step must cut off as forward() does.
TINY = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, vocab_multiple=64)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY).eval()


def prompt(batch: int, length: int, seed: int = 1, vocab: int = TINY.vocab_size) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def run(gen) -> torch.Tensor:
    return torch.cat(list(gen), dim=1)


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch,prompt_len", [(1, 1), (3, 4), (2, 15)])  # 15: one step fills the cache
def test_step_logits_equal_the_cached_path_up_to_block_size(model, dtype, batch, prompt_len):
    """Teacher-forced: both paths are fed the same tokens, from the prompt to a full cache."""
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
    context = prompt(batch, prompt_len)
    g = torch.Generator().manual_seed(3)
    with autocast(dtype), torch.no_grad():
        ordinary = KVCache(TINY, batch, dtype=kv_cache_dtype(model))
        static = KVCache(TINY, batch, dtype=kv_cache_dtype(model))
        step = StaticDecoder(model, static)
        # Prefill: the ordinary path for both, as generate() does.
        logits = next_token_logits(model, context, ordinary, context.size(1))
        next_token_logits(model, context, static, context.size(1))
        steps = 0
        while ordinary.length < TINY.block_size:
            token = sample_next(logits, temperature=1.0, generator=g)
            expected = next_token_logits(model, torch.cat([context, token], 1), ordinary, 1)
            got = step.step(token)
            assert got.shape == (batch, TINY.vocab_size) and got.dtype == expected.dtype
            torch.testing.assert_close(got, expected, **tol)
            assert static.length == ordinary.length
            context, logits, steps = torch.cat([context, token], 1), expected, steps + 1
        assert steps == TINY.block_size - prompt_len
        # Both caches hold the same keys and values for every position.
        for layer in range(TINY.n_layer):
            torch.testing.assert_close(static.k[layer], ordinary.k[layer], **tol)
            torch.testing.assert_close(static.v[layer], ordinary.v[layer], **tol)
        with pytest.raises(ValueError, match="cache is full"):
            step.step(token)


def test_stale_cache_entries_past_the_position_are_masked(model):
    """Entries past `position` hold garbage (a previous, longer sequence): they must not count."""
    context = prompt(2, 5)
    with torch.no_grad():
        ordinary, static = KVCache(TINY, 2), KVCache(TINY, 2)
        for layer in range(TINY.n_layer):
            static.k[layer].normal_(0, 30)
            static.v[layer].normal_(0, 30)
        next_token_logits(model, context, ordinary, 5)
        next_token_logits(model, context, static, 5)
        token = prompt(2, 1, seed=9)
        expected = next_token_logits(model, torch.cat([context, token], 1), ordinary, 1)
        torch.testing.assert_close(StaticDecoder(model, static).step(token), expected, rtol=1e-5, atol=1e-5)


def test_step_uses_the_models_own_parameters(model):
    """No copy of a weight: a change to the model is seen by the next step."""
    torch.manual_seed(0)
    m = GPT(TINY).eval()
    context = prompt(1, 3)
    with torch.no_grad():
        cache = KVCache(TINY, 1)
        next_token_logits(m, context, cache, 3)
        step = StaticDecoder(m, cache)
        before = step.step(prompt(1, 1, seed=4)).clone()
        cache.length -= 1  # the same step again
        m.ln_f.bias.add_(1.0)  # shifts every logit by the row sums of lm_head
        after = step.step(prompt(1, 1, seed=4))
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch,prompt_len", [(1, 1), (3, 5), (2, 20)])  # 20 > block_size: cropped
def test_generate_with_the_static_step_gives_the_ordinary_tokens(model, dtype, batch, prompt_len):
    """Sampled with a seeded generator, through the sliding window (40 tokens, context 16)."""
    idx = prompt(batch, prompt_len)
    kwargs = dict(temperature=0.8, top_k=10, top_p=0.95)
    with autocast(dtype):
        ordinary = run(generate(model, idx, 40, generator=torch.Generator().manual_seed(7), **kwargs))
        static = run(generate(model, idx, 40, generator=torch.Generator().manual_seed(7), cuda_graph=True,
                              **kwargs))
    assert static.shape == (batch, 40) and torch.equal(static, ordinary)


def test_generate_uses_the_static_step_only_when_asked_on_a_cpu(model, monkeypatch):
    calls = []
    real = StaticDecoder.step
    monkeypatch.setattr(StaticDecoder, "step", lambda self, token: calls.append(1) or real(self, token))
    run(generate(model, prompt(1, 3), 10, temperature=0))  # default on a CPU: the ordinary path
    assert calls == []
    run(generate(model, prompt(1, 3), 10, temperature=0, cuda_graph=True))
    # The first token comes from the prefill; 9 steps after it, all within block_size (3 + 9 < 16).
    assert len(calls) == 9
    with pytest.raises(ValueError, match="use_cache"):
        generate(model, prompt(1, 3), 10, use_cache=False, cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(model, KVCache(TINY, 1), graph=True)


@pytest.mark.device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_generate_replays_a_graph_and_gives_the_eager_tokens(dtype, monkeypatch):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=64)
    m = GPT(config).cuda().eval()
    idx = prompt(3, 5, vocab=97).cuda()
    replays = []
    real = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(1) or real(self))
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with ctx:
            eager = run(generate(m, idx, 80, temperature=0, cuda_graph=False))
            assert replays == []
            graphed = run(generate(m, idx, 80, temperature=0))  # the default on CUDA: graphs
            # The prefill (5 tokens) gives token 1; replays give tokens 2..60, while the cache
            # holds 5..63 tokens; from 64 on the window slides on the ordinary path.
            assert len(replays) == 64 - 5
            sampled = [run(generate(m, idx, 30, temperature=0.9, top_k=5, cuda_graph=flag,
                                    generator=torch.Generator("cuda").manual_seed(1))) for flag in (False, True)]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert graphed.shape == (3, 80) and torch.equal(graphed, eager)
    assert torch.equal(sampled[0], sampled[1])


@pytest.mark.parametrize("bad", ["false", "off", 0, 1])
def test_cuda_graph_must_be_a_bool_or_none(model, bad):
    # A string from a config or a command line ("false") is truthy: it turned the step on.
    with pytest.raises(ValueError, match="cuda_graph must be True, False or None"):
        generate(model, prompt(1, 3), 4, cuda_graph=bad)


# around block_size 16: 2, 1 or 0 positions left for the step, or a cropped prompt
@pytest.mark.parametrize("prompt_len,n", [(14, 5), (15, 0), (15, 1), (15, 2), (15, 5), (16, 1), (16, 5), (17, 5)])
def test_static_step_at_the_edge_of_the_window_and_short_runs(model, prompt_len, n):
    """The step hands over to the sliding window where the ordinary path does, and short runs
    end where they do; greedy, and sampled with top_k/top_p and eos (rows ending at different
    tokens) from an int32 prompt."""
    idx = prompt(3, prompt_len, seed=prompt_len)
    for kwargs in (dict(temperature=0.0), dict(temperature=1.5, top_k=5, top_p=0.9, eos_id=7)):
        ids = idx.int() if "eos_id" in kwargs else idx
        got = [list(generate(model, ids, n, generator=torch.Generator().manual_seed(2), cuda_graph=flag,
                             **kwargs)) for flag in (False, True)]
        assert len(got[0]) == len(got[1])
        if len(got[0]) < n:  # a run ends early only once every row has ended at eos
            assert "eos_id" in kwargs and got[0] and bool((torch.cat(got[0], 1) == 7).any(1).all()), got[0]
        if n:
            assert torch.equal(torch.cat(got[0], 1), torch.cat(got[1], 1))


def test_interleaved_generators_each_have_their_own_step_and_cache(model):
    """Two generators on one model, stepped in turn: each gets the tokens it gets alone."""
    a, b = prompt(2, 3, seed=4), prompt(3, 6, seed=5)
    alone = [run(generate(model, p, 20, temperature=0)) for p in (a, b)]
    ga = generate(model, a, 20, temperature=0, cuda_graph=True)
    gb = generate(model, b, 20, temperature=0, cuda_graph=True)
    got_a, got_b = [], []
    for _ in range(20):
        got_a.append(next(ga))
        got_b.append(next(gb))
    assert torch.equal(torch.cat(got_a, 1), alone[0]) and torch.equal(torch.cat(got_b, 1), alone[1])
