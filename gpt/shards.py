"""Binary token shards, compatible with llm.c / modded-nanogpt version-1 shards.

A shard is a header of 256 little-endian int32 (1024 bytes) followed by the tokens as
little-endian uint16. Header: [0] magic 20240520, [1] version 1, [2] number of tokens.
Readers memory-map the token part, so a corpus never has to fit in RAM.

The module also holds the dataset folder around the shards: `load_meta` (its meta.json, or
GPT-2's vocabulary for bare llm.c shards), `dataset_files`, and the errors for a dataset that is
missing or half-copied (`missing_dataset`, and `prepare_again`, the command that remakes one).
They live here because data prep and training both need them, and prep runs without torch:
this module imports only numpy.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_VOCAB = 2**16  # uint16 ids: 0..65535
MAX_SHARD_TOKENS = 2**31 - 1  # the header's token count is an int32
TOKEN_DTYPE = np.dtype("<u2")
SPLITS = ("train", "val")

# GPT-2's vocabulary, for llm.c / modded-nanogpt FineWeb shards that come without meta.json.
GPT2_VOCAB_SIZE = 50257
GPT2_EOS_ID = 50256


class ShardError(ValueError):
    """A shard or dataset folder is not what the format requires; the message names the file."""


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write one shard atomically: to `<name>.tmp`, fsync, then rename.

    A process killed mid-write leaves at most a `.tmp` file, never a half shard under a
    final name.
    """
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= MAX_VOCAB):
        raise ShardError(f"{path}: token ids must lie in [0, {MAX_VOCAB}) to fit uint16")
    if tokens.size > MAX_SHARD_TOKENS:  # numpy's OverflowError in the header named nothing
        raise ShardError(f"{path}: {tokens.size:,} tokens are more than a shard's int32 header can count "
                         f"({MAX_SHARD_TOKENS:,}); write them as several shards")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(TOKEN_DTYPE, copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk (ENOSPC), a file size limit (EFBIG), a read-only folder
        tmp.unlink(missing_ok=True)
        raise ShardError(
            f"could not write shard {path} ({e.strerror or e}): is the disk full or the folder "
            f"not writable? No partial shard was left under that name"
        ) from e


def read_header(path: str | os.PathLike) -> int:
    """Validate a shard's magic, version and size; return its number of tokens."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _read_open_header(path, f)
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e.strerror})") from e


def _read_open_header(path: Path, f) -> int:
    # The size comes from the open file, not the path: a new prep may rename another shard
    # over `path` at any moment, and a size from one file with a header from another would
    # pass or fail by chance.
    size = os.fstat(f.fileno()).st_size
    raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ShardError(
            f"{path}: file is {size} bytes, shorter than the {HEADER_BYTES}-byte shard header"
        )
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != MAGIC:
        raise ShardError(f"{path}: bad magic number {header[0]} (expected {MAGIC}); not a token shard")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    n_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * n_tokens
    if size != expected:
        raise ShardError(
            f"{path}: size is {size} bytes but the header promises {n_tokens} tokens "
            f"({expected} bytes); the shard is truncated or corrupt"
        )
    return n_tokens


def open_shard(path: str | os.PathLike) -> np.memmap:
    """Memory-map a shard's tokens (read-only) after validating its header.

    Header and tokens come from one open file: a shard renamed over `path` meanwhile (a new
    prep) leaves this map on the file that was validated, never on a mix of the two.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n_tokens = _read_open_header(path, f)
            return np.memmap(f, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e.strerror})") from e


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


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def is_shard_name(name: str, split: str | None = None) -> bool:
    """Whether a file name is a shard's (of `split`, or of any split).

    Accepts our names (`train_000000.bin`) and llm.c / modded-nanogpt names
    (`fineweb_train_000001.bin`).
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    splits = SPLITS if split is None else (split,)
    # Not a hidden file: macOS writes `._train_000000.bin` (AppleDouble metadata, not tokens)
    # beside each file copied to a FAT or exFAT disk, which matched the llm.c pattern.
    return not name.startswith(".") and re.match(rf"^(?:.*_)?(?:{'|'.join(splits)})_\d+\.bin$", name) is not None


def list_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The shards of one split, in order (names as `is_shard_name` accepts them)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return sorted(p for p in Path(data_dir).glob("*.bin") if is_shard_name(p.name, split))


def _tokenizer_flag(tokenizer: str | None) -> str:
    """The prep option that makes a dataset for `tokenizer` (the run's or the model's), for the
    commands the errors below give: BPE is prep's default, a char vocabulary must be asked for."""
    return " --tokenizer char" if tokenizer == "char" else ""


