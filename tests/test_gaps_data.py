"""Data pipeline paths the coverage run found untested: bad options, odd files and folders,
corrupt dataset files, and rows of local Hugging Face files that hold no usable text."""

import json
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest

from gpt import prepare as prepare_module
from gpt.prepare import STAGING, PrepareError, main, prepare
from gpt.dataset import load_meta
from gpt.shards import HEADER_BYTES, MAGIC, ShardError, open_shard, read_header, write_shard
from gpt.hf_dataset import HFDataset
from gpt.sources import LocalFiles, SourceError, Texts, resolve_source
from gpt.dataset import load_tokenizer

QUIET = dict(progress=False, log=None)
SMALL = ["--tokenizer", "char", "--val-rule", "tail", "--val-fraction", "0.2", "--min-val-tokens", "5",
         "--no-progress"]
TEXT = "to be or not to be, that is the question\n" * 20


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A small char dataset already in place, which a failed prep must leave as it is."""
    text = tmp_path / "good.txt"
    text.write_text(TEXT)
    out = tmp_path / "out"
    assert main(["--input", str(text), "--out", str(out), *SMALL]) == 0
    return out


def _last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


# ---- options and --out ----------------------------------------------------------------------
def test_out_that_is_a_file_is_refused_and_left_as_it_was(tmp_path, capsys):
    text = tmp_path / "good.txt"
    text.write_text(TEXT)
    out = tmp_path / "corpus.txt"
    out.write_text("my corpus, not a dataset")
    assert main(["--input", str(text), "--out", str(out), *SMALL]) == 2
    last = _last_error(capsys)
    assert last.startswith(f"error: --out {out}: exists and is a file, not a folder"), last
    assert "choose another --out" in last
    assert out.read_text() == "my corpus, not a dataset"


def test_bad_numeric_options_on_the_command_line_name_the_option(dataset, tmp_path, capsys):
    before = _snapshot(dataset)
    for option in ("--shard-tokens", "--val-chunk-tokens", "--min-val-tokens"):
        args = ["--input", str(tmp_path / "good.txt"), "--out", str(dataset), "--overwrite", *SMALL, option, "0"]
        assert main(args) == 2
        assert _last_error(capsys) == f"error: {option} must be at least 1, got 0"
    assert _snapshot(dataset) == before
    assert not (dataset / STAGING).exists()


def test_bad_options_through_the_python_api_are_named_before_any_work(tmp_path):
    # The command line's choices= stops these; gpt.prepare.prepare and train.py's auto-prep do not.
    out = tmp_path / "out"
    cases = [
        (dict(tokenizer="sentencepiece"), "--tokenizer must be bpe or char, got 'sentencepiece'"),
        (dict(tokenizer=42), "tokenizer must be 'bpe', 'char', a Tokenizer or a Path, got int"),
        (dict(val_rule="random"), "--val-rule must be one of .*, got 'random'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(PrepareError, match=message):
            prepare(out, Texts([TEXT]), **kwargs, **QUIET)
    # The corpus checks --encoding-errors first (a LocalFiles made from the string 'stdlib' or a
    # path); a corpus object given whole reaches prep's own check.
    with pytest.raises(SourceError, match="--encoding-errors must be one of strict, replace, skip, got 'ignore'"):
        prepare(out, tmp_path, encoding_errors="ignore", **QUIET)
    with pytest.raises(PrepareError, match="--encoding-errors must be one of strict, replace, skip, got 'ignore'"):
        prepare(out, Texts([TEXT]), encoding_errors="ignore", **QUIET)
    assert not out.exists()


def test_sources_that_are_not_corpora_are_named():
    with pytest.raises(SourceError, match="cannot read a corpus from generator; .*a generator cannot be read twice"):
        resolve_source(t for t in [TEXT])
    with pytest.raises(SourceError, match="--input: no paths given"):
        LocalFiles([])
    with pytest.raises(SourceError, match="documents must be str, got bytes"):
        list(Texts([TEXT, b"raw bytes"]).iter_pieces())


def test_a_single_path_given_as_a_string_is_one_input(tmp_path):
    text = tmp_path / "good.txt"
    text.write_text(TEXT)
    assert "".join(p.text for p in LocalFiles(str(text)).iter_pieces()) == TEXT


def test_a_stale_staging_file_is_named_and_does_not_keep_the_folder_locked(dataset, tmp_path, capsys):
    # A file (not the folder a killed prep leaves) where the staging folder goes: mkdir fails
    # after the lock is taken, and the lock must go with the error.
    (dataset / STAGING).write_text("in the way")
    before = _snapshot(dataset)
    args = ["--input", str(tmp_path / "good.txt"), "--out", str(dataset), "--overwrite", *SMALL]
    assert main(args) == 2
    last = _last_error(capsys)
    assert last.startswith(f"error: --out {dataset}: cannot create the dataset folder there "
                           f"(File exists: {dataset / STAGING})"), last
    assert _snapshot(dataset) == before
    (dataset / STAGING).unlink()
    assert main(args) == 0  # not "another data prep is writing this folder right now"


def test_a_dataset_published_while_waiting_for_the_lock_is_not_replaced(tmp_path, monkeypatch):
    """Two preps into one new folder (two train.py started on one data_dir): the second finds the
    folder empty, the first publishes, then the second takes the lock. It must refuse, and let go
    of the lock (train.py's auto-prep goes on in the same process)."""
    first = tmp_path / "first"
    prepare(first, Texts([TEXT]), tokenizer="char", val_rule="tail", min_val_tokens=5, **QUIET)
    out = tmp_path / "out"
    take_lock = prepare_module._lock_out_dir

    def the_other_prep_publishes_first(out_dir):
        for f in first.iterdir():
            (out_dir / f.name).write_bytes(f.read_bytes())
        return take_lock(out_dir)

    monkeypatch.setattr(prepare_module, "_lock_out_dir", the_other_prep_publishes_first)
    with pytest.raises(PrepareError, match="already holds a dataset"):
        prepare(out, Texts(["other text " * 50]), tokenizer="char", val_rule="tail", min_val_tokens=5, **QUIET)
    monkeypatch.setattr(prepare_module, "_lock_out_dir", take_lock)
    assert load_meta(out) == load_meta(first)
    assert not (out / STAGING).exists()
    prepare(out, Texts(["other text " * 50]), tokenizer="char", val_rule="tail", min_val_tokens=5,
            overwrite=True, **QUIET)


# ---- local input folders --------------------------------------------------------------------
def test_an_input_folder_with_no_files_is_named(dataset, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    before = _snapshot(dataset)
    assert main(["--input", str(empty), "--out", str(dataset), "--overwrite", *SMALL]) == 2
    assert _last_error(capsys) == f"error: {empty}: no input files in this folder"
    assert _snapshot(dataset) == before


def test_a_socket_or_a_device_in_an_input_folder_is_skipped_with_a_warning(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT)
    (folder / "zero").symlink_to("/dev/zero")  # read, it would never end
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(folder / "s.sock"))  # reading it would fail, or wait
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = prepare(tmp_path / "out", folder, tokenizer="char", val_rule="tail", min_val_tokens=5, **QUIET)
    finally:
        sock.close()
    said = sorted(str(w.message) for w in caught)
    assert said == [f"skipping {folder / 's.sock'}: not a regular file (a socket)",
                    f"skipping {folder / 'zero'}: not a regular file (a device)"], said
    assert summary["documents"] == 1


def test_source_stdlib_on_the_command_line_keeps_a_dataset_already_there(dataset, capsys):
    before = _snapshot(dataset)
    assert main(["--source", "stdlib", "--out", str(dataset), "--no-progress"]) == 2
    assert _last_error(capsys).startswith(f"error: --out {dataset}: already holds a dataset (meta.json, ...); "
                                          f"pass --overwrite to replace it")
    assert _snapshot(dataset) == before


# ---- corrupt shards and meta.json -----------------------------------------------------------
def test_unreadable_or_foreign_shards_are_named(tmp_path):
    folder = tmp_path / "train_000000.bin"  # a folder with a shard's name, which *.bin matches
    folder.mkdir()
    for read in (read_header, open_shard):
        with pytest.raises(ShardError, match=f"{folder}: cannot read shard \\(Is a directory\\)"):
            read(folder)
    shard = tmp_path / "val_000000.bin"
    write_shard(shard, np.arange(10, dtype=np.uint16))
    raw = bytearray(shard.read_bytes())
    raw[4:8] = np.array([2], "<i4").tobytes()
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=f"{shard}: unsupported shard version 2 \\(expected 1\\)"):
        read_header(shard)
    short = tmp_path / "val_000001.bin"
    short.write_bytes(np.array([MAGIC, 1, 0], "<i4").tobytes())
    with pytest.raises(ShardError, match=f"{short}: file is 12 bytes, shorter than the {HEADER_BYTES}-byte"):
        read_header(short)
    with pytest.raises(ShardError, match="token ids must lie in \\[0, 65536\\)"):
        write_shard(tmp_path / "train_000009.bin", np.array([1, 70_000]))
    assert not (tmp_path / "train_000009.bin").exists()


