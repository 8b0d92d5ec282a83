"""Configuration and command-line cases users hit: each is answered with a clear error naming the
key (or variable, or file), or works, instead of a traceback or argparse's generic complaint."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from gpt.config import ConfigError, build_parser, check_launch_environment, parse_args


def test_help_survives_a_percent_sign_in_the_default_config(tmp_path):
    """--help shows the default file's values; argparse %-formats help texts, and a '%' in one
    (wandb_run_name = "lr 50%") failed with ValueError: unsupported format character."""
    default = tmp_path / "default%.toml"
    default.write_text('wandb_run_name = "lr 50%"\n')
    text = build_parser(str(default)).format_help()
    assert "'lr 50%' from default%.toml" in text
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"], default_config=str(default))
    assert e.value.code == 0


def test_help_shows_a_config_files_value_as_the_run_takes_it(tmp_path):
    """configs/gpt2_124m.toml's `compile = true` was shown as "default: True", not a choice of
    {auto, true, false}; the run takes it as 'true'. A value the run refuses is shown as written."""
    default = tmp_path / "default.toml"
    default.write_text('compile = true\nmin_lr = 0\nn_layer = "2"\n')
    text = " ".join(build_parser(str(default)).format_help().split())
    assert "(default: 'true' from default.toml, built in 'auto')" in text
    assert "(default: 0.0 from default.toml" in text  # a float key given an integer
    assert "(default: '2' from default.toml, built in 4)" in text


def test_help_after_config_shows_that_files_values(tmp_path, capsys):
    """`train.py --config mine.toml --help` showed the default file's values ("0.008 from
    default.toml"): argparse answers --help before it has read --config. A sweep user reading
    the help for the run they are about to start saw another run's settings."""
    default = tmp_path / "default.toml"
    default.write_text("learning_rate = 8e-3\nn_layer = 4\n")
    mine = tmp_path / "mine.toml"
    mine.write_text("learning_rate = 1.2e-2\n")

    def help_of(*argv: str) -> str:
        with pytest.raises(SystemExit) as e:
            parse_args(list(argv), default_config=str(default))
        assert e.value.code == 0
        return " ".join(capsys.readouterr().out.split())

    assert "peak learning rate (default: 0.008 from default.toml, built in 0.001)" in help_of("--help")
    for argv in (["--config", str(mine), "--help"], ["--help", f"--config={mine}"]):
        text = help_of(*argv)
        assert "peak learning rate (default: 0.012 from mine.toml, built in 0.001)" in text
        assert "from default.toml" not in text  # n_layer: the built-in default, as the run would use
    assert "from default.toml" not in help_of("--config=", "--help")
    # A --config that cannot be read: said, and the help shows the built-in values (not the
    # default file's, as if they were that file's).
    text = help_of("--config", str(tmp_path / "nope.toml"), "--help")
    squeezed = "".join(text.split())  # (argparse wraps a long path at its hyphens)
    assert "".join(f"{tmp_path / 'nope.toml'} does not exist: the defaults below are the built-in ones".split()) \
        in squeezed
    assert "from default.toml" not in text
    # A file that sets nothing is still that file (it was called unusable, with no reason given).
    (tmp_path / "empty.toml").write_text("")
    squeezed = "".join(help_of("--config", str(tmp_path / "empty.toml"), "--help").split())
    assert "".join(f"the defaults below are {tmp_path / 'empty.toml'}'s".split()) in squeezed


def test_a_broken_default_config_does_not_stop_runs_of_another_file(tmp_path):
    """The default file was read for the help texts on every parse: a typo in configs/default.toml
    stopped `--config configs/other.toml` runs, which never use it. A plain run still reports it."""
    default = tmp_path / "default.toml"
    default.write_text("n_layer = \n")
    other = tmp_path / "other.toml"
    other.write_text("n_layer = 3\n")
    assert parse_args(["--config", str(other)], default_config=str(default)).n_layer == 3
    assert parse_args(["--config=", "--n_layer=5"], default_config=str(default)).n_layer == 5
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_args([], default_config=str(default))
    assert "cannot be used now" in " ".join(build_parser(str(default)).format_help().split())


def test_a_tri_state_key_alone_means_true():
    """`--compile` alone, as the bool keys take `--bias`: it was "expected one argument"."""
    assert parse_args(["--config=", "--compile"]).compile == "true"
    assert parse_args(["--config=", "--compile", "--n_layer=2"]).compile == "true"
    assert parse_args(["--config=", "--compile", "false"]).compile == "false"
    assert parse_args(["--config=", "--compile=auto"]).compile == "auto"


