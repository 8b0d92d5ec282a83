"""Text <-> token ids: byte-level BPE, a character vocabulary, or GPT-2's tokenizer.

Every kind is a real `tokenizers.Tokenizer` saved as `tokenizer.json`, so any tool that reads
Hugging Face tokenizers gets the same ids and the same text back as this project does.

bpe   Byte-level BPE trained on the corpus (GPT-2's pre-tokenizer regex and byte alphabet, all
      256 bytes in the initial alphabet, `<|endoftext|>` as end-of-text). No normalizer, so
      decode(encode(t)) == t for any unicode text.
char  The classic character vocabulary: each distinct character of the corpus, sorted, gets
      the ids 0..n-1; no end-of-text token. Stored as a WordLevel model over single characters
      (a pre-tokenizer that isolates every character, newlines and whitespace included, and a
      decoder that joins without spaces). A character outside the vocabulary is an error,
      never silently mapped to an unknown id.
gpt2  GPT-2's own tokenizer (vocabulary 50257, end-of-text 50256), for llm.c / FineWeb shards.

A literal "<|endoftext|>" inside a text is encoded as ordinary text: only the data pipeline
inserts the end-of-text id, so a document can never fake a document boundary. That is the
tokenizer's `encode_special_tokens = True`, which `tokenizers` does not save in tokenizer.json:
another tool reading the file gets our ids for every text except one that holds that literal
string, unless it sets the flag too (README.md says so).
"""

from __future__ import annotations

import json
import operator
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from gpt.shards import GPT2_EOS_ID, GPT2_VOCAB_SIZE, MAX_VOCAB



_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> re.Match | None:
    """Where `text` holds a lone surrogate, or None. One is what a byte that is not UTF-8
    becomes when decoded with errors="surrogateescape" (Python decodes command-line arguments
    so: U+DC80..U+DCFF for bytes 0x80..0xFF), or half of a UTF-16 pair: not text, which neither
    UTF-8 nor a vocabulary can hold. (A search, not an encode: no copy of a large document.)"""
    return None if text.isascii() else _SURROGATE.search(text)


class TokenizerError(ValueError):
    """A tokenizer file that is missing, damaged, or not one the project can use; the message
    names the file. A ValueError, so callers that catch those still do."""


EOS_TOKEN = "<|endoftext|>"
KINDS = ("bpe", "char", "gpt2")
TOKENIZER_FILE = "tokenizer.json"
_EVERY_CHARACTER = r"[\s\S]"  # Oniguruma has no (?s); this class matches any code point


def read_vocab(source: str | os.PathLike | bytes) -> dict[str, int] | None:
    """Every token's id in a tokenizer file (its path, or its bytes), added tokens included, or
    None where it does not load: gpt/run_data.py open_loaders refuses such a file beside a dataset,
    and gpt/resume.py then compares the tokenizer kind and vocab_size recorded in meta.json and
    state.json instead. (tokenizers parses JSON: a tokenizer file is data, never code.)"""
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        return tokenizers.Tokenizer.from_buffer(data).get_vocab(with_added_tokens=True)
    except Exception:
        return None


def same_vocab(a: str | os.PathLike, b: str | os.PathLike) -> bool | None:
    """Whether tokenizer files `a` and `b` map the same tokens to the same ids; None where one is
    missing or does not load (the caller then has only meta.json's kind and size to compare)."""
    if not (Path(a).exists() and Path(b).exists()):
        return None
    vocabs = read_vocab(a), read_vocab(b)
    return None if None in vocabs else vocabs[0] == vocabs[1]


