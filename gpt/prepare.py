"""Data prep: a corpus in, a dataset folder of token shards out.

    prepare("data/stdlib", "stdlib", tokenizer="bpe", vocab_size=4096)
    python data_prep/prepare.py --source stdlib --out data/stdlib --tokenizer bpe

Steps (the corpus is streamed twice and never held in memory whole):
1. Pass one reads the corpus, counts documents and bytes, and builds the tokenizer: BPE trained
   with `train_from_iterator` (on about the first `tokenizer_train_bytes` of text), or the character
   vocabulary.
2. Pass two encodes the document pieces on all cores (byte-level BPE through the word cache of
   `gpt/wordcache.py` in worker processes, anything else with `encode_batch`), every document
   prefixed with the end-of-text token where the tokenizer has one (as llm.c does), and routes
   the token stream to the train and val splits.
3. Shards are written into a staging folder `OUT/.prepare-staging` while the prep runs; when
   it has succeeded they are moved into OUT next to `tokenizer.json`, and `meta.json` is written
   last, atomically. A folder with meta.json is complete; a killed prep leaves no shard under a
   final name in OUT (a leftover staging folder is cleared by the next prep).

The train/val split (deterministic: the same corpus, options and seed give byte-identical shards)
    val_rule="chunks" (default): the token stream (all documents in corpus order, end-of-text
        ids included) is cut into consecutive chunks of `val_chunk_tokens` tokens; chunk i goes
        to val when floor((i+1)*f + phase) > floor(i*f + phase), f = val_fraction and phase =
        random.Random(seed).random(). That is one chunk in every 1/f, spread evenly across the
        corpus (so val looks like the whole corpus, not like its last files), with the offset
        within each cycle set by the seed (so there are about 1/f distinct splits); it works
        alike for one huge document and for many small ones. A window read across a chunk
        seam sees text that was not adjacent, as at a document boundary.
    val_rule="tail": the last `val_fraction` of the corpus's characters is val: train is the
        text before character int(n * (1 - val_fraction)), encoded as one stream, val the text
        after it. This is nanoGPT's split (first 90% train, last 10% val for Shakespeare); it
        ignores the seed.
    Either way a split with fewer than `min_val_tokens` tokens is an error (a val split must
    hold at least one block plus its target).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from gpt import locks
from gpt.held_signals import HeldSignals, terminate_as_interrupt
from gpt.config import ArgumentParser, add_option, path_arg
from gpt.console import report
from gpt.progress import progress_bar
from gpt.dataset import PREP_LOCK_FILE, dataset_files, load_tokenizer, run_data_dir
from gpt.run_layout import is_hf_model_folder, is_run_before_first_save, nearby_runs, training_output
from gpt.shards import MAX_SHARD_TOKENS, MAX_VOCAB, SPLITS, ShardError, ShardWriter
from gpt.hf_dataset import HFDataset
from gpt.sources import ENCODING_ERRORS, Corpus, LocalFiles, Piece, resolve_source
from gpt.tokenizer import (MIN_BPE_VOCAB, TOKENIZER_FILE, Tokenizer, TokenizerError, char_tokenizer,
                           check_vocab_size, train_bpe)
from gpt.wordcache import WorkerDied, encode_pieces, word_cache_applies

STAGING = ".prepare-staging"
LOCK_FILE = PREP_LOCK_FILE  # held (flock) by the prep writing the folder
META_FILE = "meta.json"
VAL_RULES = ("chunks", "tail")
# BPE merges are learned from the first 10 MB of the corpus by default: plenty for the vocabularies
# of a few thousand ids used here, and training (the tokenizers library's own pre-tokenizer, ~3 MB/s
# on 2 cores) would otherwise take longer than encoding the whole corpus. Raise it for large
# vocabularies (GPT-2's 50k merges were learned from far more text).
TOKENIZER_TRAIN_BYTES = 10_000_000
BATCH_CHARS = 2 << 20  # text per encode_batch call: ~32 pieces, enough to keep every core busy


class PrepareError(ValueError):
    """Bad input or options for data prep; the message names the file or option."""


@dataclass
class _Counts:
    documents: int = 0
    characters: int = 0
    text_bytes: int = 0


def prepare(
    out_dir: str | os.PathLike,
    source="stdlib",
    *,
    tokenizer: str | os.PathLike | Tokenizer = "bpe",
    vocab_size: int = 8192,
    val_fraction: float = 0.01,
    val_rule: str = "chunks",
    val_chunk_tokens: int = 8192,
    min_val_tokens: int = 1025,
    seed: int = 0,
    shard_tokens: int = 100_000_000,
    tokenizer_train_bytes: int | None = TOKENIZER_TRAIN_BYTES,
    encoding_errors: str = "strict",
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Tokenize a corpus into `out_dir` (shards, tokenizer.json, meta.json); return a summary.

    source: "stdlib" (this Python's standard library sources: no download), a `pathlib.Path`
        (a file or folder, each file one document), a list of str (the documents), or a corpus
        from `gpt.sources` (`LocalFiles`, `Texts`) or `gpt.hf_dataset` (`HFDataset`).
    tokenizer: "bpe" (byte-level BPE trained here to `vocab_size` ids), "char" (the corpus's
        characters), a `Tokenizer` to reuse as it is, or the path (a `pathlib.Path`) of one to
        reuse, as --tokenizer-from takes it (`reused_tokenizer`; meta.json records the path).
        `vocab_size` is BPE's alone: "char" has one id per distinct character (the CLIs refuse a
        --vocab-size given with it).
    val_fraction, val_rule, val_chunk_tokens, seed: the train/val split (module docstring).
    min_val_tokens: the fewest tokens each split may have; use at least block_size + 1.
    shard_tokens: tokens per shard file (the last shard of a split holds the rest).
    tokenizer_train_bytes: train BPE on about this much text, the first bytes of the corpus
        (whole pieces: the one that reaches it is the last fed, so up to 64K characters more, 1M
        where text has no place to cut), which bounds the time and memory of training on huge
        corpora; None for all of it.
    encoding_errors: non-UTF-8 bytes in local files: "strict" (error), "replace" or "skip".
    overwrite: replace a dataset already in `out_dir` (refused otherwise).
    progress: show progress bars (tqdm, on stderr).
    log: called with the closing summary line (documents, tokens per split, bytes per token,
        MB/s), after a note when the val split came out far larger than val_fraction (a corpus
        of only a few chunks); None for silence.

    The summary: meta.json's content (tokenizer, vocab_size, eos_id, tokens {"train", "val"},
    shards {"train", "val"}, documents, text_bytes, characters, source, seed, val_rule,
    val_fraction, val_chunk_tokens, shard_tokens) plus out_dir, seconds, bytes_per_token,
    mb_per_s and tokens_per_s.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    corpus = resolve_source(source, encoding_errors)
    tokenizer_from = None
    if isinstance(tokenizer, os.PathLike):
        tokenizer_from = Path(tokenizer).expanduser()
        tokenizer = reused_tokenizer(tokenizer_from)
    _check_options(tokenizer, vocab_size, val_fraction, val_rule, val_chunk_tokens, min_val_tokens,
                   shard_tokens, tokenizer_train_bytes, encoding_errors)
    _check_out_dir(out_dir, overwrite)
    if isinstance(corpus, LocalFiles):
        # An input folder may hold --out: never read our own output (its staging folder fills
        # with shards while the input is read a second time).
        _check_input_not_out(corpus, out_dir)
        corpus = replace(corpus, exclude=(*corpus.exclude, out_dir))
    if isinstance(corpus, HFDataset):
        _check_hf_folder_not_out(corpus, out_dir)
        if not progress:
            corpus = replace(corpus, progress=False)
    given = "the Tokenizer given" if tokenizer_from is None else f"--tokenizer-from {tokenizer_from}"
    with _staging_folder(out_dir, overwrite) as staging:
        counts = _Counts()
        tok = _fit_tokenizer(corpus, tokenizer, vocab_size, tokenizer_train_bytes, counts, progress, given)
        if counts.documents == 0:
            undecodable = getattr(corpus, "undecodable", None)
            if undecodable:  # --encoding-errors skip left every file out: the input is not empty
                raise PrepareError(f"{corpus.description}: no text left: {len(undecodable):,} file(s) skipped as not "
                                   f"valid UTF-8 (--encoding-errors skip), e.g. {next(iter(undecodable))}, and no "
                                   f"other holds text; use --encoding-errors replace, or convert the files to UTF-8 "
                                   f"(iconv -f latin1 -t utf-8)")
            raise PrepareError(f"{corpus.description}: no text found (the input is empty)")
        writers = {split: ShardWriter(staging, split, shard_tokens) for split in SPLITS}
        _encode_corpus(corpus, tok, writers, counts, val_rule, val_fraction, val_chunk_tokens, seed, progress)
        shards = {split: [p.name for p in w.close()] for split, w in writers.items()}
        tokens = {split: w.tokens_written for split, w in writers.items()}
        _check_split_sizes(tokens, min_val_tokens, val_fraction, val_rule, val_chunk_tokens)
        notes = [note for note in (_val_share_note(tokens, val_fraction, val_rule, val_chunk_tokens),
                                   _shard_count_note(shards, shard_tokens)) if note]
        with _writing(staging / TOKENIZER_FILE, out_dir):
            tok.save(staging / TOKENIZER_FILE)
        meta = {
            "tokenizer": tok.kind,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "tokens": tokens,
            "shards": shards,
            "documents": counts.documents,
            "text_bytes": counts.text_bytes,
            "characters": counts.characters,
            "source": corpus.description,
            "seed": seed,
            "val_rule": _describe_rule(val_rule, val_fraction, val_chunk_tokens, seed),
            "val_fraction": val_fraction,
            "val_chunk_tokens": val_chunk_tokens if val_rule == "chunks" else None,
            "shard_tokens": shard_tokens,
        }
        # For the command that remakes this dataset (gpt/dataset.py prepare_again): the options
        # that decide its ids, besides the split's above.
        if tokenizer_from is not None:
            meta["tokenizer_from"] = os.path.abspath(tokenizer_from)
        elif tok.kind == "bpe":
            meta["tokenizer_train_bytes"] = tokenizer_train_bytes  # null: all of the corpus
        meta["encoding_errors"] = encoding_errors
        _publish(staging, out_dir, meta)
    seconds = time.perf_counter() - started
    total = sum(tokens.values())
    summary = dict(meta, out_dir=str(out_dir), seconds=round(seconds, 3),
                   bytes_per_token=round(counts.text_bytes / max(total, 1), 4),
                   mb_per_s=round(counts.text_bytes / 1e6 / max(seconds, 1e-9), 3),
                   tokens_per_s=round(total / max(seconds, 1e-9)))
    if log is not None:
        for note in notes:
            log(note)
        log(_format_summary(summary))
    return summary


@contextmanager
def _staging_folder(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """out_dir, locked for this prep, with an empty staging folder in it for the new dataset's
    files, which the caller moves into place (`_publish`) before the block ends.

    On the way out, whether the prep succeeded or not, the staging folder is removed and the
    lock released; an out_dir this prep created and left empty is removed too, so a failed prep
    leaves no trace where there was nothing."""
    created = not out_dir.exists()
    staging = out_dir / STAGING
    lock = None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock_out_dir(out_dir)
        # Again under the lock: a prep that held it until a moment ago may have published a
        # dataset here since prepare()'s first check (two train.py started on one new data_dir).
        _check_out_dir(out_dir, overwrite)
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed prep (never a live one: the lock)
        staging.mkdir()
    except PrepareError:
        if lock is not None:
            lock.release()
        raise
    except OSError as e:  # bare, the error named only the staging folder, never --out
        if lock is not None:
            lock.release()
        # The path it failed on: a file where our staging folder goes said only "(File exists)".
        where = f": {e.filename}" if e.filename else ""
        raise PrepareError(f"--out {out_dir}: cannot create the dataset folder there ({e.strerror or e}{where}); "
                           f"is a part of the path a file, or the folder not writable?") from e
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        lock.release()  # removes the lock file too (gpt/locks.py: safe against a prep that opened it)
        if created and not any(out_dir.iterdir()):  # (a published dataset is never empty)
            out_dir.rmdir()


def _lock_out_dir(out_dir: Path):
    """A lock (gpt/locks.py) held on out_dir's prep, or PrepareError when another prep holds it:
    two preps into one folder would delete each other's staging folder."""
    try:
        lock = locks.acquire(out_dir / LOCK_FILE)
    except locks.FolderBusy as e:
        holder = f" ({e.holder})" if e.holder else ""
        raise PrepareError(f"--out {out_dir}: another data prep is writing this folder right now{holder}; "
                           f"wait for it to finish (then use its dataset), or choose another --out") from None
    if lock.warning:
        warnings.warn(lock.warning, stacklevel=3)
    return lock


