"""Export a checkpoint as a Hugging Face GPT-2 folder.

    python -m gpt.export RUN --format hf --out DIR [--overwrite] [--no-check]

RUN is a run folder (its latest checkpoint) or a checkpoint folder. DIR receives what
`transformers.GPT2LMHeadModel.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`
load offline:

    config.json             GPT2Config with activation_function="gelu" (ours is exact GELU)
    model.safetensors       the weights under GPT-2's names (see gpt/hf.py for the mapping)
    tokenizer.json          the run's tokenizer (BPE or char; the same ids, transformers adds its
                            post_processor entry as it saves)
    tokenizer_config.json   PreTrainedTokenizerFast, end-of-text as bos/eos/unk (BPE)

Before DIR appears, the export loads it back with transformers and checks that the logits
equal ours and that the tokenizer gives our ids (--no-check skips this). The folder is
written under a temporary name and renamed when complete, so a failed export leaves nothing.
Needs the `hf` extra: pip install 'gpt-from-scratch[hf]'.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m` this tool: a Ctrl-C while torch imports is one line too
    from gpt.early_signals import ImportInterrupted

    ImportInterrupted.install("interrupted: stopped before exporting; nothing was written")

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

import safetensors.torch
import tokenizers
import torch

from . import checkpoint as ckpt
from .config import ArgumentParser, path_arg
from .console import report
from .held_signals import terminate_as_interrupt
from .hf import HF_PREFIX, HFError, check_gpt2_shape, hf_config_dict, to_hf_state_dict
from .model import GPT, GPTConfig
from .run_layout import training_output
from .shards import GPT2_EOS_ID, GPT2_VOCAB_SIZE, holds_token_shards
from .tokenizer import EOS_TOKEN, Tokenizer

FORMATS = ("hf",)
# What an export folder may hold, so that --overwrite may replace it: what export writes (and
# what transformers 4.x's tokenizer save adds, and generation settings a user may add).
EXPORT_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json"})


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise HFError("exporting for Hugging Face needs the transformers package: "
                      "pip install 'gpt-from-scratch[hf]' (or pip install transformers)") from None
    return transformers


def export_hf(run: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
              check: bool = True, log: Callable[[str], None] = print) -> Path:
    """Write checkpoint `run` as a GPT-2 folder `out`; return `out`. See the module docstring."""
    if str(run).startswith(HF_PREFIX) and not Path(run).exists():
        raise HFError(f"{run}: export reads a run or checkpoint of this project and writes a Hugging "
                      f"Face folder; 'hf:DIR' is how init_from names a Hugging Face folder to start from")
    with ckpt.reading(run, hf_advice="it is in Hugging Face's format already, nothing to export") as source:
        return _export(source, Path(out), overwrite, check, log)


def _export(source: Path, out: Path, overwrite: bool, check: bool, log: Callable[[str], None]) -> Path:
    ckpt.verify_checkpoint(source)
    state = ckpt.read_state(source)
    config = GPTConfig(**state["model_config"])
    check_gpt2_shape(config)  # before any work: say at once which option differs
    _check_target(out, source, overwrite)
    transformers = require_transformers()

    model = GPT(config)
    ckpt.load_model_weights(source, model)
    model.eval()
    tokenizer_file = source / ckpt.TOKENIZER_FILE
    tokenizer = Tokenizer.from_file(tokenizer_file) if tokenizer_file.exists() else None
    # A run on bare llm.c / FineWeb shards has no tokenizer.json; its vocabulary is GPT-2's, whose
    # end-of-text is known: without it, transformers' generate never stops at end-of-text.
    gpt2_ids = config.vocab_size == GPT2_VOCAB_SIZE
    eos_id = tokenizer.eos_id if tokenizer is not None else GPT2_EOS_ID if gpt2_ids else None

    # The absolute, normalized path: "--out ." (or "x/..") has no name of its own to put the
    # temporary folder beside, and would put it inside the target instead.
    target = Path(os.path.abspath(out))
    tmp = ckpt.unfinished_copy(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        ckpt.remove_abandoned(target)  # an export killed outright left a whole model's copy
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        transformers.GPT2Config(**hf_config_dict(config, eos_id)).save_pretrained(tmp)
        # "format": "pt" is the metadata transformers itself writes and checks for.
        safetensors.torch.save_file(to_hf_state_dict(model), str(tmp / "model.safetensors"),
                                    metadata={"format": "pt"})
        ckpt.give_ordinary_permissions(tmp / "model.safetensors")  # save_file makes it 0600
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer, tmp, config.block_size, transformers)
        else:
            log(f"warning: {source} has no {ckpt.TOKENIZER_FILE}; exported the model without a tokenizer")
        # Said once the export is in place: a log that fails (standard output on a full disk) is
        # no failure to write --out, and removed the finished export with the temporary folder.
        checked = check_export(tmp, model, tokenizer, transformers) if check else None
        _publish(tmp, target)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ckpt.failed_write(e):
            raise
        # A full disk, a read-only folder, a file where a folder of --out should be: one line,
        # not a traceback; the checkpoint was only read.
        raise HFError(f"could not write {out} ({type(e).__name__}: {e}); {source} is unchanged. Is "
                      f"the disk full or {target.parent} not a writable folder? Fix that, or choose "
                      f"another --out") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if checked is not None:
        log(checked)
    log(f"exported {source} to {out} (Hugging Face GPT-2: GPT2LMHeadModel.from_pretrained({str(out)!r}))")
    return out


def _check_target(out: Path, source: Path, overwrite: bool) -> None:
    real_source = Path(os.path.realpath(source))  # not Path.resolve: a link loop raised RuntimeError
    if Path(os.path.realpath(out)) in (real_source, *real_source.parents):
        raise HFError(f"--out {out} would overwrite the checkpoint being exported; choose another folder")
    if not (out.exists() and (out.is_file() or any(out.iterdir()))):
        # Even a new or empty folder: one inside a checkpoint (or checkpoints/) is deleted with
        # it by keep_last, one inside a dataset by the next prep --overwrite.
        what = training_output(out) or _dataset(out)
        if what is not None:
            raise HFError(f"--out {out} {what}; export never writes there; choose another --out")
    else:
        # --overwrite is for an earlier export (config.json, model.safetensors, tokenizer files):
        # it never replaces training output or data, nor a file among them (metrics.jsonl). An
        # earlier export inside a run folder (out/default/hf, which a new --out may be) is
        # replaced like any other, or a run could be exported there only once.
        in_run = not _earlier_export(out)
        what = training_output(out, anywhere_in_run=in_run) or _dataset(out)
        if what is None and out.is_file():  # an export is a folder: this file is something else
            what = "is a file, not an earlier export"
        if what is None:
            # Replacing the folder deletes everything in it: only what an export writes may be
            # there (not notes, a model card, a hub clone's .git, another project).
            others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)
            if others:
                what = (f"holds files an export does not write ({', '.join(others[:5])}"
                        f"{', ...' if len(others) > 5 else ''}), so it is not only an earlier export")
        if what is not None:  # said first: --overwrite would not help
            raise HFError(f"--out {out} {what}; refusing to replace it even with --overwrite; "
                          f"choose another --out")
        if not overwrite:
            raise HFError(f"--out {out} already exists; pass --overwrite to replace it, or choose another folder")


def _earlier_export(out: Path) -> bool:
    """Whether `out` is a folder holding only what an export writes, its weights among them."""
    if not out.is_dir() or out.is_symlink():
        return False
    names = {p.name for p in out.iterdir()}
    return {"config.json", "model.safetensors"} <= names <= EXPORT_FILES


def _dataset(out: Path) -> str | None:
    """How `out` is part of a prepared dataset, in words, or None."""
    if out.is_dir() and holds_token_shards(out):
        return "holds a dataset (token shards)"
    parent = Path(os.path.realpath(out)).parent
    if parent.is_dir() and holds_token_shards(parent):  # a new --out may have new parents too
        return f"is inside the dataset folder {parent}"
    return None


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished folder to its name; an existing target is replaced only now."""
    if out.exists():
        old = out.parent / f".{out.name}.old{os.getpid()}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)  # the earlier export back under its name, not left hidden
            raise
        try:
            if old.is_dir() and not old.is_symlink():  # a link to an earlier export: only the link goes
                shutil.rmtree(old)
            else:
                old.unlink()
        except OSError as e:  # the export itself is done: not a failure to write it
            print(f"warning: exported to {out}, but could not delete the earlier export moved to {old} "
                  f"({e}); delete it yourself", file=sys.stderr)
    else:
        os.rename(tmp, out)


