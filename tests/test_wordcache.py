"""The word-cache encoder (gpt/wordcache.py) gives exactly the tokenizers pipeline's ids."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tokenizers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tokenizers import normalizers, pre_tokenizers

import gpt.prepare as prepare_module
from conftest import child_pids
import gpt.wordcache as wordcache
from gpt.prepare import prepare
from gpt.shards import list_shards, open_shard
from gpt.sources import Texts
from gpt.tokenizer import char_tokenizer, train_bpe
from gpt.wordcache import ASCII_SEGMENT, KeyTable, WordCacheEncoder, encode_pieces, segment_starts, word_cache_applies

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Every ASCII character (controls included: \x1c-\x1f are whitespace to Python's \s but not to
# GPT-2's regex), plus the runs and contractions the pattern treats specially.
ASCII_PARTS = [chr(c) for c in range(128)] + ["  ", "\n\n", " \n ", "'s", "'ll", "'re", "'S", "12", " 3", "ab",
                                              " ab", " a.", "\t ", ".  x", " ' s"]


@pytest.fixture(scope="module")
def bpe(shakespeare):
    # Frequent Unicode whitespace next to spaces: merges that only the right cuts keep intact.
    unicode_spaces = "a\u00a0  b\u3000  c\x85  d\u2028  e " * 3000
    return train_bpe([shakespeare[:200_000], "12 345 'll 're \t\x1c\x00 éè 🎉", unicode_spaces], 600)


def reference(bpe, text: str) -> list[int]:
    return bpe.inner.encode(text, add_special_tokens=False).ids


@PROPERTY
@given(text=st.lists(st.sampled_from(ASCII_PARTS), max_size=60).map("".join))
@example(text="a\x1c b\x1f\x1e c \t\n\x0b\x0c\r  d")
@example(text="x<|endoftext|>y  ")
def test_ascii_text_gives_the_pipelines_ids(bpe, text):
    encoder = WordCacheEncoder(bpe.inner.to_str())
    assert encoder.encode(text).tolist() == reference(bpe, text)
    assert encoder.encode(text).tolist() == reference(bpe, text)  # again, from the cache


@PROPERTY
@given(text=st.text())
def test_any_text_gives_the_pipelines_ids(bpe, text):
    assert WordCacheEncoder(bpe.inner.to_str()).encode(text).tolist() == reference(bpe, text)


# Mostly ASCII with some other characters, whitespace among them (no-break space, NEL, line and
# ideographic spaces are White_Space; U+200B is not): ASCII stretches take the fast path.
MIXED_PARTS = ASCII_PARTS + ["é", "🎉", "\u00a0", "\x85", "\u2028", "\u3000", "\u200b", " é", "é ", "'é",
                             "<|endoftext|>", "a b c d e f g h i j k l m n o p q r s t u v w x y z\n"]


@PROPERTY
@given(text=st.lists(st.sampled_from(MIXED_PARTS), max_size=60).map("".join))
@example(text="a \u00a0 b\u3000 c é d\n\u2028 x")
@example(text="x\u00a0  ab cd")  # no cut after the no-break space: its run holds the next space
def test_mixed_text_gives_the_pipelines_ids(bpe, text):
    encoder = WordCacheEncoder(bpe.inner.to_str(), min_ascii_run=1)  # every ASCII run on the fast path
    assert encoder.encode(text).tolist() == reference(bpe, text)
    assert encoder.encode(text).tolist() == reference(bpe, text)


def test_shakespeare_pieces_and_a_tiny_cache(bpe, shakespeare):
    encoder = WordCacheEncoder(bpe.inner.to_str(), max_segments=50)  # restarts its table many times
    for start in range(0, 300_000, 30_000):
        piece = shakespeare[start : start + 30_000]
        assert encoder.encode(piece).tolist() == reference(bpe, piece)
    assert encoder.encode("").dtype == np.uint16 and len(encoder.encode("")) == 0


@PROPERTY
@given(text=st.lists(st.sampled_from(ASCII_PARTS), max_size=60).map("".join))
def test_numpy_cuts_are_the_segment_patterns(text):
    starts = segment_starts(np.frombuffer(text.encode("ascii"), dtype=np.uint8)).tolist() if text else []
    segments = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    assert segments == [s for s in ASCII_SEGMENT.findall(text) if s]


def test_segments_sharing_a_key_go_through_the_pipeline(bpe, shakespeare):
    class SharedKeys(WordCacheEncoder):
        def _keys(self, b, starts, lengths):
            return (lengths % 3).astype(np.uint64)  # a third of all segments share each key

    encoder = SharedKeys(bpe.inner.to_str())
    for start in range(0, 100_000, 20_000):
        piece = shakespeare[start : start + 20_000]
        assert encoder.encode(piece).tolist() == reference(bpe, piece)
    assert encoder.collisions == 5
    assert encoder.encode(" a a a").tolist() == reference(bpe, " a a a")  # one segment, three times: no clash


def test_long_ascii_runs_between_other_characters(bpe, shakespeare):
    encoder = WordCacheEncoder(bpe.inner.to_str())
    text = "¿" + shakespeare[:5000] + " naïve " + shakespeare[5000:5100] + "é" + shakespeare[6000:9000] + "🎉"
    assert encoder.encode(text).tolist() == reference(bpe, text)
    assert encoder._text.rows > 500  # the long runs went through the table


def test_long_texts_in_blocks_and_a_table_of_limited_text(bpe, shakespeare, monkeypatch):
    monkeypatch.setattr(wordcache, "BLOCK_CHARS", 5000)
    encoder = WordCacheEncoder(bpe.inner.to_str(), max_segment_chars=3000)  # restarts often
    giant = "x" * 12_000  # a segment longer than two blocks: the pipeline's
    for text in (shakespeare[:60_000], shakespeare[:7000] + giant + shakespeare[:7000], giant):
        assert encoder.encode(text).tolist() == reference(bpe, text)


def test_key_table_probes_past_shared_home_slots(monkeypatch):
    rng = np.random.default_rng(0)
    keys = rng.choice(1 << 62, size=5000, replace=False).astype(np.uint64)
    for home in (KeyTable._home, lambda self, k: np.full(len(k), 7, dtype=np.int64)):  # all in one slot
        monkeypatch.setattr(KeyTable, "_home", home)
        table = KeyTable(slots=16)  # grows several times
        table.insert(keys[:1000], np.arange(1000))
        table.insert(keys[1000:3000], np.arange(1000, 3000))
        assert table.lookup(keys).tolist() == list(range(3000)) + [-1] * 2000


def signal_masks(pid: int) -> dict[str, int]:
    """The bit masks of signals `pid` catches (SigCgt) and ignores (SigIgn), from /proc/PID/status."""
    masks = {}
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(("SigCgt:", "SigIgn:")):
            masks[line[:6]] = int(line.split()[1], 16)
    return masks


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("parent_notes_sigterm", [True, False])
def test_workers_leave_sigterm_to_a_parent_that_handles_it(bpe, shakespeare, parent_notes_sigterm):
    """train.py's SIGTERM handler only notes the signal (the run saves after its next step): a
    SIGTERM to every process of the job (scancel) killed the workers under its data prep. They
    now ignore it under such a parent, and, under a plain prep that the signal ends, die of it too.
    Neither kind catches it: forked with the parent's Python handler, a worker would only note it."""
    bit = 1 << (signal.SIGTERM - 1)
    handler = (lambda signum, frame: None) if parent_notes_sigterm else signal.SIG_DFL
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        texts = [shakespeare[i : i + 7000] for i in range(0, 140_000, 7000)]
        others = set(child_pids(os.getpid()))  # earlier tests' helpers (torch.compile's workers, say)
        pieces = encode_pieces(bpe.inner, iter(texts), workers=2, pool_after_chars=7000)
        got = [next(pieces), next(pieces)]  # the second comes from a worker: the pool is running
        workers = set(child_pids(os.getpid())) - others
        assert len(workers) == 2
        for pid in workers:
            masks = signal_masks(pid)
            assert not masks["SigCgt"] & bit, "a worker catches SIGTERM"
            assert bool(masks["SigIgn"] & bit) == parent_notes_sigterm
        got += list(pieces)
        assert [a.tolist() for a in got] == [reference(bpe, t) for t in texts]
    finally:
        signal.signal(signal.SIGTERM, previous)


