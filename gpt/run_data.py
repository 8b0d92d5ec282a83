"""The dataset a training run reads: found in data_dir, prepared there when it is missing (the
embedded corpus, in the vocabulary of the model the run starts from, if it starts from one), and
opened as the run's train and val loaders after the checks that would otherwise fail only later
(ids outside the vocabulary, a split too small for one window, files of different preps).

The trainer calls `ensure_dataset`, then `open_loaders`; gpt/dataset.py reads a dataset folder
and gpt/prepare.py makes one.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from . import hf
from .config import TrainConfig
from .console import say
from .dataset import (beside, check_is_folder, check_token_ids, dataset_files, load_meta, prep_command,
                      prepare_again, tokenizer_flag, wait_for_prep)
from .distributed import DistInfo, barrier, log
from .loader import TokenLoader
from .run_layout import training_output, typo_of
from .shards import ShardError
from .tokenizer import read_vocab


def ensure_dataset(config: TrainConfig, info: DistInfo) -> dict[str, Any]:
    """Load the dataset's metadata, preparing the embedded default corpus if it is missing.

    Only into a folder holding no dataset file: a half-copied dataset gets load_meta's error,
    which names what is missing, rather than a prep that would refuse it."""
    data_dir = Path(config.data_dir)
    tokenizer = _prep_tokenizer(config)  # for the prep commands the errors give
    check_is_folder(data_dir, tokenizer)
    if not dataset_files(data_dir) and config.prepare_source != "none":
        check_no_other_files(data_dir, config, tokenizer)
        if info.is_main:
            _prepare_default(config, data_dir, tokenizer)  # (it waits for another prep of the folder itself)
        barrier(info)
    else:
        # A prep replacing the dataset right now: read it once done. (Not before the test above:
        # a rank that waited for rank 0's own prep of a new folder would skip its barrier.)
        wait_for_prep(data_dir, lambda message: log(info, message))
    return load_meta(data_dir, tokenizer)


def check_no_other_files(data_dir: Path, config: TrainConfig, tokenizer: str | Path) -> None:
    """The default corpus is prepared only into a new or empty folder. A newcomer's
    --data_dir is often the folder of their own text: the stdlib's 30 MB went in beside it, the
    run trained on Python code, and the folder was then refused as input (it held a dataset).
    `tokenizer`: `_prep_tokenizer`'s, for the prep command the error gives."""
    if not data_dir.is_dir() or training_output(data_dir) is not None:
        return  # new; or a run given as the dataset, which the prep refuses with its own words
    others = sorted(p.name for p in data_dir.iterdir() if not p.name.startswith("."))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        made = beside(data_dir, "_prepared")
        # prep's default split holds out one 8,192-token chunk in 100: a corpus of a few MB may get
        # none (an error), so a small one is told to hold out its last tenth, as nanoGPT does, and
        # to ask no more of it than this run's windows need (prep's default is 1,025 tokens).
        split = ""
        if _smaller_than(data_dir, SMALL_CORPUS_BYTES):
            split = " --val-rule tail --val-fraction 0.1" + (
                f" --min-val-tokens {config.block_size + 1}" if config.block_size + 1 < 1025 else "")
        raise ShardError(
            f"{data_dir} holds no dataset but other files ({shown}); the '{config.prepare_source}' corpus is "
            f"prepared only into a new or empty folder. To train on your own text there, prepare it first: "
            f"{prep_command()} --input {shlex.quote(str(data_dir))}{tokenizer_flag(tokenizer)}{split} --out "
            f"{shlex.quote(str(made))}, then train with --data_dir {shlex.quote(str(made))}")


SMALL_CORPUS_BYTES = 10_000_000


def _smaller_than(folder: Path, limit: int) -> bool:
    """Whether the files under `folder` (hidden ones left out, as prep does) hold fewer than
    `limit` bytes, walking no further than it takes to tell."""
    total = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                with contextlib.suppress(OSError):
                    total += os.path.getsize(os.path.join(root, name))
                if total >= limit:
                    return False
    return True


def _prepare_default(config: TrainConfig, data_dir: Path, tokenizer: str | Path) -> None:
    """Prepare config.prepare_source's corpus into data_dir with `tokenizer` (`_prep_tokenizer`'s)."""
    from .prepare import PrepareError, prepare  # here: only this path needs the tokenizer trainer

    # Said in full: a mistyped --data_dir also lands here, and would train on this corpus.
    state = "holds no dataset" if data_dir.is_dir() else "does not exist"
    if isinstance(tokenizer, Path):
        what = f"the tokenizer of {tokenizer}, the model this run starts from: the only vocabulary it reads"
    elif config.init_from.startswith(hf.HF_PREFIX):
        # Any vocabulary built here would be another than the model's: refused, after the prep.
        folder = hf.parse_init_from(config.init_from)  # a folder that is not there: said so
        raise hf.HFError(f"{data_dir} {state}, and init_from = {config.init_from!r} has no {ckpt.TOKENIZER_FILE}, "
                         f"so no dataset can be prepared in the vocabulary its model reads: put the tokenizer.json of "
                         f"the data it was trained on into {folder}, or give a data_dir prepared with that tokenizer "
                         f"(data_prep/prepare.py --tokenizer-from FILE)")
    else:  # A char vocabulary's size is the corpus's count of distinct characters, known only later.
        what = tokenizer + (f", vocab {config.prepare_vocab_size}" if tokenizer == "bpe" else "")
    meant = typo_of(data_dir, ("meta.json",))
    # Ctrl-C twice: a first one during set-up lets the run train one step and save a checkpoint
    # (gpt/stop.py), which a rerun in this out_dir would then resume, on the wrong tokenizer.
    typo = (f" (did you mean {meant}, the dataset beside it? Then press Ctrl-C, and again once it "
            f"answers, which stops this run before it saves anything; and give that data_dir)" if meant is not None else "")
    say(f"{data_dir} {state}{typo}; preparing the '{config.prepare_source}' corpus there "
        f"({what}; prepare_source = 'none' makes a missing dataset an error instead)")
    try:
        prepare(out_dir=data_dir, source=config.prepare_source, tokenizer=tokenizer,
                vocab_size=config.prepare_vocab_size, log=say)
    except PrepareError:
        # Another run started on the same new data_dir may be preparing it (prep locks the
        # folder) or have just done so: wait for that prep to end and train on its dataset.
        if not data_dir.is_dir():
            raise
        wait_for_prep(data_dir, say)
        if not (data_dir / "meta.json").exists():
            raise
        say(f"{data_dir} was prepared by another process meanwhile; training on that dataset")