def test_a_corrupt_meta_json_is_named(dataset):
    meta = dataset / "meta.json"
    good = json.loads(meta.read_text())
    meta.write_text('{"tokenizer": "char", "vocab_size": ')
    with pytest.raises(ShardError, match=f"{meta}: cannot read dataset metadata"):
        load_meta(dataset)
    meta.write_text(json.dumps({k: v for k, v in good.items() if k != "vocab_size"}))
    with pytest.raises(ShardError, match=f"{meta}: missing key 'vocab_size'"):
        load_meta(dataset)


def test_a_run_folder_without_its_config_given_as_data_dir_is_named(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # config.json never written, or deleted
    with pytest.raises(ShardError, match="is a training run folder, not a dataset folder .*Give the dataset "
                                         "folder instead$") as info:
        load_meta(run)
    assert "trained on" not in str(info.value)


def test_load_tokenizer_of_nothing_or_a_foreign_model_is_named(tmp_path):
    import tokenizers
    from tokenizers.models import Unigram

    with pytest.raises(ValueError, match=f"{tmp_path / 'nope'}: no such tokenizer file or dataset folder"):
        load_tokenizer(tmp_path / "nope")
    path = tmp_path / "tokenizer.json"
    tokenizers.Tokenizer(Unigram([("a", -1.0), ("b", -2.0)], 0)).save(str(path))
    with pytest.raises(ValueError, match=f"{path}: unsupported tokenizer model 'Unigram' \\(expected BPE or WordLevel\\)"):
        load_tokenizer(path)


# ---- local files read through datasets ------------------------------------------------------
def _hf(path, tmp_path, **kw) -> HFDataset:
    return HFDataset(str(path), cache_dir=str(tmp_path / "hf-cache"), progress=False, **kw)


def _documents(corpus) -> list[str]:
    return [p.text for p in corpus.iter_pieces()]


def _folder(tmp_path, name, files: dict[str, bytes]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for file, data in files.items():
        (folder / file).write_bytes(data)
    return folder


GOOD = b'{"text": "hello world"}\n{"text": "second row"}\n'


def test_hf_file_of_unknown_type_is_named(tmp_path):
    pytest.importorskip("datasets")
    data = tmp_path / "corpus.dat"
    data.write_text(TEXT)
    with pytest.raises(SourceError, match=f"--hf-dataset {data}: cannot tell the file type from its extension; "
                                          f"use one of .*jsonl.*parquet"):
        _documents(_hf(data, tmp_path))


def test_hf_rows_without_text_are_skipped_and_rows_of_numbers_are_named(tmp_path):
    pytest.importorskip("datasets")
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"text": "first"}\n{"text": null}\n{"text": "third"}\n')
    for streaming in (False, True):
        assert _documents(_hf(rows, tmp_path, streaming=streaming)) == ["first", "third"]
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_bytes(b'{"text": 1}\n{"text": 2}\n')
    with pytest.raises(SourceError, match=f"--text-field 'text' of {numbers} holds int, not text"):
        _documents(_hf(numbers, tmp_path))


def test_hf_streamed_rows_without_the_field_are_named(tmp_path):
    pytest.importorskip("datasets")
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"body": "x"}\n')
    with pytest.raises(SourceError, match=f"--text-field 'text': {rows} has no such column; its columns are: body"):
        _documents(_hf(rows, tmp_path, streaming=True))


