"""Fast byte-level BPE encoding for data prep: split words with Python's `re`, BPE each distinct word once.

Why: encoding with the `tokenizers` pipeline runs at about 2 MB/s on two cores, and most of
that time goes into its GPT-2 pre-tokenizer (an Oniguruma regex with Unicode classes) and the
per-word bookkeeping around it, not into BPE. Natural text repeats its words (Zipf's law):
10 MB of Shakespeare is 3M pre-tokens but only 15k distinct ones. So for each piece of text
(about 5x the pipeline's speed per core on English):

1. Cut it into segments (`ASCII_SEGMENT`: at the spaces that start a word, " speak.\n"), each
   of which splits into GPT-2 pre-tokens ("words") with `ASCII_PRETOKENIZER`, the GPT-2 pattern

       's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

   rewritten for ASCII text, where it has an exact plain-`re` form: \\p{L} is [A-Za-z], \\p{N}
   is [0-9] and \\s is [\\t\\n\\v\\f\\r ] (Unicode's White_Space, which Oniguruma's \\s follows,
   has no other ASCII member; Python's own \\s would add \\x1c-\\x1f, hence the explicit class).
2. Look each segment up in a table of its BPE ids; for segments not seen before, their words
   are encoded in one batch by the same tokenizer with its splitting turned off (each word is
   one pre-token), which is exactly what the full pipeline does to that word.
3. Gather the ids of all segments with numpy (no Python loop per token).

Only pure-ASCII pieces take this path (`str.isascii()` is O(1) in CPython); a piece with any
other character goes through the `tokenizers` pipeline unchanged, so the ids are identical
either way (tests/test_wordcache.py compares them on random text). The fast path applies to
byte-level BPE tokenizers whose only pre-tokenizer is GPT-2's ByteLevel regex and that have no
normalizer (ours and GPT-2's; see `word_cache_applies`).

`encode_pieces` runs this in worker processes once a corpus turns out to be big enough to be
worth starting them, keeping the pieces in order and only a few MB of text in flight.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import chain, islice

import numpy as np
import tokenizers
from tokenizers import pre_tokenizers

WHITESPACE = "\t\n\x0b\x0c\r "
# The contractions share their apostrophe: the same matches (no contraction is a prefix of
# another), and 1.5x the speed of seven separate alternatives in CPython's engine.
ASCII_PRETOKENIZER = re.compile(
    rf"'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z]+| ?[0-9]+| ?[^{WHITESPACE}A-Za-z0-9]+"
    rf"|[{WHITESPACE}]+(?![^{WHITESPACE}])|[{WHITESPACE}]+"
)
# Segments: the text cut just before each space that follows a non-whitespace character. No
# pre-token can span such a cut (only whitespace runs hold a space past their first character,
# and this space follows none); the pattern never looks behind, and looks ahead only after a
# whitespace run, which cannot end at a cut. So a text's pre-tokens are its segments'
# pre-tokens, in order (tests/test_wordcache.py checks it on random text). A segment
# (" further,", " speak.\n\nAll:") holds ~1.8 words of English: half the lookups of words.
ASCII_SEGMENT = re.compile(rf" ?[^ ]*(?:(?<=[{WHITESPACE}]) [^ ]*)*")
MAX_SEGMENTS = 1 << 19  # segments remembered per process (~100 MB at most); the table restarts beyond
POOL_AFTER_CHARS = 2 << 20  # encode in this process until this much text has passed, then fork workers
WINDOW_PIECES = 32  # pieces per task batch (~2 MB of text); two batches are in flight at a time


def word_cache_applies(inner: tokenizers.Tokenizer) -> bool:
    """True when `inner` is a byte-level BPE whose encoding the word cache reproduces exactly."""
    spec = json.loads(inner.to_str())
    pre = spec.get("pre_tokenizer") or {}
    added_all_special = all(t.get("special") for t in spec.get("added_tokens") or [])
    return (
        spec.get("model", {}).get("type") == "BPE"
        and spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex") is True
        and pre.get("add_prefix_space") is False
        and not spec.get("model", {}).get("dropout")
        and added_all_special
    )


class WordCacheEncoder:
    """Encodes ASCII text to byte-level BPE ids through a table of the segments seen so far."""

    def __init__(self, tokenizer_json: str, max_segments: int = MAX_SEGMENTS):
        whole = tokenizers.Tokenizer.from_str(tokenizer_json)
        whole.encode_special_tokens = True  # "<|endoftext|>" in the text is text (gpt/tokenizer.py)
        self._whole = whole  # the full pipeline, for pieces that are not pure ASCII
        one_word = tokenizers.Tokenizer.from_str(tokenizer_json)
        one_word.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        one_word.encode_special_tokens = True
        self._one_word = one_word
        self.max_segments = max_segments
        self._clear()

    def _clear(self) -> None:
        # Segment i's ids are self._ids[self._start[i] : self._start[i] + self._length[i]].
        self._row: dict[str, int] = {"": 0}  # findall's empty match at the end of a text
        self._word_ids: dict[str, list[int]] = {}  # BPE ids of each word seen in a segment
        self._ids = np.empty(1 << 16, dtype=np.uint16)
        self._start = np.zeros(1 << 14, dtype=np.int64)
        self._length = np.zeros(1 << 14, dtype=np.int64)
        self._ids_used = 0

    def encode(self, text: str) -> np.ndarray:
        """uint16 ids of `text`, equal to the full pipeline's (any text; ASCII is the fast one)."""
        if not text.isascii():
            return np.array(self._whole.encode(text, add_special_tokens=False).ids, dtype=np.uint16)
        segments = ASCII_SEGMENT.findall(text)
        try:
            rows = np.fromiter(map(self._row.__getitem__, segments), dtype=np.int64, count=len(segments))
        except KeyError:  # new segments: learn them all, then look up again
            self._learn(set(segments))
            rows = np.fromiter(map(self._row.__getitem__, segments), dtype=np.int64, count=len(segments))
        lengths = self._length[rows]
        ends = np.cumsum(lengths)
        # Output position p of segment k reads self._ids[start_k + (p - first output position of k)].
        positions = np.arange(ends[-1]) + np.repeat(self._start[rows] - (ends - lengths), lengths)
        return self._ids[positions]

    def _learn(self, segments_of_text: set[str]) -> None:
        """Add the segments of one text that the table lacks (all of them after a restart)."""
        new = segments_of_text.difference(self._row)
        if len(self._row) + len(new) > self.max_segments:
            # Bounded memory on endless vocabularies (URLs, numbers, hashes): start afresh, with
            # this text's segments (which may alone exceed the limit: the table holds them anyway).
            self._clear()
            new = segments_of_text.difference(self._row)
        segments = list(new)
        # A segment's ids are its words' ids, in order; each distinct word is BPE'd once, ever
        # (new segments of code or numbers are common, new words much rarer).
        words_of = [ASCII_PRETOKENIZER.findall(seg) for seg in segments]
        word_ids = self._word_ids
        unseen = list({w for words in words_of for w in words}.difference(word_ids))
        if unseen:
            encoded_words = self._one_word.encode_batch_fast(unseen, add_special_tokens=False)
            word_ids.update(zip(unseen, (e.ids for e in encoded_words)))
        encoded = [list(chain.from_iterable(map(word_ids.__getitem__, words))) for words in words_of]
        first_row = len(self._row)
        n_ids = sum(map(len, encoded))
        self._start = _grow(self._start, first_row + len(segments))
        self._length = _grow(self._length, first_row + len(segments))
        self._ids = _grow(self._ids, self._ids_used + n_ids)
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(segments))
        self._length[first_row : first_row + len(segments)] = lengths
        self._start[first_row : first_row + len(segments)] = self._ids_used + np.cumsum(lengths) - lengths
        flat = np.fromiter(chain.from_iterable(encoded), dtype=np.uint16, count=n_ids)
        self._ids[self._ids_used : self._ids_used + n_ids] = flat
        self._ids_used += n_ids
        self._row.update(zip(segments, range(first_row, first_row + len(segments))))


