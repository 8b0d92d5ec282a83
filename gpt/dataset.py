"""A dataset folder: the token shards (gpt/shards.py) with their meta.json and tokenizer.json.

    DIR/meta.json        tokenizer kind, vocab_size, eos id, token counts, source (gpt/prepare.py)
    DIR/tokenizer.json   the vocabulary (gpt/tokenizer.py)
    DIR/train_000000.bin, ..., DIR/val_000000.bin

Reading a folder as a dataset (`load_meta`: its meta.json, or GPT-2's vocabulary for a folder of
bare llm.c / FineWeb shards; `load_tokenizer`: its tokenizer), checking its shards' ids against
its vocabulary, and the errors for a folder that is not a whole dataset: absent, half-copied, a
file given instead, or a training run given by mistake (each error names the command that makes
or remakes it). Data prep and training both use these, and prep runs without torch: this
imports numpy and `tokenizers`, never torch.
"""

from __future__ import annotations

import json
import math
import os
from shlex import quote  # a path in a command to paste: 'my texts' is one argument, not two
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gpt import locks
from gpt.run_layout import (CHECKPOINTS_DIR, CONFIG_FILE, LATEST_FILE, MANIFEST_FILE, STATE_FILE, training_output,
                            typo_of)
from gpt.shards import (GPT2_EOS_ID, GPT2_VOCAB_SIZE, MAX_VOCAB, SPLITS, ShardError, list_shards,
                        open_shard, read_header)
from gpt.tokenizer import KINDS, TOKENIZER_FILE, Tokenizer, TokenizerError, gpt2_tokenizer, same_vocab

PREP_LOCK_FILE = ".prepare-lock"  # held (flock) by the data prep writing the folder (gpt/prepare.py)


def wait_for_prep(data_dir: Path, say: Callable[[str], None]) -> bool:
    """Return once no data prep is writing `data_dir`; True if one was. A prep replacing a
    dataset deletes the old files and renames the new ones in one by one: a run starting in
    between found half a dataset ("incomplete ... make it again") or none at all."""
    lock_path = Path(data_dir) / PREP_LOCK_FILE
    if not lock_path.exists():
        return False
    try:
        locks.acquire(lock_path).release()
        return False
    except locks.FolderBusy:
        say(f"a data prep is writing {data_dir}; waiting for it to finish")
        locks.acquire(lock_path, wait=True).release()
        return True
    except OSError:
        return False  # a read-only folder, say: no prep is writing it


def tokenizer_flag(tokenizer: str | os.PathLike | None) -> str:
    """The prep option that makes a dataset for `tokenizer`, for the commands the errors below
    give: a kind (the run's), where BPE is prep's default and a char vocabulary must be asked
    for; or a path (a Path: a model's folder or tokenizer.json), whose tokenizer is reused, as
    the model reads only ids of its own vocabulary."""
    if isinstance(tokenizer, os.PathLike):
        return f" --tokenizer-from {quote(str(model_folder(tokenizer)))}"
    return " --tokenizer char" if tokenizer == "char" else ""


