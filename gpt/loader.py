"""Batches of (input, target) token windows, read from memory-mapped shards.

The stream
    All shards of a split, in `list_shards` order, form one logical token stream of
    `num_tokens` tokens. Shards are memory-mapped, never read whole: a batch touches only the
    pages its windows cover, so memory use does not grow with the corpus. A *window* is
    `block_size + 1` consecutive tokens of the stream starting at some position `s`; it gives
    `x = stream[s : s+T]` and `y = stream[s+1 : s+T+1]` (T = block_size), so `y` is `x` shifted by
    one token. Windows may straddle a shard boundary: the two pieces are stitched together,
    exactly as if the shards were one file.

The window sequence and ranks
    Each order defines one infinite sequence of windows w_0, w_1, w_2, ... that depends only on
    the data, `block_size`, `order` and `seed`, never on batch size, rank or world size.
    A step consumes the next `batch_size * world_size` windows (the global batch); rank r takes
    windows [r*batch_size, (r+1)*batch_size) of them. Ranks therefore see disjoint windows, and
    their union is what one process with batch `batch_size * world_size` sees: 1 GPU and N GPUs
    train on the same data.

    order="random" (nanoGPT-style): w_j starts at a position drawn uniformly from
        [0, num_tokens - block_size - 1], taken from `np.random.default_rng([seed, j // 1024])`,
        which yields starts for windows 1024*c ... 1024*c + 1023 of chunk c. Any window can be
        computed directly from its index, so the state is just how many have been consumed.
    order="sequential": consecutive non-overlapping windows with stride block_size (each reads
        block_size + 1 tokens, so one token overlaps the next window): w_j starts at
        (j mod W) * block_size, where W = (num_tokens - 1) // block_size windows make an epoch.
        After an epoch the stream wraps to the start; the final (num_tokens - 1) mod block_size
        tokens, too few for another window, are not read. A global batch may span an epoch
        boundary; on a split smaller than one global batch, windows repeat within a batch.

State and resume
    `state_dict()` is `{"version": 1, "order", "seed", "block_size", "num_tokens",
    "fingerprint", "windows_consumed"}`: plain ints and strings, the same on every rank.
    `windows_consumed` (global, summed over ranks) is the only moving part; for sequential order
    it is epoch * W + position / block_size. A loader restored from it yields exactly the batches the
    uninterrupted loader would have yielded next. Restoring with a different world size or batch
    size continues the same window sequence from the same point: no window is skipped or
    repeated (in sequential order: no token of the stream is skipped or read twice within an
    epoch). `load_state_dict` refuses a state from another order, block_size, dataset (a
    different token count, or other tokens: `fingerprint` is a CRC-32 of tokens sampled at fixed
    stream positions, so the same tokens cut into other shard sizes still resume) or, in random
    order, seed. A state without `fingerprint` (saved before it existed) is not checked for it.

Fixed evaluation batches
    A random-order loader gives the same windows after `rewind()` (back to its first window), so
    the trainer evaluates on the same val batches at every eval. `eval_batches(...)` is the same
    for a caller without a loader: the same `n_batches` batches every time it is called, from a
    fresh random-order loader with a fixed seed.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gpt.dataset import missing_dataset, split_shards
from gpt.shards import HEADER_BYTES, MAGIC, TOKEN_DTYPE, VERSION, ShardError, read_header

ORDERS = ("random", "sequential")
STATE_VERSION = 1
# Random window starts are drawn in chunks of this many windows per generator. It is part of
# the data order: changing it changes which windows a seed gives.
RANDOM_CHUNK = 1024
# Tokens sampled, evenly spaced over the stream, for the state's fingerprint: one page read each.
FINGERPRINT_SAMPLES = 256


class TokenLoader:
    """This rank's share of each step's batch of windows; see the module docstring.

    With `vocab_size`, every batch is checked (a few microseconds, on the host) for ids outside
    the vocabulary, which raise a ShardError naming the shard and position instead of reaching
    the embedding (an index error on CPU, a device-side assert on CUDA).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        batch_size: int,
        block_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        order: str = "random",
        seed: int = 0,
        device: str | torch.device = "cpu",
        vocab_size: int | None = None,
    ) -> None:
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("block_size", block_size)
        _check_positive_int("world_size", world_size)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")

        self.data_dir = Path(data_dir)
        self.split = split
        self.batch_size = batch_size
        self.block_size = block_size
        self.rank = rank
        self.world_size = world_size
        self.order = order
        self.seed = seed
        self.device = torch.device(device)
        self.vocab_size = vocab_size  # when given, every batch is checked against it
        self.windows_consumed = 0

        paths = _find_shards(self.data_dir, split)
        # Every header is checked up front so a bad shard fails now, not hours into a run.
        lengths = [read_header(p) for p in paths]
        kept = [(p, n) for p, n in zip(paths, lengths) if n > 0]  # an empty shard adds nothing
        self.shard_paths = [p for p, _ in kept]
        self._shards = [_map_tokens(p, n) for p, n in kept]
        self._lengths = np.array([n for _, n in kept], dtype=np.int64)
        self._ends = np.cumsum(self._lengths)  # shard i covers stream [_begins[i], _ends[i])
        self._begins = self._ends - self._lengths
        self.num_tokens = int(self._ends[-1]) if kept else 0
        if self.num_tokens < block_size + 1:
            # A larger --val-fraction grows val at train's expense, so the advice depends on the split.
            remedy = ("a larger --val-fraction" if split == "val"
                      else "more text (or a smaller --val-fraction)")
            raise ShardError(
                f"{self.data_dir}: {split} split too small for one block of {block_size} tokens "
                f"(it has {self.num_tokens} tokens; a block needs {block_size + 1}); prepare "
                f"with {remedy} or use a smaller block_size"
            )
        # Sequential epoch length; random order draws starts from [0, num_tokens - block_size).
        self.windows_per_epoch = (self.num_tokens - 1) // block_size
        self._window_offsets = np.arange(block_size + 1, dtype=np.int64)
        self._chunk_cache: tuple[int, np.ndarray] | None = None
        self._fingerprint: int | None = None  # computed on first use (a state save or load)

    # -- iteration -------------------------------------------------------------------------

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y), each int64 [batch_size, block_size] on `device`; advances a step."""
        first = self.windows_consumed + self.rank * self.batch_size
        starts = self.window_starts(first, self.batch_size)
        windows = self._gather(starts)  # uint16 [B, T+1]
        # A few microseconds on the host, before any id reaches the device: an id past the
        # embedding would be an index error on CPU and a device-side assert on CUDA.
        if self.vocab_size is not None and int(windows.max()) >= self.vocab_size:
            self._refuse_token(starts, windows)
        # astype copies into fresh C-contiguous arrays, so x and y support .view(-1).
        x = torch.from_numpy(windows[:, :-1].astype(np.int64))
        y = torch.from_numpy(windows[:, 1:].astype(np.int64))
        if self.device.type == "cuda":
            # Fresh pinned tensors per batch: nothing rewrites them while the async copy runs.
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        # Counted only once the batch is made: a batch that raised (an id outside the
        # vocabulary) stays unconsumed, so neither a retry nor a saved state skips its windows.
        self.windows_consumed += self.batch_size * self.world_size
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def _refuse_token(self, starts: np.ndarray, windows: np.ndarray) -> None:
        row, col = np.argwhere(windows >= self.vocab_size)[0]
        position = int(starts[row]) + int(col)
        shard = int(np.searchsorted(self._ends, position, side="right"))
        raise ShardError(
            f"{self.shard_paths[shard]}: token id {int(windows[row, col])} at position "
            f"{position - int(self._begins[shard]):,} is outside the vocabulary (vocab_size "
            f"{self.vocab_size:,}): the shard was made with another tokenizer, is corrupt, or was "
            f"rewritten while this run read it"
        )

    def window_starts(self, first: int, count: int) -> np.ndarray:
        """Stream positions (int64 [count]) where windows first .. first+count-1 begin."""
        index = np.arange(first, first + count, dtype=np.int64)
        if self.order == "sequential":
            return (index % self.windows_per_epoch) * self.block_size
        chunk_of = index // RANDOM_CHUNK
        if chunk_of[0] == chunk_of[-1]:  # the usual case: all in one chunk
            return self._random_chunk(int(chunk_of[0]))[index % RANDOM_CHUNK]
        starts = np.empty(count, dtype=np.int64)
        for chunk in np.unique(chunk_of):  # one or two chunks unless batches are huge
            sel = chunk_of == chunk
            starts[sel] = self._random_chunk(int(chunk))[index[sel] % RANDOM_CHUNK]
        return starts

    def _random_chunk(self, chunk: int) -> np.ndarray:
        if self._chunk_cache is None or self._chunk_cache[0] != chunk:
            rng = np.random.default_rng([self.seed, chunk])
            # Exclusive bound: the last possible window ends exactly at the last token.
            high = self.num_tokens - self.block_size
            self._chunk_cache = (chunk, rng.integers(0, high, size=RANDOM_CHUNK, dtype=np.int64))
        return self._chunk_cache[1]

    def _gather(self, starts: np.ndarray) -> np.ndarray:
        """Windows of block_size + 1 tokens at `starts`, as uint16 [len(starts), block_size + 1]."""
        length = self.block_size + 1
        shard = np.searchsorted(self._ends, starts, side="right")
        local = starts - self._begins[shard]
        inside = local + length <= self._lengths[shard]
        if inside.all() and (shard == shard[0]).all():  # the usual case: one shard, one read
            return self._shards[shard[0]][local[:, None] + self._window_offsets]
        out = np.empty((len(starts), length), dtype=np.uint16)
        # One fancy-index read per shard touched: no Python work per window.
        for s in np.unique(shard[inside]):
            rows = np.flatnonzero(inside & (shard == s))
            out[rows] = self._shards[s][local[rows, None] + self._window_offsets]
        for row in np.flatnonzero(~inside):  # rare: the window straddles a shard boundary
            out[row] = self._read_span(int(starts[row]), length)
        return out

    def _read_span(self, start: int, length: int) -> np.ndarray:
        pieces = []
        pos, end = start, start + length
        s = int(np.searchsorted(self._ends, pos, side="right"))
        while pos < end:
            lo = pos - int(self._begins[s])
            hi = min(end, int(self._ends[s])) - int(self._begins[s])
            pieces.append(self._shards[s][lo:hi])
            pos = int(self._begins[s]) + hi
            s += 1
        return np.concatenate(pieces)

    # -- state -----------------------------------------------------------------------------

    def fingerprint(self) -> int:
        """CRC-32 of the tokens at FINGERPRINT_SAMPLES evenly spaced stream positions.

        A dataset prepared again (another --seed or input) can hold exactly as many tokens as
        before; resuming on it would read another stream without a word. Positions are in the
        stream, not in shards, so the same tokens in other shard sizes give the same value.
        """
        if self._fingerprint is None:
            positions = np.unique(np.linspace(0, self.num_tokens - 1, FINGERPRINT_SAMPLES).astype(np.int64))
            shards = np.searchsorted(self._ends, positions, side="right")
            tokens = np.array([self._shards[s][p - self._begins[s]] for s, p in zip(shards, positions)],
                              dtype=TOKEN_DTYPE)
            self._fingerprint = zlib.crc32(tokens.tobytes())
        return self._fingerprint

    def rewind(self) -> None:
        """Back to the first window: the same batches again (in random order too: the order is a
        function of the seed and the window's index)."""
        self.windows_consumed = 0

    def state_dict(self) -> dict:
        """JSON-serializable position; identical on every rank (windows are counted globally)."""
        return {
            "version": STATE_VERSION,
            "order": self.order,
            "seed": self.seed,
            "block_size": self.block_size,
            "num_tokens": self.num_tokens,
            "fingerprint": self.fingerprint(),
            "windows_consumed": self.windows_consumed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; world size and batch size may differ from the saving run."""
        required = ("version", "order", "seed", "block_size", "num_tokens", "windows_consumed")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"loader state is missing {missing}; got keys {sorted(state)}")
        if state["version"] != STATE_VERSION:
            raise ValueError(
                f"loader state version {state['version']} is not supported "
                f"(expected {STATE_VERSION})"
            )
        mine = self.state_dict()
        for key, why in (
            ("order", "the window order"),
            ("block_size", "window positions depend on it"),
            ("num_tokens", f"the dataset in {self.data_dir} ({self.split}) is not the one saved"),
        ):
            if state[key] != mine[key]:
                raise ValueError(
                    f"loader state has {key}={state[key]!r} but this loader has "
                    f"{key}={mine[key]!r}; cannot resume ({why})"
                )
        if "fingerprint" in state and state["fingerprint"] != self.fingerprint():
            raise ShardError(
                f"{self.data_dir} ({self.split}) holds {self.num_tokens:,} tokens as the saved loader "
                f"state says, but not the tokens it was saved on (their fingerprint differs): the "
                f"dataset was prepared again (another input, --seed or split rule). Cannot resume "
                f"its token stream; use the dataset the run was trained on, or start a new run "
                f"from its weights (init_from)"
            )
        if self.order == "random" and state["seed"] != self.seed:
            raise ValueError(
                f"loader state has seed={state['seed']!r} but this loader has seed={self.seed!r}; "
                f"random windows would differ from the saved run"
            )
        consumed = state["windows_consumed"]
        if not isinstance(consumed, int) or isinstance(consumed, bool) or consumed < 0:
            raise ValueError(f"loader state windows_consumed must be an int >= 0, got {consumed!r}")
        self.windows_consumed = consumed


def eval_batches(
    data_dir: str | os.PathLike,
    split: str,
    batch_size: int,
    block_size: int,
    n_batches: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    vocab_size: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same `n_batches` random batches on every call (a fresh loader with a fixed seed).

    Lazy, so only one batch is in memory at a time; ranks get disjoint shares as in training.
    Arguments are checked here, not at the first batch.
    """
    _check_positive_int("n_batches", n_batches)
    loader = TokenLoader(
        data_dir, split, batch_size, block_size,
        rank=rank, world_size=world_size, order="random", seed=seed, device=device,
        vocab_size=vocab_size,
    )
    return (loader.next_batch() for _ in range(n_batches))


def _map_tokens(path: Path, n_tokens: int) -> np.ndarray:
    """A shard's tokens, memory-mapped read-only, without an open file descriptor.

    np.memmap (Python's mmap) keeps a duplicate descriptor per map for as long as the map lives:
    a dataset of ~1,000 shards, train and val loaders open together, ran into the common 1,024
    open-files limit ("Too many open files"). torch.from_file closes its descriptor once the file
    is mapped; the map alone keeps the pages readable, and a file renamed over (a new prep) keeps
    its old inode alive for this run. shared=False maps it privately: nothing is written back.
    (Not in shards.open_shard: data prep imports gpt/shards.py and must not pull in torch, and
    open_shard's callers, the vocabulary check before training and gpt/eval.py, map one shard
    at a time and let it go, so its descriptor never piles up.)
    """
    # The header was read through another open (read_header): a new prep may have renamed
    # another shard over the path since, so the mapped file's own header is checked again.
    changed = (f"{path}: the shard changed while it was being opened (a new data prep renamed another "
               f"over it?); run again once the prep is done")
    try:
        # The path as bytes: as a str, torch takes it as UTF-8 and refuses one that is not.
        mapped = torch.from_file(os.fsencode(path), shared=False, size=HEADER_BYTES + 2 * n_tokens,
                                 dtype=torch.uint8)
    except RuntimeError as e:
        if "Cannot allocate memory" in str(e):  # ENOMEM from mmap
            raise ShardError(_cannot_map(path, e)) from None
        raise ShardError(changed) from e  # shorter than the header said
    if mapped[:12].numpy().view("<i4").tolist() != [MAGIC, VERSION, n_tokens]:
        raise ShardError(changed)
    tokens = mapped.numpy()[HEADER_BYTES:].view(TOKEN_DTYPE)  # the array keeps the map alive
    tokens.flags.writeable = False
    return tokens


def _cannot_map(path: Path, error: RuntimeError) -> str:
    """Why mmap refused a shard (ENOMEM). Every shard is one memory map while its loader lives,
    and Linux allows a process vm.max_map_count of them (65,530 unless raised): a dataset of some
    30,000 shards a split reached it, and the error said the shard had changed, which running
    again never fixed. Else it is memory or address space (ulimit -v)."""
    reason = str(error).splitlines()[0]
    try:
        limit = int(Path("/proc/sys/vm/max_map_count").read_text())
        with open("/proc/self/maps", "rb") as maps:
            held = sum(1 for _ in maps)
    except (OSError, ValueError):  # not Linux
        limit = held = 0
    if limit and held >= limit - 64:
        return (f"{path}: cannot map the shard ({reason}): this process holds {held:,} memory maps, the system's "
                f"limit (vm.max_map_count = {limit:,}), and each shard of the train and val splits is one. Prepare "
                f"the dataset again with a larger --shard-tokens (fewer shards), or raise the limit (sudo sysctl "
                f"-w vm.max_map_count=1048576)")
    return (f"{path}: cannot map the shard ({reason}): out of memory or address space (a ulimit -v?); run "
            f"with more memory")


def _find_shards(data_dir: Path, split: str) -> list[Path]:
    if not data_dir.is_dir():
        raise missing_dataset(data_dir, "dataset folder does not exist")
    return split_shards(data_dir, split)


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
