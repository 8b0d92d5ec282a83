import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from gpt.linear import MIN_GAIN, ROUTES, Linear, _pick, linears_for_decoding
from gpt.cpu_attention import max_positions
from gpt.model import GPT, GPTConfig, KVCache, attend, closed_form_num_params

TINY = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


def make_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(TINY, **overrides))


def random_tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (batch, length), generator=g)


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_future_tokens_never_change_earlier_logits(attention):
    model = make_model(attention=attention).eval()
    idx = random_tokens(2, TINY.block_size)
    logits, _ = model(idx)
    for t in (0, 7, TINY.block_size - 1):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % TINY.vocab_size
        logits2, _ = model(changed)
        torch.testing.assert_close(logits2[:, :t], logits[:, :t], rtol=0, atol=0)
        assert not torch.allclose(logits2[:, t], logits[:, t])


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_sdpa_equals_explicit_formula(dropout):
    sdpa = make_model(attention="sdpa", dropout=dropout).eval()
    explicit = make_model(attention="explicit", dropout=dropout).eval()
    explicit.load_state_dict(sdpa.state_dict())
    idx = random_tokens(3, TINY.block_size)
    torch.testing.assert_close(explicit(idx)[0], sdpa(idx)[0], rtol=1e-5, atol=1e-5)


def test_bf16_on_cpu_trains_with_cpu_attention_up_to_its_longest_context():
    # Where SDPA's CPU flash kernel is the slower one (bf16, training and prefill: gpt.model.attend):
    # up to 512 positions on a CPU with native bf16, none without.
    longest = max_positions()
    assert longest == (512 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 0)
    g = torch.Generator().manual_seed(0)
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    for S, ours in ([(16, True), (longest, True), (longest + 1, False)] if longest else [(16, False)]):
        q, k, v = (torch.randn(2, 3, S, 8, generator=g).bfloat16() for _ in range(3))
        fused = lambda: attend(q, k, v, q_start=0, dropout_p=0.0, explicit=False)  # noqa: E731
        reference = attend(q, k, v, q_start=0, dropout_p=0.0, explicit=True)
        ops = aten_ops(fused)
        assert (flash in ops) != ours and ("aten::baddbmm" in ops) == ours
        torch.testing.assert_close(fused(), reference, rtol=2e-2, atol=2e-2)
        q32, k32, v32 = q.float(), k.float(), v.float()  # fp32 keeps SDPA at every length
        assert flash in aten_ops(lambda: attend(q32, k32, v32, q_start=0, dropout_p=0.0, explicit=False))
    # Decoding after a cache (q_start > 0) keeps SDPA: the hand-written path is causal from 0.
    q, k, v = (torch.randn(2, 3, n, 8, generator=g).bfloat16() for n in (1, 16, 16))
    assert "aten::baddbmm" not in aten_ops(lambda: attend(q, k, v, q_start=15, dropout_p=0.0, explicit=False))


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_cached_forward_equals_full_forward_in_chunks(attention):
    # Chunks of 5, 1, 3, 7 exercise prefill, single-token and multi-token-after-cache masks.
    model = make_model(attention=attention).eval()
    idx = random_tokens(2, TINY.block_size)
    full, _ = model(idx)
    cache = KVCache(TINY, 2)
    pieces, start = [], 0
    for n in (5, 1, 3, 7):
        pieces.append(model(idx[:, start : start + n], kv_cache=cache)[0])
        start += n
    assert cache.length == TINY.block_size
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block_size 16"):
        model(idx[:, :1], kv_cache=cache)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"bias": False}, {"tie_weights": False}, {"bias": False, "tie_weights": False},
     {"n_layer": 3, "n_head": 4, "n_embd": 48, "vocab_size": 7, "block_size": 5},
     {"vocab_multiple": 64}, {"vocab_multiple": 64, "tie_weights": False}],
)
def test_param_count_matches_closed_form(overrides):
    model = make_model(**overrides)
    assert model.num_params() == closed_form_num_params(model.config)
    assert model.num_params(exclude_position_embedding=True) == (
        closed_form_num_params(model.config) - model.config.block_size * model.config.n_embd
    )