def _grow(array: np.ndarray, needed: int) -> np.ndarray:
    if needed <= len(array):
        return array
    bigger = np.empty(max(needed, 2 * len(array)), dtype=array.dtype)
    bigger[: len(array)] = array
    return bigger


# ---- worker processes -----------------------------------------------------------------------
# One WordCacheEncoder per worker process: a Pool initializer can only hand it over through a
# module-level name, which exists in the workers alone.
_worker_encoder: WordCacheEncoder | None = None


def _start_worker(tokenizer_json: str) -> None:
    global _worker_encoder
    # Ctrl-C is the parent's to handle (it stops the pool); workers would only print tracebacks.
    # Forked while the parent only noted SIGINT (see _pool), so nothing was raised before this.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_encoder = WordCacheEncoder(tokenizer_json)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return [_worker_encoder.encode(t) for t in texts]


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores)


def encode_pieces(inner: tokenizers.Tokenizer, texts: Iterable[str], *, workers: int | None = None,
                  pool_after_chars: int | None = None) -> Iterator[np.ndarray]:
    """The ids of each text of `texts`, in order, as uint16 arrays (`inner` must pass
    `word_cache_applies`).

    The first `pool_after_chars` characters (default POOL_AFTER_CHARS) are encoded in this
    process (small corpora never pay for starting processes); the rest in `workers` processes
    (default: one per core), in batches of WINDOW_PIECES texts with two batches in flight, so
    only a few MB of text are held however long `texts` is.
    """
    tokenizer_json = inner.to_str()
    pool_after_chars = POOL_AFTER_CHARS if pool_after_chars is None else pool_after_chars
    local = WordCacheEncoder(tokenizer_json)
    texts = iter(texts)
    seen = 0
    while seen < pool_after_chars:
        text = next(texts, None)
        if text is None:
            return
        yield local.encode(text)
        seen += len(text)
    first = next(texts, None)
    if first is None:
        return
    texts = chain([first], texts)
    workers = workers or default_workers()
    pool, release_ctrl_c = _pool(workers, tokenizer_json)
    try:
        release_ctrl_c()  # a Ctrl-C held back during the forks is raised here, with `pool` bound
        in_flight: deque = deque()
        exhausted = False
        while True:
            while not exhausted and len(in_flight) < 2:
                batch = list(islice(texts, WINDOW_PIECES))
                exhausted = not batch
                if batch:
                    in_flight.append(pool.map_async(_encode_in_worker, _split(batch, workers)))
            if not in_flight:
                return
            for part in in_flight.popleft().get():
                yield from part
    finally:
        release_ctrl_c()
        # Explicitly, before the interpreter exits: left to multiprocessing's exit handler, the
        # pool's maintenance thread can fork a replacement for a worker being terminated, and
        # that orphan then waits forever on a queue lock the dead worker held.
        pool.terminate()
        pool.join()


