"""sample.py's program: read the prompt, load a run's model (or a Hugging Face GPT-2 folder),
`generate` with the KV cache, and stream the text to stdout as it comes (the speed line to stderr).

`run_sample(argv)` is what `python sample.py` does: parse the options, run `sample(args)`, and
turn expected failures into one-line errors (gpt/cli.py `report_errors`). `sample(args)` checks
the options' values, loads the model, generates and prints.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from . import checkpoint as ckpt
from . import hf
from .checkpoint import CheckpointError
from .cli import check_stdout, report_errors
from .config import ArgumentParser, ConfigError, add_option, path_arg, path_or_default_arg
from .console import BROKEN_PIPE_EXIT, to_devnull, write_result
from .device import free_memory, is_out_of_memory, pick_device, resolve_dtype
from .generate import generate
from .linear import ROUTES
from .hf import HFError
from .tokenizer import Tokenizer, lone_surrogate


def _sample_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="sample.py",
        description="Generate text from a trained run. Options may be spelled with '_' or '-'.",
        allow_abbrev=False,
    )

    def add(name: str, **kwargs) -> None:
        add_option(parser, name, **kwargs)

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--out_dir", "--out-dir", dest="out_dir", type=path_arg,
                        help="run folder (its latest checkpoint is used)")
    source.add_argument("--ckpt", type=path_arg, help="a checkpoint folder (out_dir/checkpoints/step_NNNNNNN)")
    source.add_argument("--init_from", "--init-from", dest="init_from", type=path_arg,
                        help="hf:DIR, a local Hugging Face GPT-2 folder with its tokenizer.json")
    add("prompt", default="", help="text to continue (default: empty, an unconditional sample)")
    add("prompt_file", default=None, type=path_or_default_arg, help="read the prompt from this file instead ('-': standard input)")
    add("max_new_tokens", type=int, default=500,
        help="tokens to generate per sample, at most: a sample ends earlier at the end-of-text token "
             "(BPE vocabularies have one) (default: 500)")
    add("temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy (default: 0.8)")
    add("top_k", type=int, default=200, help="sample from the k likeliest tokens; 0 is off (default: 200)")
    add("top_p", type=float, default=1.0, help="nucleus sampling: smallest set with this total probability (default: 1.0 = off)")
    add("num_samples", type=int, default=1, help="how many samples, drawn together as one batch (default: 1)")
    add("seed", type=int, default=1337, help="random seed (default: 1337)")
    add("device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device (default: auto)")
    add("dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="compute precision (default: auto = bfloat16 on capable GPUs, else float32)")
    add("no_kv_cache", action="store_true", help="recompute the whole context each token (slow; for checking)")
    add("cpu_route", default="auto", choices=["auto", *ROUTES],
        help="how a CPU computes the linear layers while decoding (default: auto = the route measured "
             "fastest at the first token; the routes agree only to float rounding and the fastest can "
             "differ from run to run on a busy machine: name one, e.g. plain, for the same logits bit "
             "for bit on every run with the same --seed)")
    add("cuda_graph", default="auto", choices=["auto", "true", "false"],
        help="decode each token after the prompt as one CUDA-graph replay (default: auto = on a CUDA "
             "GPU with the KV cache; false: launch every kernel from Python, for checking)")
    return parser


def write_text(text: str, end: str = "") -> None:
    """Print the sample's `text` to stdout at once (`write_result`: a failed write is one line,
    a reader that stops reading, `| head`, ends sampling quietly with exit 141)."""
    write_result(text, end, what="the sample")


def run_sample(argv: Sequence[str]) -> int:
    def main() -> int | None:
        args = _sample_parser().parse_args(argv)
        check_stdout("the sample", "sample.txt")
        # Text the terminal or file encoding cannot hold (a generated CJK character or U+FFFD
        # on a Windows code page, `PYTHONIOENCODING=ascii`) is shown replaced, not a
        # UnicodeEncodeError traceback halfway through the sample.
        with contextlib.suppress(AttributeError, ValueError):
            sys.stdout.reconfigure(errors="replace")
        try:
            sample(args)
        except BrokenPipeError:
            # Standard error's reader gone (`2>&1 >/dev/null | head`: the speed line): as quiet
            # as standard output's (ReaderGone, in report_errors); sampling has no other pipe.
            to_devnull(sys.stdout, sys.stderr)
            return BROKEN_PIPE_EXIT
        return None

    return report_errors(main, interrupted="interrupted: stopped generating")


def check_batch_fits(rows: int, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                     use_cache: bool, prompt_tokens: int, new_tokens: int) -> None:
    """Refuse a --num_samples whose batch cannot fit in the memory free on `device`, before any of
    it is allocated: its rows decode together, and a batch too large crashed with an allocator's
    traceback (or, on Linux, could wake the out-of-memory killer). Counted per row, which is most
    of it: the KV cache (keys and values of every layer for block_size positions, in `dtype`), and
    for the widest forward pass its attention scores and MLP activations in fp32, and a row of
    logits. The widest pass: with the cache, the prompt, or a whole window once the tokens fed
    outgrow block_size (the cache is rebuilt from it); without, the whole context at the last token."""
    config = model.config
    block = config.block_size
    fed = prompt_tokens + new_tokens - 1  # the last token drawn is never fed back
    if use_cache:
        widest = block if fed > block else prompt_tokens
    else:
        widest = min(fed, block)
    free = free_memory(device)
    if free is None:
        return
    cache = 2 * config.n_layer * block * config.n_embd * (torch.finfo(dtype).bits // 8) * use_cache
    per_row = cache + 4 * (config.n_head * widest ** 2 + 4 * config.n_embd * widest + config.vocab_size)
    if rows * per_row > free:
        fit = free // per_row
        raise ConfigError(
            f"--num_samples {rows:,}: the samples decode as one batch, which needs about "
            f"{rows * per_row / 1e9:,.1f} GB "
            f"(its KV cache and activations), more than the {free / 1e9:,.1f} GB free on {device.type}; "
            + (f"use --num_samples {fit:,} or fewer, and run sample.py again (another --seed) for more"
               if fit else "free some memory"))


@contextlib.contextmanager
def batch_out_of_memory(rows: int, device: torch.device):
    """Out of memory for the batch of samples, which check_batch_fits could not foresee (where the
    free memory is not known, or other work took it meanwhile): one line naming --num_samples."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise ConfigError(f"out of memory generating {rows:,} sample{'s' if rows > 1 else ''} on {device.type} "
                          f"({type(e).__name__}); use a smaller --num_samples") from None


