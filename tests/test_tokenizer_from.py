"""Data prep reusing a model's tokenizer (--tokenizer-from): the only way new text reaches a
trained model as ids it knows. Errors that say to prepare data "with the model's tokenizer"
give this command, and these tests follow it as written."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from conftest import SHAKESPEARE, tiny_config
from gpt import checkpoint as ckpt
from gpt import eval as gpt_eval
from gpt import export, hf
from gpt.prepare import main as prep_main
from gpt.prepare import prepare
from gpt.shards import ShardError, list_shards, open_shard
from gpt.tokenizer import Tokenizer, read_vocab
from gpt.trainer import train

SPLIT = ["--val-rule", "tail", "--val-fraction", "0.1", "--min-val-tokens", "65", "--no-progress"]


@pytest.fixture(scope="module")
def run(char_data, tmp_path_factory) -> Path:
    """A two-step run on the char dataset: a run folder with one checkpoint."""
    out = tmp_path_factory.mktemp("tokfrom") / "run"
    train(tiny_config(char_data, out, max_steps=2, eval_interval=2, eval_iters=1))
    return out


def _new_text(char_data: Path, size: int = 60_000) -> str:
    """Shakespeare the char dataset did not hold, with the characters its vocabulary lacks left out."""
    known = set(read_vocab(char_data / "tokenizer.json"))
    return "".join(c for c in SHAKESPEARE.read_text()[300_000:300_000 + size] if c in known)


def _decoded(data_dir: Path) -> str:
    tok = Tokenizer.from_file(data_dir / "tokenizer.json")
    ids = np.concatenate([np.asarray(open_shard(p)) for split in ("train", "val") for p in list_shards(data_dir, split)])
    return tok.decode(ids.tolist())


def _command(message: str) -> list[str]:
    """The prep command an error gives, as argv for prepare.py's main()."""
    # (data_prep/prepare.py's whole path where the current folder is not the repository)
    found = re.search(r"python (?:\S*/)?data_prep/prepare\.py (.*?)(?:,| \(meta\.json| then|$)", message)
    assert found, message
    return shlex.split(found.group(1))


def test_text_prepared_with_a_models_tokenizer_gets_its_ids_from_any_folder_that_holds_it(
        char_data, run, tmp_path, capsys):
    text = _new_text(char_data)
    corpus = tmp_path / "new.txt"
    corpus.write_text(text)
    checkpoint = ckpt.latest_checkpoint(run)
    hf_dir = tmp_path / "hf"
    assert export.main([str(run), "--format", "hf", "--out", str(hf_dir)]) == 0
    sources = {"run": run, "checkpoint": checkpoint, "dataset": char_data,
               "file": char_data / "tokenizer.json", "hf": hf_dir}
    for name, source in sources.items():
        out = tmp_path / f"from_{name}"
        assert prep_main(["--input", str(corpus), "--tokenizer-from", str(source), "--out", str(out), *SPLIT]) == 0
        assert f"char vocabulary 62 from {os.path.abspath(source)}" in capsys.readouterr().out
        # The same ids for the same characters as the model's own dataset, and the text comes back.
        assert read_vocab(out / "tokenizer.json") == read_vocab(char_data / "tokenizer.json"), name
        assert _decoded(out) == text, name
        meta = json.loads((out / "meta.json").read_text())
        assert (meta["tokenizer"], meta["vocab_size"], meta["tokenizer_from"]) == ("char", 62, os.path.abspath(source))
    # A run fine-tuned from the model trains on it: the vocabulary check passes.
    train(tiny_config(tmp_path / "from_run", tmp_path / "tuned", init_from=str(run), max_steps=2,
                      eval_interval=2, eval_iters=1))
    assert ckpt.latest_checkpoint(tmp_path / "tuned") is not None


