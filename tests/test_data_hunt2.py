"""Data prep edge cases found by a second bug hunt: each test failed on the code before its fix."""

import importlib.util
import os
import random
from pathlib import Path

import numpy as np
import pytest

from gpt.prepare import PrepareError, main, prepare
from gpt.dataset import load_meta
from gpt.shards import ShardWriter
from gpt.sources import LocalFiles, SourceError, Texts, split_pieces
from gpt.tokenizer import train_bpe

QUIET = dict(progress=False, log=None)
SMALL = ["--min-val-tokens", "5", "--val-chunk-tokens", "64", "--no-progress"]


def _shakespeare_script():
    script = Path(__file__).resolve().parents[1] / "data_prep" / "shakespeare.py"
    spec = importlib.util.spec_from_file_location("hunt2_shakespeare_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _last_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_tokenizer_train_mb_inf_trains_on_everything_and_nan_is_named(tmp_path, capsys):
    """--tokenizer-train-mb inf (train on the whole corpus) raised OverflowError from int(inf * 1e6):
    a traceback from both scripts; nan gave "cannot convert float NaN to integer", naming no option."""
    text = tmp_path / "in.txt"
    text.write_text("to be or not to be, that is the question\n" * 200)
    common = ["--input", str(text), "--tokenizer", "bpe", "--vocab-size", "300", *SMALL]
    assert main([*common, "--out", str(tmp_path / "a"), "--tokenizer-train-mb", "inf"]) == 0
    prepare(tmp_path / "whole", LocalFiles([text]), vocab_size=300, tokenizer_train_bytes=None,
            min_val_tokens=5, val_chunk_tokens=64, **QUIET)
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "whole/tokenizer.json").read_bytes()
    assert main([*common, "--out", str(tmp_path / "b"), "--tokenizer-train-mb", "nan"]) == 2
    line = _last_error_line(capsys)
    assert line.startswith("error: --tokenizer-train-mb") and "nan" in line
    assert not (tmp_path / "b").exists()
    for given in ("-inf", "0"):  # the value given, not what became of it ("got -1" for -inf)
        assert main([*common, "--out", str(tmp_path / "b"), f"--tokenizer-train-mb={given}"]) == 2
        assert f"got {float(given):g};" in _last_error_line(capsys)
    assert main([*common, "--out", str(tmp_path / "c"), "--tokenizer-train-mb=1e305"]) == 0  # bytes overflow: all
    assert (tmp_path / "c/tokenizer.json").read_bytes() == (tmp_path / "whole/tokenizer.json").read_bytes()

    shakespeare = _shakespeare_script()
    assert shakespeare.main(["--input", str(text), "--out", str(tmp_path / "s"), "--tokenizer", "bpe",
                             "--vocab-size", "300", "--tokenizer-train-mb", "inf", "--min-val-tokens", "5",
                             "--no-progress"]) == 0
    assert load_meta(tmp_path / "s")["tokenizer"] == "bpe"


def test_shard_tokens_over_the_int32_header_is_refused_before_reading(tmp_path):
    """A shard's header counts tokens in an int32: --shard-tokens 3000000000 was accepted, and the
    prep failed (numpy's OverflowError, a traceback) only once 2**31 tokens had been encoded."""
    class Unread(Texts):
        def iter_pieces(self, piece_chars=0):
            raise AssertionError("the corpus was read")

    with pytest.raises(PrepareError, match=r"--shard-tokens 3,000,000,000 is over 2,147,483,647"):
        prepare(tmp_path / "out", Unread(["abc"]), tokenizer="char", shard_tokens=3_000_000_000, **QUIET)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="shard_tokens must lie in 1..2,147,483,647"):
        ShardWriter(tmp_path, "train", 2**31)
    ShardWriter(tmp_path, "train", 2**31 - 1)  # the largest count the header holds is fine


def test_a_file_that_grows_while_it_is_read_is_named(tmp_path):
    """A file still being written (a log, a download) was read to whatever its end was at the time,
    silently: prep's two reads then disagree (below). Now its size is checked at its end."""
    path = tmp_path / "growing.txt"
    path.write_text("word " * 300_000)  # 1.5 MB: more than one read of the file
    pieces = LocalFiles([path]).iter_pieces(piece_chars=1000)
    next(pieces)
    with open(path, "a") as f:
        f.write("more words\n" * 10)
    with pytest.raises(SourceError, match=r"growing.txt: changed while data prep read it \(1,500,000 bytes, then"):
        list(pieces)


def test_a_file_that_changes_between_the_two_reads_is_named(tmp_path):
    """Data prep reads the corpus twice (vocabulary, then tokens). A file appended to in between
    gave, with BPE, meta.json counts of the first read and a tail split far off its fraction (53%
    val instead of 10%); with char, an error about characters missing from the vocabulary that
    named no file. A LocalFiles corpus now remembers each file's size and time of change."""
    path = tmp_path / "in.txt"
    path.write_text("abc abc\n" * 500)
    corpus = LocalFiles([path])
    assert "".join(corpus) == "abc abc\n" * 500
    assert "".join(corpus) == "abc abc\n" * 500  # unchanged: read again as often as asked
    with open(path, "a") as f:
        f.write("zzz more text\n" * 100)
    with pytest.raises(SourceError, match=r"in.txt: changed while data prep read it \(4,000 bytes, then 5,400"):
        "".join(corpus)
    # A new corpus (as each prep makes) reads the file as it is now.
    assert "".join(LocalFiles([path])).endswith("zzz more text\n")
    # Rewritten at the same size: said so (it read "4,000 bytes, then 4,000").
    corpus = LocalFiles([path])
    size = len("".join(corpus))
    path.write_text("x" * (size - 1) + "\n")
    os.utime(path, ns=(1, 1))  # another time of change, whatever the clock's resolution
    with pytest.raises(SourceError, match=f"rewritten at the same size, {size:,} bytes"):
        "".join(corpus)