def read_prompt(args) -> str:
    if not args.prompt_file:
        surrogate = lone_surrogate(args.prompt)
        if surrogate is not None:
            # Python hands an argument's bytes that its locale's codec cannot decode over as
            # U+DC80..U+DCFF: UTF-8 text under a C locale (PYTHONUTF8=0) comes back whole here.
            with contextlib.suppress(UnicodeError):
                return os.fsencode(args.prompt).decode("utf-8")
            code = ord(surrogate[0])
            byte = f"byte 0x{code - 0xDC00:02X}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
            raise ConfigError(f"--prompt is not UTF-8 text ({byte} at character {surrogate.start():,}, from a "
                              f"terminal or file in another encoding?): convert the text to UTF-8 "
                              f"(iconv -f ITS_ENCODING -t UTF-8)")
        return args.prompt
    if args.prompt:
        raise ConfigError("give --prompt or --prompt_file, not both")
    try:
        if args.prompt_file == "-":  # standard input, as most tools read it
            if sys.stdin is None:  # `<&-`
                raise ConfigError("--prompt_file -: standard input is closed; pipe the prompt in, or name a file")
            data = sys.stdin.buffer.read()
        else:
            data = Path(args.prompt_file).read_bytes()
    except OSError as e:
        raise ConfigError(f"--prompt_file {args.prompt_file}: cannot read it ({e.strerror or e})") from None
    # The byte-order mark some editors (Notepad) write first is not part of the text: kept, it
    # was a character no char vocabulary has (and junk tokens for a BPE).
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--prompt_file {args.prompt_file}: not UTF-8 text ({e.reason} at byte {bom + e.start})") from None
    if not text:
        # Usually a mistake upstream (`head -20 missing.py | sample.py --prompt_file -`, whose
        # error scrolls by): say why the sample ignores the prompt meant.
        print(f"warning: --prompt_file {args.prompt_file} is empty; drawing an unconditional sample",
              file=sys.stderr, flush=True)
    return text


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    try:
        return tokenizer.encode(prompt)
    except ValueError as e:
        advice = ""
        if "\r\n" in prompt and tokenizer.inner.token_to_id("\r") is None:
            # A file saved on Windows, for a corpus with Unix line ends: the '\r' the error names
            # is in every line, and the fix is not to drop "characters" but to convert the file.
            advice = " The prompt has Windows line endings (CRLF): convert them to \\n (dos2unix FILE)."
        raise ConfigError(f"the prompt cannot be encoded with this model's vocabulary: {e}{advice}") from None


