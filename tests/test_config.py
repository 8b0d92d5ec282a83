"""Config parsing: a TOML file's values keep their TOML types; command-line strings are converted."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpt.config import ConfigError, parse_args

from conftest import REPO


@pytest.mark.parametrize(("line", "message"), [
    ('n_layer = "2"', "n_layer must be an integer, got '2' (a string; write n_layer = 2 without quotes)"),
    ('learning_rate = "1e-3"',
     "learning_rate must be a number, got '1e-3' (a string; write learning_rate = 0.001 without quotes)"),
    ('bias = "false"', "bias must be true or false, got 'false' (a string; write bias = false without quotes)"),
    ('tie_weights = "yes"', "tie_weights must be true or false, got 'yes' (a string; write tie_weights = true "
                            "without quotes)"),
    ('n_layer = "four"', "n_layer must be an integer, got 'four' (a string)"),
    ("n_layer = 2.0", "n_layer must be an integer, got 2.0"),
])
def test_toml_strings_for_numbers_and_booleans_are_refused(tmp_path, line, message):
    """A TOML file has real types: a quoted number or boolean is a mistake, named with the file and key."""
    path = tmp_path / "run.toml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", str(path)])
    assert str(e.value) == f"{path}: {message}"


def test_toml_types_that_fit_and_command_line_strings_are_accepted(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('n_layer = 2\nlearning_rate = 1\nmin_lr = 1e-4\nbias = false\ncompile = true\n'
                    'device = "cpu"\n')
    config = parse_args(["--config", str(path)])
    # an integer for a float key; a TOML boolean for the tri-state string key `compile`
    assert (config.n_layer, config.learning_rate, config.bias, config.compile) == (2, 1.0, False, "true")
    assert type(config.learning_rate) is float
    # On the command line every value arrives as a string and is converted, as before.
    config = parse_args(["--config", str(path), "--n_layer=3", "--learning_rate=2e-3", "--bias=yes",
                         "--compile=false"])
    assert (config.n_layer, config.learning_rate, config.bias, config.compile) == (3, 2e-3, True, "false")
    with pytest.raises(ConfigError, match="^command line: n_layer must be an integer, got 'four'$"):
        parse_args(["--n_layer=four"])


@pytest.mark.parametrize(("line", "message"), [
    ('device = "CPU"', "device = 'CPU' is not allowed; choose one of auto, cpu, cuda, mps"),
    ('compile = "yes"', "compile = 'yes' is not allowed; choose one of auto, true, false"),
    ("n_layer = 2\nn-layer = 3", "n_layer is given twice, as 'n_layer' and 'n-layer'; keep one"),
])
def test_toml_value_errors_name_the_file(tmp_path, line, message):
    """A value outside a key's choices, or a key spelled twice (TOML sees n_layer and n-layer as two
    keys, so one would silently win), is named with the file it is in, as a type error is."""
    path = tmp_path / "run.toml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", str(path)])
    assert str(e.value) == f"{path}: {message}"
    with pytest.raises(ConfigError, match="^command line: device = 'gpu' is not allowed"):
        parse_args(["--device=gpu"])


def test_a_bool_key_alone_on_the_command_line_means_true():
    """`--activation_checkpointing` as a flag (argparse refused it: 'expected one argument')."""
    config = parse_args(["--activation_checkpointing", "--n_layer=2"])
    assert config.activation_checkpointing is True and config.n_layer == 2
    assert parse_args(["--tie-weights", "false"]).tie_weights is False  # a value still counts
    assert parse_args(["--bias=no"]).bias is False


def test_a_tri_state_key_takes_the_bool_spellings_on_the_command_line():
    # compile is auto/true/false; --compile=True was refused where --bias=True was taken.
    assert [parse_args([f"--compile={v}"]).compile for v in ("True", "1", "no", "auto")] == ["true", "true", "false", "auto"]
    with pytest.raises(ConfigError, match="compile"):
        parse_args(["--compile=maybe"])


def test_home_in_folders_is_expanded_as_a_shell_would(tmp_path, monkeypatch):
    """`--out_dir=~/x` reaches us unexpanded (no shell expands '~' after '='), as does a TOML
    value: it made a folder literally named '~' in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    toml = tmp_path / "run.toml"
    toml.write_text('data_dir = "~/data"\n')
    config = parse_args(["--config", str(toml), "--out_dir=~/runs/a", "--init_from=hf:~/gpt2"])
    assert (config.out_dir, config.data_dir, config.init_from) == (
        str(tmp_path / "runs" / "a"), str(tmp_path / "data"), f"hf:{tmp_path / 'gpt2'}")
    assert parse_args(["--init_from=~/run"]).init_from == str(tmp_path / "run")
    assert parse_args(["--out_dir=out/~x"]).out_dir == "out/~x"  # only a leading ~ is home


def test_tokens_per_step_and_wandb_tags_are_refused_before_any_work(tmp_path, monkeypatch):
    # Both were refused only after the dataset was prepared and loaded (and, for the tags, the
    # model built): a first run on the default corpus prepared 31 MB for nothing.
    with pytest.raises(ConfigError, match=r"tokens_per_step \(100\) must be a multiple of .* = 4 x 32 x 1 = 128"):
        parse_args(["--batch_size=4", "--block_size=32", "--tokens_per_step=100"])
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    assert parse_args(["--batch_size=4", "--block_size=32", "--tokens_per_step=256"]).tokens_per_step == 256
    with pytest.raises(ConfigError, match=r"= 4 x 32 x 2 = 256; for example 256 or 512"):
        parse_args(["--batch_size=4", "--block_size=32", "--tokens_per_step=128"])
    with pytest.raises(ConfigError, match="wandb_tags: the tag 'xxx.*' is 65 characters; wandb takes tags of 1 to 64"):
        parse_args(["--wandb_mode=offline", "--wandb_tags=ok, " + "x" * 65])
    assert parse_args(["--wandb_tags=ok, " + "x" * 65]).wandb_mode == "disabled"  # unused: left alone


def test_train_py_refuses_a_bad_tokens_per_step_before_preparing_data(tmp_path):
    data = tmp_path / "data"
    proc = subprocess.run([sys.executable, "train.py", f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}",
                           "--prepare_source=stdlib", "--batch_size=4", "--block_size=32", "--tokens_per_step=100"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "tokens_per_step (100) must be a multiple" in proc.stderr and "Traceback" not in proc.stderr
    assert not data.exists() and not (tmp_path / "run").exists()