# ---- checks ---------------------------------------------------------------------------------
def _check_options(tokenizer, vocab_size, val_fraction, val_rule, val_chunk_tokens, min_val_tokens,
                   shard_tokens, tokenizer_train_bytes, encoding_errors) -> None:
    if isinstance(tokenizer, str):
        if tokenizer not in ("bpe", "char"):
            raise PrepareError(f"--tokenizer must be bpe or char, got {tokenizer!r}")
        if tokenizer == "bpe":
            try:
                check_vocab_size(vocab_size, "--vocab-size")
            except ValueError as e:
                raise PrepareError(str(e)) from None
            # Here, not only in train_bpe: that runs after a first read of the whole corpus.
            if vocab_size < MIN_BPE_VOCAB:
                raise PrepareError(f"--vocab-size {vocab_size} is too small for byte-level BPE: it needs at "
                                   f"least {MIN_BPE_VOCAB} (256 bytes + end-of-text)")
            # A BPE trained on no text has no merges: one id per byte, with no word from the
            # corpus, whatever --vocab-size asks for.
            if tokenizer_train_bytes is not None and tokenizer_train_bytes < 1:
                raise PrepareError(f"--tokenizer-train-mb must be positive (BPE needs text to learn its "
                                   f"merges from), got {tokenizer_train_bytes / 1e6:g}")
    elif not isinstance(tokenizer, Tokenizer):
        raise PrepareError(f"tokenizer must be 'bpe', 'char', a Tokenizer or a Path, got {type(tokenizer).__name__}")
    if not 0 < val_fraction < 1:
        raise PrepareError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}")
    if val_rule not in VAL_RULES:
        raise PrepareError(f"--val-rule must be one of {', '.join(VAL_RULES)}, got {val_rule!r}")
    for name, value in (("--val-chunk-tokens", val_chunk_tokens), ("--shard-tokens", shard_tokens),
                        ("--min-val-tokens", min_val_tokens)):
        if value < 1:
            raise PrepareError(f"{name} must be at least 1, got {value}")
    # A shard's header counts its tokens in an int32: a larger shard failed only once that many
    # tokens (4 GB of them, held in memory) had been encoded, with numpy's OverflowError.
    if shard_tokens > MAX_SHARD_TOKENS:
        raise PrepareError(f"--shard-tokens {shard_tokens:,} is over {MAX_SHARD_TOKENS:,}, the most a shard's "
                           f"int32 header can count; use a smaller --shard-tokens (several shards)")
    if encoding_errors not in ENCODING_ERRORS:
        raise PrepareError(f"--encoding-errors must be one of {', '.join(ENCODING_ERRORS)}, got {encoding_errors!r}")


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepareError(f"--out {out_dir}: exists and is a file, not a folder (a dataset is a folder of "
                           f"shards); choose another --out, or move that file away")
    what = training_output(out_dir)
    if what is not None:  # even with --overwrite: that replaces datasets, never checkpoints
        raise PrepareError(f"--out {out_dir}: {what}; data prep never writes into a training run "
                           f"(it would break its checkpoints); choose another --out")
    # Nor, even with --overwrite, into a model's folder (--overwrite replaced an export's
    # tokenizer.json: its weights then went with another vocabulary), or a run's before its
    # first checkpoint.
    if out_dir.is_dir() and is_hf_model_folder(out_dir):
        raise PrepareError(f"--out {out_dir}: holds a Hugging Face model (config.json and its weights); data prep "
                           f"never writes into a model's folder (its tokenizer.json is the model's); choose "
                           f"another --out")
    if out_dir.is_dir() and is_run_before_first_save(out_dir):
        raise PrepareError(f"--out {out_dir}: is a training run's folder (its config.json or metrics.jsonl); data "
                           f"prep never writes into a training run; choose another --out")
    if out_dir.is_dir() and not overwrite:
        found = dataset_files(out_dir)
        if found:
            raise PrepareError(f"--out {out_dir}: already holds a dataset ({found[0].name}, ...); "
                               f"pass --overwrite to replace it, or choose another --out")


