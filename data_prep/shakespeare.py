"""Tiny Shakespeare as nanoGPT prepares it: first 90% of the text train, last 10% val.

    python data_prep/shakespeare.py                         # downloads the text (1.1 MB)
    python data_prep/shakespeare.py --input input.txt       # or uses a local copy
    python data_prep/shakespeare.py --tokenizer bpe --out data/shakespeare_bpe

With the char tokenizer the shards hold exactly nanoGPT's shakespeare_char train.bin / val.bin
ids (the sorted characters of the text, 65 of them). Options take --name=value or --name value,
spelled with - or _. The tokenizer, split-size and output options are data_prep/prepare.py's
(the same definitions, some defaults changed), so the errors they share name options this
script takes too.
"""

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from gpt.config import ArgumentParser, path_arg  # noqa: E402
from gpt.console import report  # noqa: E402
from gpt.prepare import PrepareError, add_shared_options, prepare, run_prep, tokenizer_options  # noqa: E402
from gpt.sources import LocalFiles, Texts  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def download(url: str = URL, timeout: float = 30.0) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode("utf-8-sig")  # -sig: a leading byte order mark is no text
    except (urllib.error.URLError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"could not download {url} ({getattr(e, 'reason', e)}); "
                         f"download it yourself and pass --input PATH") from e


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python data_prep/shakespeare.py", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--input", type=path_arg, metavar="PATH", help="a local copy of the text (default: download it)")
    p.add_argument("--out", type=path_arg, metavar="DIR", help="dataset folder (default: data/shakespeare_char or "
                                                 "data/shakespeare_bpe, after --tokenizer)")
    # nanoGPT's split: the last 10% of the text is val. A small BPE vocabulary: the text is only 1.1 MB.
    add_shared_options(p, tokenizer="char", vocab_size=2048, val_fraction=0.1)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or f"data/shakespeare_{args.tokenizer or args.default_tokenizer}"

    def prep() -> None:
        tokenizer = tokenizer_options(args)  # first: an error here downloads, reads and writes nothing
        if args.tokenizer_from is not None and args.out is None:  # data/shakespeare_char would mislead
            raise PrepareError("--tokenizer-from needs --out: the default folder is named after --tokenizer")
        if args.input:
            corpus = LocalFiles([args.input], errors=args.encoding_errors)
        else:
            report(f"downloading {URL}")
            corpus = Texts([download()], description=f"tiny Shakespeare from {URL}")
        prepare(out, corpus, **tokenizer,
                val_fraction=args.val_fraction, val_rule="tail", min_val_tokens=args.min_val_tokens,
                shard_tokens=args.shard_tokens,
                encoding_errors=args.encoding_errors, overwrite=args.overwrite,
                progress=not args.no_progress, log=report)

    return run_prep(out, prep)

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