def check_vocab_size(vocab_size: int, what: str = "vocab_size") -> None:
    """Refuse vocabularies whose ids do not fit the uint16 shards."""
    if vocab_size > MAX_VOCAB:
        raise ValueError(
            f"{what} {vocab_size:,} is over {MAX_VOCAB:,}: token shards store ids as uint16. "
            f"Use a vocabulary of at most {MAX_VOCAB:,} tokens."
        )


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what the project needs to know about it.

    Attributes: `kind` ("bpe" | "char" | "gpt2"), `vocab_size` (ids are 0..vocab_size-1),
    `eos_id` (the end-of-text id, None for char), `inner` (the wrapped `tokenizers.Tokenizer`).
    """

    def __init__(self, inner: tokenizers.Tokenizer, kind: str):
        if kind not in KINDS:
            raise ValueError(f"tokenizer kind must be one of {KINDS}, got {kind!r}")
        self.inner = inner
        self.kind = kind
        self.vocab_size = inner.get_vocab_size(with_added_tokens=True)
        check_vocab_size(self.vocab_size, f"{kind} tokenizer vocabulary")
        # The model's embedding has vocab_size rows: an id past them (a vocabulary with holes,
        # as a hand-made tokenizer.json may have) would fail mid-run as an index error.
        ids = set(inner.get_vocab(with_added_tokens=True).values())
        if len(ids) != self.vocab_size or min(ids, default=0) != 0 or max(ids, default=-1) != self.vocab_size - 1:
            raise ValueError(f"{kind} tokenizer ids must be exactly 0..{self.vocab_size - 1} (one per token), "
                             f"got {len(ids)} distinct ids from {min(ids, default=None)} to {max(ids, default=None)}")
        self.eos_id = None if kind == "char" else inner.token_to_id(EOS_TOKEN)
        if kind != "char" and self.eos_id is None:
            raise ValueError(f"{kind} tokenizer has no {EOS_TOKEN} token")
        # Text that merely contains "<|endoftext|>" must stay text (see module docstring). Set on
        # `inner` itself, the caller's object: it is this wrapper's from here on.
        inner.encode_special_tokens = True
        if kind == "char":
            self._init_char_tables()

    def _init_char_tables(self) -> None:
        # Added tokens too: decode looks every id up in this vocabulary.
        vocab = self.inner.get_vocab(with_added_tokens=True)
        bad = [t for t in vocab if len(t) != 1]
        if bad:
            raise ValueError(f"char tokenizer tokens must be single characters, got {bad[:5]}")
        # Code points sorted, with their ids: encoding is a vectorized binary search, much
        # faster than the Rust pipeline's per-character token objects, and gives the same ids.
        items = sorted((ord(t), i) for t, i in vocab.items())
        self._codepoints = np.array([c for c, _ in items], dtype=np.uint32)
        self._char_ids = np.array([i for _, i in items], dtype=np.int64)
        self._id_to_char = {i: t for t, i in vocab.items()}

    # ---- encoding -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once; BPE runs on all cores (the Rust library's batch encoder)."""
        return [a.tolist() for a in self.encode_batch_arrays(texts)]

    def encode_array(self, text: str) -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}"
                            + (": for several texts use encode_batch" if isinstance(text, (list, tuple)) else ""))
        return self.encode_batch_arrays([text])[0]

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Like `encode_batch`, as uint16 arrays (what shards store), without Python int lists."""
        if isinstance(texts, str):
            # a str is a sequence of one-character texts: each would be encoded on its own
            raise TypeError("encode_batch takes a list of texts, got one str: use encode(text), or encode_batch([text])")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                # tokenizers reads a pair of strs as (sequence, pair) and encodes both, silently
                raise TypeError(f"texts must be strs, got {type(text).__name__} at index {i}"
                                + (": decode bytes first" if isinstance(text, (bytes, bytearray)) else ""))
            surrogate = lone_surrogate(text)
            if surrogate is not None:  # a TypeError from inside tokenizers, or a codec's error
                where = f"the text at index {i}" if len(texts) > 1 else "the text"
                raise ValueError(f"{where} holds a lone surrogate (U+{ord(surrogate[0]):04X}) at character "
                                 f"{surrogate.start():,}, which is not text: decode its bytes strictly "
                                 f"(or with errors='replace')")
        if self.kind == "char":
            return [self._encode_chars(t) for t in texts]
        encode = getattr(self.inner, "encode_batch_fast", self.inner.encode_batch)  # no offsets
        return [np.array(e.ids, dtype=np.uint16) for e in encode(texts, add_special_tokens=False)]

    def _encode_chars(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        idx = np.searchsorted(self._codepoints, points)
        idx = np.minimum(idx, len(self._codepoints) - 1)
        unknown = self._codepoints[idx] != points
        if unknown.any():
            raise ValueError(_unknown_chars_message(text, np.flatnonzero(unknown)))
        return self._char_ids[idx].astype(np.uint16)

    # ---- decoding -------------------------------------------------------------------------
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (a list, 1-D array or tensor, or one int); end-of-text ids come back as
        "<|endoftext|>"."""
        ids = _id_list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside this {self.kind} vocabulary (0..{self.vocab_size - 1})")
        if self.kind == "char":
            return "".join(map(self._id_to_char.__getitem__, ids))
        return self.inner.decode(ids, skip_special_tokens=False)

    # ---- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically (temporary name, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        # fsynced before the rename, as shards and meta.json are: a folder with meta.json is a
        # complete dataset, and after a power cut this file must not be the one left empty.
        with open(tmp, "w", encoding="utf-8") as f:  # written by Python: any path (see from_file)
            f.write(self.inner.to_str(pretty=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def from_file(cls, path: str | os.PathLike, kind: str | None = None) -> Tokenizer:
        """Load a tokenizer.json; `kind` is inferred from the model when not given."""
        path = Path(path)
        try:
            # Read by Python, parsed from bytes: tokenizers' from_file takes the path as UTF-8
            # and refused one that is not (a folder named in another encoding, under a C locale).
            data = path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read tokenizer ({e.strerror or e})") from e
        try:
            inner = tokenizers.Tokenizer.from_buffer(data)
        except Exception as e:  # the Rust side raises a bare Exception
            raise TokenizerError(f"{path}: cannot load tokenizer ({e})") from e
        kind = kind or _infer_kind(inner, path)
        try:
            return cls(inner, kind)
        except ValueError as e:  # a vocabulary the project cannot use: say which file holds it
            raise TokenizerError(f"{path}: not usable as a {kind} tokenizer: {e}") from e

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _id_list(ids: object) -> list[int]:
    """`ids` as a list of Python ints, what both decoders need: a float id would be looked up as
    an int by the char decoder and refused by the BPE one, and a [1, T] batch compared a list with
    an int."""
    if hasattr(ids, "tolist") and hasattr(ids, "shape") and hasattr(ids, "dtype"):  # tensor, array
        shape = tuple(ids.shape)
        if len(shape) > 1:
            raise ValueError(f"ids must be one sequence, got shape {shape}: decode each row "
                             f"([tokenizer.decode(row) for row in ids])")
        if not _integer_dtype(ids.dtype):
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}: convert them to an integer dtype")
        ids = ids.tolist()
        return [ids] if len(shape) == 0 else ids
    if isinstance(ids, int) and not isinstance(ids, bool):
        return [ids]
    ids = list(ids)
    if set(map(type, ids)) <= {int}:  # the common case, checked at C speed
        return ids
    return [_token_id(i) for i in ids]


def _integer_dtype(dtype) -> bool:
    """Whether a torch or numpy dtype holds integers (uint16 shards, int64 tensors), not floats or bools."""
    if isinstance(dtype, np.dtype):
        return dtype.kind in "iu"
    return not (dtype.is_floating_point or dtype.is_complex) and str(dtype) != "torch.bool"  # torch's


def as_integer(value: object) -> int | None:
    """`value` as an int when it is an integer of any kind (a numpy scalar, a 0-d tensor from
    iterating a row or a sweep), else None; True and False are not counts or ids."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _token_id(value: object) -> int:
    """One id of a list, any integer (see `as_integer`)."""
    token = as_integer(value)
    if token is not None:
        return token
    raise ValueError(f"ids must be integer token ids, got {value!r} ({type(value).__name__})"
                     + (": decode each row" if isinstance(value, (list, tuple)) else ""))


def _unknown_chars_message(text: str, positions: np.ndarray, show: int = 8) -> str:
    # Each distinct character once, where it first occurs, and how often: the count names
    # characters, as the list does ("4 characters ..." listing 3 was a repeated one counted twice).
    # (Counted in numpy: a large text may hold millions of them.)
    points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")[positions]
    distinct, first_at, times = np.unique(points, return_index=True, return_counts=True)
    order = np.argsort(first_at)[:show]  # in the order they occur

    def where(i: int) -> str:
        again = int(times[i]) - 1
        return (f"at position {int(positions[first_at[i]])}"
                + (f" (and {again} more time{'s' if again > 1 else ''})" if again else ""))

    listed = ", ".join(f"{chr(distinct[i])!r} (U+{int(distinct[i]):04X}) {where(i)}" for i in order)
    n = len(distinct)
    more = f" and {n - show} more" if n > show else ""
    return (
        f"{n} character{'s' if n != 1 else ''} not in the char vocabulary: {listed}{more}. "
        f"A char tokenizer encodes only the characters of the corpus it was built from."
    )


def _infer_kind(inner: tokenizers.Tokenizer, path: Path) -> str:
    model = json.loads(inner.to_str())["model"]["type"]
    if model == "WordLevel":
        return "char"
    if model == "BPE":
        gpt2 = (inner.get_vocab_size() == GPT2_VOCAB_SIZE and inner.id_to_token(GPT2_EOS_ID) == EOS_TOKEN)
        return "gpt2" if gpt2 else "bpe"
    raise TokenizerError(f"{path}: unsupported tokenizer model {model!r} (expected BPE or WordLevel)")


# ---- building -------------------------------------------------------------------------------
MIN_BPE_VOCAB = 257  # byte-level BPE's 256 byte tokens and end-of-text


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 0,
              show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` ids (end-of-text included) on a stream of texts.

    The result may be smaller than `vocab_size` when the corpus has too few distinct pairs.
    """
    check_vocab_size(vocab_size)
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} is too small for byte-level BPE: it needs at least "
                         f"{MIN_BPE_VOCAB} (256 bytes + {EOS_TOKEN})")
    inner = tokenizers.Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
    )
    inner.train_from_iterator(_bounded_runs(texts), trainer)
    return Tokenizer(inner, "bpe")


