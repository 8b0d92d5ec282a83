"""Tokenizers: exact round trips, tokenizer.json fidelity, piece cutting, vocabulary limits."""

from pathlib import Path

import pytest
import tokenizers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gpt.shards import MAX_VOCAB
from gpt.sources import split_pieces
from gpt.tokenizer import (EOS_TOKEN, Tokenizer, build_char, char_tokenizer, load_tokenizer,
                           train_bpe)

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
