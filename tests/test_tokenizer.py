"""Tokenizers: exact round trips, tokenizer.json fidelity, piece cutting, vocabulary limits."""

import os
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, models, pre_tokenizers

import gpt.shards as shards
from gpt.shards import MAX_VOCAB, open_shard, read_header, write_shard
from gpt.sources import split_pieces
from gpt.dataset import load_tokenizer
from gpt.tokenizer import EOS_TOKEN, Tokenizer, build_char, char_tokenizer, train_bpe

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
# Whitespace of every kind the pre-tokenizers could trip on, plus combining marks and emoji.
CHAR_ALPHABET = "ab Z\n\t\r\x0b\x0c\u00a0\u2028\u3000é\u0301🎉\u200d👍.,'!<|>"

def _strings(parts: list[str]):
    """Text built from `parts`: favours the whitespace runs and contractions that matter."""
    return st.lists(st.sampled_from(parts), max_size=40).map("".join)


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def bpe(shakespeare) -> Tokenizer:
    return train_bpe([shakespeare[:200_000]], 512)


@pytest.fixture(scope="module")
def char() -> Tokenizer:
    return char_tokenizer(CHAR_ALPHABET)


@pytest.fixture(scope="module")
def bpe_file(bpe, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    bpe.save(path)
    return path


@pytest.fixture(scope="module")
def char_file(char, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("char") / "tokenizer.json"
    char.save(path)
    return path


def test_save_fsyncs_the_file_before_it_takes_its_name(bpe, tmp_path, monkeypatch):
    """tokenizer.json is fsynced before the rename, as shards and meta.json are: after a power
    cut a dataset folder with meta.json must not hold an empty tokenizer file."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    tmp = str(path) + ".tmp"
    assert events == [("fsync", tmp), ("replace", tmp)]
    assert Tokenizer.from_file(path).encode("to be") == bpe.encode("to be")


# ---- BPE --------------------------------------------------------------------------------------
@PROPERTY
@given(text=st.text())
@example(text="a<|endoftext|>b")
@example(text="\r\n\t  \u00a0 x\u2028y 🎉\u200d👍 e\u0301")
@example(text="")
def test_bpe_round_trip_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_basics(bpe):
    assert bpe.kind == "bpe" and bpe.vocab_size == 512 and bpe.eos_id == 0
    texts = ["First Citizen:\nBefore we proceed", "", "héllo 🎉"]
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]
    assert [a.tolist() for a in bpe.encode_batch_arrays(texts)] == bpe.encode_batch(texts)
    # A document cannot fake a boundary: the literal eos text is encoded as ordinary text.
    assert bpe.eos_id not in bpe.encode(f"x{EOS_TOKEN}y")
    assert bpe.decode([bpe.eos_id]) == EOS_TOKEN
    with pytest.raises(ValueError, match="outside"):
        bpe.decode([bpe.vocab_size])


@PROPERTY
@given(text=_strings(list("ab Z\n\t'.é🎉\u00a0") + ["  ", "\n\n", "'s", "12"]))
def test_bpe_tokenizer_json_matches_plain_tokenizers(bpe, bpe_file, text):
    plain = tokenizers.Tokenizer.from_file(str(bpe_file))
    ids = bpe.encode(text)
    assert plain.encode(text, add_special_tokens=False).ids == ids
    assert plain.decode(ids, skip_special_tokens=False) == text


@PROPERTY
@given(text=_strings(list("ab \n\t\r\u00a0\u3000\u2028\x1c\x85é.'1🎉") + ["  ", "\n\n", " \n", "'s"]),
       piece_chars=st.integers(1, 12))
def test_pieces_encode_like_the_whole_text(bpe, text, piece_chars):
    pieces = list(split_pieces([text], piece_chars, max_chars=10**9))  # clean cuts only
    assert "".join(pieces) == text
    assert [i for p in pieces for i in bpe.encode(p)] == bpe.encode(text)


def test_pieces_without_a_clean_cut():
    assert list(split_pieces(["x" * 50], 3)) == ["xxx", "x" * 47]  # cut anyway past 16 * 3
    assert list(split_pieces(["x" * 50], 3, max_chars=100)) == ["x" * 50]
    assert list(split_pieces(["ab  cd ef gh"], 2)) == ["ab", "  cd", " ef", " gh"]


def test_pieces_of_a_long_text(bpe, shakespeare):
    text = shakespeare[:50_000]
    pieces = list(split_pieces((text[i:i + 999] for i in range(0, len(text), 999)), 1000))
    assert len(pieces) > 40 and max(map(len, pieces)) < 1100
    assert [i for p in pieces for i in bpe.encode(p)] == bpe.encode(text)


def test_bpe_vocab_limits():
    with pytest.raises(ValueError, match="65,536"):
        train_bpe(["abc"], MAX_VOCAB + 1)
    with pytest.raises(ValueError, match="too small"):
        train_bpe(["abc"], 100)


def test_training_is_deterministic(shakespeare):
    a = train_bpe([shakespeare[:100_000]], 400)
    b = train_bpe([shakespeare[:100_000]], 400)
    assert a.inner.to_str() == b.inner.to_str()


# ---- char -------------------------------------------------------------------------------------
@PROPERTY
@given(text=st.text(alphabet=CHAR_ALPHABET))
def test_char_round_trip_and_plain_tokenizers(char, char_file, text):
    ids = char.encode(text)
    assert len(ids) == len(text)
    assert char.decode(ids) == text
    plain = tokenizers.Tokenizer.from_file(str(char_file))
    assert plain.encode(text).ids == ids
    assert plain.decode(ids) == text


def test_char_vocabulary_is_sorted_characters(shakespeare):
    tok = build_char([shakespeare[:1000], shakespeare[1000:]])
    chars = sorted(set(shakespeare))
    assert tok.kind == "char" and tok.vocab_size == len(chars) == 65 and tok.eos_id is None
    assert tok.encode("\n ") == [chars.index("\n"), chars.index(" ")]
    assert tok.encode(shakespeare[:500]) == [chars.index(c) for c in shakespeare[:500]]


def test_char_unknown_character_is_a_clear_error(char):
    with pytest.raises(ValueError) as info:
        char.encode("ab\u00e0b\u00e0x")
    message = str(info.value)
    assert "'à' (U+00E0) at position 2" in message and "'x' (U+0078) at position 5" in message


def test_char_vocab_limit():
    with pytest.raises(ValueError, match="65,536"):
        char_tokenizer(chr(i) for i in range(0x4E00, 0x4E00 + MAX_VOCAB + 1))
    with pytest.raises(ValueError, match="empty"):
        build_char(["", ""])


# ---- files ------------------------------------------------------------------------------------
def test_from_file_infers_kind(bpe_file, char_file, tmp_path):
    assert Tokenizer.from_file(bpe_file).kind == "bpe"
    assert Tokenizer.from_file(char_file).kind == "char"
    assert load_tokenizer(char_file).kind == "char"
    assert load_tokenizer(bpe_file.parent).kind == "bpe"
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


def test_tokenizer_json_the_project_cannot_use_is_refused_naming_the_file(tmp_path):
    def saved(inner, name):
        inner.save(str(tmp_path / name))
        return tmp_path / name

    every_char = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    holes = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 5}, unk_token=None))
    holes.pre_tokenizer = every_char
    # Id 5 in a vocabulary of 2 would index past the embedding mid-run.
    with pytest.raises(ValueError, match=r"holes\.json.*0\.\.1"):
        load_tokenizer(saved(holes, "holes.json"))
    with_eos = char_tokenizer("abc")
    with_eos.inner.add_special_tokens([EOS_TOKEN])  # decode of its id had no character: KeyError
    with pytest.raises(ValueError, match=r"added\.json.*single characters"):
        load_tokenizer(saved(with_eos.inner, "added.json"))
    words = tokenizers.Tokenizer(models.WordLevel({"ab": 0, "c": 1}, unk_token=None))
    with pytest.raises(ValueError, match=r"words\.json.*single characters"):
        load_tokenizer(saved(words, "words.json"))
    with pytest.raises(ValueError, match=rf"no_eos\.json.*{EOS_TOKEN}"):
        load_tokenizer(saved(tokenizers.Tokenizer(models.BPE({"a": 0, "b": 1}, [])), "no_eos.json"))


def test_a_shard_renamed_over_while_it_is_opened(tmp_path, monkeypatch):
    """A new prep may rename a shard over one being opened: header, size and tokens must all
    come from one of the two files, never from a mix."""
    path, newer = tmp_path / "train_000000.bin", tmp_path / "newer.bin"
    old = np.arange(10, dtype=np.uint16)
    write_shard(path, old)
    real_open = open

    def renamed_at_open(before: bool):
        write_shard(newer, np.arange(3, dtype=np.uint16))

        def hooked(file, *args, **kwargs):
            if before:
                os.replace(newer, file)
            f = real_open(file, *args, **kwargs)
            if not before:
                os.replace(newer, file)
            return f
        return hooked

    monkeypatch.setattr(shards, "open", renamed_at_open(before=True), raising=False)
    assert read_header(path) == 3
    monkeypatch.undo()
    write_shard(path, old)
    monkeypatch.setattr(shards, "open", renamed_at_open(before=False), raising=False)
    assert open_shard(path).tolist() == old.tolist()
    monkeypatch.undo()
    write_shard(path, np.zeros(0, dtype=np.uint16))  # a shard of no tokens is the bare header
    assert path.stat().st_size == 1024 and read_header(path) == 0 and open_shard(path).size == 0