def _prep_tokenizer(config: TrainConfig) -> str | Path:
    """The tokenizer a dataset prepared for this run needs: that of the model it starts from,
    whose path prep takes as --tokenizer-from (the model reads only ids of its own vocabulary):
    out_dir, where it holds a checkpoint to resume (its dataset gone: a new BPE was refused by
    the resume after the prep's minutes), else init_from's; and otherwise prepare_tokenizer's kind."""
    # A broken `latest` raises here, before any prep: a dataset made with another tokenizer would
    # stay, and be refused once `latest` was mended.
    if config.resume == "auto" and ckpt.latest_checkpoint(config.out_dir) is not None:
        return Path(config.out_dir)
    return _init_from_tokenizer(config) or config.prepare_tokenizer


def _init_from_tokenizer(config: TrainConfig) -> Path | None:
    """The tokenizer of the model `init_from` names, for a dataset prepared for it: a run or
    checkpoint folder (prep finds its tokenizer.json), or the tokenizer.json of an hf:DIR folder.
    None without init_from, or where it names neither (its own check says what is wrong)."""
    if not config.init_from:
        return None
    if config.init_from.startswith(hf.HF_PREFIX):
        # Not parse_init_from, which refuses a folder gone: a resumed run no longer reads it.
        file = Path(config.init_from[len(hf.HF_PREFIX):]).expanduser() / ckpt.TOKENIZER_FILE
        return file if file.is_file() else None
    folder = Path(config.init_from).expanduser()
    return folder if folder.is_dir() and training_output(folder) is not None else None


def open_loaders(config: TrainConfig, meta: dict[str, Any],
                 info: DistInfo) -> tuple[TokenLoader, TokenLoader, bytes | None]:
    """The run's (train, val) loaders and the dataset's tokenizer.json (its bytes, which every
    checkpoint carries; None if the dataset has none), after refusing data that would fail only later, before
    any training time is spent: token ids outside the vocabulary, a split missing or too small
    for one block (for val, the first eval would find out after training). A train split smaller
    than one batch is allowed, with a note.

    Each split is opened once: its memory maps keep the files of the start, so a dataset
    prepared again into data_dir during the run (prepare.py replaces files by renaming) changes
    neither what the run trains on, nor what it evaluates on, nor the vocabulary its checkpoints
    carry (read here, once). Val is read in random order (seeded
    with config.seed) whatever data_order says: `evaluate` rewinds it to the same windows.
    """
    data_dir = Path(config.data_dir)
    # Every checkpoint copies the dataset's tokenizer.json, and sample.py decodes with it: one
    # that does not load, or holds another vocabulary, would show only when sampling.
    tokenizer_file = data_dir / "tokenizer.json"
    try:
        tokenizer_json = ckpt.read_tokenizer_json(tokenizer_file)
    except OSError:  # a folder of that name, no permission: "cannot be loaded" below
        tokenizer_json = b""
    if tokenizer_json is not None:
        vocab = read_vocab(tokenizer_json)
        if vocab is None or len(vocab) != meta["vocab_size"]:
            what = "cannot be loaded" if vocab is None else f"holds {len(vocab):,} ids"
            raise ShardError(
                f"{tokenizer_file} {what}, but {data_dir / 'meta.json'} says vocab_size "
                f"{meta['vocab_size']:,}: the folder mixes files of different preps. Copy the dataset "
                f"whole from where it came from, or make it again {prepare_again(data_dir, meta)}"
            )
    # Each loader takes the shards meta.json lists, all of them (gpt/dataset.py split_shards).
    loaders = {split: TokenLoader(data_dir, split, config.batch_size, config.block_size, rank=info.rank,
                                  world_size=info.world_size, seed=config.seed, device=info.device,
                                  order=config.data_order if split == "train" else "random",
                                  vocab_size=meta["vocab_size"])
               for split in ("train", "val")}
    paths = loaders["train"].shard_paths + loaders["val"].shard_paths
    # Each rank scans its share; a rank that finds a bad id fails, and torchrun stops the others.
    check_token_ids(paths[info.rank :: info.world_size], meta["vocab_size"])
    # A batch's windows are block_size + 1 tokens each, block_size apart: one batch needs one
    # token more than batch x block_size (at exactly that many, one window came round twice).
    train_tokens = loaders["train"].num_tokens
    batch_tokens = config.batch_size * config.block_size * info.world_size
    if loaders["train"].windows_per_epoch < config.batch_size * info.world_size:
        log(info, f"note: the train split has {train_tokens:,} tokens, too few for one batch "
                  f"({config.batch_size} x {config.block_size} x {info.world_size} processes = "
                  f"{batch_tokens:,}, and one more for the last target): windows repeat within every batch")
    return loaders["train"], loaders["val"], tokenizer_json
