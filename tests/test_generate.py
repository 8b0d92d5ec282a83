import contextlib

import pytest
import torch

import gpt.generate
from gpt.generate import generate, generate_no_cache, kv_cache_dtype, next_token_logits, sample_next
from gpt.linear import ROUTES, Linear, linears_for_decoding
from gpt.model import GPT, GPTConfig, KVCache

TINY = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY).eval()


def prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (batch, length), generator=g)


def run(gen) -> torch.Tensor:
    return torch.cat(list(gen), dim=1)


# --- KV cache vs full recomputation -------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("prompt_len", [1, 5, 20])  # 20 > block_size: the prompt is cropped
def test_cached_greedy_tokens_equal_full_recomputation(model, batch, prompt_len):
    idx = prompt(batch, prompt_len)
    n = 40  # runs well past block_size 16, through the sliding window
    cached = run(generate(model, idx, n, temperature=0))
    reference = run(generate_no_cache(model, idx, n, temperature=0))
    assert cached.shape == (batch, n)
    assert torch.equal(cached, reference)


@pytest.mark.parametrize("batch", [1, 3])
def test_cached_step_logits_equal_full_recomputation(model, batch):
    # Teacher-force both paths with the same tokens; compare the logits at every step,
    # before and after the context outgrows block_size.
    context = prompt(batch, 4)
    cache = KVCache(TINY, batch)
    n_new = context.size(1)
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        cached = next_token_logits(model, context, cache, n_new)
        reference = next_token_logits(model, context, None, n_new)
        torch.testing.assert_close(cached, reference, rtol=1e-5, atol=1e-5)
        token = sample_next(reference, temperature=1.0, generator=g)
        context = torch.cat([context, token], dim=1)
        n_new = 1
    assert context.size(1) > 2 * TINY.block_size


def test_sampled_generation_is_seeded_and_cache_independent(model):
    idx = prompt(2, 3)
    kwargs = dict(temperature=0.8, top_k=10, top_p=0.9)
    a = run(generate(model, idx, 25, generator=torch.Generator().manual_seed(7), **kwargs))
    b = run(generate(model, idx, 25, generator=torch.Generator().manual_seed(7), **kwargs))
    c = run(generate_no_cache(model, idx, 25, generator=torch.Generator().manual_seed(7), **kwargs))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_cached_generation_under_bf16_autocast(model):
    """Under autocast the cache holds bf16 keys and values, as the qkv matmul makes them: the
    tokens are those of full recomputation, through the sliding window."""
    idx = prompt(2, 3)
    assert kv_cache_dtype(model) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kv_cache_dtype(model) == torch.bfloat16
        out = run(generate(model, idx, 40, temperature=0))
        reference = run(generate_no_cache(model, idx, 40, temperature=0))
    assert out.shape == (2, 40) and torch.equal(out, reference)


def test_autocast_generation_casts_each_weight_once(model):
    """Autocast keeps one bf16 copy of each weight for its whole region, unless the calls run in
    inference mode; generation must not re-cast every weight at every token. Per extra token only
    the inputs of the 9 matmuls (8 block linears and the head) are cast, not their weights and
    biases (26 casts per token in inference mode, measured)."""
    from torch.profiler import profile

    def casts(n: int) -> int:
        with torch.autocast("cpu", dtype=torch.bfloat16), profile() as p:
            run(generate(model, prompt(1, 1), n, temperature=0))
        return sum(e.count for e in p.key_averages() if e.key == "aten::_to_copy")

    casts(1)  # the first decode of a model times the linears' routes (gpt.linear): not counted
    assert (casts(12) - casts(4)) / 8 <= 9
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in generate(model, prompt(1, 1), 3, temperature=0):
            assert torch.is_grad_enabled()  # no_grad holds inside the generator only


