"""sample.py, gpt.eval and the Hugging Face import as a user meets their less common cases: a
run or model folder without its tokenizer, a damaged one, an empty or too long prompt, a dataset
that does not fit the model. Tiny untrained models (1 layer, 16 wide): only the paths matter."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import safetensors.torch
import torch

import gpt.generate
import gpt.sampling
from gpt import checkpoint as ckpt
from gpt import eval as gpt_eval
from gpt import export
from gpt.model import GPT, GPTConfig
from gpt.prepare import prepare
from gpt.sampling import run_sample
from gpt.tokenizer import Tokenizer, train_bpe

# No newline in it: the char vocabulary below has neither an end-of-text token nor "\n".
TEXT = "abcdefgh " * 200
BLOCK = 16


def save_run(out: Path, tokenizer_file: Path | None, vocab_size: int, **state) -> Path:
    config = GPTConfig(vocab_size=vocab_size, block_size=BLOCK, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    ckpt.save_checkpoint(out, 1, GPT(config), None, {"step": 1, "model_config": asdict(config), **state},
                         tokenizer_path=tokenizer_file)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gaps_sample")
    data = root / "data"
    prepare(data, [TEXT], tokenizer="char", val_fraction=0.1, val_rule="tail", min_val_tokens=BLOCK + 1,
            progress=False, log=None)
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    bpe = root / "bpe.json"
    train_bpe([TEXT], 260).save(bpe)
    return {
        "root": root, "data": data,
        "char_run": save_run(root / "char_run", data / "tokenizer.json", vocab,
                             train_config={"data_dir": str(data)}),
        "bare_run": save_run(root / "bare_run", None, vocab),  # no tokenizer.json, no train_config
        "bpe_run": save_run(root / "bpe_run", bpe, Tokenizer.from_file(bpe).vocab_size),
    }


def hf_export(run: Path, out: Path) -> Path:
    pytest.importorskip("transformers")
    assert export.main([str(run), "--out", str(out), "--no-check"]) == 0
    return out


def sample_cpu(*argv: str) -> int:
    return run_sample([*argv, "--device", "cpu", "--max_new_tokens", "3", "--temperature", "0"])


@pytest.fixture
def prompts(monkeypatch) -> list[list[int]]:
    """The prompt ids each generate() call of sample.py starts from."""
    seen = []
    real = gpt.generate.generate

    def recording(model, idx, *args, **kwargs):
        seen.append(idx[0].tolist())
        return real(model, idx, *args, **kwargs)

    monkeypatch.setattr(gpt.sampling, "generate", recording)
    return seen


# ----------------------------------------------------------------------------------------
# sample.py (gpt/sampling.py)


def test_init_from_without_the_hf_prefix_says_to_use_out_dir(folders, capsys):
    run = folders["char_run"]
    assert sample_cpu("--init_from", str(run)) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --init_from must be hf:DIR (a Hugging Face GPT-2 folder), got {str(run)!r}; "
                   f"for a run use --out_dir or --ckpt\n")


def test_a_checkpoint_without_tokenizer_gives_advice_that_works(folders, tmp_path, capsys):
    # It said "copy the dataset's tokenizer.json there": the checkpoint was then refused as
    # edited (its manifest lists no checksum for the file), and a run on bare GPT-2-token
    # shards, which saves such checkpoints, has no dataset tokenizer.json to copy.
    run = folders["bare_run"]
    assert sample_cpu("--out_dir", str(run)) == 2
    where = ckpt.latest_checkpoint(run)
    assert capsys.readouterr().err == (
        f"error: {where} has no tokenizer.json (its dataset had none), and a checkpoint refuses files added "
        f"to it; sample a Hugging Face export instead: python -m gpt.export {run} --out DIR, copy the "
        f"tokenizer.json the model was trained with into DIR, then sample.py --init_from hf:DIR\n")
    out = hf_export(run, tmp_path / "hf")
    shutil.copy(folders["data"] / "tokenizer.json", out / "tokenizer.json")
    capsys.readouterr()
    assert sample_cpu("--init_from", f"hf:{out}", "--prompt", "ab") == 0
    assert capsys.readouterr().out.startswith("ab")


def test_a_hugging_face_folder_without_tokenizer_is_one_line(folders, tmp_path, capsys):
    out = hf_export(folders["bare_run"], tmp_path / "hf")  # exported with a warning, no tokenizer
    assert not (out / "tokenizer.json").exists()
    capsys.readouterr()
    assert sample_cpu("--init_from", f"hf:{out}") == 2
    assert capsys.readouterr().err == f"error: {out} has no tokenizer.json; sampling needs the model's tokenizer\n"


def test_a_damaged_tokenizer_in_a_hugging_face_folder_is_one_line(folders, tmp_path, capsys):
    # A traceback (ValueError from Tokenizer.from_file) before: unlike a checkpoint's, the
    # folder's files have no manifest that would report the damage first.
    out = hf_export(folders["char_run"], tmp_path / "hf")
    (out / "tokenizer.json").write_text("{not json")
    capsys.readouterr()
    assert sample_cpu("--init_from", f"hf:{out}") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out / 'tokenizer.json'}: cannot load tokenizer (") and err.count("\n") == 1, err


def test_an_empty_prompt_starts_a_bpe_sample_at_end_of_text(folders, prompts):
    eos = Tokenizer.from_file(ckpt.latest_checkpoint(folders["bpe_run"]) / "tokenizer.json").eos_id
    assert sample_cpu("--out_dir", str(folders["bpe_run"])) == 0
    assert prompts == [[eos]]


def test_an_empty_prompt_with_neither_end_of_text_nor_newline_asks_for_a_prompt(folders, capsys):
    assert sample_cpu("--out_dir", str(folders["char_run"])) == 2
    assert capsys.readouterr().err == "error: this vocabulary has no end-of-text token or newline; give a --prompt\n"


def test_a_prompt_longer_than_the_context_keeps_its_end_with_a_warning(folders, prompts, capsys):
    prompt = "abc defgh " * 4  # 40 characters, 40 tokens
    assert sample_cpu("--out_dir", str(folders["char_run"]), "--prompt", prompt) == 0
    printed = capsys.readouterr()
    assert printed.err.startswith(f"warning: the prompt is 40 tokens; keeping its last {BLOCK} (the context window)\n")
    tokenizer = Tokenizer.from_file(folders["data"] / "tokenizer.json")
    assert prompts == [tokenizer.encode(prompt)[-BLOCK:]]
    # The whole prompt is still printed, followed by the 3 new tokens.
    assert printed.out.startswith(prompt) and len(printed.out) == len(prompt) + 3 + 1


# ----------------------------------------------------------------------------------------
# python -m gpt.eval


def test_eval_hugging_face_folder_needs_data_dir(folders, tmp_path, capsys):
    out = hf_export(folders["char_run"], tmp_path / "hf")
    capsys.readouterr()
    assert gpt_eval.main([f"hf:{out}", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (f"error: hf:{out}: give --data_dir (a Hugging Face folder does not "
                                       f"name its dataset)\n")


def test_eval_damaged_tokenizers_are_one_line_errors(folders, tmp_path, capsys):
    # Each was a ValueError traceback: a damaged tokenizer.json in a Hugging Face folder, and a
    # dataset whose tokenizer.json is damaged or gone (the model having none of its own).
    data = folders["data"]
    with_tok = hf_export(folders["char_run"], tmp_path / "hf")
    (with_tok / "tokenizer.json").write_text("{not json")
    capsys.readouterr()
    assert gpt_eval.main([f"hf:{with_tok}", "--data_dir", str(data), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {with_tok / 'tokenizer.json'}: cannot load tokenizer (") and err.count("\n") == 1

    without = hf_export(folders["bare_run"], tmp_path / "hf_bare")
    broken = shutil.copytree(data, tmp_path / "broken")
    (broken / "tokenizer.json").write_text("{not json")
    capsys.readouterr()
    assert gpt_eval.main([f"hf:{without}", "--data_dir", str(broken), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {broken / 'tokenizer.json'}: cannot load tokenizer (") and err.count("\n") == 1

    (broken / "tokenizer.json").unlink()
    assert gpt_eval.main([f"hf:{without}", "--data_dir", str(broken), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (f"error: {broken}: no tokenizer.json here; prepare the dataset with "
                                       f"data_prep/prepare.py\n")
    # With the dataset's tokenizer back, the same folder evaluates.
    shutil.copy(data / "tokenizer.json", broken / "tokenizer.json")
    assert gpt_eval.main([f"hf:{without}", "--data_dir", str(broken), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["tokens"] > 0


def test_eval_checkpoint_that_does_not_name_its_dataset(folders, capsys):
    assert gpt_eval.main([str(folders["bare_run"]), "--device", "cpu"]) == 2
    where = ckpt.latest_checkpoint(folders["bare_run"])
    assert capsys.readouterr().err == f"error: {where} does not name its dataset; give --data_dir\n"


def test_eval_window_longer_than_the_model_context(folders, capsys):
    assert gpt_eval.main([str(folders["char_run"]), "--device", "cpu", "--block_size", str(BLOCK + 1)]) == 2
    assert capsys.readouterr().err == (f"error: --block_size {BLOCK + 1} is longer than the model's context "
                                       f"({BLOCK})\n")


def test_eval_on_data_of_another_vocabulary(folders, tmp_path, capsys):
    other = tmp_path / "other"
    prepare(other, ["xyz\n" * 200], tokenizer="char", val_fraction=0.1, val_rule="tail",
            min_val_tokens=BLOCK + 1, progress=False, log=None)
    assert gpt_eval.main([str(folders["char_run"]), "--data_dir", str(other), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {other} has a vocabulary of 4 ids but the model has 9: "
                                              f"evaluate on data made with the model's tokenizer: python data_prep/"
                                              f"prepare.py --input YOUR_TEXT --tokenizer-from {folders['char_run']} ")
    # Same size, other characters: the ids would mean other text.
    same_size = tmp_path / "same_size"
    prepare(same_size, ["ijklmnop\n" * 200], tokenizer="char", val_fraction=0.1, val_rule="tail",
            min_val_tokens=BLOCK + 1, progress=False, log=None)
    assert gpt_eval.main([str(folders["char_run"]), "--data_dir", str(same_size), "--device", "cpu"]) == 2
    own = ckpt.latest_checkpoint(folders["char_run"]) / "tokenizer.json"
    assert capsys.readouterr().err.startswith(f"error: {same_size / 'tokenizer.json'} differs from the model's "
                                              f"tokenizer ({own}): the same ids would mean other text; evaluate on "
                                              f"data made with the model's tokenizer: python data_prep/prepare.py ")


# ----------------------------------------------------------------------------------------
# Hugging Face folders (gpt/hf.py) as sample.py and gpt.eval read them


def test_hugging_face_folder_errors_name_the_file(folders, tmp_path, capsys):
    good = hf_export(folders["char_run"], tmp_path / "hf")
    capsys.readouterr()
    assert sample_cpu("--init_from", "hf:") == 2
    assert capsys.readouterr().err == "error: init_from = 'hf:': name a folder after 'hf:', e.g. hf:models/gpt2\n"

    (good / "config.json").write_text("{not json")
    assert sample_cpu("--init_from", f"hf:{good}") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {good / 'config.json'}: cannot read the model config (") and err.count("\n") == 1

    # Weights for another shape than config.json says, and weights missing or extra.
    hf_export(folders["char_run"], tmp_path / "hf2")
    cfg = json.loads((tmp_path / "hf2" / "config.json").read_text())
    (tmp_path / "hf2" / "config.json").write_text(json.dumps(dict(cfg, n_embd=32)))
    assert sample_cpu("--init_from", f"hf:{tmp_path / 'hf2'}") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'hf2'}: tok_emb.weight has shape (9, 16), the model from "
                          f"config.json expects (9, 32)"), err
    (tmp_path / "hf2" / "config.json").write_text(json.dumps(dict(cfg, n_layer=2)))
    assert sample_cpu("--init_from", f"hf:{tmp_path / 'hf2'}") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'hf2'}: weights missing for a 2-layer GPT-2: ['transformer.h.1."), err
    (tmp_path / "hf2" / "config.json").write_text(json.dumps(cfg))
    weights = str(tmp_path / "hf2" / "model.safetensors")
    safetensors.torch.save_file(dict(safetensors.torch.load_file(weights), extra=torch.zeros(1)), weights)
    assert sample_cpu("--init_from", f"hf:{tmp_path / 'hf2'}") == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'hf2'}: weights that a GPT-2 of this shape does "
                                       f"not have: ['extra']\n")
    (tmp_path / "hf2" / "model.safetensors").unlink()
    assert sample_cpu("--init_from", f"hf:{tmp_path / 'hf2'}") == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'hf2'}: no weights (model.safetensors, "
                                       f"model.safetensors.index.json or pytorch_model.bin)\n")


def test_export_without_transformers_says_what_to_install(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` meets uninstalled
    assert export.main([str(folders["char_run"]), "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == ("error: exporting for Hugging Face needs the transformers package: "
                                       "pip install 'gpt-from-scratch[hf]' (or pip install transformers)\n")
    assert not (tmp_path / "hf").exists()


def test_bits_per_byte_of_a_tokenizer_whose_tokens_are_not_bytes_is_a_config_error(tmp_path):
    """A BPE tokenizer.json with another decoder (Metaspace, as SentencePiece-style BPEs have)
    loads, but gpt.eval cannot count its tokens' bytes: that was a ValueError traceback; a
    ConfigError is one line from the CLI (gpt.cli.USER_ERRORS)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    from gpt.cli import USER_ERRORS
    from gpt.config import ConfigError

    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3}
    inner = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    inner.pre_tokenizer = pre_tokenizers.Metaspace()
    inner.decoder = decoders.Metaspace()
    inner.add_special_tokens(["<|endoftext|>"])
    inner.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer.from_file(tmp_path / "tokenizer.json")
    with pytest.raises(ConfigError, match="byte-level tokenizer.*decoder is 'Metaspace'") as e:
        gpt_eval.token_byte_lengths(tokenizer)
    assert isinstance(e.value, USER_ERRORS)


