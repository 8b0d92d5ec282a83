"""Bugs found hunting through sampling and generation as users drive them: packed weight copies
that outlived a replaced weight, generators interleaved on one model, a tokenizer of another
vocabulary next to a model."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import gpt.generate
import gpt.sampling
from gpt.generate import generate
from gpt.linear import Linear, linears_for_decoding
from gpt.model import GPT, GPTConfig
from gpt.sampling import run_sample
from gpt.tokenizer import char_tokenizer
from gpt.trainer import train

from conftest import run_script, tiny_config

TINY = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32)


def tokens(gen) -> torch.Tensor:
    return torch.cat(list(gen), dim=1)


def unpacked_tokens(model, idx, n, **kwargs) -> torch.Tensor:
    real = gpt.generate.linears_for_decoding
    gpt.generate.linears_for_decoding = lambda model, rows, route=None: contextlib.nullcontext()
    try:
        return tokens(generate(model, idx, n, **kwargs))
    finally:
        gpt.generate.linears_for_decoding = real


@pytest.mark.parametrize("how", ["new_parameter", "data"])
def test_a_weight_replaced_while_packed_is_not_read_from_the_old_copy(how):
    # A new weight tensor put in while a generator holds oneDNN copies (`layer.weight =
    # nn.Parameter(...)`, `layer.weight.data = ...`, load_state_dict(assign=True)) can have the
    # same version count as the one copied: the copy of the old weight was used for every later
    # token (outputs 0.5 off).
    torch.manual_seed(0)
    layer = Linear(32, 48)
    x = torch.randn(4, 32)
    with torch.no_grad(), linears_for_decoding(layer, rows=4, route="packed"):
        assert layer.packed is not None
        new = torch.randn(48, 32)
        if how == "new_parameter":
            while new._version < layer.weight._version:
                new.add_(0)
            assert new._version == layer.weight._version
            layer.weight = nn.Parameter(new)
        else:
            layer.weight.data = new
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, new, layer.bias))


def test_interleaved_generators_decode_in_eval_mode_until_the_last_ends(monkeypatch):
    # Two generators on one model in training mode (dropout on), the first ending first: it put
    # the model back in training mode while the second still decoded, whose later tokens then
    # went through dropout; and the second, ending last, left the model in eval mode.
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY.__dict__, "dropout": 0.5}))
    idx = torch.randint(0, 65, (4, 3))
    want = unpacked_tokens(model, idx, 10, temperature=0.0)
    assert model.training
    monkeypatch.setattr(gpt.generate, "linears_for_decoding",
                        lambda model, rows, route=None: linears_for_decoding(model, rows, route="packed"))
    first = generate(model, idx, 3, temperature=0.0)
    second = generate(model, idx, 10, temperature=0.0)
    next(first)
    got = [next(second)]
    assert len(list(first)) == 2
    assert not model.training  # the second is still live
    # Its oneDNN copies (made after the first's) were not dropped when the first ended.
    assert all(m.packed is not None for m in model.modules() if isinstance(m, Linear))
    got += list(second)
    assert torch.equal(torch.cat(got, dim=1), want)
    assert model.training
    assert all(m.packed is None for m in model.modules() if isinstance(m, Linear))


@pytest.fixture(scope="module")
def run(char_data, tmp_path_factory) -> Path:
    """A 1-step tiny char-level run."""
    out = tmp_path_factory.mktemp("sample_hunt") / "run"
    train(tiny_config(char_data, out, max_steps=1, eval_interval=0, eval_iters=1, log_interval=1))
    return out


def test_sampling_with_a_tokenizer_of_another_vocabulary_says_so(run, tmp_path, capsys):
    # A Hugging Face folder whose tokenizer.json is not the model's: a prompt crashed with a
    # ValueError traceback from generate(); an empty prompt printed text decoded with the wrong
    # vocabulary.
    pytest.importorskip("transformers")
    from gpt.export import export_hf

    hf_dir = export_hf(run, tmp_path / "hf", check=False, log=lambda message: None)
    assert run_sample(["--init_from", f"hf:{hf_dir}", "--device", "cpu", "--prompt", "ab",
                       "--max_new_tokens", "2"]) == 0
    capsys.readouterr()
    char_tokenizer("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'-\n").save(
        hf_dir / "tokenizer.json")
    for prompt in ("ab", ""):
        assert run_sample(["--init_from", f"hf:{hf_dir}", "--device", "cpu", "--prompt", prompt,
                           "--max_new_tokens", "2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {hf_dir / 'tokenizer.json'} has 72 token ids but the model has ")
        assert "it is not this model's tokenizer" in err and "Traceback" not in err


def test_a_prompt_file_with_a_byte_order_mark_is_read_without_it(run, tmp_path, capsys):
    # A prompt saved by an editor that writes a UTF-8 byte-order mark (Notepad) was refused by a
    # char vocabulary ("'\ufeff' (U+FEFF) at position 0", a character the user cannot see).
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"\xef\xbb\xbfFirst")
    assert run_sample(["--out_dir", str(run), "--device", "cpu", "--prompt_file", str(prompt),
                       "--max_new_tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("First")
    # A bad byte after the mark is reported at its place in the file.
    prompt.write_bytes(b"\xef\xbb\xbfa\xffb")
    assert run_sample(["--out_dir", str(run), "--prompt_file", str(prompt)]) == 2
    assert capsys.readouterr().err == f"error: --prompt_file {prompt}: not UTF-8 text (invalid start byte at byte 4)\n"


def test_a_model_made_under_inference_mode_decodes():
    # A model built or loaded under torch.inference_mode() (a common inference script) has
    # inference-tensor weights, which have no version counter: generate() at batch 3+ (and at
    # any batch under bf16 autocast) crashed with "Inference tensors do not track version
    # counter". They are not packed (an in-place change to them could not be seen).
    torch.manual_seed(0)
    reference = GPT(TINY)
    idx = torch.randint(0, 65, (4, 3))
    want = tokens(generate(reference, idx, 6, temperature=0.0))
    with torch.inference_mode():
        model = GPT(TINY)
        model.load_state_dict(reference.state_dict())
        assert model.lm_head.weight.is_inference()
        assert torch.equal(tokens(generate(model, idx, 6, temperature=0.0)), want)
    assert torch.equal(tokens(generate(model, idx, 6, temperature=0.0)), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tokens(generate(model, idx[:1], 6, temperature=0.0)).shape == (1, 6)
    with torch.no_grad(), linears_for_decoding(model, rows=4, route="packed"):
        assert all(m.packed is None for m in model.modules() if isinstance(m, Linear))


def test_text_the_output_encoding_cannot_hold_is_replaced_not_a_traceback(tmp_path):
    # stdout in an encoding without the generated characters (a Windows code page when the
    # output goes to a file, PYTHONIOENCODING=ascii) ended the sample with a UnicodeEncodeError
    # traceback.
    from gpt.prepare import prepare

    data = tmp_path / "data"
    prepare(data, ["héllo wörld, ça va? " * 400], tokenizer="char", val_fraction=0.1, val_rule="tail", min_val_tokens=17,
            progress=False)
    run = tmp_path / "run"
    train(tiny_config(data, run, max_steps=1, eval_interval=0, eval_iters=1, log_interval=1, block_size=16))
    done = run_script("sample.py", "--out_dir", str(run), "--device", "cpu", "--prompt", "hé",
                      "--max_new_tokens", "3", env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("h?") and "Traceback" not in done.stderr


def test_a_model_compiled_with_module_compile_decodes_on_a_cpu():
    # Module.compile() (or torch.compile) then generate() on a CPU at batch 3+ (any batch under
    # bf16 autocast): the packed oneDNN product was traced into the graph, and inductor, which
    # lowers it only for a frozen (constant) weight, failed: InductorError at the first token.
    # Compiled, the linears take their unpacked paths: the tokens of the uncompiled model.
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 65, (3, 4), generator=torch.Generator().manual_seed(1))
    want = tokens(generate(model, idx, 3, temperature=0.0))
    torch._dynamo.reset()
    model.compile()
    try:
        assert torch.equal(tokens(generate(model, idx, 3, temperature=0.0)), want)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_a_weight_changed_in_place_between_tokens_is_used_from_the_next_token(cuda_graph):
    # An optimizer step or a no_grad in-place change between two tokens of a live generator is
    # seen at the next token, on the ordinary path (its oneDNN copies are checked by version)
    # and on the fixed-shape step (which reads the model's own weights). A change through
    # `.data` is not seen by the oneDNN copies (documented in generate()).
    def change(model):
        with torch.no_grad():
            for block in model.blocks:
                block.mlp.fc.weight.mul_(3.0)
                block.attn.qkv.bias.add_(0.5)

    def decode(packed: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = GPT(TINY).eval()
        idx = torch.randint(0, 65, (4, 3), generator=torch.Generator().manual_seed(1))
        real = gpt.generate.linears_for_decoding
        gpt.generate.linears_for_decoding = (
            lambda model, rows, route=None: linears_for_decoding(model, rows, route="packed" if packed else "plain"))
        try:
            it = generate(model, idx, 8, temperature=0.0, cuda_graph=cuda_graph)
            first = [next(it), next(it)]
            change(model)
            return torch.cat(first + list(it), dim=1)
        finally:
            gpt.generate.linears_for_decoding = real

    assert torch.equal(decode(packed=True), decode(packed=False))


@pytest.mark.parametrize("flag,want", [(None, None), ("auto", None), ("false", False)])
def test_sample_cuda_graph_option_reaches_generate(run, monkeypatch, capsys, flag, want):
    # On a CUDA GPU generate() replays CUDA graphs by default; --cuda_graph false turns them off.
    seen = []
    real = gpt.generate.generate
    monkeypatch.setattr(gpt.sampling, "generate", lambda *a, **k: seen.append(k["cuda_graph"]) or real(*a, **k))
    argv = ["--out_dir", str(run), "--device", "cpu", "--prompt", "ab", "--max_new_tokens", "3"]
    assert run_sample(argv + (["--cuda_graph", flag] if flag else [])) == 0
    assert seen == [want]
    capsys.readouterr()


def test_sample_cuda_graph_option_is_checked(run, capsys):
    assert run_sample(["--out_dir", str(run), "--cuda_graph", "true", "--no_kv_cache"]) == 2
    assert "--cuda_graph true" in capsys.readouterr().err
    # true on a CPU: there is no graph to replay (it ran the fixed-shape step eagerly, silently)
    assert run_sample(["--out_dir", str(run), "--device", "cpu", "--cuda_graph", "true"]) == 2
    assert "--cuda_graph true needs a CUDA GPU; the device is cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_sample(["--out_dir", str(run), "--cuda_graph", "yes"])
    assert "--cuda_graph" in capsys.readouterr().err