@pytest.mark.parametrize("files, reason", [
    # A blank line is no row; the empty file (no rows, no columns) is passed over to find the bad one.
    ({"a.jsonl": GOOD, "b.jsonl": b"", "c.jsonl": GOOD + b"\n[1, 2]\n"},
     "c.jsonl: line 4 is JSON but not an object \\(list\\): each line must be one row"),
])
def test_hf_folder_with_a_line_that_is_no_row_names_it(tmp_path, files, reason):
    pytest.importorskip("datasets")
    folder = _folder(tmp_path, "rows", files)
    for streaming in (False, True):
        with pytest.raises(SourceError, match=f"--hf-dataset {folder}: {folder}/{reason}") as info:
            _documents(_hf(folder, tmp_path, streaming=streaming))
        assert "\n" not in str(info.value)


def test_hf_folder_of_json_documents_with_a_broken_one_is_one_line(tmp_path):
    pytest.importorskip("datasets")
    folder = _folder(tmp_path, "docs", {"a.json": b'[{"text": "x"}]', "b.json": b'[{"text": "y"}, {"te'})
    with pytest.raises(SourceError, match=f"--hf-dataset {folder}: {folder}/b.json: ") as info:
        _documents(_hf(folder, tmp_path))
    assert "\n" not in str(info.value)


def test_hf_text_folder_without_the_split_is_named(tmp_path):
    pytest.importorskip("datasets")
    folder = _folder(tmp_path, "texts", {"a.txt": b"one\n", "b.txt": b"two\n"})
    assert sorted(_documents(_hf(folder, tmp_path))) == ["one\n", "two\n"]
    with pytest.raises(SourceError, match=r"--hf-split validation: .*validation") as info:
        _documents(_hf(folder, tmp_path, split="validation"))
    assert "\n" not in str(info.value)