def _check_input_not_out(corpus: LocalFiles, out_dir: Path) -> None:
    """An --input folder that is --out itself would be read as it is being replaced."""
    for path in corpus.paths:
        if path.is_dir() and os.path.realpath(path) == os.path.realpath(out_dir):
            raise PrepareError(f"--input {path}: is the --out folder, where the dataset is written; "
                               f"choose an --out outside the input")


def _check_hf_folder_not_out(corpus: HFDataset, out_dir: Path) -> None:
    """datasets reads every data file under a local folder: with --out there (or inside), the next
    read takes meta.json and tokenizer.json for data, or fails on the shards."""
    folder = Path(corpus.name)
    if corpus.data_files or not folder.is_dir():
        return
    folder, out = Path(os.path.realpath(folder)), Path(os.path.realpath(out_dir))
    if out == folder or out.is_relative_to(folder):
        where = "is" if out == folder else "is inside"
        raise PrepareError(f"--out {out_dir}: {where} the --hf-dataset folder {corpus.name}, whose every data "
                           f"file datasets reads (the dataset's meta.json and tokenizer.json would be read "
                           f"as data); choose an --out outside it")


def _check_split_sizes(tokens: dict, min_val_tokens: int, val_fraction: float, val_rule: str,
                       val_chunk_tokens: int) -> None:
    total = tokens["train"] + tokens["val"]
    for split in ("val", "train"):
        if tokens[split] < min_val_tokens:
            hint = (f"raise --val-fraction (now {val_fraction})"
                    + (f" or lower --val-chunk-tokens (now {val_chunk_tokens})" if val_rule == "chunks" else "")
                    if split == "val" else "lower --val-fraction or use a larger corpus")
            if total < 2 * min_val_tokens:  # then no --val-fraction helps: do not suggest one
                hint = (f"the whole corpus has only {total:,} tokens, too few for two splits of "
                        f"{min_val_tokens:,}: use more text")
            raise PrepareError(
                f"the {split} split has {tokens[split]:,} tokens, fewer than --min-val-tokens "
                f"{min_val_tokens:,} (one block plus its target); {hint}, or lower --min-val-tokens "
                f"if your block_size is smaller"
            )