def test_generate_streams_and_restores_training_mode():
    torch.manual_seed(0)
    m = GPT(TINY)  # training mode, as a trainer sampling mid-run would hand it over
    stream = generate(m, prompt(1, 2), 3, temperature=0)
    first = next(stream)
    assert first.shape == (1, 1) and first.dtype == torch.long
    assert not m.training  # dropout is off while generating
    assert len(list(stream)) == 2
    assert m.training


def test_eos_stops_when_every_row_finished(model):
    idx = prompt(3, 4)
    n = 40

    def sampled(**kw):
        return run(generate(model, idx, n, generator=torch.Generator().manual_seed(4), **kw))

    free = sampled()
    # eos: the token that every row has produced soonest (rows sample independently, and the
    # draws do not depend on eos masking, so the unmasked run tells where each row stops).
    firsts = {
        tok: max(int((free[r] == tok).nonzero()[0]) for r in range(3))
        for tok in range(TINY.vocab_size)
        if all((free[r] == tok).any() for r in range(3))
    }
    eos = min(firsts, key=firsts.get)
    stop = firsts[eos] + 1
    assert stop < n  # the test must exercise the early stop
    expected = free[:, :stop].clone()
    for row in range(3):
        first = int((free[row] == eos).nonzero()[0])
        expected[row, first:] = eos  # a finished row keeps emitting eos
    assert torch.equal(sampled(eos_id=eos), expected)


def test_generate_argument_validation(model):
    idx = prompt(1, 3)
    assert list(generate(model, idx, 0)) == []
    for bad in (dict(max_new_tokens=-1), dict(temperature=-0.1), dict(temperature=float("nan")),
                dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0)):
        args = dict(max_new_tokens=5) | bad
        with pytest.raises(ValueError):
            generate(model, idx, args.pop("max_new_tokens"), **args)  # raises at the call
    with pytest.raises(ValueError):
        generate(model, idx[:, :0], 5)


# --- sample_next --------------------------------------------------------------------------


def random_logits(batch=4, vocab=50, seed=0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_cases_are_argmax():
    logits = random_logits()
    argmax = logits.argmax(-1, keepdim=True)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=0), argmax)
    assert torch.equal(sample_next(logits, temperature=0, top_k=5, top_p=0.5), argmax)
    for _ in range(20):
        assert torch.equal(sample_next(logits, top_k=1, generator=g), argmax)
        assert torch.equal(sample_next(logits, top_p=1e-6, generator=g), argmax)
    out = sample_next(logits, temperature=0)
    assert out.shape == (4, 1) and out.dtype == torch.long


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_a_tiny_positive_temperature_is_greedy_not_a_crash(temperature):
    # logits / temperature overflowed to inf (inf - inf = NaN in softmax), so
    # `sample.py --temperature 1e-40` ended in multinomial's traceback.
    logits = random_logits() * 10
    draws = sample_next(logits, temperature=temperature, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, logits.argmax(-1, keepdim=True))


def test_top_k_only_samples_the_top_k():
    logits = random_logits(batch=2, vocab=30).repeat(500, 1)  # 1000 draws in one call
    k = 4
    top = logits[:2].topk(k, dim=-1).indices
    draws = sample_next(logits, temperature=2.0, top_k=k, generator=torch.Generator().manual_seed(1))
    draws = draws.view(500, 2)
    for row in range(2):
        seen = set(draws[:, row].tolist())
        assert seen <= set(top[row].tolist())
        assert len(seen) == k  # with T=2 every kept token shows up in 500 draws


def test_top_p_keeps_the_smallest_nucleus():
    # sorted probabilities 0.5, 0.3, 0.15, 0.05 (cumulative 0.5, 0.8, 0.95, 1.0)
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log().repeat(2000, 1)
    draws = sample_next(logits, top_p=0.75, generator=torch.Generator().manual_seed(2))
    assert set(draws.flatten().tolist()) == {1, 3}
    draws = sample_next(logits, top_p=0.85, generator=torch.Generator().manual_seed(2))
    assert set(draws.flatten().tolist()) == {1, 2, 3}
    # A top_p below fp32's smallest number compared as 0 with every token's mass before it, the
    # most likely one's too: all were dropped, and multinomial raised on the NaNs.
    for tiny in (1e-46, 1e-300):
        assert set(sample_next(logits, top_p=tiny).flatten().tolist()) == {1}