# The BPE trainer merges a pair in every word that holds it, so a pre-token of n characters
# costs O(n) per merge learned: a corpus of long runs (a 20 MB line of letters, a file of
# spaces) took minutes per MB, with no progress shown. Runs are cut for training only (the
# merges stay valid for encoding, which sees the runs whole); ordinary text has no such run.
MAX_TRAIN_RUN = 1024
_LONG_RUN = re.compile(rf"\S{{{MAX_TRAIN_RUN}}}|\s{{{MAX_TRAIN_RUN}}}")


def _bounded_runs(texts: Iterable[str]) -> Iterable[str]:
    """`texts` with every run of MAX_TRAIN_RUN non-space (or space) characters ended as a text."""
    for text in texts:
        if not _may_hold_a_long_run(text):  # ordinary text: the regex scan would cost ~20% of a prep
            yield text
            continue
        start = 0
        for match in _LONG_RUN.finditer(text):
            yield text[start : match.end()]
            start = match.end()
        if start < len(text):
            yield text[start:]


# ASCII whitespace as spaces, in the UTF-8 bytes: a run of it is then a run of spaces, found by
# one substring search (bytes.translate is a table lookup per byte: ~1 ms a MB).
_WHITESPACE_AS_SPACE = bytes.maketrans(b"\t\n\r\x0b\x0c", b"     ")
_SPACE_RUN = b" " * MAX_TRAIN_RUN