class _Growing(list):
    """Documents that gain one more on every read after the first: a corpus (a streamed dataset
    updated on the hub, say) that is not the same on data prep's second read."""

    def __init__(self, docs):
        super().__init__(docs)
        self.reads = 0

    def __iter__(self):
        self.reads += 1
        base = list(super().__iter__())
        return iter(base if self.reads == 1 else [*base, "zzz more text"])


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_corpus_that_changes_between_the_two_reads_is_refused(tmp_path, kind):
    """Any corpus, not only files: pass two counts what it reads and compares with pass one."""
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=r"in-memory texts: changed between data prep's two reads"):
        prepare(out, Texts(_Growing(["abc abc\n" * 500])), tokenizer=kind, vocab_size=300, min_val_tokens=5,
                val_chunk_tokens=64, **QUIET)
    assert not out.exists()


def test_crlf_and_tab_separated_text_without_spaces_is_cut_between_words():
    """Pieces were cut only before a space or a newline that follows a non-whitespace character:
    text of CRLF lines ("\\r\\n": the newline follows the \\r) or tab-separated fields with no
    space had no clean cut, and was cut mid-word every piece_chars, changing BPE ids at each cut
    (210 more tokens in 0.5 MB of such text). A carriage return or tab is as clean a cut."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij,.;0123") for _ in range(rng.randint(1, 12))) for _ in range(300)]
    doc = "".join(rng.choice(words) + rng.choice(["\r\n", "\t", "\r\n\r\n"]) for _ in range(6000))
    pieces = list(split_pieces([doc], piece_chars=200))
    assert "".join(pieces) == doc and len(pieces) > 100
    assert all(p[0] in "\r\t" for p in pieces[1:])  # never inside a word
    tok = train_bpe([doc], 400)
    assert np.array_equal(np.concatenate([tok.encode_array(p) for p in pieces]), tok.encode_array(doc))


def test_hf_options_without_hf_dataset_are_refused(tmp_path, capsys):
    """--text-field, --hf-split, --hf-config, --hf-data-files and --streaming were ignored without a
    word unless --hf-dataset was given: `--input rows.jsonl --text-field body` prepared the JSON
    syntax itself ('{', '"', ':' in the vocabulary) as the corpus."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "hello there"}\n' * 300)
    common = ["--tokenizer", "char", *SMALL]
    assert main(["--input", str(rows), "--text-field", "body", "--out", str(tmp_path / "a"), *common]) == 2
    line = _last_error_line(capsys)
    assert line.startswith("error: --text-field: applies to --hf-dataset only, not to --input")
    assert main(["--input", str(rows), "--streaming", "--hf-split=test", "--out", str(tmp_path / "a"), *common]) == 2
    assert _last_error_line(capsys).startswith("error: --hf-split, --streaming: apply to --hf-dataset only")
    assert not (tmp_path / "a").exists()
    # With --hf-dataset they do what they say: the column's text alone (streamed: no datasets cache).
    pytest.importorskip("datasets")
    assert main(["--hf-dataset", str(rows), "--text-field", "body", "--streaming", "--out", str(tmp_path / "b"),
                 *common]) == 0
    assert load_meta(tmp_path / "b")["vocab_size"] == len(set("hello there"))


def test_encoding_errors_without_input_is_refused(tmp_path, capsys):
    """--encoding-errors replace with --hf-dataset was ignored, and the error for the file not in
    UTF-8 then said to pass it; with --source stdlib it was ignored too."""
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("hello there\n" * 100)
    (folder / "b.txt").write_bytes(b"caf\xe9\n")
    for source in (["--hf-dataset", str(folder)], ["--source", "stdlib"]):
        assert main([*source, "--encoding-errors", "replace", "--out", str(tmp_path / "a"), *SMALL]) == 2
        assert _last_error_line(capsys).startswith("error: --encoding-errors applies to --input only")
    assert not (tmp_path / "a").exists()
    # With --input it does what it says.
    assert main(["--input", str(folder), "--encoding-errors", "replace", "--out", str(tmp_path / "a"),
                 "--tokenizer", "char", *SMALL]) == 0
    assert load_meta(tmp_path / "a")["encoding_errors"] == "replace"


def test_a_split_the_data_lacks_names_hf_split(tmp_path):
    """A local file has only the split "train": --hf-split validation failed with an error naming
    --hf-dataset alone (its file exists and is fine), not the option to change."""
    pytest.importorskip("datasets")
    from gpt.hf_dataset import HFDataset

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "hello"}\n' * 3)
    for streaming in (False, True):
        corpus = HFDataset(str(rows), split="validation", streaming=streaming, cache_dir=str(tmp_path / "c"))
        with pytest.raises(SourceError, match=r"--hf-dataset \S+rows.jsonl --hf-split validation: cannot load it"):
            list(corpus)
