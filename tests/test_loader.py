"""TokenLoader: windows from the right stream positions, rank partition, exact resume, errors.

Synthetic shards hold `position % 65536`, so (for streams under 65,536 tokens) every token
says where in the stream it came from.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.loader import TokenLoader, eval_batches
from gpt.shards import HEADER_INTS, MAGIC, VERSION, ShardError, list_shards, shard_name, write_shard


def make_split(data_dir: Path, sizes: list[int], split: str = "train", prefix: str = "") -> None:
    """Shards of the given sizes whose tokens are their stream positions (mod 65536)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    begin = 0
    for i, n in enumerate(sizes):
        write_shard(data_dir / (prefix + shard_name(split, i)), np.arange(begin, begin + n) % 65536)
        begin += n


def starts_of(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()


def assert_windows_match_stream(x: torch.Tensor, y: torch.Tensor, block_size: int) -> None:
    assert x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    expected = x[:, :1] + torch.arange(block_size + 1)
    assert torch.equal(x, expected[:, :-1])
    assert torch.equal(y, expected[:, 1:])


def test_windows_are_stream_slices_with_y_shifted(tmp_path):
    make_split(tmp_path, [1000, 37, 500, 2000])
    loader = TokenLoader(tmp_path, "train", 8, 64, seed=3)
    assert loader.num_tokens == 3537
    for _ in range(20):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (8, 64)
        assert_windows_match_stream(x, y, 64)
        assert min(starts_of(x)) >= 0 and max(starts_of(x)) <= 3537 - 65


def test_windows_straddling_shards_are_stitched(tmp_path):
    # Shard boundaries at 120 and 157: window [100, 151) straddles one, [150, 201) the other
    # side, and a window from 110 would span all three shards (the middle is shorter than it).
    make_split(tmp_path, [120, 37, 200])
    loader = TokenLoader(tmp_path, "train", 1, 50, order="sequential")
    for start in (0, 50, 100, 150, 200, 250, 300, 0):
        x, y = loader.next_batch()
        assert starts_of(x) == [start]
        assert_windows_match_stream(x, y, 50)
    across_three = loader._gather(np.array([110, 119, 0, 300]))
    assert np.array_equal(across_three, np.array([110, 119, 0, 300])[:, None] + np.arange(51))


@pytest.mark.parametrize("order", ["random", "sequential"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_the_single_process_batch(tmp_path, order, world_size):
    make_split(tmp_path, [3000, 2500])
    batch, block = 3, 32
    single = TokenLoader(tmp_path, "train", batch * world_size, block, order=order, seed=7)
    ranks = [
        TokenLoader(tmp_path, "train", batch, block, rank=r, world_size=world_size,
                    order=order, seed=7)
        for r in range(world_size)
    ]
    for _ in range(60):  # sequential wraps its epoch (170 windows) within these steps
        whole_x, whole_y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([x for x, _ in parts]), whole_x)
        assert torch.equal(torch.cat([y for _, y in parts]), whole_y)
        if order == "sequential":  # random draws may coincide; sequential windows never do
            assert len(set(starts_of(whole_x))) == batch * world_size


@pytest.mark.parametrize("order", ["random", "sequential"])
def test_resume_yields_the_batches_that_followed(tmp_path, order):
    make_split(tmp_path, [800, 900])

    def make(rank):
        return TokenLoader(tmp_path, "train", 4, 16, rank=rank, world_size=2, order=order, seed=11)

    original = [make(0), make(1)]
    for _ in range(9):
        for loader in original:
            loader.next_batch()
    states = [json.loads(json.dumps(loader.state_dict())) for loader in original]
    assert states[0] == states[1]  # one saved state serves every rank
    resumed = [make(0), make(1)]
    for loader in resumed:
        loader.load_state_dict(states[0])
    for _ in range(40):
        for a, b in zip(original, resumed):
            xa, ya = a.next_batch()
            xb, yb = b.next_batch()
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("order", ["random", "sequential"])
@pytest.mark.parametrize(("before", "after"), [((2, 2), (1, 3)), ((1, 3), (2, 2))])
def test_changing_world_size_continues_the_window_sequence(tmp_path, order, before, after):
    """(world_size, batch) before and after a resume; the windows seen continue one sequence."""
    make_split(tmp_path, [5000])
    block = 20

    def run(loaders, steps):
        starts = []
        for _ in range(steps):
            for loader in loaders:  # rank order = window order within the global batch
                starts += starts_of(loader.next_batch()[0])
        return starts

    def ranks(world_size, batch):
        return [
            TokenLoader(tmp_path, "train", batch, block, rank=r, world_size=world_size,
                        order=order, seed=5)
            for r in range(world_size)
        ]

    first = ranks(*before)
    seen = run(first, 5)
    state = json.loads(json.dumps(first[0].state_dict()))
    second = ranks(*after)
    for loader in second:
        loader.load_state_dict(state)
    seen += run(second, 7)

    reference = TokenLoader(tmp_path, "train", 1, block, order=order, seed=5)
    assert seen == run([reference], len(seen))
    if order == "sequential":  # no token skipped or read twice: consecutive stride-block starts
        assert seen == list(range(0, len(seen) * block, block))


def test_sequential_epoch_covers_every_window_once_then_wraps(tmp_path):
    make_split(tmp_path, [400, 601])  # 1001 tokens: (1001 - 1) // 10 = 100 windows per epoch
    loader = TokenLoader(tmp_path, "train", 7, 10, order="sequential")
    assert loader.windows_per_epoch == 100
    starts = []
    for _ in range(30):  # 210 windows: two full epochs and a bit
        x, y = loader.next_batch()
        assert_windows_match_stream(x, y, 10)
        starts += starts_of(x)
    epoch = list(range(0, 1000, 10))
    assert starts[:100] == epoch and starts[100:200] == epoch and starts[200:] == epoch[:10]
    assert loader.state_dict()["windows_consumed"] == 210


def test_llm_c_shard_names_are_read(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(300))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(1000, 1500))
    write_shard(tmp_path / "fineweb_train_000002.bin", np.arange(1500, 2000))
    train = TokenLoader(tmp_path, "train", 4, 32, order="sequential")
    val = TokenLoader(tmp_path, "val", 4, 32, order="sequential")
    assert (train.num_tokens, val.num_tokens) == (1000, 300)
    assert starts_of(train.next_batch()[0]) == [1000, 1032, 1064, 1096]
    assert starts_of(val.next_batch()[0]) == [0, 32, 64, 96]


def test_macos_appledouble_files_beside_the_shards_are_not_shards(tmp_path):
    """A dataset copied through a Mac onto a FAT/exFAT disk gains `._train_000000.bin` beside each
    shard: 4 KB of metadata, not tokens. It matched the llm.c name pattern and failed as a bad
    shard (bad magic); hidden files are never shards."""
    make_split(tmp_path, [500])
    make_split(tmp_path, [300], split="val")
    for name in ("train_000000.bin", "val_000000.bin"):
        (tmp_path / f"._{name}").write_bytes(b"\x00\x05\x16\x07" + bytes(4092))
    assert [p.name for p in list_shards(tmp_path, "train")] == ["train_000000.bin"]
    loader = TokenLoader(tmp_path, "train", 4, 32, order="sequential")
    assert loader.num_tokens == 500
    assert_windows_match_stream(*loader.next_batch(), 32)
    assert TokenLoader(tmp_path, "val", 4, 32).num_tokens == 300


def test_eval_batches_are_the_same_every_call(tmp_path):
    make_split(tmp_path, [2000], split="val")
    first = list(eval_batches(tmp_path, "val", 4, 16, 5, seed=1))
    again = list(eval_batches(tmp_path, "val", 4, 16, 5, seed=1))
    assert len(first) == 5
    for (xa, ya), (xb, yb) in zip(first, again):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError, match="n_batches"):
        eval_batches(tmp_path, "val", 4, 16, 0)
    # A rewound loader (the trainer's val loader at each eval) gives those batches again.
    loader = TokenLoader(tmp_path, "val", 4, 16, order="random", seed=1)
    for _ in range(2):
        loader.rewind()
        for x, y in first:
            xl, yl = loader.next_batch()
            assert torch.equal(xl, x) and torch.equal(yl, y)