def test_a_damaged_save_to_disk_folder_is_named(dataset, tmp_path, capsys):
    pytest.importorskip("datasets")
    saved = _folder(tmp_path, "saved", {"dataset_dict.json": b'{"splits": ["train"'})
    before = _snapshot(dataset)
    assert main(["--hf-dataset", str(saved), "--out", str(dataset), "--overwrite", *SMALL]) == 2
    last = _last_error(capsys)
    assert last.startswith(f"error: --hf-dataset {saved}: looks like a folder written by save_to_disk, but "
                           f"cannot read it (JSONDecodeError"), last
    assert _snapshot(dataset) == before


# ---- tokenizers -----------------------------------------------------------------------------
def test_bare_llm_c_shards_offline_say_to_add_gpt2s_tokenizer_json(tmp_path, monkeypatch):
    """Bare llm.c shards are GPT-2 ids; with the hub out of reach the tokenizer cannot be fetched,
    and the error says which file to put where."""
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)  # no 20 s of retries without a network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # and no GPT-2 in a local cache
    write_shard(tmp_path / "train_000000.bin", np.arange(100, dtype=np.uint16))
    assert load_meta(tmp_path)["tokenizer"] == "gpt2"
    with pytest.raises(ValueError, match="cannot load GPT-2's tokenizer from the Hugging Face hub .*; put GPT-2's "
                                         "tokenizer.json into the dataset folder instead"):
        load_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def small_bpe():
    from gpt.tokenizer import train_bpe

    return train_bpe([TEXT * 5, "naïve café 12 'll"], 300)


def test_word_cache_meets_the_pipeline_on_a_lone_surrogate(small_bpe):
    # Only a Python caller can hand one over (files and datasets' rows are valid UTF-8): the
    # cache must fail as the pipeline does, never give other ids.
    from gpt.wordcache import WordCacheEncoder

    text = "café \ud800 to be"
    with pytest.raises(Exception) as pipeline:
        small_bpe.inner.encode(text)
    with pytest.raises(type(pipeline.value), match=str(pipeline.value)):
        WordCacheEncoder(small_bpe.inner.to_str()).encode(text)


def test_encode_pieces_restores_the_users_tokenizers_parallelism(small_bpe, monkeypatch):
    from gpt.wordcache import encode_pieces

    texts = [TEXT[:40], "naïve café", TEXT[40:90], ""]
    expected = [small_bpe.inner.encode(t, add_special_tokens=False).ids for t in texts]
    # The texts end exactly where the pool would start: no pool.
    got = encode_pieces(small_bpe.inner, iter(texts), pool_after_chars=sum(map(len, texts)))
    assert [a.tolist() for a in got] == expected
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    got = encode_pieces(small_bpe.inner, iter(texts), workers=2, pool_after_chars=1)
    assert [a.tolist() for a in got] == expected
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"


# ---- data_prep/shakespeare.py ---------------------------------------------------------------
def test_shakespeare_download_gives_the_same_dataset_as_input(tmp_path, monkeypatch, capsys):
    """The download path without a network: the same bytes from a file:// URL (a leading byte
    order mark included, which is no text) make the same shards as --input."""
    from test_data_hunt import _shakespeare_module

    script = _shakespeare_module("gaps_shakespeare_script")
    text = tmp_path / "input.txt"
    text.write_bytes(b"\xef\xbb\xbf" + TEXT.encode())
    download = script.download
    monkeypatch.setattr(script, "download", lambda: download(text.as_uri()))
    small = ["--val-fraction", "0.2", "--min-val-tokens", "5", "--no-progress"]
    assert script.main(["--out", str(tmp_path / "downloaded"), *small]) == 0
    assert f"downloading {script.URL}" in capsys.readouterr().out
    assert script.main(["--input", str(text), "--out", str(tmp_path / "local"), *small]) == 0
    downloaded, local = _snapshot(tmp_path / "downloaded"), _snapshot(tmp_path / "local")
    assert sorted(downloaded) == sorted(local)
    for name in downloaded:
        if name != "meta.json":
            assert downloaded[name] == local[name], name
    assert "\ufeff" not in json.loads(local["tokenizer.json"])["model"]["vocab"]


def test_a_text_with_a_lone_surrogate_names_the_document(tmp_path):
    """From Python, a str may hold a lone surrogate (decoded with surrogateescape): the prep ended
    in a bare UnicodeEncodeError naming no document, and left nothing behind to say so."""
    texts = ["hello world " * 50, "fine text", "bad \udc80 byte " * 3]
    with pytest.raises(SourceError, match=r"document 3 holds a lone surrogate \(U\+DC80\) at character 4"):
        prepare(tmp_path / "out", texts, tokenizer="char", progress=False, log=None)
    assert not (tmp_path / "out" / "meta.json").exists()