def test_options_that_would_be_ignored_are_refused_before_anything_is_read(char_data, tmp_path, capsys):
    corpus = tmp_path / "t.txt"
    corpus.write_text("hello world " * 1000)
    out = tmp_path / "out"
    for extra, named in [(["--tokenizer", "char"], "--tokenizer cannot"),
                         (["--vocab-size", "300"], "--vocab-size cannot"),
                         (["--tokenizer", "bpe", "--tokenizer-train-mb", "5"], "--tokenizer, --tokenizer-train-mb")]:
        argv = ["--input", str(corpus), "--tokenizer-from", str(char_data), *extra, "--out", str(out), *SPLIT]
        assert prep_main(argv) == 2
        err = capsys.readouterr().err
        assert named in err and "with --tokenizer-from" in err, err
        assert not out.exists()
    # A char vocabulary is not trained: --tokenizer-train-mb was ignored with it; now it is refused.
    assert prep_main(["--input", str(corpus), "--tokenizer", "char", "--tokenizer-train-mb", "5",
                      "--out", str(out), *SPLIT]) == 2
    assert "--tokenizer-train-mb cannot be used with --tokenizer char" in capsys.readouterr().err
    assert not out.exists()


def test_what_holds_no_usable_tokenizer_is_named(char_data, run, tmp_path, capsys):
    corpus = tmp_path / "t.txt"
    corpus.write_text("héllo ✓ world " * 100)
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(run.with_name("rn"), "no such file or folder"),  # a slip of "run"? the runs beside it are named
             (empty, "no tokenizer.json here; give a tokenizer.json file, a prepared dataset folder"),
             (corpus, "cannot load tokenizer"),
             (run / "checkpoints", "did you mean"),
             # A char vocabulary lacks characters of the new text: which ones, and whose vocabulary.
             (char_data, f"2 characters not in the char vocabulary of --tokenizer-from {char_data}")]
    for source, said in cases:
        assert prep_main(["--input", str(corpus), "--tokenizer-from", str(source), "--out", str(out), *SPLIT]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "--tokenizer-from" in err and said in err, err
        assert not out.exists()
    assert f"'é' (U+00E9) in {corpus} at character 1, '✓' (U+2713) at 6." in err
    assert prep_main(["--input", str(corpus), "--tokenizer-from", str(run.with_name("rn")), "--out", str(out)]) == 2
    assert f"did you mean {run}?" in capsys.readouterr().err


def test_a_refused_init_from_gives_the_prep_command_that_makes_it_work(char_data, run, tmp_path):
    # The same kind of vocabulary, other ids: this text has no 'Z', so every id above it shifts.
    text = SHAKESPEARE.read_text()[:300_000].replace("Z", "z")
    corpus = tmp_path / "no_z.txt"
    corpus.write_text(text)
    other = tmp_path / "other"
    prepare(other, Path(corpus), tokenizer="char", val_fraction=0.1, val_rule="tail", progress=False, log=None)
    for out_dir, init_from, start in [(tmp_path / "tuned", str(run), "or tokenize this text with its tokenizer"),
                                      (run, "", "start a new run (another out_dir) with init_from")]:
        with pytest.raises(ckpt.CheckpointError) as e:
            train(tiny_config(other, out_dir, init_from=init_from, max_steps=4, eval_interval=2, eval_iters=1))
        # The run, not its checkpoint folder (which the run prunes, and meta.json would record).
        assert start in str(e.value) and f"--tokenizer-from {run} " in str(e.value), str(e.value)
    argv = _command(str(e.value))
    assert argv[:2] == ["--input", "YOUR_TEXT"] and argv[-2:] == ["--out", f"{other}_for_run"]
    argv[1] = str(corpus)
    assert prep_main([*argv, "--no-progress"]) == 0
    retokenized = Path(f"{other}_for_run")
    assert read_vocab(retokenized / "tokenizer.json") == read_vocab(char_data / "tokenizer.json")
    # Its split options are the dataset's (tail, 0.1): the same windows of the same text.
    assert json.loads((retokenized / "meta.json").read_text())["tokens"] == json.loads(
        (other / "meta.json").read_text())["tokens"]
    train(tiny_config(retokenized, tmp_path / "tuned", init_from=str(run), max_steps=2, eval_interval=2,
                      eval_iters=1))
    # Given the old data_dir again, the advice is the folder already made.
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{retokenized} holds a dataset made with that "
                                                             f"tokenizer: give it as data_dir")):
        train(tiny_config(other, tmp_path / "tuned2", init_from=str(run), max_steps=2))