def test_seeded_sampling_is_reproducible():
    logits = random_logits()
    a = [sample_next(logits, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(a[0], a[1])


@pytest.mark.parametrize(
    "bad", [dict(temperature=-1.0), dict(top_k=0), dict(top_k=2.5), dict(top_p=0.0), dict(top_p=1.01)]
)
def test_sample_next_invalid_args(bad):
    with pytest.raises(ValueError):
        sample_next(random_logits(), **bad)


def test_generate_rejects_ids_the_model_cannot_have_made():
    # With vocab_multiple the tables have padding rows: an id from a larger (mismatched)
    # vocabulary was embedded as a zero row without any error, and an eos_id outside the
    # vocabulary is never sampled, so generation silently ran to max_new_tokens.
    torch.manual_seed(0)
    padded = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32, vocab_multiple=64))
    idx = prompt(2, 3)
    assert len(list(generate(padded, idx, 2, eos_id=49))) >= 1
    for bad_idx in (torch.full((1, 3), 55), torch.full((1, 3), -1), idx.float()):
        with pytest.raises(ValueError, match="idx"):
            generate(padded, bad_idx, 2)
    for bad_eos in (50, -1, True, 3.0):
        with pytest.raises(ValueError, match="eos_id"):
            generate(padded, idx, 2, eos_id=bad_eos)


def test_decoding_uses_packed_weights_and_drops_them_after(model, monkeypatch):
    # On a CPU, on the packed route, generate() holds oneDNN copies of the linears' weights for
    # the loop and lets them go when it ends or is closed early; under bf16 autocast, on a CPU
    # with native bf16, bf16 copies. The tokens are those of nn.Linear's products.
    def packed_copies() -> int:
        return sum(m.packed is not None for m in model.modules() if isinstance(m, Linear))

    monkeypatch.setattr(gpt.generate, "linears_for_decoding",
                        lambda model, rows, route=None: linears_for_decoding(model, rows, route="packed"))
    idx = prompt(4, 3)
    with torch.profiler.profile() as prof:
        tokens = run(generate(model, idx, 12, temperature=0.0))
    assert "mkldnn::_linear_pointwise" in {e.name for e in prof.events()}
    assert packed_copies() == 0
    it = generate(model, idx, 12, temperature=0.0)
    next(it)
    assert packed_copies() == len([m for m in model.modules() if isinstance(m, Linear)])
    it.close()
    assert packed_copies() == 0
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:
        run(generate(model, prompt(1, 3), 4, temperature=0.0))
    assert ("mkldnn::_linear_pointwise" in {e.name for e in prof.events()}) == native_bf16
    assert packed_copies() == 0
    monkeypatch.setattr(gpt.generate, "linears_for_decoding", lambda model, rows, route=None: contextlib.nullcontext())
    assert torch.equal(run(generate(model, idx, 12, temperature=0.0)), tokens)


@pytest.mark.parametrize("batch", [1, 4])
def test_each_route_decodes_the_same_tokens(model, monkeypatch, batch):
    # generate() takes the route measured fastest on this machine; every route must give the
    # tokens nn.Linear's products give (they differ in summation order only).
    idx = prompt(batch, 3)
    want = None
    for route in (None,) + ROUTES:
        monkeypatch.setattr(gpt.generate, "linears_for_decoding",
                            lambda model, rows, route=route: linears_for_decoding(model, rows, route=route))
        got = run(generate(model, idx, 12, temperature=0.0))
        want = got if want is None else want
        assert torch.equal(got, want), route