def _may_hold_a_long_run(text: str) -> bool:
    """Cheap tests (C loops, about half the regex's time) for what `_LONG_RUN` finds: the
    longest word, and a run of ASCII whitespace. Mixed runs too: 100,000 blank CRLF lines in
    a 1.4 MB text took BPE training 71 s where it takes 1.6 s without them (a test for runs of
    one character repeated let "\r\n" * n through). Runs of other whitespace (U+3000...) pass
    unseen, and are trained on whole."""
    return (max(map(len, text.split()), default=0) >= MAX_TRAIN_RUN
            or _SPACE_RUN in text.encode("utf-8", "surrogatepass").translate(_WHITESPACE_AS_SPACE))


def build_char(texts: Iterable[str]) -> Tokenizer:
    """The character vocabulary of `texts` (one pass): sorted distinct characters -> 0..n-1."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    return char_tokenizer(chars)


def char_tokenizer(chars: Iterable[str]) -> Tokenizer:
    """A char tokenizer over exactly `chars` (sorted by code point)."""
    alphabet = sorted(set(chars))
    if not alphabet:
        raise ValueError("cannot build a char vocabulary from empty text")
    check_vocab_size(len(alphabet), "char vocabulary (distinct characters)")
    inner = tokenizers.Tokenizer(models.WordLevel({c: i for i, c in enumerate(alphabet)}, unk_token=None))
    inner.pre_tokenizer = pre_tokenizers.Split(Regex(_EVERY_CHARACTER), behavior="isolated")
    inner.decoder = decoders.Fuse()
    return Tokenizer(inner, "char")


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's tokenizer from the Hugging Face hub (or its local cache)."""
    try:
        inner = tokenizers.Tokenizer.from_pretrained("gpt2")
    except Exception as e:
        raise TokenizerError(
            f"cannot load GPT-2's tokenizer from the Hugging Face hub ({e}); put GPT-2's "
            f"tokenizer.json into the dataset folder instead"
        ) from e
    return Tokenizer(inner, "gpt2")
