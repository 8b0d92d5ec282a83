"""Interop and observability: Hugging Face export/import, wandb (offline), plots, evaluation."""

from __future__ import annotations

import json
import math
import shutil
import os
import re
import struct
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

# Everything here works offline; make sure nothing reaches for the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_SILENT", "true")

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers  # the `test` extra installs transformers, wandb and matplotlib

from gpt import checkpoint as ckpt
from gpt import eval as gpt_eval
from gpt import export, hf, plot
from gpt.checkpoint import files as ckpt_files
from gpt.config import ConfigError, TrainConfig
from gpt.metrics import MetricsError, WandbSink, read_metrics
from gpt.model import GPT, GPTConfig
from gpt.prepare import prepare
from gpt.sampling import run_sample
from gpt.shards import list_shards, open_shard
from gpt.tokenizer import Tokenizer
from gpt.trainer import train

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------
# Fixtures: a corpus every Python has, two tiny datasets, two tiny trained runs


def corpus() -> str:
    """About 40 kB of real text: this Python's own json package sources."""
    folder = Path(json.__file__).parent
    text = "".join(p.read_text() for p in sorted(folder.glob("*.py")))
    return text[:40_000]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    out = {}
    for kind, vocab in (("char", 0), ("bpe", 300)):
        out[kind] = root / kind
        prepare(out[kind], [corpus()], tokenizer=kind, vocab_size=vocab or 8192, val_fraction=0.1,
                val_rule="tail", progress=False, log=None)
    return out


def tiny_config(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    base = TrainConfig(
        out_dir=str(out_dir), data_dir=str(data_dir), prepare_source="none", device="cpu",
        dtype="float32", n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4,
        max_steps=12, learning_rate=3e-3, min_lr=3e-4, warmup_steps=2, eval_interval=6,
        eval_iters=2, log_interval=2, keep_last=2, peak_tflops=1.0,
    )
    return replace(base, **overrides).validate()


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for kind in ("char", "bpe"):
        out[kind] = root / f"{kind}_run"
        train(tiny_config(data[kind], out[kind]))
    return out


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (biases and LayerNorms too), so a wrong mapping cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def hf_gpt2(vocab_size: int, n_positions: int = 32, seed: int = 0, **kwargs):
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=32,
                                     n_layer=2, n_head=2, activation_function="gelu",
                                     bos_token_id=None, eos_token_id=None, **kwargs)
    model = transformers.GPT2LMHeadModel(config).eval()
    randomize(model, seed)
    return model


def our_model(run: Path) -> tuple[GPT, Tokenizer]:
    source = ckpt.resolve_checkpoint(run)
    model = GPT(GPTConfig(**ckpt.read_state(source)["model_config"]))
    ckpt.load_model_weights(source, model)
    return model.eval(), Tokenizer.from_file(source / ckpt.TOKENIZER_FILE)


def val_text(data_dir: Path, tokenizer: Tokenizer, n: int = 400) -> str:
    ids = open_shard(list_shards(data_dir, "val")[0])[:n].tolist()
    return tokenizer.decode([i for i in ids if i != tokenizer.eos_id])


# ----------------------------------------------------------------------------------------
# The weight mapping, both ways, on small random models


