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
    from gpt.sources import HFDataset, SourceError

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
    from gpt.sources import HFDataset, SourceError

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
