"""Binary token shards, compatible with llm.c / modded-nanogpt version-1 shards.

A shard is a header of 256 little-endian int32 (1024 bytes) followed by the tokens as
little-endian uint16. Header: [0] magic 20240520, [1] version 1, [2] number of tokens.
Readers memory-map the token part, so a corpus never has to fit in RAM.

This module is the file format alone and imports only numpy. The dataset folder around the
shards (meta.json, tokenizer.json, the errors for a missing or half-copied one) is gpt/dataset.py.
"""

from __future__ import annotations

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


def holds_token_shards(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a prepared dataset's token shards (train_*.bin, val_*.bin)."""
    return any(is_shard_name(name) for name in os.listdir(folder))


def list_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The shards of one split, in order (names as `is_shard_name` accepts them)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return sorted(p for p in Path(data_dir).glob("*.bin") if is_shard_name(p.name, split))


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