def save_hf_tokenizer(tokenizer: Tokenizer, out: Path, max_length: int, transformers) -> None:
    """tokenizer.json plus the tokenizer_config.json that AutoTokenizer reads."""
    special = {} if tokenizer.eos_id is None else {
        "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}  # as GPT-2 does
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(tokenizer.inner.to_str()),  # HF edits it
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,  # decode must give the exact text back
        # Ours encodes a literal "<|endoftext|>" in text as text (only data prep inserts the
        # end-of-text id), so HF must too, or the ids would differ.
        split_special_tokens=True,
        **special,
    )
    fast.save_pretrained(out)
    # Older transformers (4.x) know the class by this name; 5.x accepts it as well.
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2) + "\n")


def check_export(folder: Path, model: GPT, tokenizer: Tokenizer | None, transformers) -> str:
    """Load `folder` with transformers; raise unless logits and token ids equal ours."""
    # Quietly: transformers' progress bar for loading the weights is noise in an export's output.
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(folder, local_files_only=True).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    generator = torch.Generator().manual_seed(0)
    T = min(model.config.block_size, 64)
    x = torch.randint(0, model.config.vocab_size, (2, T), generator=generator)
    with torch.no_grad():
        ours = model(x)[0].float()
        theirs = hf_model(x).logits.float()
    diff = (ours - theirs).abs().max().item()
    if not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4):
        raise HFError(f"check failed: logits of the exported model differ from ours by up to {diff:.3g}")
    message = f"checked: Hugging Face logits equal ours (max |difference| {diff:.2g})"
    if tokenizer is not None:
        hf_tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        specials = {tokenizer.eos_id}
        ids = [i for i in torch.randint(0, tokenizer.vocab_size, (T,), generator=generator).tolist()
               if i not in specials]
        text = tokenizer.decode(ids)
        # verbose=False: re-encoding T random ids can give more than the model's context in
        # tokens, which transformers would warn "will result in indexing errors" about; these
        # ids are only compared, never run through a model.
        if hf_tok(text, verbose=False)["input_ids"] != tokenizer.encode(text):
            raise HFError(f"check failed: the exported tokenizer encodes {text[:40]!r}... differently from ours")
        if hf_tok.decode(ids) != text:
            raise HFError("check failed: the exported tokenizer decodes differently from ours")
        message += "; tokenizer ids and text equal ours"
    return message


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m gpt.export",
        description="Export a checkpoint for other tools. Options may be spelled with '_' or '-'.",
        allow_abbrev=False,
    )
    parser.add_argument("run", type=path_arg, help="run folder (its latest checkpoint) or checkpoint folder")
    parser.add_argument("--format", default="hf", choices=FORMATS,
                        help="hf: a Hugging Face GPT-2 folder (default)")
    parser.add_argument("--out", required=True, type=path_arg, help="folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-check", "--no_check", dest="check", action="store_false",
                        help="skip loading the export back with transformers to compare logits and ids")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import report_errors

    def run() -> None:
        args = build_parser().parse_args(argv)
        with terminate_as_interrupt():  # SIGTERM, as Ctrl-C: the unfinished folder is removed
            export_hf(args.run, args.out, overwrite=args.overwrite, check=args.check, log=report)

    return report_errors(run, interrupted="interrupted: stopped exporting; the unfinished folder was removed")


if __name__ == "__main__":
    sys.exit(main())