# -- errors -------------------------------------------------------------------------------


def test_missing_folder_and_missing_split_name_the_prep_command(tmp_path):
    with pytest.raises(ShardError, match="does not exist") as e:
        TokenLoader(tmp_path / "nope", "train", 2, 8)
    assert "python data_prep/prepare.py" in str(e.value)
    assert f"--out {tmp_path / 'nope'}" in str(e.value)
    make_split(tmp_path, [100], split="train")
    with pytest.raises(ShardError, match=r"no val shards") as e:
        TokenLoader(tmp_path, "val", 2, 8)
    assert str(tmp_path) in str(e.value) and "python data_prep/prepare.py" in str(e.value)
    assert f"--out {tmp_path}" in str(e.value)


def test_split_too_small_for_one_block(tmp_path):
    make_split(tmp_path, [40, 24], split="val")  # 64 tokens: a block of 64 needs 65
    with pytest.raises(ValueError) as e:
        TokenLoader(tmp_path, "val", 2, 64)
    msg = str(e.value)
    assert "val split too small for one block of 64 tokens" in msg
    assert "larger --val-fraction" in msg and "smaller block_size" in msg and str(tmp_path) in msg
    TokenLoader(tmp_path, "val", 2, 63)  # exactly one window fits
    make_split(tmp_path, [64], split="train")  # a larger --val-fraction would shrink train further
    with pytest.raises(ValueError, match="train split too small") as e:
        TokenLoader(tmp_path, "train", 2, 64)
    assert "more text (or a smaller --val-fraction)" in str(e.value)