def test_eval_and_hf_init_from_on_data_of_another_vocabulary_give_the_command(char_data, run, tmp_path, capsys):
    text = SHAKESPEARE.read_text()[:300_000].replace("Z", "z")
    other = tmp_path / "other"
    prepare(other, [text], tokenizer="char", val_fraction=0.1, val_rule="tail", progress=False, log=None)
    assert gpt_eval.main([str(run), "--data_dir", str(other), "--max_batches", "1", "--no_progress"]) != 0
    err = capsys.readouterr().err
    assert f"--tokenizer-from {run}" in err and f"--out {other}_for_run" in err, err
    hf_dir = tmp_path / "hf"
    assert export.main([str(run), "--format", "hf", "--out", str(hf_dir)]) == 0
    with pytest.raises(hf.HFError) as e:
        train(tiny_config(other, tmp_path / "from_hf", init_from=f"hf:{hf_dir}", max_steps=2))
    assert f"--tokenizer-from {hf_dir}" in str(e.value), str(e.value)


def test_train_prepares_a_missing_data_dir_with_init_froms_tokenizer(char_data, run, tmp_path, capsys):
    """The embedded corpus prepared for a fine-tune is tokenized with the model's own tokenizer: a
    new BPE was refused by the vocabulary check after the prep's minutes. This char vocabulary
    (Shakespeare's) cannot spell Python, which the prep says, naming the run's tokenizer."""
    data = tmp_path / "stdlib_for_run"
    config = tiny_config(data, tmp_path / "tuned", init_from=str(run), prepare_source="stdlib")
    with pytest.raises(ValueError, match=re.escape(f"not in the char vocabulary of --tokenizer-from {run}: ")):
        train(config)
    assert f"the tokenizer of {run}, the model this run starts from: the only vocabulary it reads" in capsys.readouterr().out
    assert not (data / "meta.json").exists()
    # Where it may not prepare one, the command it gives reuses that tokenizer too.
    with pytest.raises(ShardError, match=re.escape(f"--tokenizer-from {run}")):
        train(tiny_config(data, tmp_path / "tuned", init_from=str(run), prepare_source="none"))


def test_a_folder_of_text_given_as_data_dir_gets_a_prep_command_that_works_for_its_size(run, tmp_path):
    """A 200 kB folder: prep's default split (one 8,192-token chunk in 100) held out nothing."""
    text_dir = tmp_path / "my text"  # (a space: the command quotes the paths it names)
    text_dir.mkdir()
    (text_dir / "a.txt").write_text(SHAKESPEARE.read_text()[:200_000])
    with pytest.raises(ShardError) as e:
        train(tiny_config(text_dir, tmp_path / "r", prepare_source="stdlib"))
    argv = _command(str(e.value))
    assert "--val-rule" in argv and "--tokenizer-from" not in argv
    assert prep_main([*argv, "--no-progress"]) == 0
    assert json.loads((tmp_path / "my text_prepared" / "meta.json").read_text())["tokens"]["val"] > 1025
    # A folder of 30 kB: the val split's least is this run's windows' (block_size 64 + 1), not prep's 1,025.
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text(SHAKESPEARE.read_text()[:30_000])
    with pytest.raises(ShardError) as e:
        train(tiny_config(small, tmp_path / "r", prepare_source="stdlib"))
    argv = _command(str(e.value))
    assert argv[argv.index("--min-val-tokens") + 1] == "65"
    assert prep_main([*argv, "--no-progress"]) == 0
    train(tiny_config(tmp_path / "small_prepared", tmp_path / "r_small", max_steps=2, eval_interval=2, eval_iters=1))
    # For a fine-tune, with the model's tokenizer.
    with pytest.raises(ShardError) as e:
        train(tiny_config(text_dir, tmp_path / "r", init_from=str(run), prepare_source="stdlib"))
    assert f"--tokenizer-from {run}" in str(e.value) and f"--input '{text_dir}'" in str(e.value)


