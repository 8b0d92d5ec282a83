"""config.json, the run's record of its settings: written whole, and a failure is one clear error."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_config
from gpt.config import ConfigError
from gpt.trainer import train


def test_a_folder_named_config_json_is_named_in_one_error_and_left_alone(char_data, tmp_path):
    run = tmp_path / "run"
    (run / "config.json").mkdir(parents=True)
    (run / "config.json" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"cannot write .*config\.json, the run's record of its settings "
                                            r"\(Is a directory\): a folder by that name is in the way"):
        train(tiny_config(char_data, run, max_steps=2, eval_interval=2))
    assert (run / "config.json" / "keep.txt").read_text() == "mine"
    assert not [p.name for p in run.iterdir() if p.name.startswith(".config.json.tmp")]


def test_config_json_is_replaced_whole_on_a_resume(char_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=2, eval_interval=2))
    assert json.loads((run / "config.json").read_text())["max_steps"] == 2
    train(tiny_config(char_data, run, max_steps=4, eval_interval=2))
    assert json.loads((run / "config.json").read_text())["max_steps"] == 4
    assert sorted(p.name for p in run.iterdir() if "config" in p.name) == ["config.json"]
