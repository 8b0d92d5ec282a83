"""The fast paths compute what the plain paths compute: the chunked loss (gpt/loss.py), the
last-position logits of generation, tokens handed out by generate(), the time-bounded peak
measurement, and the benchmark's peer (same function as ours)."""

import dataclasses
import time

import pytest
import torch
import torch.nn.functional as F

import gpt.loss
from gpt.generate import generate
from gpt.mfu import measure_matmul_flops
from gpt.model import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32)


def model_and_batch(seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(CONFIG)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(0, CONFIG.vocab_size, (3, CONFIG.block_size), generator=g)
    y = torch.randint(0, CONFIG.vocab_size, (3, CONFIG.block_size), generator=g)
    return model, x, y


def loss_and_grads(model, x, y, **kwargs):
    model.zero_grad(set_to_none=True)
    _, loss = model(x, y, **kwargs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("rows", [7, 1000])  # several chunks (the last one short), or one
@pytest.mark.parametrize("ignore", [False, True])
def test_chunked_loss_equals_plain_loss_and_gradients(monkeypatch, rows, ignore):
    monkeypatch.setitem(gpt.loss.CHUNK_ELEMENTS, "cpu", rows * CONFIG.vocab_size)
    model, x, y = model_and_batch()
    if ignore:
        y[:, 5:20] = -1
    plain_loss, plain_grads = loss_and_grads(model, x, y)
    loss, grads = loss_and_grads(model, x, y, return_logits=False)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_loss_untied_and_without_grad():
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(CONFIG, tie_weights=False))
    _, x, y = model_and_batch()
    plain_loss, plain_grads = loss_and_grads(model, x, y)
    loss, grads = loss_and_grads(model, x, y, return_logits=False)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads["lm_head.weight"], plain_grads["lm_head.weight"], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        logits, loss = model(x, y, return_logits=False)
    assert logits is None
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)