MANY_SHARDS = 10_000


def _shard_count_note(shards: dict, shard_tokens: int) -> str | None:
    """A note when a small --shard-tokens made so many shards that training may not map them all:
    each shard is a file, and one memory map while a run reads it, and Linux allows a process
    65,530 maps unless raised (gpt/loader.py says so if a run meets the limit, which is later)."""
    count = sum(len(names) for names in shards.values())
    if count <= MANY_SHARDS:
        return None
    return (f"note: {count:,} shards of --shard-tokens {shard_tokens:,}: each is a file, and a memory map while a "
            f"run trains on it (Linux allows a process 65,530 unless vm.max_map_count is raised); a larger "
            f"--shard-tokens makes fewer (the default is 100,000,000)")


def _val_share_note(tokens: dict, val_fraction: float, val_rule: str, val_chunk_tokens: int) -> str | None:
    """A note when val took far more of the tokens than val_fraction asked for, else None.

    The chunks rule holds out whole chunks, so val is within about one chunk of val_fraction x
    the corpus: on a corpus of only a few chunks that one chunk can be most of it (a 20,000-token
    corpus with chunks of 8,192 tokens and val_fraction 0.1 puts 41% in val). Up to twice the
    fraction asked for is the rounding a small corpus is expected to have; beyond that val is
    eating train data the user meant to train on, so say so (not an error: the dataset is
    usable). The tail rule cuts at a character position and lands near val_fraction anyway.
    """
    total = tokens["train"] + tokens["val"]
    if val_rule != "chunks" or total == 0:
        return None
    share = tokens["val"] / total
    if share <= 2 * val_fraction:
        return None
    asked = f"{val_fraction * 100:g}%"
    return (f"note: the val split is {share:.1%} of the tokens ({tokens['val']:,} of {total:,}), not the "
            f"{asked} of --val-fraction {val_fraction:g}: the chunks rule holds out whole chunks of "
            f"{val_chunk_tokens:,} tokens (--val-chunk-tokens) and the corpus has only {total:,} tokens; "
            f"for a val share near {asked} use a smaller --val-chunk-tokens (well under "
            f"{round(total * val_fraction):,}) or --val-rule tail")


# ---- pass one: the tokenizer ----------------------------------------------------------------
def reused_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer to reuse for --tokenizer-from PATH: a tokenizer.json file, a prepared dataset
    folder, a training run or checkpoint folder (the checkpoint `latest` names), or a Hugging Face
    model folder holding tokenizer.json.

    A model reads only ids of the vocabulary it was trained on: new text for fine-tuning (or for
    evaluating a model on it) must be tokenized with the model's own tokenizer, not a new one
    trained on that text, whose ids would mean other tokens."""
    try:
        return _reused_tokenizer(Path(path).expanduser())
    except (TokenizerError, ShardError) as e:  # a file that is no tokenizer, a mixed dataset: say which option
        raise PrepareError(f"--tokenizer-from: {e}") from None


def _reused_tokenizer(path: Path) -> Tokenizer:
    if path.is_file():
        return Tokenizer.from_file(path)
    if not path.is_dir():
        raise PrepareError(f"--tokenizer-from {path}: no such file or folder{nearby_runs(path)}")
    if training_output(path) is not None:
        return _checkpoint_tokenizer(path)
    if (path / META_FILE).is_file():  # a dataset (bare GPT-2 shards too: load_tokenizer knows those)
        return load_tokenizer(path)
    if (path / TOKENIZER_FILE).is_file():  # a Hugging Face model folder (an export of ours too)
        return Tokenizer.from_file(path / TOKENIZER_FILE)
    if is_run_before_first_save(path):
        return _checkpoint_tokenizer(path)  # which says so
    raise PrepareError(f"--tokenizer-from {path}: no {TOKENIZER_FILE} here; give a tokenizer.json file, a "
                       f"prepared dataset folder, a training run or checkpoint folder, or a Hugging Face "
                       f"model folder holding {TOKENIZER_FILE}")


def _checkpoint_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer.json of the checkpoint `path` is or names (a run: `latest`'s), checked against
    the checkpoint's manifest as every other reader of it does (an edited copy gave other ids)."""
    # Imported here: torch, which the rest of data prep does without.
    from gpt.checkpoint.find import reading
    from gpt.checkpoint.layout import CheckpointError
    from gpt.checkpoint.verify import verify_file

    try:
        with reading(path) as checkpoint:
            if not verify_file(checkpoint, TOKENIZER_FILE):
                raise PrepareError(f"--tokenizer-from {path}: {checkpoint} has no {TOKENIZER_FILE} (a run on bare "
                                   f"GPT-2 token shards saves none); give GPT-2's tokenizer.json")
            return Tokenizer.from_file(checkpoint / TOKENIZER_FILE)
    except CheckpointError as e:
        trained_on = run_data_dir(path)
        dataset = (f"; or reuse the tokenizer of the dataset it trains on: --tokenizer-from {shlex.quote(trained_on)}"
                   if trained_on and (Path(trained_on) / META_FILE).is_file() else "")
        raise PrepareError(f"--tokenizer-from {path}: {e}{dataset}") from None