def _split(batch: list[str], parts: int) -> list[list[str]]:
    """`batch` cut into `parts` consecutive runs (order kept when the results are chained)."""
    size = -(-len(batch) // parts)
    return [batch[i : i + size] for i in range(0, len(batch), size)]


def _pool(workers: int, tokenizer_json: str):
    """(a started Pool, a function that lets Ctrl-C through again).

    fork on Linux: no re-import of the parent's modules (torch in train.py) in each worker.
    The workers never use OpenMP or the tokenizers thread pool (a forked child of a process
    that used threads must not); TOKENIZERS_PARALLELISM=false at the fork tells the library so,
    which also spares a warning per worker. Elsewhere (macOS, Windows) spawn.

    While the workers are forked, Ctrl-C is only noted: a KeyboardInterrupt raised in a child
    just after fork would unwind through a copy of the parent's stack (running its clean-up
    code) instead of becoming a worker, and the pool would fork a replacement that could be
    orphaned. The caller calls the returned function once it holds the pool (so that it can
    always terminate it): that restores the handler and hands it a noted Ctrl-C.
    """
    method = "fork" if sys.platform == "linux" else "spawn"
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal() needs it
    noted: list[int] = []
    handler = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum)) if in_main_thread else None
    try:
        pool = multiprocessing.get_context(method).Pool(workers, _start_worker, (tokenizer_json,))
    except BaseException:
        if in_main_thread:
            signal.signal(signal.SIGINT, handler)
        raise
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous

    restored = not in_main_thread

    def release_ctrl_c() -> None:
        nonlocal restored
        if not restored:
            restored = True
            signal.signal(signal.SIGINT, handler)
            if noted and callable(handler):
                handler(signal.SIGINT, None)  # Python's raises KeyboardInterrupt; the trainer's notes it

    return pool, release_ctrl_c