def missing_dataset(data_dir: Path, what: str, split: str | None = None,
                    tokenizer: str | None = None) -> ShardError:
    """The error for a dataset that is not there, or not all there: what is missing, and the
    command that makes it (for `tokenizer`, where the caller knows which one the data needs).

    An empty or absent folder gets the command for a new dataset. A folder holding part of one
    (meta.json, tokenizer.json or shards: a half-copied dataset, or a file deleted) gets the
    files meta.json lists that are gone, and the command that remakes it: prepare.py refuses such
    a folder without --overwrite, and the same input and options give the same files again.
    """
    data_dir = Path(data_dir)
    run_part = _training_output(data_dir)
    if run_part is not None:
        # A run (or its checkpoint) given for the dataset: preparing into it is no fix (prep
        # refuses to write there), and a checkpoint's tokenizer.json is no half of a dataset.
        trained_on = _run_data_dir(data_dir)
        return ShardError(
            f"{data_dir}: {what}: it {run_part}, not a dataset folder (meta.json, tokenizer.json, "
            f"train_*.bin, val_*.bin). Give the dataset folder instead"
            + (f"; the run trained on data_dir = {trained_on!r} (as given to train.py)" if trained_on else "")
        )
    present = dataset_files(data_dir)
    if not present:
        return ShardError(f"{data_dir}: {what}. Make one with: python data_prep/prepare.py --input YOUR_TEXT "
                          f"--out {data_dir}{_tokenizer_flag(tokenizer)} (or --source stdlib in place of "
                          f"--input YOUR_TEXT: the Python standard library's own source, no download)")
    meta = _read_meta_quietly(data_dir)
    listed = meta.get("shards", {}).get(split) if split and isinstance(meta.get("shards"), dict) else None
    gone = [name for name in listed if not (data_dir / name).exists()] if isinstance(listed, list) else []
    lost = (f", though its meta.json lists {_names(gone)}" if gone else "")
    return ShardError(
        f"{data_dir}: {what}{lost}: the dataset here is incomplete (half-copied, or a file deleted; "
        f"{_names([p.name for p in present])} {'is' if len(present) == 1 else 'are'} here). Copy the "
        f"missing files from where the dataset came from, or make it again {prepare_again(data_dir, meta)}"
    )


def _training_output(folder: Path) -> str | None:
    """prepare.training_output (what part of a training run `folder` is, in words, or None),
    imported here on use: prepare imports this module (and neither imports torch)."""
    from .prepare import training_output

    return training_output(folder)