def _fit_tokenizer(corpus: Corpus, tokenizer, vocab_size: int, train_bytes: int | None,
                   counts: _Counts, progress: bool, given: str) -> Tokenizer | None:
    """Read the corpus once, counting it, and build the tokenizer (or reuse the one given, which
    `given` names: a char vocabulary given must hold every character of the corpus)."""
    chars: set[str] = set()
    kind = tokenizer if isinstance(tokenizer, str) else None
    # A reused char vocabulary: characters it lacks, each with where it first occurs. (Left to pass
    # two, only the first failing piece's were named, at offsets within that piece.)
    known = set(tokenizer.inner.get_vocab()) if kind is None and tokenizer.kind == "char" else None
    lacking: dict[str, tuple[int, int, str]] = {}  # character -> (corpus offset, document offset, document)
    offset = 0  # of the piece within its document
    desc = {"bpe": "training BPE", "char": "reading characters", None: "counting"}[kind]
    bar = progress_bar(desc, None, "B", progress)

    def texts() -> Iterator[str]:
        nonlocal offset
        fed = 0
        for piece in corpus.iter_pieces():
            if piece.starts_document:
                offset = 0
            if known is not None:
                for c in set(piece.text) - known - lacking.keys():
                    at = piece.text.index(c)
                    lacking[c] = (counts.characters + at, offset + at, piece.document)
            offset += len(piece.text)
            n_bytes = _utf8_len(piece.text)
            counts.documents += piece.starts_document
            counts.characters += len(piece.text)
            counts.text_bytes += n_bytes
            bar.update(n_bytes)
            if kind == "char":
                chars.update(piece.text)
            elif kind == "bpe" and (train_bytes is None or fed < train_bytes):
                fed += n_bytes
                yield piece.text

    try:
        if kind == "bpe":
            return train_bpe(texts(), vocab_size)
        for _ in texts():
            pass
    finally:
        bar.close()
    if kind == "char":
        if len(chars) > MAX_VOCAB:  # char_tokenizer's own error names neither the input nor a remedy
            raise PrepareError(f"{corpus.description}: has {len(chars):,} distinct characters, more than the "
                               f"{MAX_VOCAB:,} ids --tokenizer char can store (token shards hold uint16 ids); "
                               f"use --tokenizer bpe, whose byte-level vocabulary covers any text")
        return char_tokenizer(chars) if chars else None  # None: empty corpus, reported by the caller
    if lacking:
        raise PrepareError(f"{corpus.description}: {_plural(len(lacking), 'character')} not in the char vocabulary "
                           f"of {given}: {_first_seen(lacking)}. A model trained on that vocabulary has no id for "
                           f"them: take them out of the text (or map them to characters it has)")
    return tokenizer


def _first_seen(lacking: dict[str, tuple[int, int, str]], show: int = 8) -> str:
    """"'é' (U+00E9) in a.txt at character 1,204, 'ü' (U+00FC) at 1,310, ...": the characters
    where each first occurs, in the corpus's order, each document named once."""
    said, where = [], None
    for c, (_, at, document) in sorted(lacking.items(), key=lambda item: item[1][0])[:show]:
        place = f"at {at:,}" if document == where else f"in {document or 'the text'} at character {at:,}"
        said.append(f"{c!r} (U+{ord(c):04X}) {place}")
        where = document
    return ", ".join(said) + (f" and {len(lacking) - show} more" if len(lacking) > show else "")


# ---- pass two: encoding and routing ---------------------------------------------------------
def _encode_corpus(corpus: Corpus, tok: Tokenizer, writers: dict[str, ShardWriter], counts: _Counts,
                   val_rule: str, val_fraction: float, val_chunk_tokens: int, seed: int,
                   progress: bool) -> None:
    """Encode the corpus (read a second time) into the writers; `counts` is what pass one read.
    A char vocabulary holds every character that read found (built from them, or, given, checked
    against them), so a character it lacks here means the corpus changed."""
    bar = progress_bar("encoding", counts.text_bytes, "B", progress)
    pieces = corpus.iter_pieces()
    if val_rule == "tail":
        labelled = _tail_split(pieces, int(counts.characters * (1 - val_fraction)))
        route = lambda ids, split: writers[split].write(ids)  # noqa: E731
    else:
        labelled = ((piece, None) for piece in pieces)
        route = _ChunkRouter(writers, val_chunk_tokens, val_fraction, seed).write
    eos = None if tok.eos_id is None else np.array([tok.eos_id], dtype=np.uint16)
    # A corpus that is not what pass one read (a file still being written, a streamed dataset
    # updated on the hub) would give shards that disagree with meta.json's counts, a tail split
    # off its fraction, or characters the char vocabulary lacks.
    changed = (f"{corpus.description}: changed between data prep's two reads of it (a file still being "
               f"written, or documents that can be read only once?); run the prep again once nothing "
               f"writes to the input")
    read = _Counts()
    try:
        for piece, split, ids in _encoded(tok, labelled, changed):
            read.documents += piece.starts_document
            read.characters += len(piece.text)
            if piece.starts_document and eos is not None:
                route(eos, split)
            route(ids, split)
            bar.update(_utf8_len(piece.text))
    finally:
        bar.close()
    if (read.documents, read.characters) != (counts.documents, counts.characters):
        raise PrepareError(f"{changed} (first {_plural(counts.characters, 'character')} in "
                           f"{_plural(counts.documents, 'document')}, then {read.characters:,} in {read.documents:,})")


def _encoded(tok: Tokenizer, labelled: Iterator[tuple[Piece, str | None]], unknown: str = "cannot encode it"
             ) -> Iterator[tuple[Piece, str | None, np.ndarray]]:
    """(piece, split, ids) for each labelled piece, in order.

    Byte-level BPE goes through the word cache in worker processes (gpt/wordcache.py: ~10x the
    tokenizers pipeline on ASCII text, the same ids); anything else through `encode_batch`,
    which runs the Rust pipeline on all cores. A character a char vocabulary lacks is a
    PrepareError that starts with `unknown`.

    The pieces' cuts are exact for GPT-2's pre-tokenizer and for characters alone
    (gpt/sources.py). Any other tokenizer (one reused with --tokenizer-from: a Metaspace BPE
    merged "US:\n" across a cut, and put a "▁" at the start of every piece) encodes each
    document whole (`_whole_documents`): its text is held in memory at once."""
    if word_cache_applies(tok.inner):
        pending: deque[tuple[Piece, str | None]] = deque()  # pieces handed out, not yet encoded

        def texts() -> Iterator[str]:
            for item in labelled:
                pending.append(item)
                yield item[0].text

        try:
            for ids in encode_pieces(tok.inner, texts()):
                piece, split = pending.popleft()
                yield piece, split, ids
        except WorkerDied as e:
            raise PrepareError(f"{e}; nothing was written. Run the prep again, with more memory if the "
                               f"system log (dmesg) says the out-of-memory killer ended it") from None
        return
    if tok.kind != "char":
        labelled = _whole_documents(labelled)
    for batch in _batches(labelled, BATCH_CHARS):
        try:
            arrays = tok.encode_batch_arrays([piece.text for piece, _ in batch])
        except ValueError as e:  # the char tokenizer's: the characters, but not the corpus
            raise PrepareError(f"{unknown}: {e}") from None
        for (piece, split), ids in zip(batch, arrays):
            yield piece, split, ids