def missing_dataset(data_dir: Path, what: str, split: str | None = None,
                    tokenizer: str | os.PathLike | None = None) -> ShardError:
    """The error for a dataset that is not there, or not all there: what is missing, and the
    command that makes it (for `tokenizer`, where the caller knows which one the data needs).

    An empty or absent folder gets the command for a new dataset. A folder holding part of one
    (meta.json, tokenizer.json or shards: a half-copied dataset, or a file deleted) gets the
    files meta.json lists that are gone, and the command that remakes it: prepare.py refuses such
    a folder without --overwrite, and the same input and options give the same files again.
    """
    data_dir = Path(data_dir)
    run_part = training_output(data_dir)
    if run_part is not None:
        # A run (or its checkpoint) given for the dataset: preparing into it is no fix (prep
        # refuses to write there), and a checkpoint's tokenizer.json is no half of a dataset.
        trained_on = run_data_dir(data_dir)
        return ShardError(
            f"{data_dir}: {what}: it {run_part}, not a dataset folder (meta.json, tokenizer.json, "
            f"train_*.bin, val_*.bin). Give the dataset folder instead"
            + (f"; the run trained on data_dir = {trained_on!r} (as given to train.py)" if trained_on else "")
        )
    present = dataset_files(data_dir)
    if not present:
        # A relative path is from the current folder, which a job script or an IDE may not have
        # set to the repository; a folder of a dataset beside it may be what was meant.
        where = f" (from the current folder, {Path.cwd()})" if not data_dir.is_absolute() else ""
        meant = typo_of(data_dir, ("meta.json",))
        make = (f"; did you mean {meant}, the dataset beside it? Or make one with" if meant is not None
                else ". Make one with")
        return ShardError(f"{data_dir}: {what}{where}{make}: {prep_command()} --input YOUR_TEXT "
                          f"--out {quote(str(data_dir))}{tokenizer_flag(tokenizer)} (or --source stdlib in place of "
                          f"--input YOUR_TEXT: the Python standard library's own source, no download)")
    meta = _read_meta_quietly(data_dir)
    listed = _listed_shards(meta, split) if split else None
    gone = [name for name in listed if not (data_dir / name).exists()] if listed is not None else []
    if gone and len(gone) < len(listed):  # some of the split is here
        lost = (f" ({_names(gone)}, listed in its meta.json, {'is' if len(gone) == 1 else 'are'} not here)")
    else:
        lost = (f", though its meta.json lists {_names(gone)}" if gone else "")
    return ShardError(
        f"{data_dir}: {what}{lost}: the dataset here is incomplete (half-copied, or a file deleted; "
        f"{_names([p.name for p in present])} {'is' if len(present) == 1 else 'are'} here). Copy the "
        f"missing files from where the dataset came from, or make it again {prepare_again(data_dir, meta)}"
    )


def _listed_shards(meta: dict, split: str) -> list[str] | None:
    """The names of `split`'s shards as meta.json lists them (prep writes the list), or None
    where it lists none (bare llm.c shards, an older or hand-made meta.json)."""
    shards = meta.get("shards")
    listed = shards.get(split) if isinstance(shards, dict) else None
    return listed if isinstance(listed, list) and all(isinstance(n, str) for n in listed) else None


def split_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The shards of `split` in `data_dir`, in order, once they are the ones its meta.json lists.

    The shards found on disk are one token stream: a lost middle shard would silently join text
    that was never adjacent (and train on less), and a stale shard left by an earlier prep into
    the folder would mix another corpus in. So the names must be meta.json's, and their headers'
    token counts must add up to its count. A folder without such a list (bare llm.c shards) is
    taken as it is."""
    data_dir = Path(data_dir)
    paths = list_shards(data_dir, split)
    if not paths:
        raise missing_dataset(data_dir, f"no {split} shards ({split}_*.bin) in this folder", split)
    meta = _read_meta_quietly(data_dir)
    listed = _listed_shards(meta, split)
    if listed is None:
        return paths
    names = [p.name for p in paths]
    on_disk, in_meta = set(names), set(listed)  # sets: 33,000 shards took 20 s compared as lists
    gone = [n for n in listed if n not in on_disk]
    if gone:
        raise missing_dataset(data_dir, f"{len(gone)} of the {len(listed)} {split} shards missing", split)
    again = f"make the dataset again {prepare_again(data_dir, meta)}"
    extra = [n for n in names if n not in in_meta]
    if extra:
        raise ShardError(
            f"{data_dir}: {_names(extra)} {'is' if len(extra) == 1 else 'are'} not among the {split} shards its "
            f"meta.json lists ({_names(listed)}): files of another prep left in this folder? Training would "
            f"read them as part of the corpus. Move them out, or {again}")
    expected = meta.get("tokens", {}).get(split) if isinstance(meta.get("tokens"), dict) else None
    found = sum(read_header(p) for p in paths) if type(expected) is int else None
    if found is not None and found != expected:
        raise ShardError(
            f"{data_dir}: its {split} shards hold {found:,} tokens, but its meta.json says {expected:,}: "
            f"a shard of another prep copied over one of these? Copy the dataset whole from where it "
            f"came from, or {again}")
    return paths


def run_data_dir(folder: Path) -> str | None:
    """The data_dir that the run `folder` is (or holds, or is in) was trained on, read from its
    config.json or a checkpoint's state.json; None when there is none to read."""
    folder = Path(os.path.realpath(folder))  # (the parents of a relative "run" are ".", the current folder)
    for place in (folder, folder.parent, folder.parent.parent):
        for name, keys in ((CONFIG_FILE, ("data_dir",)), (STATE_FILE, ("train_config", "data_dir"))):
            value: object = _read_json_quietly(place / name)
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, str) and value:
                return value
    return None