KILLED = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from gpt.tokenizer import train_bpe
from gpt.wordcache import encode_pieces, WorkerDied
text = open({text!r}).read()[:300_000]
bpe = train_bpe([text[:50_000]], 400)
texts = [text[i : i + 5000] for i in range(0, len(text), 5000)]
if sys.argv[1] == "worker under a parent that handles SIGTERM":  # train.py's StopFlag, prepare.py's
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
pieces = encode_pieces(bpe.inner, iter(texts), workers=2, pool_after_chars=5000)
next(pieces), next(pieces)
workers = [int(c) for c in open(f"/proc/{{os.getpid()}}/task/{{os.getpid()}}/children").read().split()]
print(*workers, flush=True)
if sys.argv[1].startswith("worker"):
    os.kill(workers[0], signal.SIGKILL)
    try:
        list(pieces)
    except WorkerDied as e:
        print("WorkerDied:", e, flush=True)
else:
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_the_pools_processes_start_under_each_start_method(method):
    """The processes whose terminate() is SIGKILL are pickled to a spawned worker (macOS,
    Windows): defined inside a function, they could not be, and no pool started there."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, wordcache._killing_context(method)) as pool:
        assert pool.submit(os.getpid).result() != os.getpid()


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; PR_SET_PDEATHSIG is Linux's")
def test_a_killed_worker_ends_the_encoding_and_workers_never_outlive_their_parent(tmp_path):
    """A worker killed (the out-of-memory killer's SIGKILL) left multiprocessing.Pool waiting
    forever for its work, and Ctrl-C could not end the wait: now an error. And a parent killed
    outright left its workers waiting for work forever."""
    from conftest import REPO, SHAKESPEARE

    script = KILLED.format(repo=str(REPO), text=str(SHAKESPEARE))
    # Under a parent that handles SIGTERM the workers ignore it, and the pool's SIGTERM to the
    # others, once one had died, left it waiting for them forever (a review found it).
    for case in ("worker", "worker under a parent that handles SIGTERM"):
        died = subprocess.run([sys.executable, "-c", script, case], capture_output=True, text=True, timeout=120)
        assert "WorkerDied: an encoding worker process was killed" in died.stdout, case + died.stdout + died.stderr
    orphaned = subprocess.run([sys.executable, "-c", script, "parent"], capture_output=True, text=True, timeout=120)
    assert orphaned.returncode == -signal.SIGKILL, orphaned.stderr
    workers = [int(pid) for pid in orphaned.stdout.split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    # (a zombie, reaped by init, holds no memory and runs nothing: State Z)
    alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}")
             and "\nState:\tZ" not in open(f"/proc/{pid}/status").read()]
    assert alive == [], "workers outlived their parent"


def test_worker_processes_keep_the_order(bpe, shakespeare):
    texts = [shakespeare[i : i + 7000] for i in range(0, 210_000, 7000)]
    texts[3] = "naïve café " + texts[3]  # not ASCII: the pipeline's path, in a worker
    texts[5] = ""
    got = list(encode_pieces(bpe.inner, iter(texts), workers=2, pool_after_chars=20_000))
    assert [a.tolist() for a in got] == [reference(bpe, t) for t in texts]


def test_which_tokenizers_the_cache_serves(bpe):
    assert word_cache_applies(bpe.inner)
    assert not word_cache_applies(char_tokenizer("abc").inner)
    with_prefix = tokenizers.Tokenizer.from_str(bpe.inner.to_str())
    with_prefix.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert not word_cache_applies(with_prefix)
    normalized = tokenizers.Tokenizer.from_str(bpe.inner.to_str())
    normalized.normalizer = normalizers.NFC()
    assert not word_cache_applies(normalized)


def test_prepare_writes_the_same_shards_with_and_without_the_cache(shakespeare, tmp_path, monkeypatch):
    docs = [shakespeare[:400_000], "héllo wörld", shakespeare[400_000:700_000]]
    kwargs = dict(tokenizer="bpe", vocab_size=500, val_fraction=0.1, val_chunk_tokens=4096,
                  progress=False, log=None)
    monkeypatch.setattr(wordcache, "POOL_AFTER_CHARS", 100_000)  # workers take over early
    prepare(tmp_path / "cached", Texts(docs), **kwargs)
    monkeypatch.setattr(prepare_module, "word_cache_applies", lambda inner: False)
    prepare(tmp_path / "plain", Texts(docs), **kwargs)
    for split in ("train", "val"):
        cached, plain = list_shards(tmp_path / "cached", split), list_shards(tmp_path / "plain", split)
        assert [p.name for p in cached] == [p.name for p in plain]
        for a, b in zip(cached, plain):
            assert np.array_equal(open_shard(a), open_shard(b))
