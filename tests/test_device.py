"""The accelerator's own paths, for a session lent a GPU: training in each dtype (autocast,
GradScaler, pinned non-blocking batches, TF32), resume with the device's RNG, DDP and FSDP
under torchrun, compile, the KV cache, Muon, checkpoints written there and read on a CPU, and
the datasheet peak for MFU.

Deselected by default (no GPU in CI). GPT_TEST_DEVICE names the device, cuda unless set:

    python -m pytest -q -m device                          # on a GPU machine, about a minute
    GPT_TEST_DEVICE=cpu python -m pytest -q -m device      # the same checks on the CPU

The CPU run is how these tests were checked before any GPU ran them; there, resume is compared
bit for bit, on a GPU within a tolerance (atomics make a few CUDA kernels non-deterministic).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from gpt import checkpoint as ckpt
from gpt.generate import generate
from gpt.metrics import read_metrics
from gpt.mfu import gpu_peak_flops, peak_flops
from gpt.model import GPT, GPTConfig, KVCache
from gpt.muon import MuonAdamW
from gpt.trainer import train

from conftest import REPO, rewound_copy, staged_dtensor, tiny_args, tiny_config

DEVICE = torch.device(os.environ.get("GPT_TEST_DEVICE", "cuda"))
ON_GPU = DEVICE.type == "cuda"
# The 95-character code data: guessing is ln 95 = 4.55 (untrained: 4.45), character frequencies
# alone 3.14; 60 steps reach 2.91 on a CPU in each dtype. Below 3.1: it learned what follows what.
VAL_LOSS_LEARNED = 3.1

pytestmark = [
    pytest.mark.device,
    pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                       reason="no CUDA GPU visible (GPT_TEST_DEVICE=cpu runs these checks on the CPU)"),
]


@pytest.fixture
def exact_fp32():
    """fp32 matmuls in full fp32: train() turns TF32 on for CUDA, which would blur comparisons."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on_device(data, out, **overrides):
    # compile = auto would compile every run on a GPU (~30 s each): one test below compiles.
    return tiny_config(data, out, device=DEVICE.type, **{"compile": "false", **overrides})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_training_learns_in_each_dtype(code_data, tmp_path, dtype):
    result = train(on_device(code_data, tmp_path / "run", dtype=dtype, max_steps=60, eval_interval=60))
    records = read_metrics(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5, [r["loss"] for r in records]
    assert result.val_loss < VAL_LOSS_LEARNED
    assert all(r["mfu"] > 0 for r in records)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_the_same_run(code_data, tmp_path, optimizer):
    """Restarted from step 20, the run repeats the original's steps 21-30: the device's RNG (the
    dropout masks) included."""
    overrides = dict(dropout=0.1, optimizer=optimizer)
    full = tmp_path / "full"
    train(on_device(code_data, full, **overrides))
    resumed = rewound_copy(full, tmp_path / "resumed", step=20)
    assert train(on_device(code_data, resumed, **overrides)).step == 30

    a, b = read_metrics(full), read_metrics(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    # Another dropout mask moves a step's loss by ~1e-2; kernel non-determinism by ~1e-6.
    tolerance = 1e-4 if ON_GPU else 0.0
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= tolerance * abs(x["loss"]), (x["step"], x["loss"], y["loss"])


def test_compiled_training_tracks_eager(code_data, tmp_path, exact_fp32):
    eager = train(on_device(code_data, tmp_path / "eager", compile="false", max_steps=10, eval_interval=10))
    compiled = train(on_device(code_data, tmp_path / "compiled", compile="true", max_steps=10, eval_interval=10))
    losses = [[r["loss"] for r in read_metrics(tmp_path / run)] for run in ("eager", "compiled")]
    for x, y in zip(*losses):
        assert abs(x - y) < 1e-3 * x
    assert abs(eager.val_loss - compiled.val_loss) < 1e-3 * eager.val_loss


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_with_each_strategy_tracks_one_process(code_data, tmp_path, strategy):
    """torchrun, one process per device (one here: NCCL on a GPU, gloo on a CPU), DDP or FSDP2
    around the model: the same losses as the plain run."""
    plain = tmp_path / "plain"
    train(on_device(code_data, plain, max_steps=10, eval_interval=10))
    wrapped = tmp_path / strategy
    args = tiny_args(code_data, wrapped, device=DEVICE.type, compile="false", max_steps=10, eval_interval=10,
                     parallel=strategy)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                             "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f"parallel: {strategy}" in result.stdout
    a, b = read_metrics(plain), read_metrics(wrapped)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(5, 11, 5))
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-4 * x["loss"], (x["step"], x["loss"], y["loss"])


def test_kv_cache_logits_equal_full_recomputation(exact_fp32):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=64)).to(DEVICE).eval()
    prompt = torch.randint(0, 97, (3, 5), device=DEVICE)
    tokens = torch.cat([prompt, *generate(model, prompt, 30, temperature=0.0)], dim=1)
    with torch.no_grad():
        full, _ = model(tokens)
        cache = KVCache(model.config, 3, device=DEVICE)
        cached = [model(tokens[:, :5], kv_cache=cache)[0]]
        cached += [model(tokens[:, t : t + 1], kv_cache=cache)[0] for t in range(5, tokens.size(1))]
    torch.testing.assert_close(torch.cat(cached, dim=1), full, atol=1e-4, rtol=1e-4)
    # Greedy decoding chose the argmax of those logits.
    assert torch.equal(tokens[:, 5:], full[:, 4:-1].argmax(-1))


