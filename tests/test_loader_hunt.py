"""TokenLoader properties over many small random cases, and bugs they found.

Random shard layouts (empty shards, shards shorter than a block, one-window shards), batch
sizes, block sizes, world sizes 1-4, both orders and seeds, checked against the module
docstring's definition of the window sequence. Synthetic shards hold `position % 65536`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.loader import RANDOM_CHUNK, TokenLoader, eval_batches
from gpt.shards import ShardError, shard_name, write_shard


def make_split(data_dir: Path, sizes: list[int], split: str = "train") -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    begin = 0
    for i, n in enumerate(sizes):
        write_shard(data_dir / shard_name(split, i), np.arange(begin, begin + n) % 65536)
        begin += n
    return begin


def documented_starts(num_tokens: int, block: int, order: str, seed: int, first: int, count: int) -> list[int]:
    """Window starts as the module docstring defines them, one window at a time."""
    if order == "sequential":
        per_epoch = (num_tokens - 1) // block
        return [(j % per_epoch) * block for j in range(first, first + count)]
    out = []
    for j in range(first, first + count):
        rng = np.random.default_rng([seed, j // RANDOM_CHUNK])
        out.append(int(rng.integers(0, num_tokens - block, size=RANDOM_CHUNK, dtype=np.int64)[j % RANDOM_CHUNK]))
    return out


@pytest.mark.parametrize("case_seed", range(6))
def test_random_layouts_follow_the_documented_window_sequence_and_resume(tmp_path, case_seed):
    rs = random.Random(case_seed)
    for case in range(8):
        block = rs.choice([1, 2, 3, 5, 8, 17])
        sizes = [rs.choice([0, 1, 2, block, block + 1, rs.randint(0, 4 * block + 10)])
                 for _ in range(rs.randint(1, 5))]
        if sum(sizes) < block + 1:
            sizes.append(block + 1 + rs.randint(0, 30))
        data = tmp_path / f"c{case}"
        n = make_split(data, sizes)
        order, seed = rs.choice(["random", "sequential"]), rs.randint(0, 3)
        batch, world = rs.randint(1, 5), rs.randint(1, 4)
        loaders = [TokenLoader(data, "train", batch, block, rank=r, world_size=world, order=order,
                               seed=seed, vocab_size=65536) for r in range(world)]
        steps = rs.randint(1, 25)
        for step in range(steps):
            for r, loader in enumerate(loaders):
                x, y = loader.next_batch()
                assert x.shape == y.shape == (batch, block) and x.dtype == y.dtype == torch.int64
                whole = x[:, :1] + torch.arange(block + 1)  # a stream slice, shards stitched
                assert torch.equal(x, whole[:, :-1]) and torch.equal(y, whole[:, 1:])
                first = (step * world + r) * batch
                assert x[:, 0].tolist() == documented_starts(n, block, order, seed, first, batch)
        state = json.loads(json.dumps(loaders[0].state_dict()))
        assert all(loader.state_dict() == state for loader in loaders)
        assert state["windows_consumed"] == steps * batch * world
        # Another world size and batch size continue the same sequence from the same window.
        batch2, world2 = rs.randint(1, 5), rs.randint(1, 4)
        resumed = [TokenLoader(data, "train", batch2, block, rank=r, world_size=world2,
                               order=order, seed=seed) for r in range(world2)]
        for loader in resumed:
            loader.load_state_dict(state)
        for step in range(3):
            for r, loader in enumerate(resumed):
                first = state["windows_consumed"] + (step * world2 + r) * batch2
                assert loader.next_batch()[0][:, 0].tolist() == documented_starts(n, block, order, seed, first, batch2)


def test_a_refused_batch_is_not_counted_as_consumed(tmp_path):
    """A batch that raised (an id outside the vocabulary) used to advance `windows_consumed`
    anyway: the state then claimed windows no caller ever received, and a retry went on to the
    next batch, silently skipping the bad one."""
    tokens = np.arange(40) % 50
    tokens[25] = 99  # in the third window [20, 31) of a sequential block of 10, in shard 1
    write_shard(tmp_path / shard_name("train", 0), tokens[:22])
    write_shard(tmp_path / shard_name("train", 1), tokens[22:])
    loader = TokenLoader(tmp_path, "train", 1, 10, order="sequential", vocab_size=50)
    loader.next_batch()
    loader.next_batch()
    before = loader.state_dict()
    for _ in range(2):  # the retry is refused too: the bad batch is never skipped
        with pytest.raises(ShardError, match="token id 99 at position 3 ") as e:
            loader.next_batch()
        assert "train_000001.bin" in str(e.value)
        assert loader.state_dict() == before
    assert before["windows_consumed"] == 2


def test_eval_batches_repeat_and_split_across_ranks(tmp_path):
    make_split(tmp_path, [400, 3, 0, 300], split="val")
    first = list(eval_batches(tmp_path, "val", 3, 16, 4, seed=2))
    again = list(eval_batches(tmp_path, "val", 3, 16, 4, seed=2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    ranks = [list(eval_batches(tmp_path, "val", 3, 16, 4, seed=2, rank=r, world_size=2)) for r in range(2)]
    single = list(eval_batches(tmp_path, "val", 6, 16, 4, seed=2))
    for i in range(4):
        assert torch.equal(torch.cat([ranks[0][i][0], ranks[1][i][0]]), single[i][0])
        assert torch.equal(torch.cat([ranks[0][i][1], ranks[1][i][1]]), single[i][1])
