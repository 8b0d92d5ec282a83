"""Evaluate a model on a prepared dataset split: loss, perplexity and bits per byte.

    python -m gpt.eval RUN [--split val] [--data_dir DIR] [--max_batches N] [--batch_size B]
                           [--block_size T] [--device D] [--dtype P]

RUN is a run folder (its latest checkpoint), a checkpoint folder, or `hf:DIR` (a local
Hugging Face GPT-2 folder, with --data_dir). The dataset defaults to the one the run trained on.

Which tokens are scored: the split's token stream s_0 .. s_{n-1} (all shards in order) is cut
into consecutive windows of T = block_size predictions; window k reads s[kT .. kT+T] and
predicts s[kT+1 .. kT+T], each from the tokens before it in the same window. So every token
but the first is scored exactly once (the last window may be shorter), and --max_batches N
stops after the first N batches. Unlike the trainer's val loss (a fixed sample of random
windows), this is the whole split.

Formulas, over the N scored tokens t_i, and the B bytes of UTF-8 text they decode to:
    loss          = L / N,  where L = sum_i -ln p(t_i | context)   (nats per token)
    perplexity    = exp(loss)
    bits per byte = L / (ln 2 * B)  = loss * N / (ln 2 * B)
Bits per byte measure the same thing for any tokenizer (a model that packs more text per token
pays for it with more nats per token), so runs with char and BPE vocabularies compare. Bytes
are counted exactly per token: a char token is its character's UTF-8 bytes, a byte-level BPE
token one byte per character of its string. End-of-text tokens count 0 bytes: they are not
text of the corpus (prep inserts them between documents), though predicting them costs nats.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m` this tool: a Ctrl-C while torch imports is one line too
    from gpt.early_signals import ImportInterrupted

    ImportInterrupted.install("interrupted: stopped before evaluating")

import argparse
import contextlib
import json
import shlex
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .config import ArgumentParser, ConfigError, add_option, path_arg
from .console import write_result
from .hf import HF_PREFIX, load_hf_model, parse_init_from
from .model import GPT
from .progress import progress_bar
from .dataset import load_meta, load_tokenizer, prepare_with_tokenizer_of, split_shards
from .shards import ShardError, open_shard, read_header
from .tokenizer import TOKENIZER_FILE, Tokenizer


@dataclass
class EvalResult:
    split: str
    tokens: int  # N: tokens scored
    bytes: int  # B: UTF-8 bytes those tokens decode to
    nats: float  # L: summed negative log-likelihood
    loss: float  # L / N
    perplexity: float  # exp(loss)
    bits_per_byte: float  # L / (ln 2 * B)

    def format(self) -> str:
        return (f"split {self.split}: {self.tokens:,} tokens, {self.bytes:,} bytes\n"
                f"loss           {self.loss:.4f} nats/token\n"
                f"perplexity     {self.perplexity:.3f}\n"
                f"bits per byte  {self.bits_per_byte:.4f}")


# ----------------------------------------------------------------------------------------
# Tokens and bytes


def stream_windows(paths: Sequence[Path], block_size: int) -> Iterator[np.ndarray]:
    """Consecutive windows of block_size + 1 tokens over the shards' joined stream, each one
    starting at the last token of the previous one; the final window may be shorter."""
    carry = np.empty(0, dtype=np.uint16)
    for path in paths:
        tokens = open_shard(path)
        start = 0
        while True:
            piece = tokens[start : start + block_size + 1 - len(carry)]
            start += len(piece)
            window = np.concatenate([carry, piece])
            if len(window) < block_size + 1:  # this shard is used up; the window continues in the next
                carry = window
                break
            yield window
            carry = window[-1:]
    if len(carry) > 1:
        yield carry


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of text each id stands for (int64 [vocab]); special tokens count 0."""
    inner = tokenizer.inner
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    if tokenizer.kind == "char":
        for token, i in inner.get_vocab(with_added_tokens=False).items():
            lengths[i] = len(token.encode("utf-8"))
        return lengths
    decoder = json.loads(inner.to_str()).get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        # A foreign tokenizer.json (a Metaspace BPE, say) loads, but its tokens are not bytes: a
        # ValueError here was a traceback.
        raise ConfigError(f"bits per byte need a byte-level tokenizer (a char one, or byte-level BPE "
                          f"as data_prep/prepare.py trains); this {tokenizer.kind} tokenizer's decoder is "
                          f"{decoder.get('type')!r}")
    # Byte-level BPE writes each byte as one printable character, so a token's string has one
    # character per byte of text.
    for i in range(tokenizer.vocab_size):
        lengths[i] = len(inner.id_to_token(i))
    for i, added in inner.get_added_tokens_decoder().items():
        if added.special:
            lengths[i] = 0
    return lengths


