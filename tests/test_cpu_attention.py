"""gpt/cpu_attention.py: the causal attention formula with a hand-written backward (bf16
training on a CPU). Checked against autograd's own derivative of the formula and against
float64 references, with and without attention dropout."""

import pytest
import torch

from gpt.cpu_attention import causal_attention
from gpt.model import attend


def qkv(B=2, H=3, T=12, D=8, dtype=torch.float64, seed=0, sharpness=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    q = q * sharpness  # larger scores: a peakier softmax, whose backward cancels more
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def reference(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_forward_and_backward_equal_the_formula_in_float64():
    q, k, v = qkv()
    d_out = torch.randn_like(q)
    out = causal_attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    ref = reference(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), d_out)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck(dropout_p):
    # Finite differences against the hand-written backward; the seed is reset inside so that
    # every evaluation drops the same attention weights.
    q, k, v = qkv(B=1, H=2, T=6, D=4)

    def f(q, k, v):
        torch.manual_seed(0)
        return causal_attention(q, k, v, dropout_p)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_dropout_drops_weights_and_rescales_the_rest():
    q, k, v = qkv(T=32)
    torch.manual_seed(0)
    dropped = causal_attention(q, k, v, 0.5)
    kept = causal_attention(q, k, v, 0.0)
    assert not torch.allclose(dropped, kept)
    # Averaged over many masks the output is the undropped one (inverted dropout).
    mean = torch.stack([causal_attention(q, k, v, 0.5) for _ in range(400)]).mean(0)
    assert (mean - kept).abs().mean() < 0.1 * kept.abs().mean()


def test_future_keys_get_no_gradient_and_change_nothing():
    q, k, v = qkv(T=10)
    out = causal_attention(q, k, v)
    out[:, :, :4].sum().backward()  # queries 0..3 see keys 0..3 only
    assert torch.count_nonzero(k.grad[:, :, 4:]) == 0 and torch.count_nonzero(v.grad[:, :, 4:]) == 0
    assert torch.count_nonzero(k.grad[:, :, :4]) > 0


@pytest.mark.parametrize("T", [16, 256])
def test_bf16_is_as_accurate_as_the_explicit_formula(T):
    # Both against float64: the hand-written path must lose no more than autograd's formula does.
    q64, k64, v64 = qkv(B=2, H=2, T=T, D=32, sharpness=2.0)
    d_out = torch.randn_like(q64)
    ref = reference(q64, k64, v64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), d_out)

    def errors(fn):
        q, k, v = (t.detach().bfloat16().requires_grad_() for t in (q64, k64, v64))
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), d_out.bfloat16())
        rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
        return [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, ref_grads)]

    ours = errors(causal_attention)
    formula = errors(lambda q, k, v: attend(q, k, v, q_start=0, dropout_p=0.0, explicit=True))
    for mine, theirs in zip(ours, formula):
        assert mine < 1.25 * theirs + 1e-4, (ours, formula)
        assert mine < 2e-2


def test_autocast_changes_nothing():
    q, k, v = qkv(dtype=torch.bfloat16)
    plain = causal_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = causal_attention(q, k, v)
    assert autocast.dtype == torch.bfloat16 and torch.equal(plain, autocast)


def test_mismatched_inputs_are_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one shape and dtype"):
        causal_attention(q, k[:, :, :5], v)
    with pytest.raises(ValueError, match="one shape and dtype"):
        causal_attention(q, k.float(), v)


def test_second_derivatives_are_refused_not_wrong():
    # The backward is written out for first derivatives only; through it, a double backward
    # (create_graph=True) would miss terms without a word.
    q, k, v = qkv(B=1, H=2, T=5, D=4)
    d_q, = torch.autograd.grad((causal_attention(q, k, v) ** 2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|marked with @once_differentiable"):
        d_q.sum().backward()


def test_only_the_gradients_asked_for_are_computed():
    q, k, v = qkv()
    q.requires_grad_(False), k.requires_grad_(False)
    d_out = torch.randn_like(v)
    causal_attention(q, k, v).backward(d_out)
    v_ref = v.detach().requires_grad_()
    reference(q, k, v_ref).backward(d_out)
    assert q.grad is None and k.grad is None
    torch.testing.assert_close(v.grad, v_ref.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("native_bf16,longest", [(False, 0), (True, 512)])
def test_longest_context_follows_the_cpu(monkeypatch, native_bf16, longest):
    # Without native bf16 oneDNN emulates the matmuls (~1 GFLOP/s): SDPA at every length. With it,
    # 512 positions, with AMX or without (benchmarks/results/attention.json, attention_amd.json).
    from gpt import cpu_attention

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native_bf16)
    assert cpu_attention.max_positions() == longest
    q = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    assert cpu_attention.use_cpu_attention(q, 0, 4) == (longest > 0)
    assert not cpu_attention.use_cpu_attention(q.float(), 0, 4)