def test_a_key_with_one_dash_is_told_to_use_two():
    """`-n_layer=2` was "unknown key 'n_layer' (did you mean n_layer, ...?)"."""
    with pytest.raises(ConfigError, match=r"'-n_layer=2' needs two dashes: --n_layer=2"):
        parse_args(["--config=", "-n_layer=2"])
    with pytest.raises(ConfigError, match=r"'n_layer=2' needs two dashes: --n_layer=2"):
        parse_args(["--config=", "n_layer=2"])


@pytest.mark.parametrize(("argv", "message"), [
    (["--learning_rate", "-1e-3"], "learning_rate must be positive, got -0.001"),
    (["--learning-rate", "-1E-3", "--n_layer", "2"], "learning_rate must be positive, got -0.001"),
    (["--max_steps", "-1_000"], "max_steps must be positive, got -1000"),
    (["--weight_decay", "-.5e0"], "weight_decay must be >= 0, got -0.5"),
])
def test_a_negative_value_after_a_space_reaches_the_key_check(argv, message):
    """argparse takes "-1e-3" for an option (only -1 or -0.5 look like numbers to it): the user
    read "expected one argument" instead of what is wrong with the value."""
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config=", *argv])


def test_a_negative_value_after_a_space_is_kept_where_it_is_valid():
    config = parse_args(["--config=", "--wandb_run_name", "-1e3", "--seed", "3", "--bias", "false"])
    assert (config.wandb_run_name, config.seed, config.bias) == ("-1e3", 3, False)


def test_config_given_twice_is_refused(tmp_path):
    """The last --config won and every setting of the first file was silently dropped (a user
    expecting the two to be layered trained the wrong model)."""
    base, small = tmp_path / "base.toml", tmp_path / "small.toml"
    base.write_text("n_layer = 2\n")
    small.write_text("n_embd = 64\n")
    with pytest.raises(ConfigError, match="--config is given 2 times"):
        parse_args(["--config", str(base), f"--config={small}"])
    config = parse_args([f"--config={small}", "--n_layer=2"])
    assert (config.n_layer, config.n_embd) == (2, 64)


def test_a_toml_file_with_a_byte_order_mark_loads(tmp_path):
    """Windows Notepad saves UTF-8 with a BOM: tomllib refused it as "Invalid statement (at line 1,
    column 1)", which names nothing to fix."""
    path = tmp_path / "run.toml"
    path.write_bytes(b"\xef\xbb\xbfn_layer = 2\nn_head = 2\n")
    config = parse_args(["--config", str(path)])
    assert (config.n_layer, config.n_head) == (2, 2)