# ----------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_split(model: GPT, data_dir: str | Path, tokenizer: Tokenizer, split: str = "val", *,
                   batch_size: int = 8, block_size: int | None = None, max_batches: int | None = None,
                   device: torch.device | str = "cpu", autocast=None, progress: bool = False) -> EvalResult:
    """Loss, perplexity and bits per byte of `model` on a whole split (module docstring).
    `progress`: a progress bar of the tokens scored (tqdm, on stderr)."""
    # `is not None`, not `or`: --block_size 0 must be refused, not read as the default.
    for name, value in (("block_size", block_size), ("batch_size", batch_size), ("max_batches", max_batches)):
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be positive, got {value}")
    block_size = block_size if block_size is not None else model.config.block_size
    if block_size > model.config.block_size:
        raise ConfigError(f"--block_size {block_size} is longer than the model's context "
                          f"({model.config.block_size})")
    paths = split_shards(data_dir, split)  # the ones meta.json lists, all of them
    byte_lengths = token_byte_lengths(tokenizer)
    device = torch.device(device)
    autocast = autocast or contextlib.nullcontext()
    model.eval()

    # Apple's MPS has no float64: its sum is kept on the CPU (one copy of a number per batch).
    nats = torch.zeros((), dtype=torch.float64, device="cpu" if device.type == "mps" else device)
    n_tokens = n_bytes = n_batches = 0
    # Every token but the split's first is a target once (the windows overlap by one token).
    targets_total = max(sum(read_header(p) for p in paths) - 1, 0)
    if max_batches is not None:
        targets_total = min(targets_total, max_batches * batch_size * block_size)
    bar = progress_bar(f"eval {split}", targets_total, "tok", progress)

    def score(windows: list[np.ndarray]) -> None:
        nonlocal n_tokens, n_bytes, n_batches
        stacked = np.stack(windows)
        # Before the model sees them: an id past the embedding's rows is an IndexError inside it
        # on a CPU (a device-side assert on a GPU), not this error.
        if int(stacked.max()) >= len(byte_lengths):
            raise ShardError(f"{data_dir}: token id {int(stacked.max())} in the {split} shards is outside the "
                             f"tokenizer's vocabulary ({len(byte_lengths)} ids): the shards were made with "
                             f"another tokenizer than this model's, or are corrupt")
        batch = torch.from_numpy(stacked.astype(np.int64)).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        with autocast:
            logits, _ = model(x)
        # Summed in fp32 per batch, accumulated in fp64: no drift over a long split.
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        nats.add_(nll.to(nats.device).double())
        targets = y.cpu().numpy()
        n_tokens += targets.size
        n_bytes += int(byte_lengths[targets].sum())
        n_batches += 1
        bar.update(targets.size)

    with bar:
        pending: list[np.ndarray] = []
        for window in stream_windows(paths, block_size):
            if max_batches is not None and n_batches >= max_batches:
                break
            if len(window) < block_size + 1:  # the short last window goes alone (rows need one length)
                if pending:
                    score(pending)
                    pending = []
                if max_batches is None or n_batches < max_batches:
                    score([window])
                break
            pending.append(window)
            if len(pending) == batch_size:
                score(pending)
                pending = []
        if pending and (max_batches is None or n_batches < max_batches):
            score(pending)
    if n_tokens == 0:
        raise ShardError(f"{data_dir}: the {split} split has fewer than 2 tokens; nothing to evaluate")

    total = nats.item()
    loss = total / n_tokens
    bpb = total / (math.log(2) * n_bytes) if n_bytes else float("nan")
    return EvalResult(split=split, tokens=n_tokens, bytes=n_bytes, nats=total, loss=loss,
                      perplexity=math.exp(loss), bits_per_byte=bpb)


# ----------------------------------------------------------------------------------------
# Loading what to evaluate