def test_chunked_loss_under_bf16_autocast_is_as_close_to_fp32_as_the_plain_path():
    model, x, y = model_and_batch()
    fp32_loss, fp32_grads = loss_and_grads(model, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_loss, plain_grads = loss_and_grads(model, x, y)
        loss, grads = loss_and_grads(model, x, y, return_logits=False)
    assert loss.dtype == torch.float32
    assert abs(loss - fp32_loss) <= 2 * abs(plain_loss - fp32_loss) + 1e-3
    for name, grad in fp32_grads.items():
        ours = (grads[name] - grad).norm() / grad.norm()
        plain = (plain_grads[name] - grad).norm() / grad.norm()
        assert ours <= 2 * plain + 1e-3, name


def test_chunked_loss_stays_finite_when_the_target_is_far_below_the_best_logit():
    """exp(z_t - max z) underflows to 0 once the target's logit is ~104 below the best one; the
    loss, logsumexp(z) - z_t, is still finite (~240 for row 0 here) and must be computed so."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(16, 8)
    weight[3] = 0.0
    weight[5] = 60 * x.detach()[0] / x.detach()[0].norm() ** 2 * 4  # row 0: logit 5 is 240, logit 3 is 0
    targets = torch.tensor([3, 1, 2, 3])
    plain = F.cross_entropy(x @ weight.t(), targets)
    ours = gpt.loss.linear_cross_entropy(x, weight, targets)
    assert plain > 50 and torch.isfinite(ours)
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-5)
    (grad_plain,) = torch.autograd.grad(plain, x)
    (grad_ours,) = torch.autograd.grad(ours, x)
    torch.testing.assert_close(grad_ours, grad_plain, rtol=1e-5, atol=1e-6)


def test_chunked_loss_with_every_target_ignored_is_nan_like_cross_entropy():
    model, x, y = model_and_batch()
    y[:] = -1
    _, loss = model(x, y, return_logits=False)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(torch.zeros(2, 3), torch.tensor([-1, -1]), ignore_index=-1))


def test_last_only_logits_are_the_last_row():
    model, x, _ = model_and_batch()
    model.eval()
    full, _ = model(x)
    last, _ = model(x, last_only=True)
    assert last.shape == (3, 1, CONFIG.vocab_size)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="last_only"):
        model(x, x, last_only=True)


def test_generated_tokens_are_ordinary_tensors():
    # generate() runs under inference_mode; what it yields must still be usable for training.
    model, x, _ = model_and_batch()
    tokens = torch.cat(list(generate(model, x[:1, :4], 6, temperature=0)), dim=1)
    assert not tokens.is_inference()
    model.train()
    _, loss = model(tokens, tokens)
    loss.backward()


def test_peak_measurement_is_time_bounded():
    start = time.perf_counter()
    flops = measure_matmul_flops(torch.device("cpu"), torch.bfloat16, max_seconds=0.5)
    assert flops > 0 and time.perf_counter() - start < 60  # minutes before, without AVX512-BF16


def test_benchmark_peer_is_the_same_model():
    pytest.importorskip("transformers")
    from benchmarks.bench_train import build_pair

    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, batch_size=2)
    ours, peer, check = build_pair(shape, torch.device("cpu"))
    assert check["params_ours"] == check["params_peer"] == ours.num_params()
    assert check["max_abs_logit_diff_same_weights"] < 1e-4


def test_benchmark_times_the_padded_vocabulary_as_the_same_model(monkeypatch):
    """bench_train --vocab-multiple (gpu.sh stage 2): a third contender, ours with the tables
    padded as train.py pads them, checked to compute the same logits."""
    pytest.importorskip("transformers")
    from benchmarks import bench_train

    monkeypatch.setitem(bench_train.SHAPES, "tiny", dict(n_layer=1, n_head=2, n_embd=32, block_size=16,
                                                         vocab_size=50, batch_size=2))
    r = bench_train.run_case("tiny", "float32", device=torch.device("cpu"), vocab_multiple=64,
                             budget_s=0.1, min_rounds=1, max_rounds=1)
    assert set(r["results"]) == {"ours", "peer", "ours+pad64"}
    assert r["max_abs_logit_diff_padded"] < 1e-4 and r["ratio_padded_over_ours"] > 0
    assert "padded vocabulary / ours" in bench_train.format_case(r)


def test_compile_auto_means_cuda_only(tmp_path):
    from gpt.config import ConfigError, TrainConfig, apply_overrides, load_toml
    from gpt.parallel import compile_enabled

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    auto = TrainConfig().validate()
    assert auto.compile == "auto" and not compile_enabled(auto.compile, cpu) and compile_enabled(auto.compile, cuda)
    # TOML booleans (configs/gpt2_124m.toml: compile = true) and CLI words both work.
    (tmp_path / "c.toml").write_text("compile = true\n")
    on = apply_overrides(TrainConfig(), load_toml(tmp_path / "c.toml"), "c.toml").validate()
    assert on.compile == "true" and compile_enabled(on.compile, cpu)
    off = apply_overrides(TrainConfig(), {"compile": "false"}, "command line").validate()
    assert not compile_enabled(off.compile, cuda)
    with pytest.raises(ConfigError, match="compile = 'maybe' is not allowed; choose one of auto, true, false"):
        apply_overrides(TrainConfig(), {"compile": "maybe"}, "command line").validate()


def test_chunked_loss_weight_gradient_does_not_overflow_under_fp16_autocast():
    """Under fp16 the chunk's dz^T x is formed before the 1/n_valid of the mean: 20,000 rows with
    the same target and a feature of 4 sum to -80,000, past fp16's largest finite 65,504. The
    plain path divides first, so its gradient is finite. GradScaler cannot help here (it scales
    in backward), and an inf gradient would skip every step."""
    n, width, vocab = 20_000, 8, 64
    x = torch.full((n, width), 4.0, requires_grad=True)
    weight = (torch.randn(vocab, width, generator=torch.Generator().manual_seed(0)) * 0.02).requires_grad_()
    targets = torch.zeros(n, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.float16):
        ours = gpt.loss.linear_cross_entropy(x, weight, targets)
    grad_x, grad_w = torch.autograd.grad(ours, (x, weight))
    exact_x, exact_w = torch.autograd.grad(F.cross_entropy(F.linear(x, weight), targets), (x, weight))
    assert torch.isfinite(grad_w).all() and torch.isfinite(grad_x).all()
    torch.testing.assert_close(grad_w, exact_w, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(grad_x, exact_x, rtol=1e-2, atol=1e-7)


def test_a_model_told_not_to_chunk_its_loss_returns_the_plain_loss_alone(monkeypatch):
    model, x, y = model_and_batch()
    plain_loss, plain_grads = loss_and_grads(model, x, y)
    model.chunked_loss = False
    called = []
    monkeypatch.setattr("gpt.model.linear_cross_entropy", lambda *a, **k: called.append(1))
    logits, loss = model(x, y, return_logits=False)
    assert logits is None and not called
    loss, grads = loss_and_grads(model, x, y, return_logits=False)
    assert torch.equal(loss, plain_loss)
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name


@pytest.mark.parametrize("setting, compile, device, strategy, chunked", [
    ("auto", "auto", "cuda", "none", False),   # the whole model compiled: inductor fuses the plain loss
    ("auto", "auto", "cuda", "ddp", False),
    ("auto", "auto", "cuda", "fsdp", True),    # blocks compiled one by one: the loss stays eager
    ("auto", "false", "cuda", "none", True),
    ("auto", "true", "cpu", "none", True),
    ("auto", "auto", "cpu", "none", True),
    ("plain", "false", "cpu", "none", False),
    ("chunked", "auto", "cuda", "none", True),
])
def test_the_loss_setting_resolves_per_device_compile_and_strategy(setting, compile, device, strategy, chunked):
    from gpt.config import TrainConfig
    from gpt.parallel import chunked_loss_enabled

    config = TrainConfig(loss=setting, compile=compile)
    assert chunked_loss_enabled(config, strategy, torch.device(device)) is chunked


def test_return_logits_false_without_targets_still_returns_the_logits():
    model, x, _ = model_and_batch()
    logits, loss = model(x, return_logits=False)
    assert loss is None and logits is not None and logits.shape == (*x.shape, CONFIG.vocab_size)
