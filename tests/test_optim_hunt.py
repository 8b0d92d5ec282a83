"""gpt/optim.py and gpt/muon.py against what they promise: the parameter groups, the schedule,
MuonAdamW against a plain reference, skipped steps, state round trips, odd gradients and dtypes."""

import copy
from dataclasses import replace

import pytest
import torch

from gpt.config import TrainConfig
from gpt.model import GPT, GPTConfig
from gpt.muon import MuonAdamW, orthogonalize
from gpt.optim import build_optimizer, learning_rate_at


@pytest.mark.parametrize("kw", [{}, {"bias": False}, {"tie_weights": False}, {"n_layer": 1},
                                {"vocab_multiple": 64, "tie_weights": False, "bias": False}])
@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_every_parameter_is_in_exactly_one_group_with_the_promised_rule(kw, name):
    model = GPT(GPTConfig(**{"vocab_size": 50, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **kw}))
    config = TrainConfig(optimizer=name, learning_rate=1e-3, **({"muon_lr": 0.02} if name == "muon" else {})).validate()
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}  # the tied table once
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(names)
    for group in optimizer.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            hidden = p.dim() == 2 and n.startswith("blocks.")
            assert group.get("muon", False) == (name == "muon" and hidden), n
            if not group.get("muon", False):
                assert group["weight_decay"] == (config.weight_decay if p.dim() == 2 else 0.0), n


def test_the_schedule_warms_up_decays_and_stays_at_the_floor():
    config = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100).validate()
    for kw in [{}, {"warmup_steps": 0}, {"lr_decay_steps": 50}, {"min_lr": 1e-3}, {"min_lr": 0.0}]:
        c = replace(config, **kw).validate()
        lrs = [learning_rate_at(s, c) for s in range(150)]
        end = c.lr_decay_steps or c.max_steps
        assert lrs[0] == pytest.approx(c.learning_rate / c.warmup_steps if c.warmup_steps else c.learning_rate)
        assert max(lrs) == pytest.approx(c.learning_rate)
        assert lrs[c.warmup_steps] == pytest.approx(c.learning_rate)
        assert all(lr == c.min_lr for lr in lrs[end:])
        assert all(a <= b for a, b in zip(lrs[:c.warmup_steps], lrs[1:c.warmup_steps]))
        assert all(a >= b for a, b in zip(lrs[c.warmup_steps:], lrs[c.warmup_steps + 1:]))
        step = (c.learning_rate - c.min_lr) * 0.1 + 1e-12  # no jump at the boundaries
        bound = max(step, c.learning_rate / max(1, c.warmup_steps)) * (1 + 1e-9)
        assert all(abs(a - b) <= bound for a, b in zip(lrs, lrs[1:]))
    # The curve's shape, by hand: linear warmup (step 4 of 10 is the 5th: half the peak), then a
    # cosine, here over the 40 steps 10..50: (1 + cos(pi/4)) / 2 = 0.8536 of the way down a quarter in.
    c = replace(config, lr_decay_steps=50).validate()
    assert learning_rate_at(4, c) == pytest.approx(0.5e-3)
    for at, left in [(20, 0.8535534), (30, 0.5), (40, 0.1464466)]:
        assert learning_rate_at(at, c) == pytest.approx(1e-4 + left * 0.9e-3, rel=1e-6)


def _reference_muon(weights, grads_seq, lr, momentum, weight_decay):
    a, b, c = 3.4445, -4.7750, 2.0315
    weights = [w.clone() for w in weights]
    buffers = [torch.zeros_like(w) for w in weights]
    for grads in grads_seq:
        for i, g in enumerate(grads):
            buffers[i] = momentum * buffers[i] + g
            x = g + momentum * buffers[i]  # Nesterov
            x = x / (x.norm() + 1e-7)
            tall = x.size(0) > x.size(1)
            x = x.T if tall else x
            for _ in range(5):
                gram = x @ x.T
                x = a * x + (b * gram + c * gram @ gram) @ x
            x = x.T if tall else x
            scale = lr * max(1.0, weights[i].size(0) / weights[i].size(1)) ** 0.5
            weights[i] = weights[i] * (1 - lr * weight_decay) - scale * x
    return weights


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("flag", [False, True])
def test_muon_matches_a_plain_reference(fused, flag):
    torch.manual_seed(0)
    shapes = [(8, 24), (24, 8), (16, 16), (8, 24)]
    weights = [torch.randn(*s) for s in shapes]
    grads_seq = [[torch.randn(*s) for s in shapes] for _ in range(3)]
    params = [w.clone().requires_grad_() for w in weights]
    optimizer = MuonAdamW([{"params": params, "muon": True, "lr_scale": 20.0, "weight_decay": 0.1}],
                          lr=1e-3, momentum=0.9, fused=fused)
    if flag:
        optimizer.found_inf = torch.tensor(0.0)
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    for p, r in zip(params, _reference_muon(weights, grads_seq, 0.02, 0.9, 0.1)):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-5)