def test_weights_are_tied_by_default_and_untied_on_request():
    tied = make_model()
    assert tied.lm_head.weight is tied.tok_emb.weight
    untied = make_model(tie_weights=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_init_statistics():
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=4, n_head=4, n_embd=128)
    torch.manual_seed(0)
    model = GPT(cfg)
    residual = torch.cat([w.flatten() for b in model.blocks for w in (b.attn.proj.weight, b.mlp.proj.weight)])
    assert residual.std().item() == pytest.approx(0.02 / math.sqrt(2 * cfg.n_layer), rel=0.05)
    others = torch.cat([model.tok_emb.weight.flatten()] + [b.mlp.fc.weight.flatten() for b in model.blocks])
    assert others.std().item() == pytest.approx(0.02, rel=0.05)
    assert all((b.attn.qkv.bias == 0).all() for b in model.blocks)
    assert all((b.ln1.weight == 1).all() and (b.ln1.bias == 0).all() for b in model.blocks)


def test_loss_at_init_is_about_log_vocab():
    model = make_model()
    idx = random_tokens(4, TINY.block_size, seed=2)
    targets = random_tokens(4, TINY.block_size, seed=3)
    logits, loss = model(idx, targets)
    assert logits.shape == (4, TINY.block_size, TINY.vocab_size)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.5
    assert model(idx)[1] is None


