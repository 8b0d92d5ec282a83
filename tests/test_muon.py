"""Muon + AdamW (gpt/muon.py): the orthogonalization, which parameters each part steps, and the
AdamW part against torch's own AdamW. Resume exactness and DDP equivalence with Muon are in
tests/test_train.py and tests/test_distributed.py."""

import json
from dataclasses import replace

import pytest
import torch

from gpt import checkpoint as ckpt
from gpt.checkpoint.files import crc32
from gpt.config import ConfigError, TrainConfig
from gpt.model import GPT, GPTConfig
from gpt.muon import MuonAdamW, orthogonalize
from gpt.optim import build_optimizer, describe_optimizer
from gpt.trainer import train
from conftest import tiny_config


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (3, 24, 64), (128, 512)])
def test_orthogonalize_approximates_u_v_transposed(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape)
    out = orthogonalize(g)
    assert out.shape == g.shape
    # Singular values pushed from anywhere in (0, |g|] into roughly [0.7, 1.2], not exactly 1.
    singular = torch.linalg.svdvals(out)
    assert singular.min() > 0.6 and singular.max() < 1.2
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    exact = u @ vh
    cosine = (out * exact).sum() / (out.norm() * exact.norm())
    assert cosine > 0.97


def test_muon_steps_the_block_matrices_and_adamw_the_rest():
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
    config = TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.02).validate()
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    assert isinstance(optimizer, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = sorted(names[id(p)] for g in optimizer.param_groups if g["muon"] for p in g["params"])
    assert muon == sorted(n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2)
    assert len(muon) == 2 * 4  # qkv, attention proj, fc, mlp proj per block
    rest = {names[id(p)] for g in optimizer.param_groups if not g["muon"] for p in g["params"]}
    assert {"tok_emb.weight", "pos_emb.weight", "blocks.0.ln1.weight"} <= rest
    assert optimizer.param_groups[0]["lr_scale"] == pytest.approx(20.0)

    x = torch.randint(0, 50, (4, 16))
    _, loss = model(x, x)
    loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), name
    qkv = model.blocks[0].attn.qkv.weight
    assert set(optimizer.state[qkv]) == {"momentum_buffer"}
    assert set(optimizer.state[model.tok_emb.weight]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("fused", [False, True])
def test_the_adamw_part_is_torch_adamw(fused):
    torch.manual_seed(0)
    params = [torch.randn(8, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    ours = MuonAdamW([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:]}],
                     lr=1e-2, betas=(0.9, 0.95), fused=fused)
    theirs = torch.optim.AdamW([{"params": twins[:1], "weight_decay": 0.1}, {"params": twins[1:], "weight_decay": 0.0}],
                               lr=1e-2, betas=(0.9, 0.95), fused=fused)
    for step in range(4):
        grads = [torch.randn_like(p) for p in params]
        for p, t, g in zip(params, twins, grads):
            p.grad, t.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t, rtol=0, atol=1e-7)


def test_muon_options_are_checked():
    TrainConfig(optimizer="muon", parallel="fsdp").validate()  # Muon gathers FSDP's shards
    with pytest.raises(ConfigError, match="muon_lr = 0.05 applies only with optimizer = 'muon'"):
        TrainConfig(muon_lr=0.05).validate()
    with pytest.raises(ConfigError, match="muon_momentum must be in"):
        TrainConfig(optimizer="muon", muon_momentum=1.0).validate()


def test_resuming_with_the_other_optimizer_says_how_to_go_on(char_data, tmp_path):
    train(tiny_config(char_data, tmp_path / "run", max_steps=10))
    with pytest.raises(ckpt.CheckpointError, match="trained with optimizer = 'adamw' and this config says 'muon'"):
        train(tiny_config(char_data, tmp_path / "run", max_steps=20, optimizer="muon"))


def test_a_checkpoint_that_does_not_record_its_optimizer_is_not_told_it_had_adamw(char_data, tmp_path):
    # save_checkpoint from a caller's own loop writes the state it is given: no train_config.
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=10, optimizer="muon"))
    saved = ckpt.latest_checkpoint(run)
    state = json.loads((saved / ckpt.STATE_FILE).read_text())
    del state["train_config"]
    (saved / ckpt.STATE_FILE).write_text(json.dumps(state))
    manifest = json.loads((saved / ckpt.MANIFEST_FILE).read_text())
    manifest[ckpt.STATE_FILE] = {"bytes": (saved / ckpt.STATE_FILE).stat().st_size,
                                 "crc32": crc32(saved / ckpt.STATE_FILE)}
    (saved / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    # The optimizer state itself is the check: AdamW's groups do not take Muon's state ...
    with pytest.raises(ckpt.CheckpointError, match="optimizer state do not fit") as refused:
        train(tiny_config(char_data, run, max_steps=20, optimizer="adamw"))
    assert "trained with optimizer" not in str(refused.value)
    # ... and the optimizer it was trained with resumes it.
    train(tiny_config(char_data, run, max_steps=20, optimizer="muon"))
    assert ckpt.step_of(ckpt.latest_checkpoint(run).name) == 20


def test_the_log_says_which_optimizer_steps_what():
    model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=4, n_head=2, n_embd=32))
    config = TrainConfig(optimizer="muon", learning_rate=8e-3, min_lr=8e-4, warmup_steps=50, max_steps=1000).validate()
    line = describe_optimizer(build_optimizer(model, config, torch.device("cpu")), config)
    assert line == ("optimizer: Muon for 16 block matrices (lr 0.02, momentum 0.95), AdamW for the other "
                    "36 tensors (lr 0.008); warmup 50 steps, cosine to 0.1x of the peak by step 1000")
    config = replace(config, optimizer="adamw").validate()
    line = describe_optimizer(build_optimizer(model, config, torch.device("cpu")), config)
    assert line.startswith("optimizer: AdamW for 52 tensors (lr 0.008)")
    config = replace(config, min_lr=0.0).validate()
    line = describe_optimizer(build_optimizer(model, config, torch.device("cpu")), config)
    assert line.endswith("warmup 50 steps, cosine to 0 by step 1000")