def test_bad_shard_header_names_the_file(tmp_path):
    make_split(tmp_path, [100])
    bad = tmp_path / shard_name("train", 1)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = [MAGIC + 1, VERSION, 10]
    bad.write_bytes(header.tobytes() + bytes(20))
    with pytest.raises(ShardError, match="bad magic") as e:
        TokenLoader(tmp_path, "train", 2, 8)
    assert str(bad) in str(e.value)
    header[0] = MAGIC
    bad.write_bytes(header.tobytes() + bytes(12))  # promises 10 tokens, holds 6
    with pytest.raises(ShardError, match="truncated") as e:
        TokenLoader(tmp_path, "train", 2, 8)
    assert str(bad) in str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"block_size": -1}, "block_size must be a positive int"),
        ({"block_size": 8.0}, "block_size must be a positive int"),
        ({"world_size": 0}, "world_size must be a positive int"),
        ({"rank": 2, "world_size": 2}, r"rank must be an int in \[0, world_size=2\)"),
        ({"rank": -1}, "rank must be"),
        ({"order": "shuffled"}, "order must be one of"),
        ({"seed": -3}, "seed must be"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, match):
    make_split(tmp_path, [100])
    args = {"batch_size": 2, "block_size": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        TokenLoader(tmp_path, "train", **args)


def test_load_state_dict_refuses_a_mismatched_state(tmp_path):
    make_split(tmp_path / "a", [500])
    make_split(tmp_path / "b", [600])
    loader = TokenLoader(tmp_path / "a", "train", 2, 8, seed=1)
    loader.next_batch()
    state = loader.state_dict()
    cases = [
        (TokenLoader(tmp_path / "a", "train", 2, 8, order="sequential"), "order="),
        (TokenLoader(tmp_path / "a", "train", 2, 16, seed=1), "block_size="),
        (TokenLoader(tmp_path / "b", "train", 2, 8, seed=1), "num_tokens=.*dataset"),
        (TokenLoader(tmp_path / "a", "train", 2, 8, seed=2), "seed="),
    ]
    for other, match in cases:
        with pytest.raises(ValueError, match=match):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        loader.load_state_dict({"order": "random"})
    with pytest.raises(ValueError, match="windows_consumed"):
        loader.load_state_dict({**state, "windows_consumed": -1})
    # Batch size, rank and world size are free to change.
    TokenLoader(tmp_path / "a", "train", 5, 8, rank=1, world_size=3, seed=1).load_state_dict(state)


# -- memory ---------------------------------------------------------------------------------


def write_big_shard(path: Path, n_tokens: int, chunk: int = 8_000_000) -> None:
    """A shard written chunk by chunk, so the test process never holds it either."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = [MAGIC, VERSION, n_tokens]
    zeros = np.zeros(chunk, dtype="<u2").tobytes()  # content is irrelevant to memory use
    with open(path, "wb") as f:
        f.write(header.tobytes())
        for begin in range(0, n_tokens, chunk):
            f.write(zeros[: 2 * (min(begin + chunk, n_tokens) - begin)])


# Peak RSS growth while a loader is built and iterated. Read as VmHWM after resetting it
# through /proc/self/clear_refs: ru_maxrss of a child also counts the forking parent's RSS
# (pytest with torch imported), which hides anything smaller than that.
PEAK_RSS_SCRIPT = textwrap.dedent(
    """
    import sys
    from gpt.loader import TokenLoader

    def peak_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS (after importing torch)
    before = peak_kib()
    for order in ("random", "sequential"):
        loader = TokenLoader(sys.argv[1], "train", 2, 256, order=order)
        for _ in range(10):
            loader.next_batch()
    print(peak_kib() - before)
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_does_not_grow_with_the_shard(tmp_path):
    growth_mib = {}
    for name, n_tokens in (("small", 20_000_000), ("large", 200_000_000)):  # 40 MB vs 400 MB
        shard = tmp_path / name / shard_name("train", 0)
        shard.parent.mkdir()
        write_big_shard(shard, n_tokens)
        try:
            out = subprocess.run(
                [sys.executable, "-c", PEAK_RSS_SCRIPT, str(shard.parent)],
                capture_output=True, text=True, check=True, timeout=120,
            )
        finally:
            shard.unlink()  # pytest keeps old tmp dirs; do not leave 400 MB behind
        growth_mib[name] = int(out.stdout.split()[-1]) / 1024
    # Reading the large shard whole would add >= 400 MB. Mapped pages of the 20 random windows
    # do count (the kernel may map up to a 2 MB page-cache folio per window), hence the margin.
    assert growth_mib["large"] < 1.3 * growth_mib["small"] + 48, growth_mib


# -- open files -----------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs Linux /proc")
def test_open_loaders_hold_no_file_descriptor_per_shard(tmp_path):
    """A memory map needs no open file: np.memmap kept one descriptor per shard, so ~1,000 shards
    (with a val loader beside the train loader) ran into the usual 1,024 open-files limit."""
    make_split(tmp_path, [40] * 300)
    make_split(tmp_path, [40] * 50, split="val")

    def open_fds() -> int:
        return len(list(Path("/proc/self/fd").iterdir()))

    before = open_fds()
    train = TokenLoader(tmp_path, "train", 4, 64, seed=1)
    val = TokenLoader(tmp_path, "val", 4, 64, order="sequential")
    assert open_fds() - before < 5
    for _ in range(10):
        x, y = train.next_batch()
        assert_windows_match_stream(x, y, 64)
    assert_windows_match_stream(*val.next_batch(), 64)
    assert open_fds() - before < 5
    assert not train._shards[0].flags.writeable  # read-only, as the memory map was


def test_load_state_dict_refuses_other_tokens_of_the_same_count(tmp_path):
    """A dataset prepared again (another --seed, another input of the same length) can hold as
    many tokens as before: the count alone let a resume read another stream without a word.
    The same tokens in other shard sizes are the same stream, and resume."""
    make_split(tmp_path / "a", [500, 500])
    make_split(tmp_path / "resharded", [300, 37, 663])
    other = tmp_path / "other"
    other.mkdir()
    write_shard(other / shard_name("train", 0), (np.arange(1000) * 7 + 3) % 65536)
    saved = TokenLoader(tmp_path / "a", "train", 2, 8, seed=1)
    for _ in range(3):
        saved.next_batch()
    state = json.loads(json.dumps(saved.state_dict()))

    with pytest.raises(ShardError, match="not the tokens it was saved on") as e:
        TokenLoader(other, "train", 2, 8, seed=1).load_state_dict(state)
    assert str(other) in str(e.value) and "1,000 tokens" in str(e.value)

    resumed = TokenLoader(tmp_path / "resharded", "train", 2, 8, seed=1)
    resumed.load_state_dict(state)
    for _ in range(5):
        xa, ya = saved.next_batch()
        xb, yb = resumed.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # A state saved before the check existed has no fingerprint: it resumes as it did.
    old = {k: v for k, v in state.items() if k != "fingerprint"}
    TokenLoader(other, "train", 2, 8, seed=1).load_state_dict(old)


@pytest.mark.parametrize("order", ["random", "sequential"])
def test_empty_and_one_window_shards_with_ranks_and_a_resume_at_the_epoch_boundary(tmp_path, order):
    """Shards of 0 tokens and of exactly block_size + 1 (one window, whose last token is also the
    next window's first) add nothing and exactly their tokens; 2 ranks still split the
    single-process batch; a state saved at the epoch boundary, then past it, resumes on 3 ranks."""
    block = 8
    make_split(tmp_path, [0, block + 1, 0, 5, block + 1, 0, 32, block + 1])  # 64 tokens
    single = TokenLoader(tmp_path, "train", 1, block, order=order, seed=3)
    assert single.num_tokens == 64 and single.windows_per_epoch == 7  # 63 // 8: no 8th window

    def ranks(world_size, batch):
        return [TokenLoader(tmp_path, "train", batch, block, rank=r, world_size=world_size,
                            order=order, seed=3) for r in range(world_size)]

    def step(loaders):
        parts = [loader.next_batch() for loader in loaders]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        assert_windows_match_stream(x, y, block)
        assert max(starts_of(x)) <= 64 - block - 1
        return starts_of(x)

    reference = [int(s) for s in single.window_starts(0, 40)]
    if order == "random":  # the last window that fits ends at the stream's last token
        assert single.window_starts(0, 2000).max() == 64 - block - 1
    seen, loaders = [], ranks(2, 2)
    while len(seen) < 8:  # stops one window past the first epoch (7 windows)
        seen += step(loaders)
    for consumed in (7, 8):  # at the boundary, and beyond one epoch
        resumed = ranks(3, 1)
        state = json.loads(json.dumps(loaders[0].state_dict()))
        state["windows_consumed"] = consumed
        for loader in resumed:
            loader.load_state_dict(state)
        after = step(resumed) + step(resumed)
        assert after == reference[consumed:consumed + 6]
    assert seen == reference[:8]
    if order == "sequential":  # each epoch reads every window once, in stream order
        assert reference[:14] == 2 * list(range(0, 7 * block, block))


def test_a_shard_replaced_between_its_header_read_and_its_map_is_named(tmp_path):
    # The loader reads a shard's header, then maps the file through a second open: a new prep may
    # rename another shard over the path in between (a larger count than the file holds gave
    # torch's bare error; a smaller one mapped a mix of the two files).
    from gpt.loader import _map_tokens

    path = tmp_path / shard_name("train", 0)
    write_shard(path, np.arange(100))
    assert _map_tokens(path, 100).tolist() == list(range(100))
    for stale_count in (200, 50):  # the count of the file that was there when the header was read
        with pytest.raises(ShardError, match="the shard changed while it was being opened") as e:
            _map_tokens(path, stale_count)
        assert str(path) in str(e.value)