def test_kv_cache_under_bf16_autocast_is_kept_in_bf16():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=64)).to(DEVICE)
    prompt = torch.randint(0, 97, (2, 4), device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = torch.cat(list(generate(model, prompt, 20, temperature=0.8, top_k=20)), dim=1)
        cache = KVCache(model.config, 2, device=DEVICE, dtype=torch.bfloat16)
        with torch.no_grad():
            model(prompt, kv_cache=cache)
    assert out.shape == (2, 20) and out.device.type == DEVICE.type and 0 <= out.min() and out.max() < 97
    assert cache.k[0].dtype == torch.bfloat16 and cache.length == 4


def test_muon_on_the_device_steps_like_on_the_cpu(exact_fp32):
    torch.manual_seed(0)
    shapes = [(64, 32), (32, 128), (96, 64)]
    params = [torch.randn(s) for s in shapes] + [torch.randn(64)]  # the last one: the AdamW part
    grads = [[torch.randn(s) * 0.1 for s in [*shapes, (64,)]] for _ in range(3)]

    def run(device: torch.device) -> list[torch.Tensor]:
        ps = [p.clone().to(device).requires_grad_() for p in params]
        opt = MuonAdamW([{"params": ps[:3], "muon": True, "lr_scale": 10.0}, {"params": ps[3:]}], lr=2e-3)
        for step in grads:
            for p, g in zip(ps, step):
                p.grad = g.to(device)
            opt.step()
        return [p.detach().cpu() for p in ps]

    for on_cpu, there, before in zip(run(torch.device("cpu")), run(DEVICE), params):
        assert not torch.equal(on_cpu, before)
        torch.testing.assert_close(there, on_cpu, atol=1e-5, rtol=1e-4)


def test_checkpoint_written_on_the_device_samples_on_the_cpu(code_data, tmp_path):
    run = tmp_path / "run"
    train(on_device(code_data, run, dtype="bfloat16" if ON_GPU else "float32", max_steps=20, eval_interval=20))
    ckpt.verify_checkpoint(ckpt.latest_checkpoint(run))
    result = subprocess.run([sys.executable, "sample.py", "--out_dir", str(run), "--device", "cpu",
                             "--prompt", "def ", "--max_new_tokens", "30", "--seed", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("def ") and len(result.stdout.strip()) > len("def")


def test_mfu_uses_the_datasheet_peak_of_this_gpu():
    peak, source = peak_flops(DEVICE, torch.bfloat16)
    if not ON_GPU:
        assert source == "measured cpu bfloat16 matmul" and peak > 0
        return
    name = torch.cuda.get_device_name(DEVICE)
    assert gpu_peak_flops(name, torch.bfloat16) is not None, f"add {name!r} to GPU_PEAK_TFLOPS (gpt/mfu.py)"
    assert (peak, source) == (gpu_peak_flops(name, torch.bfloat16), f"{name} datasheet")


@pytest.mark.parametrize("fmt", ["full", "sharded"])
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_save_holds_the_state_of_its_step_while_training_goes_on(tmp_path, fmt, async_save):
    """A save copies the state off the device (into page-locked memory on a GPU, queued without
    waiting) and training's next step changes it at once: the files hold the saved step's values,
    and the second save reuses the first one's memory."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=ON_GPU)
    x = torch.randint(0, 64, (4, 16), device=DEVICE)

    def step() -> None:
        model(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    saver = ckpt.Checkpointer(tmp_path / "run", format=fmt, async_save=async_save)
    blocks = []
    for n in (1, 2):
        step()
        weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        moments = {k: v.cpu().clone() for k, v in optimizer.state_dict()["state"][0].items()}
        path = saver.save(n, model, optimizer, {"step": n})
        step()  # changes every weight and moment while an async save may still be writing
        saver.wait()
        saved = ckpt.read_model_state(path)
        for name, value in saved.items():
            assert torch.equal(value, weights[name]), name
        state = ckpt.read_optimizer_state(path) if fmt == "full" else None
        if state is not None:
            for key, value in state["state"][0].items():
                assert torch.equal(value.cpu(), moments[key]), key
            # Each tensor was written alone, not the whole staging block the weights share.
            state_bytes = sum(v.nbytes for s in optimizer.state.values() for v in s.values())
            weight_bytes = sum(p.nbytes for p in model.parameters())
            assert (path / ckpt.OPTIMIZER_FILE).stat().st_size < state_bytes + weight_bytes / 2
        if ON_GPU:
            buffers = saver._staging.buffers.values()
            assert buffers and all(b.is_pinned() for b in buffers)
            blocks.append(saver._staging._block.data_ptr())
    saver.close()
    if ON_GPU:
        assert blocks[0] == blocks[1] and saver._staging._block is None  # reused; unpinned at close


def test_a_staged_fsdp_shard_is_in_host_memory(tmp_path):
    """FSDP's sharded save stages each shard off the device; DTensor.from_local moved the staged
    copy straight back to the mesh's device (a GPU copy of the rank's whole state at every save).
    The staged shard is a CPU tensor in the staging memory (page-locked from a GPU)."""
    weight, staged, staging = staged_dtensor(tmp_path, DEVICE.type)
    local = staged.to_local()
    assert local.device.type == "cpu" and local.data_ptr() == staging.buffers[("w",)].data_ptr()
    assert torch.equal(local, weight.to_local().cpu())
    assert local.is_pinned() == ON_GPU
    staging.release()