def _whole_documents(labelled: Iterator[tuple[Piece, str | None]]) -> Iterator[tuple[Piece, str | None]]:
    """The pieces of each document joined back into one, as long as they go to one split (the
    tail rule's cut between train and val stays a cut, as in nanoGPT's split)."""
    parts: list[Piece] = []
    split = None
    for piece, label in labelled:
        if parts and (piece.starts_document or label != split):
            yield parts[0]._replace(text="".join(p.text for p in parts)), split
            parts = []
        parts.append(piece)
        split = label
    if parts:
        yield parts[0]._replace(text="".join(p.text for p in parts)), split


def _utf8_len(text: str) -> int:
    # str.isascii() is O(1) in CPython; encoding 100 MB just to count it is not free.
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _batches(labelled, batch_chars: int) -> Iterator[list[tuple[Piece, str | None]]]:
    batch, size = [], 0
    for item in labelled:
        batch.append(item)
        size += len(item[0].text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _tail_split(pieces: Iterator[Piece], train_chars: int) -> Iterator[tuple[Piece, str]]:
    """Label pieces train until `train_chars` characters have passed, val after (cutting one piece)."""
    seen = 0
    for piece in pieces:
        n = len(piece.text)
        if seen + n <= train_chars:
            yield piece, "train"
        elif seen >= train_chars:
            yield piece, "val"
        else:
            cut = train_chars - seen
            yield Piece(piece.text[:cut], piece.starts_document, piece.document), "train"
            yield Piece(piece.text[cut:], False, piece.document), "val"
        seen += n


class _ChunkRouter:
    """Sends the token stream, chunk by chunk, to train or val (val_rule "chunks")."""

    def __init__(self, writers: dict[str, ShardWriter], chunk_tokens: int, val_fraction: float, seed: int):
        self.writers = writers
        self.chunk_tokens = chunk_tokens
        self.fraction = val_fraction
        self.phase = random.Random(seed).random()
        self.position = 0  # tokens routed so far

    def is_val(self, chunk: int) -> bool:
        return math.floor((chunk + 1) * self.fraction + self.phase) > math.floor(chunk * self.fraction + self.phase)

    def write(self, ids: np.ndarray, _split=None) -> None:
        while ids.size:
            chunk, offset = divmod(self.position, self.chunk_tokens)
            take = ids[: self.chunk_tokens - offset]
            self.writers["val" if self.is_val(chunk) else "train"].write(take)
            self.position += take.size
            ids = ids[take.size :]


def _describe_rule(val_rule: str, val_fraction: float, val_chunk_tokens: int, seed: int) -> str:
    if val_rule == "tail":
        return f"tail: the last {val_fraction:g} of the corpus characters is val"
    return (f"chunks: token stream cut into chunks of {val_chunk_tokens} tokens; chunk i is val iff "
            f"floor((i+1)*{val_fraction:g} + phase) > floor(i*{val_fraction:g} + phase), "
            f"phase = random.Random({seed}).random()")


# ---- output ---------------------------------------------------------------------------------
@contextmanager
def _writing(name: Path, out_dir: Path) -> Iterator[None]:
    """Name the file in a write error: a full disk raised a bare "[Errno 28] No space left on
    device" (the OSError of a write() carries no file name). Both files written under it go
    into the staging folder first, so whatever out_dir held is still there."""
    try:
        yield
    except OSError as e:
        raise PrepareError(f"could not write {name.name} of the new dataset ({e.strerror or e}): is the "
                           f"disk full or {out_dir} not writable? Nothing in {out_dir} was changed") from e


def _publish(staging: Path, out_dir: Path, meta: dict) -> None:
    """Move the finished dataset from staging into out_dir; meta.json last, atomically.

    meta.json is written (into staging) before anything old is removed: from then on only
    unlinks and renames remain, which need no disk space, so a disk that fills up cannot strike
    between removing the old dataset and completing the new one.
    """
    pending = staging / (META_FILE + ".pending")
    with _writing(out_dir / META_FILE, out_dir), open(pending, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    # Stopped between the first unlink and the last rename, neither the old dataset nor the new
    # one would be whole (and the staging folder's removal would take the new one's files):
    # Ctrl-C and SIGTERM wait for the last rename.
    held = HeldSignals((signal.SIGINT, signal.SIGTERM))
    try:
        (out_dir / META_FILE).unlink(missing_ok=True)  # first: a half-replaced folder is never "complete"
        for old in dataset_files(out_dir):
            old.unlink()
        for path in sorted(staging.iterdir()):
            if path != pending:
                os.replace(path, out_dir / path.name)
        os.replace(pending, out_dir / META_FILE)
    except BaseException:
        held.release()
        raise
    try:
        held.release()
    except KeyboardInterrupt:  # a Ctrl-C held until now: the new dataset is in place
        raise InterruptedAfterPublish from None


class InterruptedAfterPublish(KeyboardInterrupt):
    """Ctrl-C while the new dataset's files were being moved into place: held until they were,
    so --out holds the new dataset, whole."""


def _format_summary(s: dict) -> str:
    t, shards = s["tokens"], s["shards"]
    return (
        f"prepared {s['out_dir']}: {_plural(s['documents'], 'document')}, {s['text_bytes'] / 1e6:,.1f} MB of text "
        f"-> train {t['train']:,} tokens ({_plural(len(shards['train']), 'shard')}), val {t['val']:,} "
        f"tokens ({_plural(len(shards['val']), 'shard')}); {s['bytes_per_token']:.2f} bytes/token; {s['tokenizer']} "
        f"vocabulary {s['vocab_size']:,}{' from ' + s['tokenizer_from'] if 'tokenizer_from' in s else ''}; "
        f"{s['seconds']:.1f} s, {s['mb_per_s']:.2f} MB/s, "
        f"{s['tokens_per_s']:,} tokens/s"
    )


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


# ---- command line ---------------------------------------------------------------------------
def add_shared_options(parser: argparse.ArgumentParser, **defaults) -> None:
    """The options of the tokenizer, the split sizes and the output, which data_prep/shakespeare.py
    accepts too (so that the errors of prepare() name options both scripts take). `defaults`
    replaces a default by the option's name with _ (tokenizer="char"); help shows the one in use.
    """
    def opt(name: str, **kwargs):
        key = name[2:].replace("-", "_")
        if key in defaults:
            kwargs["default"] = defaults.pop(key)
        add_option(parser, name, **kwargs)

    # The tokenizer options' defaults sit in the namespace under other names (default_tokenizer,
    # ...), their own being None: an option given where it does not apply is told apart from its
    # default, and refused by tokenizer_options (--vocab-size with char; any with --tokenizer-from).
    chosen = {"tokenizer": "bpe", "vocab_size": 8192, "tokenizer_train_mb": TOKENIZER_TRAIN_BYTES / 1e6}
    chosen.update((key, defaults.pop(key)) for key in list(chosen) if key in defaults)
    parser.set_defaults(**{f"default_{key}": value for key, value in chosen.items()})
    add_option(parser, "--tokenizer", choices=["bpe", "char"], default=None,
               help=f"bpe: byte-level BPE trained on the corpus; char: one id per distinct character "
                    f"(default: {chosen['tokenizer']})")
    add_option(parser, "--tokenizer-from", type=path_arg, metavar="PATH",
               help="reuse a tokenizer instead of building one, so that the ids are those a model trained "
                    "with it reads (to fine-tune it on this text, or evaluate it): a tokenizer.json, a prepared "
                    "dataset folder, a training run or checkpoint folder, or a Hugging Face model folder")
    add_option(parser, "--vocab-size", type=int, default=None, metavar="N",
               help=f"BPE vocabulary size, end-of-text included, at most {MAX_VOCAB} (default: "
                    f"{chosen['vocab_size']}); --tokenizer bpe only: a char vocabulary is sized by the corpus")
    opt("--val-fraction", type=float, default=0.01, metavar="F",
        help="share of the corpus held out for validation (default: %(default)s)")
    opt("--min-val-tokens", type=int, default=1025, metavar="N",
        help="fewest tokens a split may have; at least block_size + 1 (default: %(default)s)")
    opt("--shard-tokens", type=int, default=100_000_000, metavar="N",
        help="tokens per shard file (default: %(default)s)")
    add_option(parser, "--tokenizer-train-mb", type=float, default=None, metavar="MB",
               help=f"train BPE on about this many MB of text, from the start of the corpus; raise it for "
                    f"large vocabularies, inf for all of it (default: {chosen['tokenizer_train_mb']:g})")
    opt("--encoding-errors", choices=ENCODING_ERRORS, default="strict",
        help="non-UTF-8 bytes in input files: strict = stop with an error naming file and byte "
             "offset (default); replace = use U+FFFD; skip = leave the file out, with a warning")
    opt("--overwrite", action="store_true", help="replace a dataset already in --out")
    opt("--no-progress", action="store_true", help="no progress bars (the closing summary is still printed)")
    if defaults:
        raise TypeError(f"add_shared_options: no such option: {', '.join(defaults)}")


def tokenizer_options(args: argparse.Namespace) -> dict:
    """prepare()'s `tokenizer`, `vocab_size` and `tokenizer_train_bytes` from the command line.

    An option given where it does not apply is an error rather than ignored: --vocab-size and
    --tokenizer-train-mb with --tokenizer char (a char vocabulary is one id per distinct character
    of the corpus, never trained), and all three with --tokenizer-from (that tokenizer is reused
    whole). Call it before reading anything, so that nothing is written."""
    if args.tokenizer_from is not None:
        given = [name for name, value in (("--tokenizer", args.tokenizer), ("--vocab-size", args.vocab_size),
                                          ("--tokenizer-train-mb", args.tokenizer_train_mb)) if value is not None]
        if given:
            raise PrepareError(f"{', '.join(given)} cannot be used with --tokenizer-from: that tokenizer is "
                               f"reused as it is, vocabulary and all; drop {'it' if len(given) == 1 else 'them'}")
        reused_tokenizer(args.tokenizer_from)  # here: a wrong path is said before any download or read
        return {"tokenizer": Path(args.tokenizer_from)}
    kind = args.tokenizer or args.default_tokenizer
    return {"tokenizer": kind, "vocab_size": _vocab_size_option(args, kind),
            "tokenizer_train_bytes": _train_bytes_option(args, kind)}


def _train_bytes_option(args: argparse.Namespace, kind: str) -> int | None:
    """--tokenizer-train-mb in bytes: None for inf (train on the whole corpus).

    int() of inf raised OverflowError, which the CLIs' error handling does not catch (a
    traceback), and of nan a ValueError that named no option."""
    if kind != "bpe":
        if args.tokenizer_train_mb is not None:
            raise PrepareError(f"--tokenizer-train-mb cannot be used with --tokenizer {kind}: a {kind} vocabulary "
                               f"is not trained (one id per distinct character of the corpus); drop it")
        return None
    mb = args.default_tokenizer_train_mb if args.tokenizer_train_mb is None else args.tokenizer_train_mb
    if not mb > 0:  # nan too; a BPE trained on no text has no merges
        raise PrepareError(f"--tokenizer-train-mb must be a positive number of MB, got {mb:g}; use inf to "
                           f"train BPE on the whole corpus")
    nbytes = mb * 1e6  # 1e305 MB overflows to inf here
    return None if math.isinf(nbytes) else max(1, math.ceil(nbytes))  # 1e-9 MB is still some text


def _vocab_size_option(args: argparse.Namespace, kind: str) -> int | None:
    """--vocab-size: the one given, else the BPE default; None with --tokenizer char, where a
    --vocab-size given is an error (it was ignored)."""
    if kind == "char":
        if args.vocab_size is not None:
            # The BPE alternative only where that size is one BPE takes: it was advised for 100,
            # which BPE then refused in turn.
            bpe = (", or use --tokenizer bpe" if MIN_BPE_VOCAB <= args.vocab_size <= MAX_VOCAB else
                   f" (or use --tokenizer bpe with a --vocab-size from {MIN_BPE_VOCAB} to {MAX_VOCAB:,}: 256 bytes + "
                   f"end-of-text at least, uint16 token ids at most)")
            raise PrepareError(f"--vocab-size {args.vocab_size} cannot be used with --tokenizer char: a char "
                               f"vocabulary is sized by the corpus (one id per distinct character); "
                               f"drop --vocab-size{bpe}")
        return None
    return args.default_vocab_size if args.vocab_size is None else args.vocab_size


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python data_prep/prepare.py",
        description="Tokenize a text corpus into token shards (train_*.bin, val_*.bin), "
                    "tokenizer.json and meta.json. Every option is accepted as --name=value or "
                    "--name value, spelled with - or _.",
        allow_abbrev=False,
    )

    def opt(name: str, **kwargs):
        add_option(p, name, **kwargs)

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", action="extend", type=path_arg, metavar="PATH",
                     help="text files or folders (walked recursively, sorted, links followed, hidden "
                          "files and folders left out); each file is one document; repeated --input adds up")
    src.add_argument("--source", choices=["stdlib"],
                     help="a named corpus: stdlib = this Python's standard library .py files (no download)")
    src.add_argument("--hf-dataset", "--hf_dataset", metavar="NAME", type=path_arg,
                     help="a Hugging Face dataset: a hub name, a builder (json, parquet, text, csv) with "
                          "--hf-data-files, or a local data file or folder (one written by save_to_disk too); local "
                          ".txt files are read as --input reads them (each file one document, line endings kept)")
    opt("--hf-config", metavar="C", help="dataset configuration (subset) name")
    opt("--hf-split", default="train", metavar="S", help="dataset split to read (default: train)")
    opt("--hf-data-files", nargs="+", action="extend", metavar="FILE", type=path_arg,
        help="data files for a builder such as json or parquet (repeated: all of them)")
    opt("--text-field", default="text", metavar="NAME", help="column holding the text (default: text)")
    opt("--streaming", action="store_true", help="stream the dataset instead of downloading/caching it whole")
    opt("--out", required=True, type=path_arg, metavar="DIR", help="dataset folder to write")
    opt("--val-rule", choices=VAL_RULES, default="chunks",
        help="chunks: every 1/F-th chunk of tokens, spread evenly (default); tail: the last F of the text")
    opt("--val-chunk-tokens", type=int, default=8192, metavar="N",
        help="chunk size of the chunks rule, in tokens (default: 8192)")
    opt("--seed", type=int, default=0, metavar="S", help="seed of the train/val split (default: 0)")
    add_shared_options(p)
    return p