def test_ignore_index_minus_one_skips_targets():
    model = make_model().eval()
    idx = random_tokens(2, 8)
    targets = random_tokens(2, 8, seed=5)
    masked = targets.clone()
    masked[:, 4:] = -1
    _, loss_masked = model(idx, masked)
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, TINY.vocab_size), targets[:, :4].reshape(-1))
    torch.testing.assert_close(loss_masked, expected)


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_bf16_autocast_forward_backward_on_cpu(attention):
    model = make_model(attention=attention, dropout=0.1)
    idx = random_tokens(2, TINY.block_size)
    targets = random_tokens(2, TINY.block_size, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_sequence_longer_than_block_size_raises():
    model = make_model()
    with pytest.raises(ValueError, match=r"sequence length 17 .* block_size 16"):
        model(random_tokens(1, TINY.block_size + 1))


@pytest.mark.parametrize(
    "bad",
    [{"n_embd": 30, "n_head": 4}, {"n_layer": 0}, {"vocab_size": -1}, {"block_size": 0},
     {"attention": "flash"}, {"dropout": 1.0}, {"vocab_multiple": 0}],
)
def test_config_validation(bad):
    with pytest.raises(ValueError):
        dataclasses.replace(TINY, **bad)


def test_large_vocab_is_not_a_model_concern():
    GPTConfig(vocab_size=100_000, block_size=4, n_layer=1, n_head=1, n_embd=4)


@pytest.mark.parametrize("tie_weights", [True, False])
def test_flops_per_token_formula(tie_weights):
    cfg = dataclasses.replace(TINY, tie_weights=tie_weights)
    model = GPT(cfg)
    n = closed_form_num_params(cfg) - cfg.block_size * cfg.n_embd
    if not tie_weights:
        n -= cfg.vocab_size * cfg.n_embd  # the token table is a lookup; lm_head is counted
    L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
    assert model.flops_per_token() == 6 * n + 12 * L * H * Q * T


@pytest.mark.parametrize("tie_weights", [True, False])
def test_padded_vocabulary_computes_the_same_function(tie_weights):
    """vocab_multiple pads the tables (50 -> 64 rows) for matmul shapes; with the same weights
    in the real rows, the model is the one without padding: same logits, losses (both paths)
    and gradients, and the padding rows (which start at 0) get no gradient."""
    plain = make_model(tie_weights=tie_weights)
    padded = make_model(tie_weights=tie_weights, vocab_multiple=64)
    assert padded.config.padded_vocab_size == 64 and padded.tok_emb.weight.shape == (64, TINY.n_embd)
    assert padded.lm_head.weight.shape == (64, TINY.n_embd)
    for table in (padded.tok_emb.weight, padded.lm_head.weight):
        assert (table[TINY.vocab_size:] == 0).all() and (table[: TINY.vocab_size] != 0).all()
    padded_state = padded.state_dict()
    with torch.no_grad():
        for name, value in plain.state_dict().items():
            padded_state[name][: value.size(0)].copy_(value)

    idx, targets = random_tokens(3, TINY.block_size), random_tokens(3, TINY.block_size, seed=5)
    targets[0, :4] = -1
    logits_plain, loss_plain = plain(idx, targets)
    logits_padded, loss_padded = padded(idx, targets)
    assert logits_padded.shape == logits_plain.shape == (3, TINY.block_size, TINY.vocab_size)
    torch.testing.assert_close(logits_padded, logits_plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss_padded, loss_plain, rtol=1e-6, atol=1e-6)
    _, chunked_plain = plain(idx, targets, return_logits=False)
    _, chunked_padded = padded(idx, targets, return_logits=False)
    torch.testing.assert_close(chunked_padded, chunked_plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked_padded, loss_plain, rtol=1e-6, atol=1e-6)
    (chunked_plain + loss_plain).backward()
    (chunked_padded + loss_padded).backward()
    grads = dict(padded.named_parameters())
    for name, p in plain.named_parameters():
        g = grads[name].grad
        torch.testing.assert_close(g[: p.size(0)], p.grad, rtol=1e-5, atol=1e-7)
        if name in ("tok_emb.weight", "lm_head.weight"):
            assert (g[TINY.vocab_size:] == 0).all(), name

    # Generation never sees the padding: its logits stop at vocab_size.
    last, _ = padded.eval()(idx, last_only=True)
    assert last.shape == (3, 1, TINY.vocab_size)


def aten_ops(fn) -> set[str]:
    with torch.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_features", [80, 36, 35])
def test_linear_row_blocks_route_computes_nn_linear(bias, out_features):
    # On the "row_blocks" route, no-grad products of 1-64 rows on a CPU are one batched product
    # of W's row blocks with x^T (gpt.linear.Linear): the same product up to summation order.
    # With autograd, for more rows, and outside the block, it is nn.Linear's own, bit for bit.
    # 80 rows make 8 blocks, 36 make 4, and 35 (odd) cannot be cut: nn.Linear's product.
    torch.manual_seed(0)
    layer = Linear(48, out_features, bias=bias)
    batched = "aten::baddbmm" if bias else "aten::bmm"
    with linears_for_decoding(layer, rows=1, route="row_blocks"):
        for shape in [(1, 48), (2, 48), (1, 1, 48), (3, 5, 48), (64, 48), (65, 48), (2, 40, 48)]:
            x = torch.randn(shape)
            expected = F.linear(x, layer.weight, layer.bias)
            with torch.no_grad():
                y = layer(x)
            assert y.shape == expected.shape and y.is_contiguous()
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
            assert torch.equal(layer(x), expected)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # bf16: nn.Linear's
                assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        for rows, fast in [(1, True), (8, True), (64, True), (65, False)]:
            x = torch.randn(rows, 48)
            with torch.no_grad():
                assert (batched in aten_ops(lambda: layer(x))) == (fast and out_features != 35)
            assert batched not in aten_ops(lambda: layer(x))
    with torch.no_grad():
        x = torch.randn(8, 48)
        assert batched not in aten_ops(lambda: layer(x)) and torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


PACKED_OP = "mkldnn::_linear_pointwise"


@pytest.mark.parametrize("bias", [True, False])
def test_linear_packed_route_serves_every_row_count_with_a_fresh_copy(bias):
    # On the "packed" route, no-grad fp32 products go through oneDNN with its blocked copy of W
    # (the same product up to summation order); autograd keeps nn.Linear's own; a weight
    # changed in place since it was copied is never read from the stale copy.
    torch.manual_seed(0)
    model = torch.nn.Sequential(Linear(48, 80, bias=bias), Linear(80, 35, bias=bias))
    layer, odd = model
    with torch.no_grad(), linears_for_decoding(model, rows=3, route="packed"):
        assert all(m.packed is not None for m in model)
        for lin, shape in [(layer, (1, 48)), (layer, (2, 5, 48)), (layer, (64, 48)), (layer, (300, 48)),
                           (odd, (4, 80))]:
            x = torch.randn(shape)
            y = lin(x)
            expected = F.linear(x, lin.weight, lin.bias)
            assert y.shape == expected.shape and y.is_contiguous()
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
            assert PACKED_OP in aten_ops(lambda: lin(x))
        with torch.enable_grad():
            x = torch.randn(4, 48)
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.weight.mul_(2)
        x = torch.randn(100, 48)
        assert PACKED_OP not in aten_ops(lambda: layer(x))
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert all(m.packed is None and m.decoding is None for m in model)


def test_a_route_that_cannot_serve_here_is_nn_linears_product():
    model = torch.nn.Sequential(Linear(16, 32), Linear(16, 32).double())
    with torch.autocast("cpu", dtype=torch.float16), linears_for_decoding(model, rows=8, route="packed"):
        assert all(m.packed is None and m.decoding.route == "plain" for m in model)
    with linears_for_decoding(model, rows=8, route="row_blocks"):
        assert all(m.packed is None for m in model)  # copies only for the packed route
    with linears_for_decoding(model, rows=3, route="packed"):
        assert model[0].packed is not None and model[1].packed is None  # float64: not packed
        with torch.no_grad():
            x = torch.randn(5, 16, dtype=torch.float64)
            assert torch.equal(model[1](x), F.linear(x, model[1].weight, model[1].bias))
    with pytest.raises(ValueError, match="route must be one of"):
        with linears_for_decoding(model, rows=3, route="fast"):
            pass


def test_the_measured_route_is_one_usable_here_timed_once_per_model_and_rows(monkeypatch):
    import gpt.linear

    timed = []
    real = gpt.linear._fastest
    monkeypatch.setattr(gpt.linear, "_fastest", lambda *a: timed.append(a[2:]) or real(*a))
    torch.manual_seed(0)
    model = torch.nn.Sequential(Linear(32, 64), Linear(64, 32))
    rng = torch.get_rng_state()
    with linears_for_decoding(model, rows=2):
        route = model[0].decoding.route
        assert route in ROUTES and model[1].decoding.route == route
        assert (model[0].packed is not None) == (route == "packed")
    assert torch.equal(torch.get_rng_state(), rng)  # timing drew no numbers from the caller's stream
    with linears_for_decoding(model, rows=2):
        assert model[0].decoding.route == route
    with linears_for_decoding(model, rows=200):  # timed at 64 rows: another measurement
        pass
    with linears_for_decoding(model, rows=100):  # the same 64
        pass
    assert [rows for rows, _ in timed] == [2, 64]
    assert timed[0][1] == ("plain", "row_blocks", "packed")
    with torch.autocast("cpu", dtype=torch.bfloat16), linears_for_decoding(model, rows=2):
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        assert len(timed) == (3 if native else 2)  # bf16: plain or packed, where it can be packed


def test_timing_copies_go_before_the_block_runs_and_hooks_see_no_timing(monkeypatch):
    # The packed copies made to time that route were held for the whole block (GPT-2 124M:
    # ~490 MB) when another route won; and timing went through Module.__call__, so a user's
    # forward hooks saw a dozen calls on random inputs.
    import gc
    import weakref

    import gpt.linear

    made = []
    real_pack = gpt.linear._pack
    monkeypatch.setattr(gpt.linear, "_pack", lambda linears: (p := real_pack(linears), made.extend(
        weakref.ref(w) for w in p.values()))[0])
    monkeypatch.setattr(gpt.linear, "_pick", lambda seconds: "plain")
    model = torch.nn.Sequential(Linear(32, 64), Linear(64, 32))
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    with linears_for_decoding(model, rows=4):
        gc.collect()
        assert made and all(r() is None for r in made)
        assert model[0].decoding.route == "plain" and calls == []


def test_a_model_is_measured_again_once_its_weights_can_take_other_routes(monkeypatch):
    # The first decode of a bf16 model (no fp32 weights: nothing to time) recorded "plain" for
    # good: after model.float() it was never timed.
    import gpt.linear

    timed = []
    real = gpt.linear._fastest
    monkeypatch.setattr(gpt.linear, "_fastest", lambda *a: timed.append(a[2]) or real(*a))
    model = torch.nn.Sequential(Linear(32, 64), Linear(64, 32)).bfloat16()
    with linears_for_decoding(model, rows=2):
        assert model[0].decoding.route == "plain"
    assert timed == []
    model.float()
    with linears_for_decoding(model, rows=2):
        pass
    assert timed == [2]


def test_another_route_must_beat_plain_by_min_gain():
    assert _pick({"plain": 1.0, "row_blocks": 1.0 / (MIN_GAIN * 1.01), "packed": 0.99}) == "row_blocks"
    assert _pick({"plain": 1.0, "row_blocks": 0.95, "packed": 1.0 / (MIN_GAIN * 0.99)}) == "plain"
    assert _pick({"plain": 0.5, "packed": 0.1}) == "packed"


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_copies_serve_under_autocast_on_cpus_with_native_bf16(bias):
    # Under bf16 autocast the packed route holds a bf16 copy where the CPU has native bf16;
    # without it (oneDNN emulates bf16) nothing is packed.
    torch.manual_seed(0)
    layer = Linear(48, 80, bias=bias)
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    with (torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16),
          linears_for_decoding(layer, rows=1, route="packed")):
        assert (layer.packed is not None) == native
        for shape in [(1, 48), (2, 1, 48), (8, 48), (100, 48)]:
            x = torch.randn(shape)
            expected = F.linear(x, layer.weight, layer.bias)  # autocast's bf16 product
            y = layer(x)
            assert y.dtype == expected.dtype == torch.bfloat16 and y.shape == expected.shape
            torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-3)
            assert (PACKED_OP in aten_ops(lambda: layer(x))) == native
    with torch.no_grad(), linears_for_decoding(layer, rows=1, route="packed"):  # fp32 outside autocast
        assert layer.packed.dtype == torch.float32


