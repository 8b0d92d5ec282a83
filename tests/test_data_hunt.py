"""Data prep edge cases found by a bug hunt: each test failed on the code before its fix."""

import random
import re
import types

import pytest
import tokenizers

from gpt import sources as sources_module
from gpt import tokenizer as tokenizer_module
from gpt.sources import split_pieces
from gpt.tokenizer import train_bpe


def _longest_run(text: str) -> int:
    return max((len(m.group()) for m in re.finditer(r"\S+|\s+", text)), default=0)


def test_bpe_training_sees_no_huge_run(monkeypatch):
    """A corpus that is one long run of letters (a 20 MB line without spaces) made the BPE
    trainer merge inside one giant word for every merge learned: minutes per MB, no progress.
    Training now sees such runs cut into bounded texts; the text itself is unchanged."""
    fed: list[str] = []

    class Spy:
        def __init__(self, model):
            object.__setattr__(self, "real", tokenizers.Tokenizer(model))

        def __getattr__(self, name):
            return getattr(self.real, name)

        def __setattr__(self, name, value):
            setattr(self.real, name, value)

        def train_from_iterator(self, texts, trainer):
            fed.extend(texts)
            self.real.train_from_iterator(fed, trainer)

    monkeypatch.setattr(tokenizer_module, "tokenizers", types.SimpleNamespace(Tokenizer=Spy))
    rng = random.Random(0)
    run = "".join(rng.choice("abcdefgh") for _ in range(50_000))
    text = "a few words first\n" + run + " " * 5000 + "and after\n"
    tok = train_bpe([text], 300)
    assert "".join(fed) == text
    assert max(map(_longest_run, fed)) <= 1024
    # The merges still encode the run itself, whole, and decode it back.
    assert tok.decode(tok.encode(text)) == text


def test_split_pieces_searches_a_long_run_once(monkeypatch):
    """A document without spaces or newlines was searched for a clean cut ~16 times over
    (1M characters searched again for each 64K piece): ~0.4 s per MB in each pass."""
    searched = []

    class Counting:
        def search(self, text, pos, endpos):
            searched.append(max(0, min(endpos, len(text)) - pos))
            return sources_module._CLEAN_CUT_REAL.search(text, pos, endpos)

    monkeypatch.setattr(sources_module, "_CLEAN_CUT_REAL", sources_module._CLEAN_CUT, raising=False)
    monkeypatch.setattr(sources_module, "_CLEAN_CUT", Counting())
    text = "x" * 200_000
    chunks = [text[i : i + 7_000] for i in range(0, len(text), 7_000)]
    pieces = list(split_pieces(chunks, piece_chars=1_000))
    assert "".join(pieces) == text
    assert all(len(p) == 1_000 for p in pieces[:-1])
    assert sum(searched) <= 2 * len(text)


def test_char_vocabulary_over_uint16_names_the_input_and_the_remedy(tmp_path):
    """More than 65,536 distinct characters with --tokenizer char said only "char vocabulary
    (distinct characters) ... Use a vocabulary of at most 65,536 tokens", which names neither
    the input nor anything the user can change (a char vocabulary has no size option)."""
    from gpt.prepare import PrepareError, prepare

    text = "".join(chr(c) for c in range(0x20, 0x30000) if not 0xD800 <= c < 0xE000)
    corpus = tmp_path / "many.txt"
    corpus.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=r"many\.txt: has 194,528 distinct characters.*--tokenizer bpe"):
        prepare(out, corpus, tokenizer="char", progress=False, log=None)
    assert not out.exists()


def test_hf_data_files_missing_or_matching_nothing_are_named(tmp_path):
    """A missing --hf-data-files file got datasets' "Unable to find" plus a hint to check the
    network; a pattern matching no file got "no rows: is the file empty?"."""
    pytest.importorskip("datasets")
    from gpt.hf_dataset import HFDataset
    from gpt.sources import SourceError

    cache = str(tmp_path / "hf-cache")
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(SourceError, match=f"--hf-data-files {missing}: no such file or folder") as info:
        list(HFDataset("json", data_files=[str(missing)], cache_dir=cache))
    assert "No network" not in str(info.value)
    pattern = tmp_path / "none*.jsonl"
    with pytest.raises(SourceError, match=r"--hf-data-files .*none\*\.jsonl: the pattern matches no file"):
        list(HFDataset("json", data_files=[str(pattern)], cache_dir=cache))


