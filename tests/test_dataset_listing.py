"""A split's shards are one token stream, so training and eval read exactly the shards the
dataset's meta.json lists: a shard lost from the middle, a stale one left by an earlier prep, or
one copied over from another prep is refused by name before any step (found by a review: each
was read as it was, exit 0, no word). And repeated prep options add up instead of the last one
silently winning."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt.dataset import load_tokenizer, split_shards
from gpt.eval import evaluate_split
from gpt.loader import TokenLoader
from gpt.model import GPT, GPTConfig
from gpt.prepare import build_parser, main, prepare
from gpt.shards import ShardError, write_shard

from conftest import REPO, SHAKESPEARE, need_shakespeare, tiny_args


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory) -> Path:
    """A char dataset whose train split is 4 shards (val 1)."""
    need_shakespeare()
    out = tmp_path_factory.mktemp("listing") / "data"
    prepare(out, [SHAKESPEARE.read_text()[:100_000]], tokenizer="char", val_fraction=0.1, val_rule="tail",
            shard_tokens=25_000, progress=False)
    assert [p.name for p in split_shards(out, "train")] == [f"train_00000{i}.bin" for i in range(4)]
    return out


def _copy(four_shards: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(four_shards, data)
    return data


def _refused(data: Path, split: str = "train") -> str:
    """The message of the one error both readers of a split give: the loader and eval."""
    with pytest.raises(ShardError) as by_loader:
        TokenLoader(data, split, 2, 8)
    model = GPT(GPTConfig(vocab_size=json.loads((data / "meta.json").read_text())["vocab_size"], n_layer=1,
                          n_head=1, n_embd=8, block_size=8))
    with pytest.raises(ShardError) as by_eval:
        evaluate_split(model, data, load_tokenizer(data), split, batch_size=2, max_batches=1)
    assert str(by_eval.value) == str(by_loader.value)
    return str(by_loader.value)


def test_a_shard_lost_from_the_middle_is_named(four_shards, tmp_path):
    data = _copy(four_shards, tmp_path)
    (data / "train_000001.bin").unlink()
    message = _refused(data)
    assert "1 of the 4 train shards missing (train_000001.bin, listed in its meta.json, is not here)" in message
    assert "incomplete" in message and "--overwrite" in message, message


def test_a_stale_shard_of_an_earlier_prep_is_named(four_shards, tmp_path):
    # e.g. `cp new/* old/` over a folder that held a bigger dataset
    data = _copy(four_shards, tmp_path)
    shutil.copy(data / "train_000003.bin", data / "train_000004.bin")
    message = _refused(data)
    assert "train_000004.bin is not among the train shards its meta.json lists" in message, message
    assert "--overwrite" in message


def test_a_shard_of_another_prep_under_a_listed_name_is_found_by_its_token_count(four_shards, tmp_path):
    data = _copy(four_shards, tmp_path)
    write_shard(data / "val_000000.bin", torch.arange(50).numpy().astype("uint16") % 10)
    message = _refused(data, "val")
    assert "its val shards hold 50 tokens, but its meta.json says 10,000" in message, message


def test_a_whole_dataset_and_one_without_a_shard_list_are_read_as_they_are(four_shards, tmp_path):
    assert TokenLoader(four_shards, "train", 2, 8).num_tokens == 90_000
    data = _copy(four_shards, tmp_path)
    meta = json.loads((data / "meta.json").read_text())
    del meta["shards"]  # an older or hand-made meta.json: nothing to check the files against
    (data / "meta.json").write_text(json.dumps(meta))
    (data / "train_000001.bin").unlink()
    assert TokenLoader(data, "train", 2, 8).num_tokens == 65_000


def test_train_py_refuses_the_dataset_before_training_in_one_line(four_shards, tmp_path):
    data = _copy(four_shards, tmp_path)
    (data / "train_000002.bin").unlink()
    run = subprocess.run([sys.executable, "train.py", *tiny_args(data, tmp_path / "run", max_steps=2)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "train_000002.bin, listed in its meta.json, is not here" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and "step 1" not in run.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_repeated_input_and_hf_data_files_add_up(tmp_path):
    # argparse kept only the last --input: `--input a.txt --input b.txt` prepared b.txt alone.
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha beta gamma\n" * 200)
    b.write_text("delta epsilon\n" * 200)
    out = tmp_path / "data"
    assert main(["--input", str(a), "--input", str(b), "--out", str(out), "--tokenizer", "char",
                 "--val-rule", "tail", "--val-fraction", "0.1", "--min-val-tokens", "10", "--no-progress"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] == 2 and meta["text_bytes"] == a.stat().st_size + b.stat().st_size
    args = build_parser().parse_args(["--hf-dataset", "json", "--hf-data-files", "x.json", "--hf-data-files",
                                      "y.json", "z.json", "--out", "o"])
    assert args.hf_data_files == ["x.json", "y.json", "z.json"]