def _check_hf_options(args: argparse.Namespace) -> None:
    """The --hf-* options, --text-field and --streaming only with --hf-dataset: with --input they were
    ignored without a word (--input rows.jsonl --text-field body trained on the JSON syntax).
    And --encoding-errors only with --input, the files this prep decodes itself: with --hf-dataset
    it was ignored, and the error for a file not in UTF-8 then said to pass it."""
    if args.encoding_errors != "strict" and not args.input:
        instead = ("datasets decodes --hf-dataset's files itself; for text files that are not all UTF-8 use "
                   "--input FOLDER" if args.hf_dataset is not None else "--source stdlib is read as it is")
        raise PrepareError(f"--encoding-errors applies to --input only (the text files this prep decodes); {instead}")
    if args.hf_dataset is not None:
        return
    given = [name for name, value, default in (
        ("--hf-config", args.hf_config, None), ("--hf-split", args.hf_split, "train"),
        ("--hf-data-files", args.hf_data_files, None), ("--text-field", args.text_field, "text"),
        ("--streaming", args.streaming, False)) if value != default]
    if given:
        source = "--input (each file read as plain text, one document)" if args.input else "--source"
        raise PrepareError(f"{', '.join(given)}: {'applies' if len(given) == 1 else 'apply'} to --hf-dataset only, "
                           f"not to {source}; for the rows of a json, parquet or csv file use "
                           f"--hf-dataset FILE")