def _read_json_quietly(path: Path) -> object:
    """The JSON in `path`, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def prepare_again(data_dir: Path, meta: dict | None = None) -> str:
    """How to remake the dataset in `data_dir` over what is there, to follow "make it again":
    the prep command, with the corpus, tokenizer and split options that `meta` (its meta.json,
    read here when not given) or else tokenizer.json records."""
    meta = _read_meta_quietly(Path(data_dir)) if meta is None else meta
    kind, vocab_size = meta.get("tokenizer"), meta.get("vocab_size")
    if "tokenizer" not in meta:  # meta.json is what went missing: tokenizer.json says as much
        kind, vocab_size = _tokenizer_file_kind(Path(data_dir) / "tokenizer.json")
    options = ""
    if isinstance(meta.get("tokenizer_from"), str):  # the tokenizer was reused: the same ids need it again
        options = f" --tokenizer-from {quote(meta['tokenizer_from'])}"
    elif kind == "char":
        options = " --tokenizer char"
    elif kind == "bpe" and isinstance(vocab_size, int):
        options = f" --tokenizer bpe --vocab-size {vocab_size}" + _train_text_option(meta)
    unknown = (" (add the split options it was made with, --val-rule, --val-fraction, --seed...: meta.json "
               "alone recorded them)" if "val_rule" not in meta else "")
    return (f"from the same input and options{_came_from(meta)}, which give the same files{unknown}: "
            f"{_prep_command(meta, options, data_dir)} --overwrite")


def prepare_with_tokenizer_of(model: str | os.PathLike, model_tokenizer: Path, data_dir: Path,
                              meta: dict | None = None) -> str:
    """The prep command that tokenizes the text of the dataset in `data_dir` with the tokenizer
    of `model` (a run, checkpoint or Hugging Face folder; its tokenizer.json: `model_tokenizer`),
    into a new folder beside it named for the model: a model reads only ids of its own
    vocabulary. (Not over `data_dir`, which other runs may train on; not into one folder for
    every model, where the second model's prep was refused.) Where that folder holds such a
    dataset already, that is the advice."""
    meta = _read_meta_quietly(Path(data_dir)) if meta is None else meta
    model = model_folder(model)
    new = beside(data_dir, f"_for_{Path(os.path.abspath(model)).name or 'model'}")
    if same_vocab(new / TOKENIZER_FILE, model_tokenizer) and (new / "meta.json").is_file():
        return f"{new} holds a dataset made with that tokenizer: give it as data_dir"
    return (f"{_prep_command(meta, f' --tokenizer-from {quote(str(model))}', new)}{_came_from(meta)}, then give "
            f"that folder as data_dir")


def beside(path: str | os.PathLike, suffix: str) -> Path:
    """The folder beside `path` named after it plus `suffix` (data/x -> data/x_prepared). A path
    of no name of its own ('.', '..', '/') is taken by its absolute one: '.' raised ValueError,
    and '..' gave '.._prepared' inside the current folder."""
    path = Path(path)
    if path.name in ("", ".."):  # ('.' too: its name is "")
        path = Path(os.path.abspath(path))
    return path.parent / f"{path.name or 'data'}{suffix}"


def model_folder(path: str | os.PathLike) -> Path:
    """The folder to name for a model's tokenizer in a command: a checkpoint of a run, or its
    tokenizer.json, is named by the run (the run prunes its checkpoint folders as it goes on,
    and a prep's meta.json would record the dead path); a Hugging Face folder's tokenizer.json
    by the folder."""
    path = Path(path)
    if path.name == TOKENIZER_FILE:
        path = path.parent
    run = path.parent.parent
    return run if path.parent.name == CHECKPOINTS_DIR and _latest_is_sound(run) else path


def _latest_is_sound(run: Path) -> bool:
    """Whether the run's `latest` names a checkpoint folder of it that holds its manifest: a
    command naming the run reads that one (a broken `latest` failed the command given)."""
    try:
        name = (run / LATEST_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return False
    return (bool(name) and Path(name).name == name and name not in (".", "..")
            and (run / CHECKPOINTS_DIR / name / MANIFEST_FILE).is_file())


def _came_from(meta: dict) -> str:
    source = meta.get("source")
    return f" (meta.json says it was made from {source})" if isinstance(source, str) and not _is_stdlib(meta) else ""


def _is_stdlib(meta: dict) -> bool:
    return isinstance(meta.get("source"), str) and meta["source"].startswith("stdlib:")


def _prep_command(meta: dict, tokenizer_options: str, out: str | os.PathLike) -> str:
    """prepare.py's command line for the corpus `meta` (meta.json) names, with its split options."""
    corpus = "--source stdlib" if _is_stdlib(meta) else "--input YOUR_TEXT"
    return (f"{prep_command()} {corpus}{tokenizer_options}{_split_options(meta)}{_encoding_option(meta)} "
            f"--out {quote(str(out))}")


PREP_SCRIPT = Path(__file__).resolve().parents[1] / "data_prep" / "prepare.py"


def prep_command() -> str:
    """How to run data prep from the current folder, for the commands errors give: `python
    data_prep/prepare.py` in the repository, its whole path elsewhere (a job script run from
    another folder: the short form would not be found there)."""
    here = Path("data_prep/prepare.py")
    try:
        short = here.is_file() and here.resolve() == PREP_SCRIPT
    except OSError:
        short = False
    return f"python {here if short else quote(str(PREP_SCRIPT))}"


def _split_options(meta: dict) -> str:
    """prepare.py's options for the train/val split and shard size that meta.json records, where
    they differ from its defaults (data_prep/shakespeare.py's tail rule and val fraction 0.1, say):
    without them a remake cut train and val elsewhere, and a run refused to resume on it."""
    from gpt.prepare import build_parser  # the command's own defaults (a lazy import: prepare imports this module)

    parser = build_parser()
    rule = meta.get("val_rule")
    rule = rule.split(":", 1)[0] if isinstance(rule, str) else None  # "tail: the last 0.1 ..."
    given = {"--val-rule": rule, "--val-fraction": meta.get("val_fraction"), "--seed": meta.get("seed"),
             "--val-chunk-tokens": meta.get("val_chunk_tokens") if rule == "chunks" else None,
             "--shard-tokens": meta.get("shard_tokens")}
    return "".join(f" {option} {value}" for option, value in given.items()  # str(float) round-trips
                   if value is not None and value != parser.get_default(option[2:].replace("-", "_")))


def _train_text_option(meta: dict) -> str:
    """--tokenizer-train-mb as meta.json records the BPE was trained (another share of the text
    gives other merges), where it differs from prepare.py's default."""
    from gpt.prepare import build_parser

    if "tokenizer_train_bytes" not in meta:  # (a dataset prepared before it was recorded)
        return ""
    nbytes = meta["tokenizer_train_bytes"]
    mb = math.inf if nbytes is None else nbytes / 1e6
    while nbytes is not None and math.ceil(mb * 1e6) > nbytes:  # the MB that prepare.py turns into those bytes
        mb = math.nextafter(mb, 0)
    return "" if mb == build_parser().get_default("default_tokenizer_train_mb") else f" --tokenizer-train-mb {mb!r}"


def _encoding_option(meta: dict) -> str:
    """--encoding-errors as meta.json records it, where not the default (strict)."""
    errors = meta.get("encoding_errors")
    return f" --encoding-errors {errors}" if errors not in (None, "strict") else ""


def dataset_files(data_dir: Path) -> list[Path]:
    """The files of a dataset in `data_dir`: meta.json, tokenizer.json, shards (those present)."""
    if not data_dir.is_dir():
        return []
    named = [data_dir / name for name in ("meta.json", "tokenizer.json") if (data_dir / name).exists()]
    return named + [p for split in SPLITS for p in list_shards(data_dir, split)]


def _tokenizer_file_kind(path: Path) -> tuple[str | None, int | None]:
    """The kind ("char" for a WordLevel model, "bpe") and number of ids of a tokenizer.json,
    read as plain JSON (this module does not load `tokenizers`); (None, None) if it cannot tell."""
    return _tokenizer_json_kind(_read_json_quietly(path))


def _tokenizer_json_kind(saved: object) -> tuple[str | None, int | None]:
    try:
        model = saved["model"]
        ids = {*model["vocab"].values(), *(t["id"] for t in saved.get("added_tokens") or [])}
        kind = {"WordLevel": "char", "BPE": "bpe"}.get(model["type"])
        return kind, (max(ids) + 1 if ids else None)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, None


def _is_gpt2_tokenizer_file(path: Path) -> bool:
    """Whether `path` is a tokenizer.json of GPT-2's vocabulary (BPE, 50257 ids, end-of-text
    50256), read as plain JSON (once: GPT-2's is 1.3 MB); False when absent or unreadable."""
    saved = _read_json_quietly(path)
    if _tokenizer_json_kind(saved) != ("bpe", GPT2_VOCAB_SIZE):
        return False
    eos = {t.get("content"): t.get("id") for t in saved.get("added_tokens") or []}.get("<|endoftext|>")
    return (saved["model"]["vocab"].get("<|endoftext|>") if eos is None else eos) == GPT2_EOS_ID


def _read_meta_quietly(data_dir: Path) -> dict:
    """meta.json as a dict, or {} when it is absent or unreadable (for advice, never for data)."""
    meta = _read_json_quietly(data_dir / "meta.json")
    return meta if isinstance(meta, dict) else {}


def _names(names: list[str], show: int = 3) -> str:
    more = f" and {len(names) - show} more" if len(names) > show else ""
    return ", ".join(names[:show]) + more


def check_is_folder(data_dir: Path, tokenizer: str | os.PathLike | None = None) -> None:
    """A data_dir that is a file (the corpus itself, given by mistake) is said to be one."""
    if data_dir.exists() and not data_dir.is_dir():
        raise ShardError(f"data_dir {data_dir} is a file, not a dataset folder (meta.json, tokenizer.json, "
                         f"train_*.bin, val_*.bin): give the folder, or make one from this file with "
                         f"{prep_command()} --input {quote(str(data_dir))} --out DIR{tokenizer_flag(tokenizer)}")


def load_meta(data_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> dict:
    """The dataset's meta.json; for bare llm.c / FineWeb shard folders, GPT-2's vocabulary.
    `tokenizer`: the kind the caller needs, or the path of the one to reuse (`tokenizer_flag`),
    named in the command an error gives to make the data."""
    data_dir = Path(data_dir)
    check_is_folder(data_dir, tokenizer)
    if not data_dir.is_dir():
        raise missing_dataset(data_dir, "dataset folder does not exist", tokenizer=tokenizer)
    meta_path = data_dir / "meta.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_bytes())
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
            raise ShardError(f"{meta_path}: cannot read dataset metadata ({e})") from e
        if not isinstance(meta, dict):
            raise ShardError(f"{meta_path}: must hold a JSON object, got {type(meta).__name__}")
        for key, kind in (("tokenizer", str), ("vocab_size", int)):
            if key not in meta:
                raise ShardError(f"{meta_path}: missing key {key!r}")
            if type(meta[key]) is not kind:  # not isinstance: a JSON true is no vocab_size
                raise ShardError(f"{meta_path}: {key} must be a JSON {'string' if kind is str else 'integer'}, "
                                 f"got {meta[key]!r}")
        if not 1 <= meta["vocab_size"] <= MAX_VOCAB:
            raise ShardError(f"{meta_path}: vocab_size {meta['vocab_size']} is outside 1..{MAX_VOCAB} "
                             f"(the shards hold uint16 token ids)")
        return meta
    gpt2_tokenizer = _is_gpt2_tokenizer_file(data_dir / "tokenizer.json")
    if (data_dir / "tokenizer.json").exists() and not gpt2_tokenizer:
        # Only a prep of ours writes tokenizer.json, always with meta.json; bare llm.c shard
        # folders have none, or GPT-2's own (which gpt/tokenizer.py asks for where the hub is out
        # of reach). Without meta.json this one's shards would be read as GPT-2 ids.
        raise missing_dataset(data_dir, "tokenizer.json but no meta.json here", tokenizer=tokenizer)
    if list_shards(data_dir, "train"):
        return {
            "tokenizer": "gpt2",
            "vocab_size": GPT2_VOCAB_SIZE,
            "eos_id": GPT2_EOS_ID,
            "source": f"llm.c-style shards in {data_dir}",
        }
    raise missing_dataset(data_dir, "no meta.json and no train shards (train_*.bin) here", "train", tokenizer)


def check_token_ids(paths: list[Path], vocab_size: int, chunk_tokens: int = 1 << 22) -> None:
    """Refuse shards holding an id >= vocab_size (another tokenizer's shards, or corruption).

    One streaming pass over the memory-mapped tokens, `chunk_tokens` at a time (several GB/s
    once the pages are cached, and the pages then serve training). The loader checks every
    batch too (a shard changed under a running job); this scan makes a bad dataset fail before
    the first step rather than hours into a run.
    """
    for path in paths:
        tokens = open_shard(path)
        for start in range(0, tokens.size, chunk_tokens):
            piece = tokens[start : start + chunk_tokens]
            if piece.size and int(piece.max()) >= vocab_size:
                where = start + int(np.argmax(piece >= vocab_size))
                raise ShardError(
                    f"{path}: token id {int(tokens[where])} at position {where:,} is outside the "
                    f"vocabulary (vocab_size {vocab_size:,} of the dataset's tokenizer): the shard "
                    f"was made with another tokenizer or is corrupt. Prepare the dataset again "
                    f"{prepare_again(path.parent)}"
                )


def load_tokenizer(data_dir_or_file: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a dataset folder (its tokenizer.json), or of a tokenizer file.

    The kind comes from the tokenizer file itself, as everywhere else it is loaded. A meta.json
    naming another kind means the folder mixes files of different preps (or a hand-edited
    meta.json), whose shards may hold either tokenizer's ids: that is an error naming both files.
    meta.json decides only between bpe and gpt2, which are both BPE files: a BPE of our own with
    GPT-2's size and end-of-text id would otherwise be called gpt2. A folder of bare llm.c /
    FineWeb shards (no tokenizer.json) gets GPT-2's tokenizer.
    """
    path = Path(data_dir_or_file)
    if path.is_file():
        return Tokenizer.from_file(path)
    if not path.is_dir():
        raise TokenizerError(f"{path}: no such tokenizer file or dataset folder")
    try:
        meta = load_meta(path)
    except ShardError:
        meta = {}
    kind = meta.get("tokenizer")
    file = path / TOKENIZER_FILE
    if file.exists():
        tokenizer = Tokenizer.from_file(file)
        if kind == tokenizer.kind or kind not in KINDS:
            return tokenizer
        if kind == "bpe" and tokenizer.kind == "gpt2":
            return Tokenizer(tokenizer.inner, "bpe")
        raise ShardError(
            f"{file} is a {tokenizer.kind} tokenizer ({tokenizer.vocab_size:,} ids), but "
            f"{path / 'meta.json'} says the dataset's tokenizer is {kind!r}: the folder mixes files of "
            f"different preps (or an edited meta.json), and its shards may hold either one's ids. "
            f"Copy the dataset whole from where it came from, or make it again "
            # With tokenizer.json's kind: meta.json's may be the wrong file (a char vocabulary of
            # 39 ids as "bpe --vocab-size 39" would be refused by prep).
            f"{prepare_again(path, {k: v for k, v in meta.items() if k not in ('tokenizer', 'vocab_size')})}"
        )
    if kind == "gpt2":
        return gpt2_tokenizer()
    raise TokenizerError(f"{path}: no {TOKENIZER_FILE} here; prepare the dataset with data_prep/prepare.py")