@pytest.mark.parametrize(("env", "message"), [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a non-negative integer"),
    ({"WORLD_SIZE": ""}, "WORLD_SIZE='' is not a non-negative integer"),
    ({"RANK": "x"}, "RANK='x' is not a non-negative integer"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' is not a non-negative integer"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: the number of processes must be at least 1"),
    ({"WORLD_SIZE": "2"}, "RANK, MASTER_ADDR, MASTER_PORT are not set: launch with `torchrun"),
    ({"RANK": "0", "MASTER_ADDR": "localhost"}, "WORLD_SIZE, MASTER_PORT are not set"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK=2 must be less than WORLD_SIZE=2"),
])
def test_torchrun_variables_that_cannot_work_are_named(env, message):
    """gpt/distributed.py read these with int() (a ValueError traceback) and handed a WORLD_SIZE
    left in a shell without torchrun to torch.distributed's rendezvous (another traceback)."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_launch_environment(env)


@pytest.mark.parametrize("env", [
    {},
    {"WORLD_SIZE": "1"},
    {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "a", "MASTER_PORT": "29500"},
])
def test_torchrun_variables_that_work_pass(env):
    check_launch_environment(env)


def test_parse_args_checks_the_launch_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="WORLD_SIZE=4"):
        parse_args(["--config="])


@pytest.fixture
def torch_that_fails(tmp_path):
    """A `torch` package found before the real one, whose import runs `body`."""
    def make(body: str):
        package = tmp_path / "fake" / "torch"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(textwrap.dedent(body))
        return {"PYTHONPATH": str(tmp_path / "fake"), "PATH": "/usr/bin:/bin"}
    return make


def test_help_and_typos_are_answered_before_torch_imports(torch_that_fails, tmp_path):
    """gpt.cli imports torch (through gpt.checkpoint): --help and a typo waited seconds for it."""
    env = torch_that_fails("raise ImportError('torch imported before the settings were parsed')")
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--n_layer" in result.stdout
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--n_layer=x"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == "error: command line: n_layer must be an integer, got 'x'\n"


def test_ctrl_c_while_torch_imports_is_one_line(torch_that_fails, tmp_path):
    """A Ctrl-C in the seconds torch takes to import printed a traceback through its import."""
    env = torch_that_fails("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nimport time\ntime.sleep(5)\n")
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--config=", f"--out_dir={tmp_path / 'run'}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr == "interrupted: stopped before training started; nothing was written\n"
    assert not (tmp_path / "run").exists()


def test_a_bad_value_in_a_config_file_names_the_file(tmp_path):
    """`dropout = 1` in a sweep's own TOML file said only "dropout must be in [0, 1), got 1.0",
    not where the 1 came from (a wrong type or choice in a file named it already)."""
    mine = tmp_path / "mine.toml"
    mine.write_text("dropout = 1.0\nn_layer = 2\n")
    with pytest.raises(ConfigError, match=rf"^{mine}: dropout must be in \[0, 1\), got 1.0$"):
        parse_args(["--config", str(mine)])
    # From the command line it is the command line's value: no file named.
    with pytest.raises(ConfigError, match=r"^dropout must be in \[0, 1\), got 1.5$"):
        parse_args(["--config", str(mine), "--dropout=1.5"])
    assert parse_args(["--config", str(mine), "--dropout=0.1"]).dropout == 0.1


@pytest.mark.parametrize("argv", [["--max_steps"], ["--out-dir"], ["--config"]])
def test_an_option_without_its_value_is_one_line(argv):
    """argparse printed its usage of every key (22 lines) above "expected one argument"; under
    torchrun, once per rank. Now it is a ConfigError like every other key error."""
    with pytest.raises(ConfigError) as e:
        parse_args(argv, default_config=None)
    assert str(e.value).startswith("command line: argument --") and "expected one argument" in str(e.value)
    assert str(e.value).endswith("(python train.py --help lists every key)")
    run = subprocess.run([sys.executable, "train.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"error: {e.value}\n"


@pytest.mark.parametrize(("parser", "argv", "says"), [
    ("gpt.sampling:_sample_parser", ["--out_dir", "r", "--max_new_tokens"], "sample.py: error: argument --max_new_tokens"),
    ("gpt.prepare:build_parser", ["--out"], "python data_prep/prepare.py: error: argument --out: expected one argument"),
    ("gpt.eval:build_parser", [], "python -m gpt.eval: error: the following arguments are required"),
    ("gpt.export:build_parser", ["run", "--format"], "python -m gpt.export: error: argument --format"),
    ("gpt.plot:build_parser", [], "python -m gpt.plot: error: the following arguments are required: RUN"),
])
def test_the_tools_say_a_command_line_error_in_one_line(parser, argv, says, capsys):
    """Their usage (4 to 14 lines) no longer comes above the error: one line, and where to look."""
    import importlib

    module, name = parser.split(":")
    with pytest.raises(SystemExit) as e:
        getattr(importlib.import_module(module), name)().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(says) and err.endswith("--help lists every option)\n"), err


def test_gpt_checkpoint_without_its_source_is_one_line(capsys):
    from gpt.checkpoint.commands import main

    with pytest.raises(SystemExit) as e:
        main(["consolidate"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("python -m gpt.checkpoint consolidate: error: the following arguments are "
                                       "required: source (python -m gpt.checkpoint consolidate --help lists every "
                                       "option)\n")


def test_a_key_given_twice_takes_the_last_value_as_help_says(capsys):
    """A script's settings can be overridden by appending (`train.py --max_steps=3 "$@"`), in
    either spelling; --help says so."""
    assert parse_args(["--max_steps=3", "--max-steps=7"], default_config=None).max_steps == 7
    with pytest.raises(SystemExit):
        parse_args(["--help"], default_config=None)
    assert "a key given twice takes the last value" in " ".join(capsys.readouterr().out.split())


def test_config_file_named_with_a_tilde_after_the_equals_sign(tmp_path, monkeypatch):
    # No shell expands `~` in `--config=~/x.toml`: "config file ~/x.toml does not exist", while
    # --out_dir=~/... and every other path option expanded it.
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.toml").write_text("n_layer = 3\n")
    assert parse_args(["--config=~/mine.toml", "--device=cpu"]).n_layer == 3