def test_eval_shows_progress_over_the_split_on_stderr_and_keeps_json_clean(folders, capfd):
    """Scoring a whole split can take long (a large val split, a CPU): gpt.eval printed nothing
    until the end. The bar counts the tokens scored (every token of the split but its first) on
    stderr; --json's stdout stays one JSON object; --no_progress turns it off."""
    from gpt.shards import list_shards, read_header

    run = str(folders["char_run"])
    targets = sum(read_header(p) for p in list_shards(folders["data"], "val")) - 1
    assert gpt_eval.main([run, "--device", "cpu", "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["tokens"] == targets
    assert "eval val: 100%" in err and f"{targets}/{targets}" in err, err
    assert gpt_eval.main([run, "--device", "cpu", "--json", "--no-progress"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["tokens"] == targets and "eval val" not in err, err


def test_samples_that_end_at_end_of_text_say_so(folders, tmp_path, capsys):
    """`--num_samples 3 --max_new_tokens 300` printed "[3 samples, 127 tokens ...]" and nothing
    said why there were fewer: each sample ends at the end-of-text token. A model that always
    predicts it (its final LayerNorm a constant that only the eos row of the tied table matches)."""
    bpe = ckpt.latest_checkpoint(folders["bpe_run"]) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(bpe)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=BLOCK, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config)
    with torch.no_grad():
        model.tok_emb.weight.zero_()
        model.tok_emb.weight[tokenizer.eos_id] = 1.0
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
    run = tmp_path / "eos_run"
    ckpt.save_checkpoint(run, 1, model, None, {"step": 1, "model_config": asdict(config)}, tokenizer_path=bpe)
    assert run_sample(["--out_dir", str(run), "--device", "cpu", "--prompt", "abc", "--num_samples", "3",
                       "--max_new_tokens", "20", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "[3 samples, 3 ended at the end-of-text token before --max_new_tokens 20, 0 tokens in " in err, err
    # A sample that ran to the end says nothing of it (the char vocabulary has no end-of-text).
    assert sample_cpu("--out_dir", str(folders["char_run"]), "--prompt", "ab") == 0
    assert "end-of-text" not in capsys.readouterr().err
