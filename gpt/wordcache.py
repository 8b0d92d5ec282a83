"""Fast byte-level BPE encoding for data prep: BPE each distinct segment of text once, look the rest up.

Why: encoding with the `tokenizers` pipeline runs at about 2 MB/s on two cores, and most of
that time goes into its GPT-2 pre-tokenizer (an Oniguruma regex with Unicode classes) and the
per-word bookkeeping around it, not into BPE. Natural text repeats its words (Zipf's law):
10 MB of Shakespeare is 3M pre-tokens but only 15k distinct ones. So for each piece of text
(10-20x the pipeline's speed per core on English):

1. Cut it into segments, each a run of whitespace then a run of anything else (`ASCII_SEGMENT`:
   " speak.", "\n\nAll:"), with numpy (`segment_starts`). A segment splits into GPT-2
   pre-tokens ("words") with `ASCII_PRETOKENIZER`, the GPT-2 pattern

       's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

   rewritten for ASCII text, where it has an exact plain-`re` form: \\p{L} is [A-Za-z], \\p{N}
   is [0-9] and \\s is [\\t\\n\\v\\f\\r ] (Unicode's White_Space, which Oniguruma's \\s follows,
   has no other ASCII member; Python's own \\s would add \\x1c-\\x1f, hence the explicit class).
2. Give every segment a 64-bit key (a polynomial hash of its bytes, all segments at once from
   one prefix sum) and find its row in a table of the segments seen so far (`KeyTable`, a hash
   table in numpy arrays: no Python step per segment). Segments not seen before are split into
   words, and words not seen before are encoded in one batch by the same tokenizer with its
   splitting turned off (each word is one pre-token), which is exactly what the full pipeline
   does to that word.
3. Check that the rows found hold exactly the text's bytes (a key shared by two segments would
   show here; the text then goes through the full pipeline), and gather the rows' ids. Both
   are one numpy indexing operation each (`RaggedRows.gather`).

Only ASCII text takes this path (`str.isascii()` is O(1) in CPython). A piece with other
characters is cut into segments the same way; its runs of ASCII segments take the fast path, and
the rest goes through the `tokenizers` pipeline unchanged, so the ids are identical either way
(tests/test_wordcache.py compares them on random text). The fast path applies to
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
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import chain, islice

import numpy as np
import tokenizers
from tokenizers import pre_tokenizers

from gpt.crc import usable_cpus
from gpt.held_signals import HeldSignals

WHITESPACE = "\t\n\x0b\x0c\r "
# The contractions share their apostrophe: the same matches (no contraction is a prefix of
# another), and 1.5x the speed of seven separate alternatives in CPython's engine.
ASCII_PRETOKENIZER = re.compile(
    rf"'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z]+| ?[0-9]+| ?[^{WHITESPACE}A-Za-z0-9]+"
    rf"|[{WHITESPACE}]+(?![^{WHITESPACE}])|[{WHITESPACE}]+"
)
# Segments: a run of whitespace, then a run of anything else (" further,", "\n\nAll:", "\n
# return"); the text is cut before each whitespace character that follows a non-whitespace one.
# No pre-token can span such a cut (only whitespace runs hold whitespace, and this one starts
# there); the pattern never looks behind, and looks ahead only past a whitespace run, which
# cannot end at a cut. So a text's pre-tokens are its segments' pre-tokens, in order
# (tests/test_wordcache.py checks it on random text). A segment holds ~1.7 words of English:
# fewer lookups than words, and code (indented lines) repeats its segments as prose does.
# This pattern is the definition; `segment_starts` finds the same cuts with numpy.
ASCII_SEGMENT = re.compile(rf"[{WHITESPACE}]*[^{WHITESPACE}]*")
_IS_WHITESPACE = np.zeros(33, dtype=bool)  # by code point, up to the space
_IS_WHITESPACE[[ord(c) for c in WHITESPACE]] = True
_ASCII_NOT_WHITESPACE = np.ones(129, dtype=bool)  # by code point, 128 standing for all beyond ASCII
_ASCII_NOT_WHITESPACE[[ord(c) for c in WHITESPACE] + [128]] = False
# Segment keys: a polynomial hash of the segment's bytes mod 2**64 (numpy's uint64 arithmetic
# wraps), plus its length. HASH_BASE is odd, so it has an inverse mod 2**64, which lets one
# prefix sum over the text give every segment's hash (`WordCacheEncoder._keys`).
HASH_BASE = 0x9E3779B97F4A7C15
LENGTH_MIX = np.uint64(0xD6E8FEB86659FD93)
MAX_SEGMENTS = 1 << 19  # segments remembered per process; the table restarts beyond this many
MAX_SEGMENT_CHARS = 1 << 25  # ... or beyond this much segment text (together at most ~100 MB per process)
MIN_ASCII_RUN = 256  # in text that is not all ASCII, shorter ASCII runs go through the pipeline (fewer calls)
BLOCK_CHARS = 1 << 20  # longer texts are encoded a block at a time (bounded temporary arrays)
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


def segment_starts(codes: np.ndarray) -> np.ndarray:
    """Where segments start (int64; 0 first) in a text given as its code points (uint32) or, if
    ASCII, its bytes: at each ASCII whitespace character that follows an ASCII non-whitespace
    one, so for ASCII text where the ASCII_SEGMENT matches start."""
    low = np.flatnonzero(codes[1:] <= ord(" ")) + 1  # ~1/5 of English: examine only these closely
    cuts = low[_IS_WHITESPACE[codes[low]] & _ASCII_NOT_WHITESPACE[np.minimum(codes[low - 1], 128)]]
    return np.concatenate((np.zeros(1, dtype=np.int64), cuts))


class WordCacheEncoder:
    """Encodes text to byte-level BPE ids through a table of the ASCII segments seen so far."""

    def __init__(self, tokenizer_json: str, max_segments: int = MAX_SEGMENTS,
                 max_segment_chars: int = MAX_SEGMENT_CHARS, min_ascii_run: int = MIN_ASCII_RUN):
        whole = tokenizers.Tokenizer.from_str(tokenizer_json)
        whole.encode_special_tokens = True  # "<|endoftext|>" in the text is text (gpt/tokenizer.py)
        self._whole = whole  # the full pipeline, for text that is not ASCII
        one_word = tokenizers.Tokenizer.from_str(tokenizer_json)
        one_word.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        one_word.encode_special_tokens = True
        self._one_word = one_word
        self.max_segments = max_segments
        self.max_segment_chars = max_segment_chars
        self.min_ascii_run = min_ascii_run
        self.collisions = 0  # texts handed to the full pipeline because two segments shared a key
        self._powers = _powers(HASH_BASE, 1 << 16)  # HASH_BASE**i mod 2**64
        self._inverse_powers = _powers(pow(HASH_BASE, -1, 1 << 64), 1 << 16)  # HASH_BASE**-i mod 2**64
        self._clear()

    def _clear(self) -> None:
        # Segment row r: its key maps to r in _row_of_key; its bytes are row r of _text, its ids row r of _ids.
        self._row_of_key = KeyTable()
        self._text = RaggedRows(np.uint8)
        self._ids = RaggedRows(np.uint16)
        self._word_row: dict[str, int] = {}  # each word seen in a segment: its row of _word_ids
        self._word_ids = RaggedRows(np.uint16)

    def encode(self, text: str) -> np.ndarray:
        """uint16 ids of `text`, equal to the full pipeline's (any text; ASCII is the fast one)."""
        if text.isascii():
            return self._encode_ascii(text)
        try:
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        except UnicodeEncodeError:  # a lone surrogate: the pipeline decides what to do with it
            return self._pipeline(text)
        # Runs of whole segments, all ASCII or not; ASCII runs of min_ascii_run characters or more
        # take the fast path, and the text between them goes through the pipeline in one batch.
        starts = segment_starts(codes)
        foreign = np.logical_or.reduceat(codes >= 128, starts)
        first = np.concatenate(([0], np.flatnonzero(foreign[1:] != foreign[:-1]) + 1))
        cuts = [*starts[first].tolist(), len(text)]
        parts: list[list] = []  # [start, end, fast]
        for a, b, is_foreign in zip(cuts, cuts[1:], foreign[first].tolist()):
            fast = not is_foreign and b - a >= self.min_ascii_run
            if parts and not fast and not parts[-1][2]:
                parts[-1][1] = b
            else:
                parts.append([a, b, fast])
        slow = iter(self._whole.encode_batch_fast([text[a:b] for a, b, fast in parts if not fast],
                                                  add_special_tokens=False))
        return np.concatenate([self._encode_ascii(text[a:b]) if fast else np.array(next(slow).ids, dtype=np.uint16)
                               for a, b, fast in parts])

    def _encode_ascii(self, text: str) -> np.ndarray:
        if len(text) <= BLOCK_CHARS:
            return self._encode_block(text)
        # Cut at segment starts about every BLOCK_CHARS characters: a block's segments are the text's.
        starts = segment_starts(np.frombuffer(text.encode("ascii"), dtype=np.uint8))
        near = starts[np.minimum(np.searchsorted(starts, range(BLOCK_CHARS, len(text), BLOCK_CHARS)),
                                 len(starts) - 1)]
        cuts = sorted({0, len(text), *near.tolist()})
        return np.concatenate([self._encode_block(text[a:b]) if b - a <= 2 * BLOCK_CHARS
                               else self._pipeline(text[a:b])  # one giant segment: no table for it
                               for a, b in zip(cuts, cuts[1:])])

    def _pipeline(self, text: str) -> np.ndarray:
        return np.array(self._whole.encode(text, add_special_tokens=False).ids, dtype=np.uint16)

    def _encode_block(self, text: str) -> np.ndarray:
        b = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        if len(b) == 0:
            return np.empty(0, dtype=np.uint16)
        starts = segment_starts(b)
        lengths = np.diff(starts, append=len(b))
        keys = self._keys(b, starts, lengths)
        rows = self._row_of_key.lookup(keys)
        if (rows < 0).any():
            self._learn(text, keys, starts, lengths, rows < 0)
            rows = self._row_of_key.lookup(keys)
        # The rows the keys found must hold these very segments, else two segments share a key
        # (vanishingly rare in text, but possible): then only the full pipeline is exact.
        if not (np.array_equal(self._text.length[rows], lengths) and np.array_equal(self._text.gather(rows), b)):
            self.collisions += 1
            return self._pipeline(text)
        return self._ids.gather(rows)

    def _keys(self, b: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Each segment's key: sum_k b[start + k] * HASH_BASE**k, plus its length times LENGTH_MIX."""
        if len(self._powers) < len(b):
            n = 1 << (len(b) - 1).bit_length()
            self._powers = _powers(HASH_BASE, n)
            self._inverse_powers = _powers(pow(HASH_BASE, -1, 1 << 64), n)
        prefix = np.zeros(len(b) + 1, dtype=np.uint64)  # prefix[i] = sum_{j<i} b[j] * HASH_BASE**j
        np.cumsum(b * self._powers[: len(b)], out=prefix[1:])
        # Multiplying by HASH_BASE**-start shifts the sum of a segment to start at power 0.
        hashes = (prefix[starts + lengths] - prefix[starts]) * self._inverse_powers[starts]
        return hashes + lengths.astype(np.uint64) * LENGTH_MIX

    def _learn(self, text: str, keys: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
               missing: np.ndarray) -> None:
        """Add the segments of one text that the table lacks (all of them after a restart)."""
        new_keys, first = np.unique(keys[missing], return_index=True)
        first = np.flatnonzero(missing)[first]
        new_chars = int(lengths[first].sum())
        if (self._text.rows + len(new_keys) > self.max_segments
                or self._text.used + new_chars > self.max_segment_chars):
            # Bounded memory on endless vocabularies (URLs, numbers, hashes): start afresh, with
            # this text's segments (which may alone exceed the limit: the table holds them anyway).
            self._clear()
            new_keys, first = np.unique(keys, return_index=True)
        segments = [text[s : s + n] for s, n in zip(starts[first].tolist(), lengths[first].tolist())]
        # A segment's ids are its words' ids, in order; each distinct word is BPE'd once, ever
        # (new segments of code or numbers are common, new words much rarer).
        words_of = [ASCII_PRETOKENIZER.findall(seg) for seg in segments]
        words = list(chain.from_iterable(words_of))
        unseen = list(set(words).difference(self._word_row))
        if unseen:
            encoded = [e.ids for e in self._one_word.encode_batch_fast(unseen, add_special_tokens=False)]
            self._word_row.update(zip(unseen, range(self._word_ids.rows, self._word_ids.rows + len(unseen))))
            self._word_ids.append(np.fromiter(chain.from_iterable(encoded), dtype=np.uint16),
                                  np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
        word_rows = np.fromiter(map(self._word_row.__getitem__, words), dtype=np.int64, count=len(words))
        first_word = np.cumsum([0] + [len(w) for w in words_of[:-1]])  # every segment has a word
        self._row_of_key.insert(new_keys, np.arange(self._text.rows, self._text.rows + len(segments)))
        self._text.append(np.frombuffer("".join(segments).encode("ascii"), dtype=np.uint8), lengths[first])
        self._ids.append(self._word_ids.gather(word_rows),
                         np.add.reduceat(self._word_ids.length[word_rows], first_word))


def _powers(base: int, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) mod 2**64."""
    factors = np.full(n, base, dtype=np.uint64)
    factors[0] = 1
    return np.cumprod(factors, dtype=np.uint64)


class KeyTable:
    """A hash table from uint64 keys to row numbers, in numpy arrays, queried an array at a time.

    A Python dict costs an interpreter step per lookup (~0.3 us: more than everything else the
    encoder does per segment); here a text's ~10k keys are looked up in a few array operations.
    Open addressing with linear probing: a key sits at its home slot or in the first free slot
    after it, with no free slot in between; the table is at most a quarter full (few probes).
    """

    def __init__(self, slots: int = 1 << 14):
        self._empty(slots)

    def _empty(self, slots: int) -> None:
        self._keys = np.zeros(slots, dtype=np.uint64)
        self._rows = np.full(slots, -1, dtype=np.int64)  # -1: a free slot
        self._count = 0

    def _home(self, keys: np.ndarray) -> np.ndarray:
        # Fibonacci hashing: the top bits of key * (an odd constant near 2**64 / golden ratio).
        shift = np.uint64(64 - (len(self._keys).bit_length() - 1))
        return ((keys * np.uint64(0x9E3779B97F4A7C15)) >> shift).astype(np.int64)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The row of each key, -1 where absent."""
        slots = self._home(keys)
        found = self._rows[slots]
        go_on = (found >= 0) & (self._keys[slots] != keys)  # another key's slot: probe the next one
        found[go_on] = -1
        todo = np.flatnonzero(go_on)  # a few percent of the keys (the table is at most a quarter full)
        mask = len(self._keys) - 1
        while len(todo):
            slots = (slots[go_on] + 1) & mask
            rows = self._rows[slots]
            hit = (rows >= 0) & (self._keys[slots] == keys[todo])
            found[todo[hit]] = rows[hit]
            go_on = (rows >= 0) & ~hit
            todo = todo[go_on]
        return found

    def insert(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Add `keys` (distinct, none present yet) with their `rows`."""
        if 4 * (self._count + len(keys)) > len(self._keys):
            old = self._rows >= 0
            old_keys, old_rows = self._keys[old], self._rows[old]
            slots = len(self._keys)
            while 4 * (self._count + len(keys)) > slots:
                slots *= 2
            self._empty(slots)
            self.insert(old_keys, old_rows)
        todo = np.arange(len(keys))
        slots = self._home(keys)
        mask = len(self._keys) - 1
        while len(todo):
            free = np.flatnonzero(self._rows[slots] < 0)
            # Several keys may reach one free slot in this round: the first of them takes it.
            _, first = np.unique(slots[free], return_index=True)
            took = free[first]
            self._keys[slots[took]] = keys[todo[took]]
            self._rows[slots[took]] = rows[todo[took]]
            left = np.ones(len(todo), dtype=bool)
            left[took] = False
            todo, slots = todo[left], (slots[left] + 1) & mask
        self._count += len(keys)


class RaggedRows:
    """Rows of different lengths stored end to end in one growing numpy array."""

    def __init__(self, dtype):
        self.flat = np.empty(1 << 16, dtype=dtype)
        self.start = np.zeros(1 << 14, dtype=np.int64)
        self.length = np.zeros(1 << 14, dtype=np.int64)
        self.rows = 0
        self.used = 0  # items of `flat` in use

    def append(self, values: np.ndarray, lengths: np.ndarray) -> None:
        """Add len(lengths) rows: `values` holds them end to end."""
        n = self.rows + len(lengths)
        self.start, self.length = _grow(self.start, n), _grow(self.length, n)
        self.flat = _grow(self.flat, self.used + len(values))
        self.start[self.rows : n] = self.used + np.cumsum(lengths) - lengths
        self.length[self.rows : n] = lengths
        self.flat[self.used : self.used + len(values)] = values
        self.rows, self.used = n, self.used + len(values)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` end to end, in one indexing operation (no Python loop per row)."""
        lengths = self.length[rows]
        ends = np.cumsum(lengths)
        # Output position p of row k reads flat[start_k + (p - first output position of k)].
        return self.flat[np.arange(ends[-1]) + np.repeat(self.start[rows] - (ends - lengths), lengths)]


def _grow(array: np.ndarray, needed: int) -> np.ndarray:
    if needed <= len(array):
        return array
    bigger = np.empty(max(needed, 2 * len(array)), dtype=array.dtype)
    bigger[: len(array)] = array
    return bigger


# ---- worker processes -----------------------------------------------------------------------
# One WordCacheEncoder per worker process: a pool's initializer can only hand it over through a
# module-level name, which exists in the workers alone.
_worker_encoder: WordCacheEncoder | None = None


class WorkerDied(RuntimeError):
    """An encoding worker process ended in the middle of its work: killed (by the out-of-memory
    killer, or a signal sent to it alone)."""


PARENTS_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # noted while the workers are forked


def _start_worker(tokenizer_json: str, parent: int, parent_handles: tuple[int, ...]) -> None:
    global _worker_encoder
    _die_with(parent)
    # Forked while the parent only noted these signals (see _pool), so nothing was raised before
    # this. Ctrl-C is the parent's to handle (it stops the pool); workers would only print
    # tracebacks. So is SIGTERM or SIGUSR1 where the parent has a handler for it (train.py's
    # notes it: the run stops after its next step and saves; a tool's stops as Ctrl-C does): a
    # signal sent to every process of the job (scancel's) killed the workers under a prep the
    # run meant to finish. Where the parent has none (the signal ends it), it ends them too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN if sig in parent_handles else signal.SIG_DFL)
    _worker_encoder = WordCacheEncoder(tokenizer_json)


def _die_with(parent: int) -> None:
    """End this worker when its parent ends, however it ends (kill -9 included): left behind,
    a worker waits for work forever. Linux's PR_SET_PDEATHSIG; elsewhere nothing."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before that took effect
        os._exit(1)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return [_worker_encoder.encode(t) for t in texts]


def encode_pieces(inner: tokenizers.Tokenizer, texts: Iterable[str], *, workers: int | None = None,
                  pool_after_chars: int | None = None) -> Iterator[np.ndarray]:
    """The ids of each text of `texts`, in order, as uint16 arrays (`inner` must pass
    `word_cache_applies`).

    The first `pool_after_chars` characters (default POOL_AFTER_CHARS) are encoded in this
    process (small corpora never pay for starting processes); the rest in `workers` processes
    (default: one per usable CPU), in batches of WINDOW_PIECES texts with two batches in flight, so
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
    workers = workers or usable_cpus()
    pool, release_signals = _pool(workers, tokenizer_json)
    try:
        release_signals()  # a signal held back during the forks is delivered here, with `pool` bound
        in_flight: deque = deque()  # each batch's futures, one per part
        exhausted = False
        while True:
            while not exhausted and len(in_flight) < 2:
                batch = list(islice(texts, WINDOW_PIECES))
                exhausted = not batch
                if batch:
                    in_flight.append([pool.submit(_encode_in_worker, part) for part in _split(batch, workers)])
            if not in_flight:
                return
            for future in in_flight.popleft():
                try:
                    part = future.result()
                except BrokenProcessPool:
                    raise WorkerDied("an encoding worker process was killed in the middle of its work (by "
                                     "the out-of-memory killer, or a signal sent to it)") from None
                yield from part
    finally:
        release_signals()
        # Work not started is dropped; a worker's batch under way (a second or two) is awaited,
        # so that no worker outlives this call.
        pool.shutdown(wait=True, cancel_futures=True)


# The pool's processes, whose terminate() is SIGKILL (`_killing_context`). At module level: a
# spawned worker's process object is pickled, which takes a class found by its name.
class _KillingSpawnProcess(multiprocessing.context.SpawnProcess):
    def terminate(self) -> None:
        self.kill()


_KILLING_PROCESSES = {"spawn": _KillingSpawnProcess}
if sys.platform != "win32":  # (fork exists only there)
    class _KillingForkProcess(multiprocessing.context.ForkProcess):
        def terminate(self) -> None:
            self.kill()

    _KILLING_PROCESSES["fork"] = _KillingForkProcess


def _killing_context(method: str) -> multiprocessing.context.BaseContext:
    """A multiprocessing context of `method` ("fork" or "spawn") whose processes' terminate() is
    SIGKILL. The pool terminates its other workers when one dies, and waits for them: with
    SIGTERM, which the workers ignore under a parent that handles it (`_start_worker`), that wait
    never ended."""
    context = type(multiprocessing.get_context(method))()  # one of its own: the shared one keeps its Process
    context.Process = _KILLING_PROCESSES[method]
    return context


def _split(batch: list[str], parts: int) -> list[list[str]]:
    """`batch` cut into `parts` consecutive runs (order kept when the results are chained)."""
    size = -(-len(batch) // parts)
    return [batch[i : i + size] for i in range(0, len(batch), size)]


def _pool(workers: int, tokenizer_json: str):
    """(a started ProcessPoolExecutor, a function that lets the signals held meanwhile through).

    fork on Linux: no re-import of the parent's modules (torch in train.py) in each worker.
    The workers never use OpenMP or the tokenizers thread pool (a forked child of a process
    that used threads must not); TOKENIZERS_PARALLELISM=false at the fork tells the library so,
    which also spares a warning per worker. Elsewhere (macOS, Windows) spawn.

    While the workers are forked, Ctrl-C (and SIGTERM and SIGUSR1) is only noted: a
    KeyboardInterrupt raised in a child just after fork would unwind through a copy of the
    parent's stack (running its clean-up code) instead of becoming a worker. The caller calls
    the returned function once it holds the pool (so that it can always shut it down): that
    restores the handlers and hands them a noted signal. Not multiprocessing.Pool: where a worker dies (the out-of-memory killer), it forks a
    replacement and waits forever for the dead one's work; this executor says it is broken.
    """
    method = "fork" if sys.platform == "linux" else "spawn"
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    handles = tuple(sig for sig in PARENTS_SIGNALS if callable(signal.getsignal(sig)))
    held = HeldSignals(PARENTS_SIGNALS)
    pool = None
    try:
        pool = ProcessPoolExecutor(workers, _killing_context(method), initializer=_start_worker,
                                   initargs=(tokenizer_json, os.getpid(), handles))
        pool.submit(os.getpid).result()  # with fork, every worker starts at the first submit: here
    except BaseException:
        held.release(deliver=False)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    release_signals = held.release  # Python's handler raises KeyboardInterrupt; the trainer's notes it
    return pool, release_signals