def test_remaking_a_dataset_prepared_with_a_reused_tokenizer_reuses_it_again(char_data, run, tmp_path):
    text = _new_text(char_data)
    corpus = tmp_path / "new.txt"
    corpus.write_text(text)
    data = tmp_path / "data"
    assert prep_main(["--input", str(corpus), "--tokenizer-from", str(run), "--out", str(data), *SPLIT]) == 0
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    (data / "val_000000.bin").unlink()
    with pytest.raises(ShardError) as e:
        train(tiny_config(data, tmp_path / "r", max_steps=2))
    argv = _command(str(e.value))
    assert argv[argv.index("--tokenizer-from") + 1] == os.path.abspath(run), str(e.value)
    argv[argv.index("YOUR_TEXT")] = str(corpus)
    assert prep_main([*argv, "--no-progress"]) == 0
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before


@pytest.mark.parametrize("train_mb", ["0.05", "inf"])
def test_remaking_a_dataset_keeps_the_bpe_training_share_and_the_encoding_rule(tmp_path, train_mb):
    """The remake command ("make it again ... which give the same files") left out
    --tokenizer-train-mb and --encoding-errors: another share of the text trained other merges,
    and other ids (2,132,205 train tokens instead of 2,764,099 in a review's case)."""
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "a.txt").write_text(SHAKESPEARE.read_text()[:200_000])
    (corpus / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    data = tmp_path / "data"
    assert prep_main(["--input", str(corpus), "--vocab-size", "300", "--tokenizer-train-mb", train_mb,
                      "--encoding-errors", "replace", "--out", str(data), *SPLIT]) == 0
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    (data / "val_000000.bin").unlink()
    with pytest.raises(ShardError) as e:
        train(tiny_config(data, tmp_path / "r", max_steps=2))
    argv = _command(str(e.value))
    assert argv[argv.index("--tokenizer-train-mb") + 1] == train_mb and "replace" in argv, str(e.value)
    argv[argv.index("YOUR_TEXT")] = str(corpus)
    assert prep_main([*argv, "--no-progress"]) == 0
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before


def test_shakespeare_script_reuses_a_tokenizer_into_the_folder_it_is_given(char_data, tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "tokfrom_shakespeare", Path(__file__).resolve().parents[1] / "data_prep" / "shakespeare.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "download", lambda *a, **k: pytest.fail("downloaded before the options were checked"))
    monkeypatch.chdir(tmp_path)
    assert script.main(["--tokenizer-from", "nowhere", "--out", "x", "--no-progress"]) == 2  # before a download
    assert "--tokenizer-from nowhere: no such file or folder" in capsys.readouterr().err
    # Its default folder is named after --tokenizer (data/shakespeare_char): not for a reused one.
    assert script.main(["--tokenizer-from", str(char_data), "--no-progress"]) == 2
    assert "--tokenizer-from needs --out" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
    corpus = tmp_path / "t.txt"
    corpus.write_text(_new_text(char_data))
    assert script.main(["--input", str(corpus), "--tokenizer-from", str(char_data), "--out", "mine", "--no-progress"]) == 0
    assert read_vocab(tmp_path / "mine" / "tokenizer.json") == read_vocab(char_data / "tokenizer.json")


def test_a_resume_whose_dataset_is_gone_prepares_it_with_the_checkpoints_tokenizer(char_data, run, tmp_path, capsys):
    """It prepared the embedded corpus with a new BPE, which the resume then refused, and advised
    giving up the resume for a new run."""
    import shutil

    resumed = shutil.copytree(run, tmp_path / "run")
    config = tiny_config(tmp_path / "gone", resumed, prepare_source="stdlib", max_steps=4)
    with pytest.raises(ValueError, match=re.escape(f"not in the char vocabulary of --tokenizer-from {resumed}: ")):
        train(config)  # Shakespeare's characters cannot spell Python: said, by the checkpoint's vocabulary
    assert f"the tokenizer of {resumed}, the model this run starts from" in capsys.readouterr().out


def test_a_checkpoints_tokenizer_is_checked_against_its_manifest_and_a_run_without_one_is_named(
        char_data, run, tmp_path, capsys):
    import shutil

    corpus = tmp_path / "new.txt"
    corpus.write_text(_new_text(char_data))
    out = tmp_path / "out"
    # An edited tokenizer.json in a checkpoint (two ids swapped: valid, other ids) was reused as it was.
    copy = shutil.copytree(run, tmp_path / "copy")
    tokenizer_file = ckpt.latest_checkpoint(copy) / "tokenizer.json"
    saved = json.loads(tokenizer_file.read_text())
    vocab = saved["model"]["vocab"]
    a, b = list(vocab)[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tokenizer_file.write_text(json.dumps(saved, indent=2))
    assert prep_main(["--input", str(corpus), "--tokenizer-from", str(copy), "--out", str(out), *SPLIT]) == 2
    err = capsys.readouterr().err
    assert f"--tokenizer-from {copy}: {tokenizer_file}: " in err and "the manifest" in err, err
    assert not out.exists()
    # A run before its first checkpoint: said so, with the dataset it trains on.
    early = tmp_path / "early"
    early.mkdir()
    shutil.copy(run / "config.json", early / "config.json")  # what a run writes at its start
    assert prep_main(["--input", str(corpus), "--tokenizer-from", str(early), "--out", str(out), *SPLIT]) == 2
    err = capsys.readouterr().err
    assert "has not saved a checkpoint yet" in err and f"--tokenizer-from {char_data}" in err, err


def test_init_from_an_hf_folder_without_a_tokenizer_prepares_nothing(char_data, run, tmp_path):
    """Any vocabulary prepared here would be another than the model's: it prepared a 4,096-id BPE
    of the standard library (25 s) before init_from refused it."""
    hf_dir = tmp_path / "hf"
    assert export.main([str(run), "--format", "hf", "--out", str(hf_dir)]) == 0
    (hf_dir / "tokenizer.json").unlink()
    data = tmp_path / "data"
    with pytest.raises(hf.HFError, match=f"has no tokenizer.json, so no dataset can be prepared"):
        train(tiny_config(data, tmp_path / "r", init_from=f"hf:{hf_dir}", prepare_source="stdlib"))
    assert not data.exists()


def test_review_of_the_advice_edges(char_data, run, tmp_path, monkeypatch, capsys):
    """Regressions found by reviewing this change: advice for data_dir '.' raised a traceback (a
    Path of no name); a broken `latest` let a dataset be prepared with another tokenizer first;
    gpt.eval named a checkpoint's tokenizer.json (pruned later); an HF folder without a
    tokenizer.json was taken for a run; a mistyped hf:DIR was said to lack a tokenizer."""
    import shutil

    other = tmp_path / "other"
    prepare(other, [SHAKESPEARE.read_text()[:300_000].replace("Z", "z")], tokenizer="char", val_fraction=0.1,
            val_rule="tail", progress=False, log=None)
    monkeypatch.chdir(other)
    assert gpt_eval.main([str(run), "--data_dir", ".", "--max_batches", "1", "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"--out {tmp_path / 'other_for_run'}" in err, err
    monkeypatch.chdir(tmp_path)

    broken = shutil.copytree(run, tmp_path / "broken")
    (broken / "latest").write_text("step_9999999")
    with pytest.raises(ckpt.CheckpointError, match="names checkpoint 'step_9999999'"):
        train(tiny_config(tmp_path / "gone", broken, prepare_source="stdlib", prepare_tokenizer="char"))
    assert not (tmp_path / "gone").exists()

    assert gpt_eval.main([str(run), "--data_dir", str(tmp_path / "nodata"), "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert f"--tokenizer-from {run} " in err and "checkpoints" not in err, err

    hf_dir = tmp_path / "hf"
    assert export.main([str(run), "--format", "hf", "--out", str(hf_dir)]) == 0
    (hf_dir / "tokenizer.json").unlink()
    corpus = tmp_path / "t.txt"
    corpus.write_text(_new_text(char_data))
    assert prep_main(["--input", str(corpus), "--tokenizer-from", str(hf_dir), "--out", "o", *SPLIT]) == 2
    assert f"--tokenizer-from {hf_dir}: no tokenizer.json here" in capsys.readouterr().err

    with pytest.raises(hf.HFError, match="is not a folder"):
        train(tiny_config(tmp_path / "gone", tmp_path / "r", init_from=f"hf:{tmp_path / 'hff'}",
                          prepare_source="stdlib"))
    assert not (tmp_path / "gone").exists()


def test_paths_of_no_name_and_runs_with_a_broken_latest_in_the_advice(char_data, run, tmp_path, monkeypatch):
    """A second review: data_dir '.' still raised a traceback in the advice for a folder of text,
    '..' advised '.._prepared' inside the current folder, and a checkpoint given as init_from was
    named by its run even where the run's `latest` was broken (the command then failed)."""
    import shutil

    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    (texts / "a.txt").write_text(SHAKESPEARE.read_text()[:30_000])
    for where, data_dir in [(texts, "."), (texts / "sub", "..")]:
        monkeypatch.chdir(where)
        with pytest.raises(ShardError) as e:
            train(tiny_config(data_dir, tmp_path / "r", prepare_source="stdlib"))
        assert f"--out {tmp_path / 'texts_prepared'}, then" in str(e.value), str(e.value)
    monkeypatch.chdir(tmp_path)
    broken = shutil.copytree(run, tmp_path / "broken")
    (broken / "latest").write_text("step_9999999")
    checkpoint = ckpt.complete_checkpoints(broken)[-1]
    with pytest.raises(ShardError) as e:
        train(tiny_config(texts, tmp_path / "r2", init_from=str(checkpoint), prepare_source="stdlib"))
    argv = _command(str(e.value))
    assert argv[argv.index("--tokenizer-from") + 1] == str(checkpoint)
    assert prep_main([*argv, "--no-progress"]) == 0
    # A `latest` of '..' reads as a name too, but no reader takes it: the checkpoint is named.
    (broken / "latest").write_text("..")
    (broken / "manifest.json").write_text("{}")  # (checkpoints/../manifest.json)
    from gpt.dataset import model_folder

    assert model_folder(checkpoint) == checkpoint and model_folder(ckpt.latest_checkpoint(run)) == run


@pytest.mark.parametrize("val_rule", ["tail", "chunks"])
def test_a_reused_tokenizer_of_another_kind_gets_the_ids_of_each_whole_document(tmp_path, val_rule):
    """Prep cuts documents into 64K-character pieces just before whitespace, a cut exact for
    GPT-2's pre-tokenizer. A reused Metaspace BPE (Llama's kind) merged "US:\\n" across a cut
    and put a "▁" at the start of every piece: 9 ids more than the tokenizer's own encoding of
    the text, and text that did not decode back. Such a tokenizer now encodes each document whole."""
    from tokenizers import Tokenizer as Inner
    from tokenizers import decoders, models, pre_tokenizers, trainers

    text = SHAKESPEARE.read_text()[:400_000]  # one document of ~6 pieces
    inner = Inner(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    inner.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    inner.train_from_iterator([text[:100_000]], trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                                    show_progress=False))
    inner.save(str(tmp_path / "metaspace.json"))
    (tmp_path / "in.txt").write_text(text)
    prepare(tmp_path / "out", tmp_path / "in.txt", tokenizer=tmp_path / "metaspace.json", val_rule=val_rule,
            val_fraction=0.1, min_val_tokens=65, progress=False, log=None)
    eot = inner.token_to_id("<|endoftext|>")
    shards = {split: np.concatenate([np.asarray(open_shard(p)) for p in list_shards(tmp_path / "out", split)])
              for split in ("train", "val")}
    if val_rule == "tail":  # nanoGPT's split: train and val are each encoded as one text
        cut = int(len(text) * 0.9)
        assert shards["train"].tolist() == [eot] + inner.encode(text[:cut]).ids
        assert shards["val"].tolist() == inner.encode(text[cut:]).ids
    else:  # the chunks of one stream
        assert sorted(np.concatenate(list(shards.values())).tolist()) == sorted([eot] + inner.encode(text).ids)
