"""Corpora and datasets of unusual shape at scale (a review that ran prep and the loader on them):
long runs of mixed whitespace in BPE training, and datasets of tens of thousands of shards."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, tiny_config
from gpt import resume
from gpt.loader import TokenLoader
from gpt.shards import HEADER_BYTES, MAGIC, VERSION, ShardError
from gpt.tokenizer import MAX_TRAIN_RUN, _bounded_runs
from gpt.trainer import train


def _bare_shards(folder: Path, count: int, tokens: int) -> None:
    """`count` train shards of `tokens` ids each, as llm.c writes them (no meta.json)."""
    folder.mkdir()
    header = np.zeros(HEADER_BYTES // 4, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens)
    data = header.tobytes() + np.arange(tokens, dtype=np.uint16).tobytes()
    for i in range(count):
        (folder / f"train_{i:06d}.bin").write_bytes(data)


def test_bpe_training_cuts_runs_of_mixed_whitespace():
    """100,000 blank CRLF lines in a 1.4 MB text took BPE training 71 s (1.6 s without them): the
    cheap test for long runs saw runs of one character repeated only, and let "\\r\\n" * n through
    to the trainer whole, whose cost grows with a pre-token's length per merge."""
    for run in ("\r\n" * 100_000, " \n" * 50_000, "\n  \t" * 10_000):
        pieces = list(_bounded_runs(["words before " + run + " and after"]))
        assert "".join(pieces) == "words before " + run + " and after"  # cut, nothing lost
        longest = max(len(m.group()) for piece in pieces for m in re.finditer(r"\s+", piece))
        assert longest <= MAX_TRAIN_RUN, (repr(run[:4]), longest)
    ordinary = "To be, or not to be:\r\n\r\nthat is the question.\n" * 1000
    assert list(_bounded_runs([ordinary])) == [ordinary]  # ordinary text goes through as it is


def test_a_resume_reads_the_data_fingerprint_from_the_runs_own_loader(char_data, tmp_path, monkeypatch):
    """The resume check built a second train loader for the fingerprint while the run's train
    and val loaders were open: every shard mapped twice, so a dataset of 33,000 shards a split
    trained from scratch but could not resume (past the limit of memory maps)."""
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=2, eval_interval=2, eval_iters=1))

    def no_second_loader(*args, **kwargs):
        raise AssertionError("a second TokenLoader was opened for the resume check")

    monkeypatch.setattr(resume, "TokenLoader", no_second_loader)
    result = train(tiny_config(char_data, run, max_steps=4, eval_interval=2, eval_iters=1))
    assert result.step == 4
    # The check still compares it: the same number of tokens, other ones, is refused.
    data = tmp_path / "other"
    import shutil

    shutil.copytree(char_data, data)
    shard = data / "train_000000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16, offset=HEADER_BYTES)
    with open(shard, "r+b") as f:
        f.seek(HEADER_BYTES)
        f.write(tokens[::-1].tobytes())
    with pytest.raises(Exception, match="holds as many as the checkpoint's dataset, but not the same ones"):
        train(tiny_config(data, run, max_steps=6, eval_interval=2, eval_iters=1))


def test_a_shard_that_cannot_be_mapped_for_want_of_address_space_says_so(tmp_path):
    """mmap's ENOMEM was reported as "the shard changed while it was being opened (a new data prep
    renamed another over it?); run again", which running again never fixed."""
    data = tmp_path / "big"
    data.mkdir()
    header = np.zeros(HEADER_BYTES // 4, dtype="<i4")
    header[:3] = (MAGIC, VERSION, 60_000_000)
    with open(data / "train_000000.bin", "wb") as f:  # 120 MB, sparse: no disk is spent
        f.write(header.tobytes())
        f.truncate(HEADER_BYTES + 120_000_000)
    code = textwrap.dedent(f"""
        import re, resource
        from gpt.loader import TokenLoader
        size = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + (64 << 20), resource.RLIM_INFINITY))
        TokenLoader({str(data)!r}, "train", 1, 2)
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "cannot map the shard" in result.stderr and "out of memory or address space" in result.stderr, result.stderr
    assert "changed while it was being opened" not in result.stderr


@pytest.mark.slow  # ~10 s: 65,600 shard files, each mapped
def test_more_shards_than_the_system_allows_memory_maps_names_the_limit(tmp_path):
    limit = int(Path("/proc/sys/vm/max_map_count").read_text())
    if limit > 200_000:
        pytest.skip(f"vm.max_map_count is {limit:,} here: too many files to reach it")
    data = tmp_path / "many"
    _bare_shards(data, limit + 100, tokens=4)
    with pytest.raises(ShardError) as e:
        TokenLoader(data, "train", 1, 2)
    assert f"the system's limit (vm.max_map_count = {limit:,})" in str(e.value)
    assert "larger --shard-tokens" in str(e.value)