def sample(args) -> None:
    if args.max_new_tokens <= 0:
        raise ConfigError(f"--max_new_tokens must be positive, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ConfigError(f"--temperature must be a finite number >= 0 (0 is greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ConfigError(f"--top_k must be >= 0 (0 is off), got {args.top_k}")
    if args.num_samples <= 0:
        raise ConfigError(f"--num_samples must be positive, got {args.num_samples}")
    if not 0 <= args.seed < 1 << 63:
        raise ConfigError(f"--seed must be in 0..{(1 << 63) - 1}, got {args.seed}")
    if args.cuda_graph == "true" and args.no_kv_cache:
        raise ConfigError("--cuda_graph true replays a decode step with the KV cache: drop --no_kv_cache")
    prompt = read_prompt(args)  # before the model loads: a wrong file is found at once

    device = pick_device(args.device)
    if args.cuda_graph == "true" and device.type != "cuda":
        raise ConfigError(f"--cuda_graph true needs a CUDA GPU; the device is {device.type} (drop the option)")
    dtype = resolve_dtype(args.dtype, device)
    if args.init_from:
        if args.init_from.startswith(hf.HF_PREFIX):
            named = Path(args.init_from[len(hf.HF_PREFIX):]).expanduser()
            kind = hf.project_folder_kind(named)
            if kind:
                raise ConfigError(f"--init_from {args.init_from}: {named} is {kind}, not a Hugging Face "
                                  f"folder; sample it with --out_dir {shlex.quote(str(named))}")
        hf_dir = hf.parse_init_from(args.init_from)
        if hf_dir is None:
            raise ConfigError(f"--init_from must be {hf.HF_PREFIX}DIR (a Hugging Face GPT-2 folder), "
                              f"got {args.init_from!r}; for a run use --out_dir or --ckpt")
        hf.read_hf_config(hf_dir)  # not a Hugging Face folder at all: say that, not "no tokenizer.json"
        tokenizer_file = hf_dir / ckpt.TOKENIZER_FILE
        if not tokenizer_file.exists():
            raise HFError(f"{hf_dir} has no {ckpt.TOKENIZER_FILE}; sampling needs the model's tokenizer")
        tokenizer = Tokenizer.from_file(tokenizer_file)
        model = hf.load_hf_model(hf_dir, log=lambda m: print(m, file=sys.stderr, flush=True))
    else:
        given = args.out_dir or args.ckpt
        with ckpt.reading(given, hf_advice=f"sample it with --init_from {shlex.quote(hf.HF_PREFIX + str(given))}") as path:
            model, _ = ckpt.load_model(path)
            tokenizer_file = path / ckpt.TOKENIZER_FILE
            if not tokenizer_file.exists():
                # As a run on bare GPT-2-token shards saves it. Copying one in is no way out: the
                # manifest would refuse the checkpoint as edited. An export's folder takes one.
                raise CheckpointError(
                    f"{path} has no {ckpt.TOKENIZER_FILE} (its dataset had none), and a checkpoint refuses "
                    f"files added to it; sample a Hugging Face export instead: python -m gpt.export {shlex.quote(str(given))} "
                    f"--out DIR, copy the tokenizer.json the model was trained with into DIR, then "
                    f"sample.py --init_from {hf.HF_PREFIX}DIR")
            tokenizer = Tokenizer.from_file(tokenizer_file)  # JSON, parsed by `tokenizers`: data, never code
    model.to(device).eval()
    if tokenizer.vocab_size != model.config.vocab_size:
        # Another vocabulary's ids mean other text: a prompt would crash generate() (ids past the
        # model's table), an empty one would give text decoded with the wrong table.
        error = HFError if args.init_from else CheckpointError
        raise error(f"{tokenizer_file} has {tokenizer.vocab_size} token ids but the model has "
                    f"{model.config.vocab_size}: it is not this model's tokenizer; put the tokenizer.json "
                    f"of the data the model was trained on there")

    ids = encode_prompt(tokenizer, prompt)
    if not ids:
        # An empty prompt asks for an unconditional sample: start where documents start.
        if tokenizer.eos_id is not None:
            ids = [tokenizer.eos_id]
        else:
            try:
                ids = tokenizer.encode("\n")
            except ValueError:
                raise ConfigError("this vocabulary has no end-of-text token or newline; give a --prompt") from None
    block = model.config.block_size
    if len(ids) > block:
        print(f"warning: the prompt is {len(ids)} tokens; keeping its last {block} (the context window)",
              file=sys.stderr, flush=True)
        ids = ids[-block:]

    generator = torch.Generator(device=device).manual_seed(args.seed)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    # All samples are rows of one batch (a batch of 8 decodes ~4-5x the tokens/s of one row on a
    # CPU, more on a GPU); the first is printed as it is generated, the others once all are done.
    rows = args.num_samples
    check_batch_fits(rows, model, device, dtype, not args.no_kv_cache, len(ids), args.max_new_tokens)
    with batch_out_of_memory(rows, device):
        idx = torch.tensor([ids] * rows, dtype=torch.long, device=device)
    continuations: list[list[int]] = [[] for _ in range(rows)]
    streamed = 0  # tokens of the first sample whose text is printed
    write_text(prompt)
    start = time.perf_counter()
    try:
        with autocast, batch_out_of_memory(rows, device):
            for token in generate(
                model, idx, args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k or None, top_p=args.top_p if args.top_p < 1 else None,
                eos_id=tokenizer.eos_id, generator=generator, use_cache=not args.no_kv_cache,
                cuda_graph={"auto": None, "true": True, "false": False}[args.cuda_graph],
                cpu_route=None if args.cpu_route == "auto" else args.cpu_route,
            ):
                new = token[:, 0].tolist()
                for continuation, tok in zip(continuations, new):
                    if tok != tokenizer.eos_id:  # a row that has ended emits eos_id from then on
                        continuation.append(tok)
                if new[0] != tokenizer.eos_id:
                    # Decode the tokens not yet printed: a byte-level token can be half a
                    # character, which only becomes printable once its other half arrives. (Not
                    # the whole continuation each time: that made a long sample quadratic.)
                    text = tokenizer.decode(continuations[0][streamed:])
                    if not text.endswith("\ufffd"):
                        write_text(text)
                        streamed = len(continuations[0])
    except KeyboardInterrupt:
        # End the half-printed line, so that the "interrupted" message (stderr) and the shell's
        # prompt start on a line of their own.
        with contextlib.suppress(OSError):
            print(flush=True)
        raise
    seconds = time.perf_counter() - start
    write_text(tokenizer.decode(continuations[0][streamed:]), end="\n")
    for continuation in continuations[1:]:
        write_text("-" * 40, end="\n")
        write_text(prompt + tokenizer.decode(continuation), end="\n")
    n_tokens = sum(len(c) for c in continuations)
    # On stderr, so that stdout stays the text alone (for pipes and files).
    samples = f"{rows} samples, " if rows > 1 else ""
    # Fewer tokens than asked for read as a fault unless the summary says why.
    ended = sum(len(c) < args.max_new_tokens for c in continuations)
    if ended:
        samples += (f"{'the sample' if rows == 1 else ended} ended at the end-of-text token before "
                    f"--max_new_tokens {args.max_new_tokens}, ")
    print(f"[{samples}{n_tokens} tokens in {seconds:.2f} s: {n_tokens / max(seconds, 1e-9):,.0f} tokens/s, "
          f"{'without' if args.no_kv_cache else 'with'} KV cache, {str(dtype).removeprefix('torch.')}]",
          file=sys.stderr, flush=True)