def test_linear_few_rows_path_reports_a_wrong_input_width_like_nn_linear():
    # The batched path reshaped by numel: x [2, 12] into a 8-wide layer failed with "shape
    # '[2, 16]' is invalid for input of size 48", naming sizes the caller never wrote.
    layer = Linear(8, 16)
    for route in ROUTES:
        with linears_for_decoding(layer, rows=2, route=route):
            for shape in [(2, 12), (4, 4), (3,)]:
                x = torch.randn(shape)
                with pytest.raises(RuntimeError, match="cannot be multiplied|size mismatch"):
                    layer(x)
                with torch.no_grad(), pytest.raises(RuntimeError, match="cannot be multiplied|size mismatch"):
                    layer(x)


def test_cropping_the_context_keeps_the_function_on_shorter_inputs():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    x = torch.randint(0, 50, (2, 8))
    before = model(x)[0]
    first_rows = model.pos_emb.weight[:8].detach().clone()
    model.crop_block_size(8)
    assert model.config.block_size == 8 and model.pos_emb.weight.shape == (8, 16)
    assert torch.equal(model.pos_emb.weight, first_rows)
    assert torch.equal(model(x)[0], before)
    with pytest.raises(ValueError, match="exceeds the model's block_size 8"):
        model(torch.randint(0, 50, (1, 9)))
    with pytest.raises(ValueError, match="must be in 1..8"):
        model.crop_block_size(9)


def test_the_explicit_formula_keeps_float64_and_does_not_overflow_in_fp16():
    """The reference path rounded float64 scores to fp32 for its softmax (1e-7 off, where SDPA is
    exact), and scaled Q K^T after the product: fp16 dot products over 65,504 became inf and
    the softmax NaN, where SDPA (which scales first) stays finite (review findings)."""
    from gpt.model import attend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8, dtype=torch.float64, generator=g) for _ in range(3))
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-2, -1) / 8 ** 0.5).masked_fill(~mask, float("-inf"))
    exact = torch.softmax(scores, dim=-1) @ v
    ours = attend(q, k, v, q_start=0, dropout_p=0.0, explicit=True)
    assert ours.dtype == torch.float64 and (ours - exact).abs().max() < 1e-14

    big = torch.full((1, 1, 4, 64), 35.0, dtype=torch.float16)  # q.k = 78,400 before the 1/8 scale
    out = attend(big, big, big, q_start=0, dropout_p=0.0, explicit=True)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.float(), attend(big, big, big, q_start=0, dropout_p=0.0, explicit=False).float())
