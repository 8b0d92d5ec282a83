"""A newcomer's first hour, third pass (a reviewer following the README): each test failed on the
code before its fix."""

from __future__ import annotations

import os

import pytest

from gpt.cli import run_train
from gpt.config import ConfigError, parse_args

from conftest import tiny_args


def test_a_data_dir_of_ones_own_text_is_not_filled_with_the_default_corpus(char_data, tmp_path, capsys):
    """`--data_dir my_texts/` (where my data is): the stdlib's 30 MB was prepared in beside the
    text files, the run trained on Python code, and prep then refused the folder as input."""
    texts = tmp_path / "my texts"
    texts.mkdir()
    (texts / "a.txt").write_text("to be or not to be\n")
    (texts / ".hidden").write_text("")  # (hidden files do not count)
    args = tiny_args(char_data, tmp_path / "run", prepare_source="stdlib")
    args = [a for a in args if not a.startswith("--data_dir=")] + [f"--data_dir={texts}"]
    assert run_train(args) == 2
    err = capsys.readouterr().err
    made = tmp_path / "my texts_prepared"
    # The paths quoted: pasted into a shell, 'my texts' is one argument (the command was cut in two).
    assert err == (f"error: {texts} holds no dataset but other files (a.txt); the 'stdlib' corpus is prepared "
                   f"only into a new or empty folder. To train on your own text there, prepare it first: python "
                   f"data_prep/prepare.py --input '{texts}' --val-rule tail --val-fraction 0.1 --min-val-tokens 65 --out "
                   f"'{made}', then "
                   f"train with --data_dir '{made}'\n")  # (a small folder: prep's default split held out nothing)
    assert sorted(p.name for p in texts.iterdir()) == [".hidden", "a.txt"]
    assert not (tmp_path / "run").exists()


def test_out_dir_and_data_dir_may_not_be_one_folder(tmp_path):
    # The run was written among the shards; prep then refused the folder as a training run.
    with pytest.raises(ConfigError, match=r"^out_dir and data_dir are the same folder \("):
        parse_args([f"--data_dir={tmp_path}/d", f"--out_dir={tmp_path}/x/../d/"], default_config=None)


def test_the_tools_expand_a_tilde_in_their_paths(tmp_path, monkeypatch):
    """`--out=~/x` reaches the tool unexpanded (the shell leaves it): export, consolidate, plot
    and prep made a folder named '~' where they ran; eval, prep --input, plot and list said the
    path did not exist. train.py and sample.py expanded it already."""
    from gpt import eval as gpt_eval
    from gpt import export, plot
    from gpt.prepare import main as prepare_main

    home = tmp_path / "home"
    (home / "texts").mkdir(parents=True)
    (home / "texts" / "a.txt").write_text("abcabcabc\n" * 50)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert prepare_main(["--input=~/texts", "--out=~/data", "--tokenizer", "char", "--val-rule", "tail",
                         "--val-fraction", "0.2", "--min-val-tokens", "5", "--no-progress"]) == 0
    assert (home / "data" / "meta.json").is_file() and not (tmp_path / "~").exists()
    assert export.build_parser().parse_args(["~/run", "--out=~/hf"]).out == str(home / "hf")
    assert plot.build_parser().parse_args(["~/run", "--out=~/p.png"]).runs == [str(home / "run")]
    assert gpt_eval.build_parser().parse_args(["~/run", "--data_dir=~/data"]).data_dir == str(home / "data")


def test_a_refused_run_removes_the_parent_folders_it_made(tmp_path, capsys):
    # `--out_dir out/NAME` run from another folder, refused at set-up: an empty out/ was left.
    args = tiny_args(tmp_path / "no data", tmp_path / "deep" / "a" / "b", prepare_source="none")
    assert run_train(args) == 2
    assert "dataset folder does not exist" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists() and os.listdir(tmp_path) == []