def _run_data_dir(folder: Path) -> str | None:
    """The data_dir that the run `folder` is (or holds, or is in) was trained on, read from its
    config.json or a checkpoint's state.json; None when there is none to read."""
    folder = folder.resolve()  # (the parents of a relative "run" are ".", the current folder)
    for place in (folder, folder.parent, folder.parent.parent):
        for name, keys in (("config.json", ("data_dir",)), ("state.json", ("train_config", "data_dir"))):
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
    the prep command, with the corpus and tokenizer options that `meta` (its meta.json, read
    here when not given) or else tokenizer.json records."""
    meta = _read_meta_quietly(Path(data_dir)) if meta is None else meta
    source = meta.get("source")
    stdlib = isinstance(source, str) and source.startswith("stdlib:")
    kind, vocab_size = meta.get("tokenizer"), meta.get("vocab_size")
    if "tokenizer" not in meta:  # meta.json is what went missing: tokenizer.json says as much
        kind, vocab_size = _tokenizer_file_kind(Path(data_dir) / "tokenizer.json")
    options = ""
    if kind == "char":
        options = " --tokenizer char"
    elif kind == "bpe" and isinstance(vocab_size, int):
        options = f" --tokenizer bpe --vocab-size {vocab_size}"
    came_from = (f" (meta.json says it was made from {source})" if isinstance(source, str) and not stdlib else "")
    return (f"from the same input and options{came_from}, which give the same files: "
            f"python data_prep/prepare.py {'--source stdlib' if stdlib else '--input YOUR_TEXT'}{options} "
            f"--out {data_dir} --overwrite")


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


def check_is_folder(data_dir: Path, tokenizer: str | None = None) -> None:
    """A data_dir that is a file (the corpus itself, given by mistake) is said to be one."""
    if data_dir.exists() and not data_dir.is_dir():
        raise ShardError(f"data_dir {data_dir} is a file, not a dataset folder (meta.json, tokenizer.json, "
                         f"train_*.bin, val_*.bin): give the folder, or make one from this file with "
                         f"python data_prep/prepare.py --input {data_dir} --out DIR{_tokenizer_flag(tokenizer)}")


def load_meta(data_dir: str | os.PathLike, tokenizer: str | None = None) -> dict:
    """The dataset's meta.json; for bare llm.c / FineWeb shard folders, GPT-2's vocabulary.
    `tokenizer`: the kind the caller needs, named in the command an error gives to make the data."""
    data_dir = Path(data_dir)
    check_is_folder(data_dir, tokenizer)
    if not data_dir.is_dir():
        raise missing_dataset(data_dir, "dataset folder does not exist", tokenizer=tokenizer)
    meta_path = data_dir / "meta.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
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


class ShardWriter:
    """Streams one split's tokens into successive shards of `shard_tokens` tokens each.

    Shards are numbered from 0 (`train_000000.bin`, ...) and each is written with `write_shard`,
    so only complete shards ever carry a final name. Memory holds at most one shard's tokens.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, shard_tokens: int = 100_000_000):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
            raise ValueError(f"shard_tokens must lie in 1..{MAX_SHARD_TOKENS:,} (the header's int32 count), "
                             f"got {shard_tokens:,}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.shard_tokens = shard_tokens
        self.paths: list[Path] = []
        self.tokens_written = 0  # accepted so far, flushed or not
        # Grown on demand: a small split (val) should not reserve a full shard of memory.
        self._buf = np.empty(min(shard_tokens, 1 << 20), dtype=TOKEN_DTYPE)
        self._fill = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= MAX_VOCAB):
            raise ShardError(f"{self.split} tokens must lie in [0, {MAX_VOCAB}) to fit uint16")
        while tokens.size:
            room = self.shard_tokens - self._fill
            take = tokens[:room]
            self._reserve(self._fill + take.size)
            self._buf[self._fill : self._fill + take.size] = take
            self._fill += take.size
            self.tokens_written += take.size
            tokens = tokens[take.size :]
            if self._fill == self.shard_tokens:
                self._flush()

    def close(self) -> list[Path]:
        """Write the last, partial shard; return every shard written, in order."""
        if self._fill:
            self._flush()
        return list(self.paths)

    def _reserve(self, size: int) -> None:
        if size > self._buf.size:
            grown = np.empty(min(self.shard_tokens, max(size, 2 * self._buf.size)), dtype=TOKEN_DTYPE)
            grown[: self._fill] = self._buf[: self._fill]
            self._buf = grown

    def _flush(self) -> None:
        path = self.out_dir / shard_name(self.split, len(self.paths))
        write_shard(path, self._buf[: self._fill])
        self.paths.append(path)
        self._fill = 0
