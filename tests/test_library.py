"""The package from Python, as a notebook uses it: gpt.trainer.train(TrainConfig(...)) in a
long-lived process (a review of library use found each of these)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_config
from gpt.config import ConfigError, TrainConfig
from gpt.trainer import train


def _unchecked(config: TrainConfig, **changes) -> TrainConfig:
    """`config` with `changes`, not validated: a TrainConfig as a library user builds one."""
    return dataclasses.replace(config, **changes)


def test_train_checks_a_config_built_by_hand(char_data, tmp_path):
    # Nothing validated a TrainConfig given to train(): out_dir = data_dir wrote checkpoints
    # among the dataset's files, min_lr > learning_rate trained to a val loss of 16.
    base = tiny_config(char_data, tmp_path / "run", max_steps=2)
    before = sorted(p.name for p in char_data.iterdir())
    with pytest.raises(ConfigError, match="among the dataset's files"):
        train(_unchecked(base, out_dir=str(char_data)))
    assert sorted(p.name for p in char_data.iterdir()) == before
    with pytest.raises(ConfigError, match="min_lr"):
        train(_unchecked(base, min_lr=1.0))
    with pytest.raises(ConfigError, match=r"max_steps must be an int, got '5' \(str\)"):
        train(_unchecked(base, max_steps="5"))
    with pytest.raises(ConfigError, match=r"init_from must be a str, got None"):  # not AttributeError
        train(_unchecked(base, init_from=None))
    assert not (tmp_path / "run").exists()


def test_train_expands_home_in_its_folders_as_train_py_does(char_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    train(_unchecked(tiny_config(char_data, tmp_path, max_steps=2, eval_interval=0), out_dir="~/run"))
    assert (tmp_path / "home" / "run" / "latest").is_file()
    assert not (tmp_path / "~").exists()


def test_train_leaves_the_callers_random_state_and_grad_mode(char_data, tmp_path):
    # train() seeded the global generator from config.seed: whatever the caller drew afterwards
    # was the same whatever seed the caller had set. Under no_grad it failed in backward.
    config = tiny_config(char_data, tmp_path / "run", max_steps=2, eval_interval=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with torch.no_grad():
        train(config)
        assert not torch.is_grad_enabled()
    assert torch.equal(torch.rand(3), expected)


def test_train_refuses_another_default_dtype(char_data, tmp_path):
    # The model was built in float64 while the log and state.json said float32.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.raises(ConfigError, match="default dtype is torch.float64"):
            train(tiny_config(char_data, tmp_path / "run", max_steps=2))
    finally:
        torch.set_default_dtype(previous)
    assert not (tmp_path / "run").exists()


def test_a_whole_corpus_given_as_one_string_is_named_briefly(tmp_path):
    from gpt.prepare import prepare
    from gpt.sources import SourceError

    with pytest.raises(SourceError) as e:
        prepare(tmp_path / "out", "to be or not to be " * 10_000, tokenizer="char", progress=False)
    assert len(str(e.value)) < 400 and "190,000 characters" in str(e.value), str(e.value)[:500]


def test_a_refused_resume_or_init_from_names_every_difference_at_once(char_data, tmp_path):
    # Following each refusal took a try per setting: the data settings first, then the optimizer
    # or the model's shape; and the fallback advice, a new run from its weights, then met the
    # shape refusal (a review followed them literally).
    from gpt import checkpoint as ckpt

    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=4, eval_interval=2))
    with pytest.raises(ckpt.CheckpointError) as e:
        train(tiny_config(char_data, run, max_steps=8, data_order="sequential", optimizer="adamw"
                          if tiny_config(char_data, run).optimizer == "muon" else "muon"))
    text = str(e.value)
    assert "data_order: checkpoint 'random' vs config 'sequential'" in text and "Also, it was trained with optimizer" in text
    assert "--init_from=" in text  # the same shape: a new run from its weights works
    with pytest.raises(ckpt.CheckpointError) as e:
        train(tiny_config(char_data, run, max_steps=8, data_order="sequential", n_embd=32))
    text = str(e.value)
    assert "data_order" in text and "n_embd: checkpoint 64 vs config 32" in text and "--init_from=" not in text
    with pytest.raises(ConfigError) as e:
        train(tiny_config(char_data, tmp_path / "new", init_from=str(run), block_size=128, n_layer=3))
    text = str(e.value)
    assert "set block_size = 64" in text and "n_layer: checkpoint 2 vs config 3" in text and "--n_layer=2" in text
    # A block_size difference is named once (the loader's), and a shorter one keeps the
    # new-run advice (init_from crops the position table); a Path for out_dir is a folder as a str is.
    with pytest.raises(ckpt.CheckpointError) as e:
        train(tiny_config(char_data, run, max_steps=8, block_size=32))
    text = str(e.value)
    assert text.count("block_size: checkpoint 64 vs config 32") == 1 and "--init_from=" in text, text
    assert train(_unchecked(tiny_config(char_data, run, max_steps=4, eval_interval=2), out_dir=run)).step == 4


def test_out_of_memory_advice_to_a_resume_never_run_says_to_resume(char_data, tmp_path):
    # resume = 'never' refuses an out_dir holding checkpoints: "to resume from it" alone failed.
    from gpt.trainer import out_of_memory_message

    config = tiny_config(char_data, tmp_path / "run", max_steps=2, eval_interval=2, resume="never")
    train(config)
    text = out_of_memory_message(config, torch.OutOfMemoryError("out of memory"))
    assert "To resume from it with resume = 'auto', lower batch_size and set tokens_per_step = 512" in text, text
    assert "resume = 'auto'" not in out_of_memory_message(dataclasses.replace(config, resume="auto"),
                                                         torch.OutOfMemoryError("out of memory"))


def test_load_model_given_a_run_folder_says_to_name_a_checkpoint(char_data, tmp_path):
    # It said the run folder's manifest.json was unreadable and to restore "the checkpoint" from a copy.
    from gpt import checkpoint as ckpt

    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=2, eval_interval=2))
    with pytest.raises(ckpt.CheckpointError, match="is a training run's folder, not one of its checkpoints") as e:
        ckpt.load_model(run)
    assert "restore" not in str(e.value)
    model, state = ckpt.load_model(ckpt.latest_checkpoint(run))
    assert state["step"] == 2