def test_hf_errors_from_pyarrow_stay_one_line_without_a_network_hint(tmp_path):
    """Files of a glob whose columns differ fail in pyarrow with a message of several lines (the
    CLI's error must be one line), and the glob itself (not an existing path) added the "No
    network?" hint."""
    pytest.importorskip("datasets")
    from gpt.hf_dataset import HFDataset
    from gpt.sources import SourceError

    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "two", "id": 3}\n')
    corpus = HFDataset("json", data_files=[str(tmp_path / "*.jsonl")], cache_dir=str(tmp_path / "hf-cache"))
    with pytest.raises(SourceError) as info:
        list(corpus)
    message = str(info.value)
    assert "\n" not in message and "No network" not in message, message


def test_shakespeare_script_ctrl_c_is_one_line(tmp_path, monkeypatch, capsys):
    """Ctrl-C in data_prep/shakespeare.py printed a traceback (data_prep/prepare.py says one line)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "data_prep" / "shakespeare.py"
    spec = importlib.util.spec_from_file_location("hunt_shakespeare_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "prepare", interrupted)
    text = tmp_path / "input.txt"
    text.write_text("to be or not to be\n")
    assert module.main(["--input", str(text), "--out", str(tmp_path / "out")]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_corpus_too_small_for_two_splits_is_not_told_to_raise_val_fraction(tmp_path):
    """A corpus of fewer than 2 x --min-val-tokens tokens (a file of a few spaces) was told to
    "raise --val-fraction", which can never make both splits big enough."""
    from gpt.prepare import PrepareError, prepare
    from gpt.sources import Texts

    with pytest.raises(PrepareError, match="val split has 0 tokens") as info:
        prepare(tmp_path / "out", Texts(["   \n\t\n  "]), tokenizer="char", progress=False, log=None)
    message = str(info.value)
    assert "only 8 tokens" in message and "--val-fraction" not in message, message
    assert not (tmp_path / "out").exists()


def test_each_skipped_file_is_warned_about_once(tmp_path):
    """Prep reads the corpus twice, and a file skipped as not UTF-8 was reported in each pass."""
    import warnings

    from gpt.prepare import prepare

    folder = tmp_path / "in"
    (folder / ".git").mkdir(parents=True)
    (folder / "a.txt").write_text("some words to read\n" * 200)
    (folder / "b.bin").write_bytes(b"\xff\xfe binary \x80" * 50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare(tmp_path / "out", folder, tokenizer="char", encoding_errors="skip", val_rule="tail",
                val_fraction=0.1, min_val_tokens=10, progress=False, log=None)
    messages = [str(w.message) for w in caught if str(w.message).startswith("skipping")]
    assert sorted(messages) == sorted(set(messages)) and len(messages) == 2, messages


def test_a_file_reached_twice_is_read_once(tmp_path):
    """A link to a file of the corpus, or a file named besides its folder, was read twice: the
    same document in train and in val (val then measures recall of training text)."""
    from gpt.sources import LocalFiles

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha\n")
    (folder / "b.txt").write_text("beta\n")
    (folder / "z_link.txt").symlink_to(folder / "a.txt")
    with pytest.warns(UserWarning) as caught:
        files = list(LocalFiles([folder, folder / "b.txt"]).files())
    assert files == [folder / "a.txt", folder / "b.txt"]
    notes = {str(w.message) for w in caught}
    assert notes == {f"skipping {folder / 'z_link.txt'}: the same file as {folder / 'a.txt'}, read already",
                     f"skipping {folder / 'b.txt'}: given twice, read once"}
    # The same folder named twice is no error ("no input files") either.
    with pytest.warns(UserWarning):
        assert list(LocalFiles([folder, folder]).files()) == [folder / "a.txt", folder / "b.txt"]


def _shakespeare_module(name: str):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "data_prep" / "shakespeare.py"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vocab_size_with_the_char_tokenizer_is_an_error_before_any_work(tmp_path, capsys):
    """--vocab-size with --tokenizer char was silently ignored (a char vocabulary is one id per
    distinct character): the user got a vocabulary of another size than asked, and no word."""
    from gpt import prepare as prepare_module

    corpus = tmp_path / "in.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 100)
    out = tmp_path / "out"
    for size in ("100", "500", "8192", "70000"):  # the BPE default, given, is given too
        code = prepare_module.main(["--input", str(corpus), "--out", str(out), "--tokenizer", "char",
                                    f"--vocab-size={size}", "--val-rule=tail", "--val-fraction=0.1",
                                    "--min-val-tokens=10", "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, err
        assert err[-1].startswith("error: ") and "--vocab-size" in err[-1] and "--tokenizer char" in err[-1]
        assert "sized by the corpus" in err[-1]
        # The BPE alternative names the size BPE needs where this one is too small for it.
        assert ("--tokenizer bpe with a --vocab-size from 257 to 65,536" in err[-1]) == (not 257 <= int(size) <= 65536), err[-1]
        assert not out.exists()
    # data_prep/shakespeare.py, char by default: its --vocab-size alone is the same mistake, refused
    # before the text is downloaded or read.
    script = _shakespeare_module("hunt_shakespeare_vocab")
    script.download = lambda *a, **k: pytest.fail("downloaded before the options were checked")
    assert script.main(["--out", str(out), "--vocab-size", "2048", "--no-progress"]) == 2
    assert "--tokenizer char" in capsys.readouterr().err
    assert not out.exists()
    # Not given: char as before, and BPE gets each script's default.
    assert prepare_module.main(["--input", str(corpus), "--out", str(out), "--tokenizer", "char",
                                "--val-rule=tail", "--val-fraction=0.1", "--min-val-tokens=10", "--no-progress"]) == 0
    ns = prepare_module.build_parser().parse_args(["--source", "stdlib", "--out", "o"])
    assert prepare_module.tokenizer_options(ns)["vocab_size"] == 8192
    ns = script.build_parser().parse_args(["--tokenizer", "bpe"])
    assert prepare_module.tokenizer_options(ns)["vocab_size"] == 2048
    ns = script.build_parser().parse_args(["--tokenizer", "bpe", "--vocab-size", "600"])
    assert prepare_module.tokenizer_options(ns)["vocab_size"] == 600


def test_a_byte_order_mark_that_starts_a_file_is_not_text(tmp_path, monkeypatch):
    """A file starting with a UTF-8 byte order mark (EF BB BF) had U+FEFF as its first character,
    and so in the char vocabulary. It is left out now, in every chunking of the file; a U+FEFF
    elsewhere is text and stays; error offsets still count the mark's bytes."""
    from gpt.prepare import prepare
    from gpt.sources import LocalFiles, NotUTF8Error
    from gpt.dataset import load_tokenizer

    bom = b"\xef\xbb\xbf"
    text = "to be or not to be, that is the question\n" * 100
    with_bom = tmp_path / "bom.txt"
    with_bom.write_bytes(bom + text.encode())
    middle = tmp_path / "middle.txt"
    middle.write_bytes(b"ab" + bom + b"cd")
    for read_bytes in (1, 2, 4, 1 << 20):  # the mark cut across reads, or not
        monkeypatch.setattr(sources_module, "READ_BYTES", read_bytes)
        assert "".join(LocalFiles([with_bom])) == text
        assert "".join(LocalFiles([middle])) == "ab\ufeffcd"
    monkeypatch.undo()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(bom + b"ok\n\xfe")
    with pytest.raises(NotUTF8Error, match="byte offset 6"):
        list(LocalFiles([bad]))
    prepare(tmp_path / "out", with_bom, tokenizer="char", val_rule="tail", val_fraction=0.1, min_val_tokens=10,
            progress=False, log=None)
    tok = load_tokenizer(tmp_path / "out")
    assert tok.vocab_size == len(set(text))
    assert tok.decode(range(tok.vocab_size)) == "".join(sorted(set(text)))


def test_a_byte_order_mark_that_starts_a_text_file_read_by_datasets_is_not_text(tmp_path):
    """The same for --hf-dataset on a .txt file (datasets' text builder decoded it as utf-8)."""
    pytest.importorskip("datasets")
    from gpt.hf_dataset import HFDataset

    path = tmp_path / "doc.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\nline two\n")
    assert list(HFDataset(str(path), cache_dir=str(tmp_path / "hf-cache"), progress=False)) == [
        "line one\nline two\n"]