def load_for_eval(run: str, data_dir: str | None,
                  device: torch.device) -> tuple[GPT, Path, Tokenizer, dict[str, Any]]:
    """(model on `device`, dataset folder, the dataset's tokenizer, what was loaded) for a run or
    hf:DIR. What was loaded: {"checkpoint": its folder, "step": its step} (a run folder names
    its latest, which moves on while the run trains), or {"hf": the folder}."""
    hf_dir = parse_init_from(run)
    if hf_dir is not None:
        origin: dict[str, Any] = {"hf": str(hf_dir)}
        if data_dir is None:
            raise ConfigError(f"{run}: give --data_dir (a Hugging Face folder does not name its dataset)")
        model = load_hf_model(hf_dir, log=lambda m: print(m, file=sys.stderr))
        model_tokenizer = hf_dir / TOKENIZER_FILE
        own_tokenizer = _tokenizer_if_any(model_tokenizer)
    else:
        with ckpt.reading(run, hf_advice=f"evaluate it as {shlex.quote(HF_PREFIX + str(run))} (with --data_dir)") as source:
            model, state = ckpt.load_model(source)
            origin = {"checkpoint": str(source), "step": state.get("step")}
            model_tokenizer = source / ckpt.TOKENIZER_FILE
            own_tokenizer = _tokenizer_if_any(model_tokenizer)
        if data_dir is None:
            data_dir = state.get("train_config", {}).get("data_dir")
            if not data_dir:
                raise ConfigError(f"{source} does not name its dataset; give --data_dir")
            if not Path(data_dir).is_dir():
                # The run recorded data_dir as given to train.py: a relative one (the default
                # data/stdlib) names a folder under where training ran, not under here.
                where = (f"relative to the folder train.py ran in, not to this one ({Path.cwd()}): "
                         f"run from that folder, or" if not Path(data_dir).is_absolute()
                         else "it was moved or deleted:")
                raise ConfigError(f"{source} trained on data_dir = {data_dir!r}, which is not a "
                                  f"folder from here ({where} give --data_dir)")
    data_dir = Path(data_dir)
    meta = load_meta(data_dir, model_tokenizer if own_tokenizer is not None else None)  # (named by its folder)
    if meta["vocab_size"] != model.config.vocab_size:
        raise ShardError(f"{data_dir} has a vocabulary of {meta['vocab_size']} ids but the model has "
                         f"{model.config.vocab_size}: evaluate on data made with the model's tokenizer: "
                         f"{prepare_with_tokenizer_of(hf_dir or run, model_tokenizer, data_dir, meta)}")
    if (data_dir / TOKENIZER_FILE).exists():
        tokenizer = load_tokenizer(data_dir)
        if own_tokenizer is not None and own_tokenizer.inner.get_vocab() != tokenizer.inner.get_vocab():
            raise ShardError(f"{data_dir / TOKENIZER_FILE} differs from the model's tokenizer "
                             f"({model_tokenizer}): the same ids would mean other text; evaluate on data made "
                             f"with the model's tokenizer: {prepare_with_tokenizer_of(hf_dir or run, model_tokenizer, data_dir, meta)}")
    elif own_tokenizer is not None:  # bare llm.c shards: the model's copy of GPT-2's tokenizer
        tokenizer = own_tokenizer
    else:
        tokenizer = load_tokenizer(data_dir)
    return model.to(device), data_dir, tokenizer, origin


def _tokenizer_if_any(path: Path) -> Tokenizer | None:
    """The model's own tokenizer file, read while its checkpoint is pinned; None without one."""
    return Tokenizer.from_file(path) if path.exists() else None


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m gpt.eval",
        description="Loss, perplexity and bits per byte of a model on a whole dataset split. "
                    "Options may be spelled with '_' or '-'.",
        allow_abbrev=False,
    )

    def add(name: str, **kwargs) -> None:
        add_option(parser, name, **kwargs)

    parser.add_argument("run", type=path_arg,
                        help=f"run folder, checkpoint folder, or {HF_PREFIX}DIR (a Hugging Face GPT-2 folder)")
    add("split", default="val", choices=["train", "val"], help="which split (default: val)")
    add("data_dir", default=None, type=path_arg, help="dataset folder (default: the one the run trained on)")
    add("max_batches", type=int, default=None, help="stop after this many batches (default: the whole split)")
    add("batch_size", type=int, default=8, help="windows per batch (default: 8)")
    add("block_size", type=int, default=None, help="window length (default: the model's context)")
    add("device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device (default: auto)")
    add("dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
        help="compute precision (default: float32; auto = bfloat16 on capable GPUs)")
    add("json", action="store_true", help="print the figures as one JSON object")
    add("no_progress", action="store_true", help="no progress bar (on stderr) while the split is scored")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import check_stdout, report_errors
    from .device import pick_device, resolve_dtype

    def run() -> None:
        args = build_parser().parse_args(argv)
        check_stdout("the figures", "eval.txt")  # before the minutes of evaluating
        device = pick_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        model, data_dir, tokenizer, origin = load_for_eval(args.run, args.data_dir, device)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else None
        result = evaluate_split(model, data_dir, tokenizer, args.split, batch_size=args.batch_size,
                                block_size=args.block_size, max_batches=args.max_batches,
                                device=device, autocast=autocast, progress=not args.no_progress)
        if args.json:  # which model and step each line is, for a loop over a sweep's runs
            write_result(json.dumps({"model": args.run, **origin, "data_dir": str(data_dir), **asdict(result)}),
                         what="the figures")
        else:
            loaded = (f"checkpoint {origin['checkpoint']}, step {origin['step']}" if "checkpoint" in origin
                      else "Hugging Face folder")
            write_result(f"model {args.run} ({loaded}) on {data_dir}\n{result.format()}", what="the figures")

    return report_errors(run, interrupted="interrupted: stopped before the end of the split; no figures to report")


if __name__ == "__main__":
    sys.exit(main())