def corpus_from_args(args: argparse.Namespace) -> Corpus:
    if args.input:
        return LocalFiles(args.input, errors=args.encoding_errors)
    if args.source:
        return resolve_source(args.source)
    return HFDataset(args.hf_dataset, config=args.hf_config, split=args.hf_split, text_field=args.text_field,
                     streaming=args.streaming, data_files=args.hf_data_files)


def run_prep(out: str | Path, prep: Callable[[], object]) -> int:
    """A data_prep command's exit status for prep(), which writes the dataset `out`: 0 once done;
    bad input (2), Ctrl-C or SIGTERM (130) and running out of memory (1) are one line on stderr, no
    traceback. prepare() removes its staging folder and lock on every failure, so `out` is as it
    was (SIGTERM's default action left them). Warnings (a file skipped) are one `warning:` line
    each, not Python's two lines with the source line."""
    try:
        with warnings.catch_warnings(), terminate_as_interrupt():
            warnings.showwarning = _show_warning
            prep()
    except (ValueError, OSError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except InterruptedAfterPublish:
        print(f"\ninterrupted as the new dataset was being moved into place: it was finished first, and "
              f"{out} holds it, whole", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\ninterrupted: nothing was written to {out}", file=sys.stderr)
        return 130
    except BaseException as e:
        if not ran_out_of_memory(e):
            raise
        print(f"error: {out_of_memory_message(e, out)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def prep() -> None:
        tokenizer = tokenizer_options(args)  # first: an error here reads and writes nothing
        _check_hf_options(args)
        prepare(
            args.out, corpus_from_args(args), **tokenizer,
            val_fraction=args.val_fraction, val_rule=args.val_rule,
            val_chunk_tokens=args.val_chunk_tokens, min_val_tokens=args.min_val_tokens,
            seed=args.seed, shard_tokens=args.shard_tokens,
            encoding_errors=args.encoding_errors, overwrite=args.overwrite,
            progress=not args.no_progress, log=report,
        )

    return run_prep(args.out, prep)


def ran_out_of_memory(error: BaseException) -> bool:
    """Python's MemoryError, or a panic in tokenizers' Rust code (pyo3's PanicException, a
    BaseException), which is how it fails to start its thread pool under a memory limit."""
    return isinstance(error, MemoryError) or type(error).__name__ == "PanicException"


def out_of_memory_message(error: BaseException, out: str | os.PathLike) -> str:
    what = "data prep ran out of memory" if isinstance(error, MemoryError) else \
        f"the tokenizers library failed ({str(error).splitlines()[0] if str(error) else type(error).__name__}; " \
        f"under a memory limit such as ulimit -v, that is it running out of memory)"
    return (f"{what}; nothing was written to {out}. Run it with more memory (with "
            f"--tokenizer bpe, a smaller --tokenizer-train-mb also trains the vocabulary on less text)")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)