def test_ours_to_hf_logits_equal():
    model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32))
    randomize(model)
    model.eval()
    theirs = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**hf.hf_config_dict(model.config, eos_id=None))).eval()
    missing, unexpected = theirs.load_state_dict(hf.to_hf_state_dict(model), strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied: HF reties it to wte
    theirs.tie_weights()
    x = torch.randint(0, 65, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(x)[0], theirs(x).logits, atol=1e-5, rtol=0)


def test_hf_to_ours_logits_equal(tmp_path):
    theirs = hf_gpt2(vocab_size=50)
    theirs.save_pretrained(tmp_path / "hf")
    ours = hf.load_hf_model(tmp_path / "hf").eval()
    assert (ours.config.vocab_size, ours.config.block_size, ours.config.n_layer) == (50, 32, 2)
    x = torch.randint(0, 50, (3, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(x).logits
        assert torch.allclose(ours(x)[0], expected, atol=1e-5, rtol=0)

    # OpenAI's GPT-2 upload names weights without "transformer." and stores causal-mask buffers.
    openai = tmp_path / "openai_style"
    openai.mkdir()
    tensors = safetensors.torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    safetensors.torch.save_file(tensors, str(openai / "model.safetensors"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (openai / "config.json").write_text(json.dumps(dict(config, activation_function="gelu_new")))
    notes = []
    approx = hf.load_hf_model(openai, log=notes.append).eval()
    assert notes and "gelu_new" in notes[0]  # the user is told the activation is approximated
    with torch.no_grad():
        # Same weights; only tanh-GELU vs exact GELU separates the logits.
        assert (approx(x)[0] - expected).abs().max() < 0.05


def test_hf_config_refusals():
    base = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 50}
    with pytest.raises(hf.HFError, match="activation_function='relu'"):
        hf.gpt_config_from_hf(dict(base, activation_function="relu"), "x/config.json")
    with pytest.raises(hf.HFError, match="n_inner=64"):
        hf.gpt_config_from_hf(dict(base, n_inner=64), "x/config.json")
    with pytest.raises(hf.HFError, match="model_type is 'llama'"):
        hf.gpt_config_from_hf(dict(base, model_type="llama"), "x/config.json")


def test_hf_activations_exact_and_approximate_gelus_load_others_are_refused():
    base = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 50}
    # "gelu_python" is the same erf formula as ours: it was refused as "(ours is GELU)".
    hf.gpt_config_from_hf(dict(base, activation_function="gelu_python"), "x/config.json")
    assert hf.activation_note(dict(base, activation_function="gelu_python")) is None
    # gelu_accurate is within 5e-4 of exact GELU, like gelu_new: loads, with the note.
    hf.gpt_config_from_hf(dict(base, activation_function="gelu_accurate"), "x/config.json")
    assert "gelu_accurate" in hf.activation_note(dict(base, activation_function="gelu_accurate"))
    # quick_gelu is up to 0.02 off: refused, and the message says what would load.
    with pytest.raises(hf.HFError, match="activation_function='quick_gelu'.*loadable: gelu, gelu_python"):
        hf.gpt_config_from_hf(dict(base, activation_function="quick_gelu"), "x/config.json")


def test_hf_config_our_model_cannot_build_is_an_error_naming_the_file():
    # n_embd not divisible by n_head ended in GPTConfig's ValueError traceback, naming no file.
    base = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 3, "vocab_size": 50}
    with pytest.raises(hf.HFError, match=r"x/config\.json: .*divisible by n_head \(3\)"):
        hf.gpt_config_from_hf(base, "x/config.json")


@pytest.mark.parametrize(("content", "says"), [
    (b"[]", "a JSON list, not an object"),
    (b"\xff\xfe{}", "can't decode byte 0xff"),
    (b'{"model_type": "gpt2", "n_embd": null}', "n_embd must be an integer, got None"),
])
def test_a_malformed_hf_config_json_is_one_line_naming_it(data, tmp_path, capsys, content, says):
    # Each was a traceback (AttributeError, UnicodeDecodeError, TypeError) from sample, eval, train.
    folder = tmp_path / "hf"
    hf_gpt2(vocab_size=50).save_pretrained(folder)
    shutil.copy(data["char"] / "tokenizer.json", folder)
    (folder / "config.json").write_bytes(content)
    capsys.readouterr()  # save_pretrained's progress bar
    assert run_sample(["--init_from", f"hf:{folder}", "--max_new_tokens", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder / 'config.json'}") and says in err and err.count("\n") == 1, err


def test_hf_damaged_weights_are_errors_naming_the_file(tmp_path, capsys):
    # Each of these was a traceback (SafetensorError, UnpicklingError) from eval, sample, train.
    hf_gpt2(vocab_size=50).save_pretrained(tmp_path / "good")
    config = (tmp_path / "good" / "config.json").read_text()
    weights = (tmp_path / "good" / "model.safetensors").read_bytes()

    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_text(config)
    (cut / "model.safetensors").write_bytes(weights[:100])
    with pytest.raises(hf.HFError, match=rf"{cut / 'model.safetensors'}: not a readable safetensors file"):
        hf.load_hf_model(cut)

    sharded = tmp_path / "sharded"
    hf_gpt2(vocab_size=50).save_pretrained(sharded, max_shard_size="20KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    hf.load_hf_model(sharded)  # complete, it loads
    shards[1].unlink()
    with pytest.raises(hf.HFError, match=rf"{shards[1]}: missing; .*index.json lists it"):
        hf.load_hf_model(sharded)

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text(config)
    torch.save({"x": Unpicklable()}, evil / "pytorch_model.bin")
    capsys.readouterr()  # transformers' progress bars
    assert gpt_eval.main([f"hf:{evil}", "--data_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {evil / 'pytorch_model.bin'}: cannot load it as plain tensors"), err
    assert "never unpickled" in err and not Unpicklable.ran


class Unpicklable:
    """Unpickling it would run code: weights_only loading must refuse it."""
    ran = False

    def __reduce__(self):
        return (Unpicklable._run, ())

    @staticmethod
    def _run():
        Unpicklable.ran = True


# ----------------------------------------------------------------------------------------
# Export: run folder -> a folder transformers loads offline


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_export_loads_in_transformers(kind, runs, data, tmp_path, capsys):
    out = tmp_path / f"{kind}_hf"
    assert export.main([str(runs[kind]), "--format", "hf", "--out", str(out)]) == 0
    assert "logits equal ours" in capsys.readouterr().out  # the export checked itself
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    # Every file readable as the umask allows (safetensors alone would make the weights 0600).
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o666 & ~ckpt_files._UMASK)}

    ours, tokenizer = our_model(runs[kind])
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out, local_files_only=True).eval()
    assert theirs.config.activation_function == "gelu"
    text = val_text(data[kind], tokenizer)
    ids = torch.tensor([tokenizer.encode(text)[:32]])
    with torch.no_grad():
        assert torch.allclose(ours(ids)[0], theirs(ids).logits, atol=1e-5, rtol=0)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    for sample in (text, "\n\n    def f(x):\n        return x\n"):
        assert hf_tok(sample)["input_ids"] == tokenizer.encode(sample)
        assert hf_tok.decode(tokenizer.encode(sample)) == sample
    # sample.py reads the exported folder directly.
    assert run_sample(["--init_from", f"hf:{out}", "--prompt", sample[:8], "--max_new_tokens", "5",
                       "--device", "cpu", "--seed", "1"]) == 0
    if kind == "bpe":
        assert hf_tok.eos_token_id == tokenizer.eos_id
        # A literal end-of-text string in text is text, as in our tokenizer.
        assert hf_tok("a<|endoftext|>b")["input_ids"] == tokenizer.encode("a<|endoftext|>b")


def test_export_refuses_existing_target_unless_overwrite(runs, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # --overwrite replaces an earlier export only: a folder holding other files is refused, with
    # the option or without (not told to pass --overwrite, which would then be refused).
    for overwrite in ([], ["--overwrite"]):
        assert export.main([str(runs["char"]), "--format", "hf", "--out", str(out), "--no-check", *overwrite]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "holds files an export does not write (keep.txt)" in err, err
        assert "refusing to replace it even with --overwrite" in err
        assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert export.main([str(runs["char"]), "--out", str(out), "--no-check"]) == 0  # empty: no --overwrite
    assert export.main([str(runs["char"]), "--out", str(out), "--no-check"]) == 2  # an earlier export
    err = capsys.readouterr().err
    assert "already exists; pass --overwrite to replace it" in err, err
    assert export.main([str(runs["char"]), "--out", str(out), "--overwrite", "--no-check"]) == 0
    assert (out / "config.json").exists()
    # Never over the run being exported, even with --overwrite.
    assert export.main([str(runs["char"]), "--out", str(runs["char"]), "--overwrite"]) == 2


def test_export_overwrite_never_replaces_runs_checkpoints_or_datasets(runs, data, tmp_path, capsys):
    import shutil

    other = shutil.copytree(runs["bpe"], tmp_path / "other_run")  # a copy: the bug would delete it
    dataset = shutil.copytree(data["bpe"], tmp_path / "dataset")
    step = ckpt.latest_checkpoint(other)

    def listing() -> dict[str, bytes]:
        return {str(p): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    before = listing()
    for out, what in [(step, "is a checkpoint folder"),
                      (other / "checkpoints", "is the checkpoints folder of the training run"),
                      (other, "is a training run folder"),
                      (other / "metrics.jsonl", "is inside the training run folder"),
                      (dataset, "holds a dataset"),
                      (dataset / "train_000000.bin", "is inside the dataset folder")]:
        assert export.main([str(runs["char"]), "--out", str(out), "--overwrite", "--no-check"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out} {what}") and "choose another --out" in err, err
    assert listing() == before
    ckpt.verify_checkpoint(ckpt.latest_checkpoint(other))
    # An earlier export is what --overwrite is for.
    hf_dir = tmp_path / "hf"
    assert export.main([str(runs["char"]), "--out", str(hf_dir), "--no-check"]) == 0
    char_weights = (hf_dir / "model.safetensors").read_bytes()
    assert export.main([str(runs["bpe"]), "--out", str(hf_dir), "--overwrite", "--no-check"]) == 0
    assert (hf_dir / "model.safetensors").read_bytes() != char_weights


def test_untied_model_exports_with_its_own_lm_head_and_imports_back(tmp_path):
    # GPT2LMHeadModel holds an untied lm_head when config.json says tie_word_embeddings false.
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, tie_weights=False)
    model = GPT(config)
    randomize(model)
    model.eval()
    ckpt.save_checkpoint(tmp_path / "run", 1, model, None, {"step": 1, "model_config": asdict(config)})
    assert export.main([str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0  # with its check
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert not torch.equal(theirs.lm_head.weight, theirs.transformer.wte.weight)
    back = hf.load_hf_model(tmp_path / "hf").eval()
    assert back.config.tie_weights is False
    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(theirs(x).logits, model(x)[0], atol=1e-5, rtol=0)
        assert torch.equal(back(x)[0], model(x)[0])
    # The same folder with tie_word_embeddings left out (its default: true), as a converter or a
    # config.json written by hand leaves it: the stored head was dropped without a word, and
    # the logits differed from transformers' (which loads it untied).
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    del saved["tie_word_embeddings"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(hf.HFError, match=r"ties the output layer to the token embedding .* differs from "
                                         r"transformer.wte.weight; if the model is untied, set"):
        hf.load_hf_model(tmp_path / "hf")


def test_a_run_on_bare_gpt2_shards_exports_gpt2s_end_of_text(tmp_path):
    """Trained on llm.c shards (no tokenizer.json), an export wrote eos_token_id null: the
    vocabulary is GPT-2's, whose end-of-text (50256) transformers' generate stops at."""
    config = GPTConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=16)
    ckpt.save_checkpoint(tmp_path / "run", 1, GPT(config), None, {"step": 1, "model_config": asdict(config)})
    assert export.main([str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--no-check"]) == 0
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["eos_token_id"] == 50256 and saved["bos_token_id"] == 50256


def test_export_refuses_models_that_are_not_gpt2_shaped(tmp_path, capsys):
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, bias=False)
    ckpt.save_checkpoint(tmp_path / "run", 1, GPT(config), None,
                         {"step": 1, "model_config": asdict(config)})
    assert export.main([str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "bias=False" in err and "not GPT-2-shaped" in err
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------------------
# Import: init_from = "hf:DIR"


def test_init_from_hf_trains_and_resumes(data, tmp_path, capsys):
    vocab = json.loads((data["char"] / "meta.json").read_text())["vocab_size"]
    theirs = hf_gpt2(vocab_size=vocab, n_positions=64)
    theirs.save_pretrained(tmp_path / "hf")
    # A learning rate too small to move the weights: the trained checkpoint must still be
    # the Hugging Face model, logit for logit.
    config = tiny_config(data["char"], tmp_path / "run", init_from=f"hf:{tmp_path / 'hf'}",
                         n_embd=64, max_steps=4, eval_interval=4, learning_rate=1e-12, min_lr=1e-12,
                         weight_decay=0.0)
    train(config)
    out = capsys.readouterr().out
    assert "taken from" in out and "n_embd = 32 (config: 64)" in out and "n_positions = 64" in out
    ours, _ = our_model(tmp_path / "run")
    assert ours.config.n_embd == 32 and ours.config.block_size == 64
    # The run's recorded config is the architecture it has, not the one the config asked for.
    assert json.loads((tmp_path / "run" / "config.json").read_text())["n_embd"] == 32
    assert ours.tok_emb.weight.shape[0] == -(-vocab // 64) * 64 > vocab  # padded on import (vocab_multiple)
    x = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(ours(x)[0], theirs(x).logits, atol=1e-5, rtol=0)

    # Resuming keeps the Hugging Face architecture (the checkpoint fits) and continues.
    result = train(replace(config, max_steps=6, eval_interval=6))
    assert result.step == 6 and "resumed from" in capsys.readouterr().out
    # Another block_size: the model still fits (its 64 positions are hf's), but the data
    # position does not. It was refused by the loader as a checkpoint "edited or not written by
    # this project", after a note that had accepted the change.
    with pytest.raises(ckpt.CheckpointError, match=r"block_size: checkpoint 32 vs config 16, the length of the "
                                                   r"windows it reads; resume with --block_size=32"):
        train(replace(config, max_steps=8, block_size=16))
    assert "block_size 32 -> 16" not in capsys.readouterr().out
    # Without init_from the command asks for the config's own shape: the error says what to add.
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"resume it with --init_from=hf:{tmp_path / 'hf'}")) as e:
        train(replace(config, init_from="", max_steps=8))
    # Only that: the differences from the config's own shape (block_size 64 vs 32 among them)
    # read as advice to change the windows' length, which the resume refuses.
    assert "block_size" not in str(e.value) and "different model" not in str(e.value)
    # What init_from does not settle is said with it, so that following the advice takes one try.
    with pytest.raises(ckpt.CheckpointError, match=r"resume it with --init_from=hf:.*Also, .*set --vocab_multiple="):
        train(replace(config, init_from="", max_steps=8, vocab_multiple=1))
    # With a data setting changed too, the shape is not judged against this config's own (it is
    # the folder's): that named block_size 128 and n_embd 32, which the resume then refused.
    with pytest.raises(ckpt.CheckpointError) as e:
        train(replace(config, init_from="", max_steps=8, data_order="sequential"))
    assert "data_order" in str(e.value) and "holds a different model" not in str(e.value)
    # The folder moved away since: the same shape error and hint, not one about the folder.
    (tmp_path / "hf").rename(tmp_path / "hf_moved")
    with pytest.raises(ckpt.CheckpointError, match="took its model's shape.*resume it with --init_from=hf:"):
        train(replace(config, init_from="", max_steps=8))
    # With init_from as the run started, the architecture comes from the checkpoint (which has
    # the folder's), not from the folder: the run resumes with the folder gone. It failed with
    # "... is not a folder", and without init_from with the shape error above: no way to resume.
    capsys.readouterr()
    result = train(replace(config, max_steps=8, eval_interval=8))
    out = capsys.readouterr().out
    assert result.step == 8 and "resumed from" in out and "taken from" not in out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["n_embd"] == 32
    (tmp_path / "hf_moved").rename(tmp_path / "hf")

    # The same folder evaluates directly.
    assert gpt_eval.main([f"hf:{tmp_path / 'hf'}", "--data_dir", str(data["char"]), "--max_batches", "2"]) == 0
    assert "bits per byte" in capsys.readouterr().out


def test_init_from_hf_counts_flops_at_the_windows_trained_on(data, tmp_path, capsys):
    # The model keeps the folder's 1,024 positions; training reads 16-token windows. FLOPs per
    # token (and so MFU, and the peak raised to training's own speed) priced attention at 1,024.
    vocab = json.loads((data["char"] / "meta.json").read_text())["vocab_size"]
    hf_gpt2(vocab_size=vocab, n_positions=1024).save_pretrained(tmp_path / "hf")
    train(tiny_config(data["char"], tmp_path / "run", init_from=f"hf:{tmp_path / 'hf'}", n_embd=32,
                      block_size=16, max_steps=1, eval_interval=0))
    ours, _ = our_model(tmp_path / "run")
    assert ours.config.block_size == 1024
    same_at_16 = GPT(replace(ours.config, block_size=16)).flops_per_token()
    assert ours.flops_per_token(16) == same_at_16 < ours.flops_per_token()
    assert f"{same_at_16 / 1e6:.1f} MFLOP/token" in capsys.readouterr().out


def test_init_from_hf_refuses_other_vocabulary(data, tmp_path):
    hf_gpt2(vocab_size=50).save_pretrained(tmp_path / "hf")
    config = tiny_config(data["char"], tmp_path / "run", init_from=f"hf:{tmp_path / 'hf'}")
    with pytest.raises(hf.HFError, match="vocab_size 50.*same tokenizer"):
        train(config)
    with pytest.raises(hf.HFError, match="not a folder"):
        train(replace(config, init_from=f"hf:{tmp_path / 'missing'}"))
    # A vocabulary of the same size that maps ids to other text (another char table) was taken:
    # only the size was compared for hf:DIR, while a run folder as init_from was refused.
    vocab = json.loads((data["char"] / "meta.json").read_text())["vocab_size"]
    hf_gpt2(vocab_size=vocab, n_positions=64).save_pretrained(tmp_path / "hf_same_size")
    table = json.loads((data["char"] / "tokenizer.json").read_text())
    words = table["model"]["vocab"]
    first, second = sorted(words)[:2]
    words[first], words[second] = words[second], words[first]  # two characters' ids swapped
    (tmp_path / "hf_same_size" / "tokenizer.json").write_text(json.dumps(table))
    with pytest.raises(hf.HFError, match=r"maps tokens to other ids than .*tokenizer.json, so token ids would mean"):
        train(replace(config, init_from=f"hf:{tmp_path / 'hf_same_size'}"))
    shutil.copyfile(data["char"] / "tokenizer.json", tmp_path / "hf_same_size" / "tokenizer.json")
    assert train(replace(config, init_from=f"hf:{tmp_path / 'hf_same_size'}", max_steps=1)).step == 1


# ----------------------------------------------------------------------------------------
# wandb, for real, offline


def wandb_records(path: Path):
    """The protobuf records of a .wandb file (a LevelDB-style log of 32 KiB blocks: each
    record is a 7-byte header, crc32 + length + type, then data; FULL=1, FIRST=2, MIDDLE=3,
    LAST=4 chain records that cross a block)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a header: padding to the next block
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_records(run_file: Path, timeout: float = 60.0) -> list:
    """The records once the run's exit record is on disk: wandb's service writes the file in
    the background and may still be flushing it when finish() returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(run_file))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_history(records) -> dict[int, dict[str, float]]:
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history[int(items["_step"])] = items
    return history


def test_a_stop_signal_finishes_the_wandb_run_before_train_exits(data, tmp_path, monkeypatch):
    """train() raised SystemExit at a stop signal with the wandb run still open: a caller that
    kept the process alive had no exit record on disk, and its next train() logged into that
    unfinished run (review finding; the command line was saved by wandb's exit hook)."""
    import wandb

    from gpt.stop import StopFlag

    calls = iter(range(100))
    monkeypatch.setattr(StopFlag, "agreed", lambda self, info: next(calls) == 6)  # after step 7
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        train(tiny_config(data["char"], run, wandb_mode="offline", wandb_project="interop-test", max_steps=10,
                          eval_interval=4, log_interval=2))
    assert wandb.run is None
    run_id = (run / "wandb_run_id").read_text().strip()
    [file] = (run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    logged = finished_records(file, timeout=20)
    assert any(r.WhichOneof("record_type") == "exit" for r in logged)
    assert sorted(wandb_history(logged)) == [2, 4, 6]


def test_wandb_offline_logs_metrics_and_resumes_same_run(data, tmp_path):
    run = tmp_path / "run"
    config = tiny_config(data["char"], run, wandb_mode="offline", wandb_project="interop-test",
                         wandb_run_name="tiny", wandb_tags="test, cpu", max_steps=4, eval_interval=2,
                         log_interval=2)
    train(config)
    run_id = (run / "wandb_run_id").read_text().strip()
    files = list((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    logged = finished_records(files[0])
    history = wandb_history(logged)
    records = {r["step"]: r for r in read_metrics(run)}
    assert sorted(history) == [2, 4] == sorted(records)
    for step, record in records.items():
        for key in ("loss", "lr", "tokens_per_s", "val_loss"):
            assert history[step][key] == pytest.approx(record[key])
    run_record = next(r.run for r in logged if r.WhichOneof("record_type") == "run")
    assert run_record.project == "interop-test" and run_record.display_name == "tiny"
    assert list(run_record.tags) == ["test", "cpu"]
    logged_config = {i.key: json.loads(i.value_json) for i in run_record.config.update}
    assert logged_config["learning_rate"] == config.learning_rate
    assert logged_config["model_config"]["n_embd"] == 32

    # Resumed from its checkpoint: the same wandb run id, continued at step 6. wandb names an
    # offline folder by the second it starts in: on a fast machine both runs fit in one second
    # and would share a folder, so the resume starts in the next one.
    time.sleep(1.1)
    train(replace(config, max_steps=6))
    assert (run / "wandb_run_id").read_text().strip() == run_id
    files = sorted((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # one folder per process, both for the same run id
    assert sorted(wandb_history(finished_records(files[-1]))) == [6]


def test_wandb_resume_with_an_empty_run_id_file_starts_a_new_run(tmp_path):
    """wandb_run_id left empty (a kill or a full disk while it was written): resuming used to fail
    at every start with wandb's "Run ID cannot be empty" (told as a login problem)."""
    (tmp_path / "wandb_run_id").write_text("")
    sink = WandbSink(tmp_path, mode="offline", project="interop-test", resumed=True)
    try:
        assert sink.run_id and (tmp_path / "wandb_run_id").read_text().strip() == sink.run_id
    finally:
        sink.close()


def test_wandb_missing_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ConfigError, match=r"gpt-from-scratch\[wandb\]"):
        WandbSink(tmp_path, mode="offline", project="p")


# ----------------------------------------------------------------------------------------
# Plots


def test_plot_overlays_runs_into_a_png(runs, tmp_path, capsys):
    png = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, "-m", "gpt.plot", str(runs["char"]), str(runs["bpe"]),
                             "--out", str(png)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from matplotlib.image import imread

    pixels = imread(png)
    assert pixels.shape[0] >= 800 and pixels.shape[1] >= 1000
    # Not blank: many distinct colours (two runs' lines, text, grids).
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50
    assert pixels[..., :3].std() > 0.05
    # One run: the picture goes into the run folder by default.
    assert plot.main([str(runs["char"])]) == 0
    assert (runs["char"] / "metrics.png").stat().st_size > 10_000
    # No suffix: a PNG, under the name it says it wrote.
    assert plot.main([str(runs["char"]), "--out", str(tmp_path / "char")]) == 0
    assert f"wrote {tmp_path / 'char.png'}" in capsys.readouterr().out
    assert (tmp_path / "char.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_refuses_empty_or_malformed_metrics(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    assert plot.main([str(run)]) == 2
    assert "is empty" in capsys.readouterr().err
    # A first line cut short by a kill mid-write is not "empty".
    (run / "metrics.jsonl").write_text('{"step": 1, "lo')
    assert plot.main([str(run)]) == 2
    assert "metrics.jsonl holds only a line cut short: the run has not logged a step yet" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    assert plot.main([str(run)]) == 2
    assert "metrics.jsonl:2: not valid JSON" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n["step"]\n')
    with pytest.raises(MetricsError, match=r":2: expected a JSON object"):
        read_metrics(run)
    # A last line cut short by a kill mid-write is skipped, not an error.
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert [r["step"] for r in read_metrics(run)] == [1]
    assert plot.main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # --out: an image file (a folder, or a suffix matplotlib cannot write, named before any work).
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    for out, message in [(tmp_path, f"--out {tmp_path} is a folder"),
                         (tmp_path / "keep.txt", f"--out {tmp_path / 'keep.txt'}: write a .png, .pdf, .svg file")]:
        assert plot.main([str(run), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "keep.txt").exists()


def test_plot_of_a_sweep_in_progress(tmp_path, capsys):
    """What a sweep's `python -m gpt.plot out/sweep/*` meets: a run that has started but not
    logged yet made the whole plot fail (now: left out, with a warning); runs of the same name
    in two sweeps were told apart only by a quote mark ("lr_3e-3'"); a mistyped run had no
    did-you-mean; the sweep's own folder said only that it had no metrics.jsonl."""
    def run(path: Path, records: int) -> Path:
        path.mkdir(parents=True)
        if records:  # (a run that has just started holds only its lock: no config.json, no latest)
            (path / "config.json").write_text("{}")
            (path / "latest").write_text("step_0000001")
            (path / "metrics.jsonl").write_text("".join(
                json.dumps({"step": s, "loss": 3.0 - s / 10, "lr": 1e-3, "tokens": 64 * s}) + "\n"
                for s in range(1, records + 1)))
        return path

    a, b = run(tmp_path / "sweep" / "lr_3e-3", 5), run(tmp_path / "sweepB" / "lr_3e-3", 5)
    starting = run(tmp_path / "sweep" / "lr_1e-2", 0)
    out = tmp_path / "all.png"
    assert plot.main([str(a), str(starting), str(b), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"warning: left out, nothing logged yet: {starting}" in captured.err
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert plot.load_runs([a, b], warn=print).keys() == {"sweep/lr_3e-3", "sweepB/lr_3e-3"}
    # Two metrics files of one folder were one label, and one run was dropped without a word;
    # one run given twice is plotted once, and said so.
    shutil.copy(a / "metrics.jsonl", a / "metrics_old.jsonl")
    assert plot.load_runs([a / "metrics.jsonl", a / "metrics_old.jsonl"]).keys() == {"lr_3e-3", "metrics_old.jsonl"}
    warned = []
    assert list(plot.load_runs([a, a / "metrics.jsonl", b], warn=warned.append)) == ["sweep/lr_3e-3", "sweepB/lr_3e-3"]
    assert warned == [f"warning: {a / 'metrics.jsonl'} is {a} again; plotted once"]
    # Alone, or all of them: still an error, saying why.
    assert plot.main([str(starting)]) == 2
    assert "metrics.jsonl does not exist: the run has not logged a step yet" in capsys.readouterr().err
    # A typo names the run it looks like; the sweep's folder names its runs and the command.
    assert plot.main([str(tmp_path / "sweep" / "lr_3e3")]) == 2
    assert f"did you mean {a}?" in capsys.readouterr().err
    assert plot.main([str(tmp_path / "sweep")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"holds no metrics.jsonl of its own but runs that have one (lr_3e-3): plot them with " \
           f"python -m gpt.plot {tmp_path / 'sweep'}/*" in err


def test_plot_of_one_metrics_file_writes_beside_it(tmp_path, monkeypatch, capsys):
    """`python -m gpt.plot out/a/metrics.jsonl` draws into out/a/metrics.png, as `out/a` does; it
    wrote ./metrics.png in whatever folder it was run from (replacing another run's plot there)."""
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "tokens": 8}\n{"step": 2, "loss": null}\n')
    monkeypatch.chdir(elsewhere)
    assert plot.main([str(run / "metrics.jsonl")]) == 0
    assert f"wrote {run / 'metrics.png'}" in capsys.readouterr().out
    assert (run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(elsewhere.iterdir()) == []


# ----------------------------------------------------------------------------------------
# Evaluation


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_eval_prints_loss_perplexity_bits_per_byte(kind, runs, data, capsys):
    assert gpt_eval.main([str(runs[kind]), "--split", "val"]) == 0
    text = capsys.readouterr().out
    assert "loss" in text and "perplexity" in text and "bits per byte" in text
    # Which checkpoint was scored: a run folder names its latest, which moves on while it trains
    # (a sweep's loop over runs could not tell its JSON lines apart).
    latest = ckpt.latest_checkpoint(runs[kind])
    step = ckpt.read_state(latest)["step"]
    assert f"model {runs[kind]} (checkpoint {latest}, step {step}) on {data[kind]}" in text
    assert gpt_eval.main([str(runs[kind]), "--split", "val", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["model"], result["checkpoint"], result["step"], result["data_dir"]) == (
        str(runs[kind]), str(latest), step, str(data[kind]))

    stream = np.concatenate([open_shard(p) for p in list_shards(data[kind], "val")]).astype(np.int64)
    tokenizer = Tokenizer.from_file(data[kind] / "tokenizer.json")
    # Every token but the first is scored once; bytes are the text those tokens decode to.
    targets = stream[1:].tolist()
    assert result["tokens"] == len(targets)
    text_ids = [t for t in targets if t != tokenizer.eos_id]  # end-of-text is not corpus text
    assert result["bytes"] == len(tokenizer.decode(text_ids).encode("utf-8"))
    assert result["bits_per_byte"] == pytest.approx(
        result["loss"] * result["tokens"] / (math.log(2) * result["bytes"]), rel=1e-9)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)

    # The loss itself, recomputed window by window from the model.
    model, _ = our_model(runs[kind])
    T = model.config.block_size
    nats = 0.0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, T):
            window = torch.from_numpy(stream[start:start + T + 1])[None]
            logits, _ = model(window[:, :-1])
            nats += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
    assert result["loss"] == pytest.approx(nats / len(targets), rel=1e-5)
    # A trained model beats uniform guessing.
    assert result["loss"] < math.log(model.config.vocab_size)

    assert gpt_eval.main([str(runs[kind]), "--max_batches", "1", "--batch_size", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 2 * T


@pytest.mark.parametrize("option, value", [("--block_size", "-3"), ("--block_size", "0"),
                                           ("--batch_size", "0"), ("--max_batches", "0")])
def test_eval_refuses_a_window_or_batch_that_is_not_positive(option, value, runs, capsys):
    # --block_size -3 ended in numpy's traceback; --block_size 0 silently meant the default.
    assert gpt_eval.main([str(runs["char"]), option, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option} must be positive, got {value}"), err


def test_eval_of_a_run_whose_relative_data_dir_is_not_here_says_give_data_dir(tmp_path, monkeypatch, capsys):
    # The default data_dir ("data/stdlib") is relative to where train.py ran; from elsewhere the
    # error said to prepare a new dataset there ("Make one with: python data_prep/prepare.py").
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)
    ckpt.save_checkpoint(tmp_path / "run", 1, GPT(config), None,
                         {"step": 1, "model_config": asdict(config), "train_config": {"data_dir": "data/stdlib"}})
    monkeypatch.chdir(tmp_path)
    assert gpt_eval.main([str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "data_dir = 'data/stdlib'" in err and "relative to the folder train.py ran in" in err, err
    assert "give --data_dir" in err and "prepare.py" not in err


def test_export_never_writes_inside_checkpoints_nor_over_a_file(runs, data, tmp_path, capsys):
    import shutil

    # A new --out inside a checkpoint folder was written there (keep_last would later delete
    # it with the checkpoint), and --overwrite replaced a plain file (the corpus, say) by a folder.
    other = shutil.copytree(runs["bpe"], tmp_path / "other_run")
    step = ckpt.latest_checkpoint(other)
    text = tmp_path / "corpus.txt"
    text.write_text("my only copy")
    for out, args, what in [(step / "hf", [], f"is inside the checkpoint folder {step.resolve()}"),
                            (other / "checkpoints" / "hf", [], "is inside the checkpoints folder"),
                            (data["char"] / "hf", [], "is inside the dataset folder"),
                            (text, ["--overwrite"], "is a file, not an earlier export")]:
        assert export.main([str(runs["char"]), "--out", str(out), "--no-check", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out} {what}") and "choose another --out" in err, err
    assert not any((p / "hf").exists() for p in (step, other / "checkpoints", data["char"]))
    assert text.read_text() == "my only copy"
    ckpt.verify_checkpoint(step)
    # A new folder in the run folder itself, beside checkpoints/, is a fine place for an export.
    assert export.main([str(runs["char"]), "--out", str(other / "hf"), "--no-check"]) == 0
    assert (other / "hf" / "config.json").exists()
    # So is a new folder whose parents do not exist yet.
    assert export.main([str(runs["char"]), "--out", str(tmp_path / "a" / "b" / "hf"), "--no-check"]) == 0


def test_export_of_an_hf_folder_says_what_export_reads(tmp_path, capsys):
    # "hf:DIR" names a Hugging Face folder for init_from; given to export it used to read
    # "checkpoint path hf:... does not exist", which hid the mix-up.
    hf_gpt2(vocab_size=50).save_pretrained(tmp_path / "hf")
    assert export.main([f"hf:{tmp_path / 'hf'}", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "export reads a run or checkpoint" in err and "init_from" in err
    assert not (tmp_path / "out").exists()


def test_plot_names_its_image_after_the_runs_it_draws(tmp_path, monkeypatch, capsys):
    # The default name was made from the arguments: a run given twice (as its folder and its
    # metrics file) was drawn once into ./metrics_run+run_HASH.png, not run/metrics.png, and a run
    # left out (nothing logged yet) was still named in the image of the others.
    a, b, empty = tmp_path / "a", tmp_path / "b", tmp_path / "empty"
    for run in (a, b, empty):
        run.mkdir()
        if run != empty:
            (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "tokens": 8}\n')
    monkeypatch.chdir(tmp_path)
    assert plot.main([str(a / "metrics.jsonl"), str(a)]) == 0
    assert f"wrote {a / 'metrics.png'}" in capsys.readouterr().out
    assert plot.main([str(a), str(b), str(empty)]) == 0
    out, err = capsys.readouterr()
    assert f"wrote {plot.default_output([str(a), str(b)])}" in out and "left out, nothing logged yet" in err
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [plot.default_output([str(a), str(b)]).name]


def test_plot_of_several_runs_is_named_after_them_and_replaces_no_other_plot(tmp_path, monkeypatch, capsys):
    """Several runs went to ./metrics.png: run from a run's folder (or beside another plot of that
    name) it replaced that run's own plot. Now the image is named after the runs (and a hash of
    their paths: two sweeps' runs of one name are other runs)."""
    a, b = tmp_path / "lr_1e-3", tmp_path / "lr_3e-3"
    for run in (a, b):
        run.mkdir()
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "tokens": 8}\n{"step": 2, "loss": 1.5, "tokens": 16}\n')
    (a / "metrics.png").write_bytes(b"a's own plot")
    monkeypatch.chdir(a)
    assert plot.main([".", str(b / "metrics.jsonl")]) == 0
    drawn = a / plot.default_output([".", str(b / "metrics.jsonl")])
    assert re.fullmatch(r"metrics_lr_1e-3\+lr_3e-3_[0-9a-f]{6}\.png", drawn.name)
    assert f"wrote {drawn.name}" in capsys.readouterr().out
    assert (a / "metrics.png").read_bytes() == b"a's own plot"
    assert drawn.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same runs again: their plot is redrawn in place, not beside it.
    assert plot.main([str(a), str(b)]) == 0
    assert sorted(p.name for p in a.glob("*.png")) == ["metrics.png", drawn.name]
    # The sweep's folder stays as it was: `gpt.plot SWEEP/*` twice took the image for a run.
    assert not list(tmp_path.glob("*.png"))
    # Plotted from inside the sweep (`gpt.plot *`): the image is there, and is left out the next time.
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert plot.main(sorted(p.name for p in tmp_path.iterdir())) == 0
    err = capsys.readouterr().err
    made = plot.default_output(["lr_1e-3", "lr_3e-3"])
    assert f"warning: left out, images (an earlier plot?): {made}" in err
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [made.name]
    # Another sweep's runs of the same names: another image.
    other = [str(tmp_path / "sweep2" / "lr_1e-3"), str(tmp_path / "sweep2" / "lr_3e-3")]
    assert plot.default_output(other).name != drawn.name
    # A sweep of many runs: a name of bounded length.
    many = plot.default_output([str(tmp_path / f"run_{i:03d}") for i in range(40)]).name
    assert re.fullmatch(r"metrics_run_000\+39_more_[0-9a-f]{6}\.png", many)