def _small(fused, dtype=torch.float32, params=None):
    torch.manual_seed(1)
    params = params or [torch.randn(8, 24, dtype=dtype, requires_grad=True), torch.randn(24, 8, dtype=dtype, requires_grad=True),
                        torch.randn(8, dtype=dtype, requires_grad=True), torch.randn(4, 4, dtype=dtype, requires_grad=True)]
    groups = [{"params": params[:2], "muon": True, "lr_scale": 20.0, "weight_decay": 0.1},
              {"params": params[3:], "weight_decay": 0.1}, {"params": params[2:3]}, {"params": []}]
    return params, MuonAdamW(groups, lr=1e-2, fused=fused)


def test_a_skipped_step_leaves_weights_and_all_state_alone():
    params, optimizer = _small(fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    weights, state = [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict()["state"])
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    optimizer.found_inf = torch.tensor(1.0)
    optimizer.step()
    assert all(torch.equal(w, p) for w, p in zip(weights, params))
    after = optimizer.state_dict()["state"]
    assert state.keys() == after.keys()
    for i in state:
        assert state[i].keys() == after[i].keys()
        for key in state[i]:
            assert torch.equal(state[i][key], after[i][key]), (i, key)


@pytest.mark.parametrize("fused", [False, True])
def test_the_state_round_trips_with_cpu_steps(fused):
    params, optimizer = _small(fused)
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]
    for step in grads[:2]:
        for p, g in zip(params, step):
            p.grad = g.clone()
        optimizer.step()
    twins = [p.detach().clone().requires_grad_() for p in params]
    saved = copy.deepcopy(optimizer.state_dict())
    for s in saved["state"].values():
        if "step" in s:
            s["step"] = s["step"].cpu()
    _, resumed = _small(fused, params=twins)
    resumed.load_state_dict(saved)
    for step in grads[2:]:
        for p, t, g in zip(params, twins, step):
            p.grad, t.grad = g.clone(), g.clone()
        optimizer.step()
        resumed.step()
    assert all(torch.equal(p, t) for p, t in zip(params, twins))


def test_fused_and_foreach_agree_and_missing_or_zero_gradients_are_fine():
    a, foreach = _small(fused=False)
    b, fused = _small(fused=True)
    for _ in range(3):
        for p, q in zip(a, b):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        foreach.step()
        fused.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))

    params, optimizer = _small(fused=True)
    params[0].grad, params[2].grad = None, None
    params[1].grad, params[3].grad = torch.zeros_like(params[1]), torch.zeros_like(params[3])
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert torch.equal(params[0], before[0]) and torch.equal(params[2], before[2])  # no gradient: untouched
    assert params[0] not in optimizer.state and params[2] not in optimizer.state
    assert torch.equal(params[1], before[1] * (1 - 0.2 * 0.1))  # zero gradient: weight decay alone
    torch.testing.assert_close(params[3], before[3] * (1 - 1e-2 * 0.1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_matrices_get_a_full_size_update_at_any_gradient_scale(dtype):
    # float16 tops out at 65504: a 64 x 256 gradient of entries ~1e3 has a larger Frobenius norm,
    # which made the normalization divide by inf and the whole update zero.
    torch.manual_seed(0)
    g = torch.randn(64, 256)
    exact = orthogonalize(g)
    for scale in (1e-4, 1.0, 1e3, 1e4):
        out = orthogonalize((g * scale).to(dtype))
        assert out.dtype == dtype
        out = out.float()
        cosine = (out * exact).sum() / (out.norm() * exact.norm())
        assert cosine > 0.999, (scale, cosine)
    for fused in (False, True):
        params, optimizer = _small(fused, dtype)
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.randn_like(p) * 1e4 if p.dim() == 2 else torch.randn_like(p)
        optimizer.step()
        assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(params, before))
        muon = params[0].float() - before[0].float() * (1 - 0.2 * 0.1)
        assert muon.norm() > 0.1  # ~0.2 per singular direction, not 0
