"""Second-round reviews (session 22), one area each: command lines and configs, tokenizers and
data prep, the loader, portability. Each test is a reproduced failure of the code before it."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from gpt.tokenizer import char_tokenizer, train_bpe

from conftest import REPO, tiny_config


def test_a_lone_surrogate_is_named_by_the_tokenizer_not_a_binding_error():
    """Text decoded with errors="surrogateescape" (Python's command-line arguments) holds lone
    surrogates: BPE's encode raised a TypeError from inside `tokenizers` ("TextEncodeInput must
    be Union[...]"), the char vocabulary a utf-32 codec error."""
    bpe = train_bpe(["some text to learn a few merges from, and more text"] * 20, vocab_size=300)
    for tokenizer in (bpe, char_tokenizer("acfilntu ")):
        with pytest.raises(ValueError, match=r"the text holds a lone surrogate \(U\+DCE9\) at character 3, "
                                             r"which is not text"):
            tokenizer.encode("caf\udce9 au lait")
        with pytest.raises(ValueError, match=r"the text at index 1 holds a lone surrogate \(U\+D800\)"):
            tokenizer.encode_batch(["fine", "a\ud800"])
    assert bpe.decode(bpe.encode("café au lait")) == "café au lait"


def test_a_prompt_that_is_not_utf8_names_the_byte(char_data, tmp_path, capsys):
    """`sample.py --prompt "$(cat latin1.txt)"`: the char model said its vocabulary could not
    encode it, through a 'utf-32-le' codec the user never chose; a BPE model raised a TypeError."""
    from gpt.sampling import run_sample
    from gpt.trainer import train

    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=1, eval_interval=0, eval_iters=1, log_interval=1))
    capsys.readouterr()
    assert run_sample(["--out_dir", str(run), "--device", "cpu", "--prompt", "caf\udce9 au lait",
                       "--max_new_tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert "--prompt is not UTF-8 text (byte 0xE9 at character 3" in err and "iconv" in err, err
    assert "Traceback" not in err and "utf-32" not in err


def test_a_symbolic_link_loop_in_the_input_or_as_out_is_one_line(tmp_path):
    """Path.resolve raises RuntimeError (not OSError) at a link loop before Python 3.13: a file
    link loop in an --input folder, or --out a link loop, ended data prep in a traceback."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.txt").write_text("some text " * 3000)
    os.symlink("b", inputs / "c")
    os.symlink("c", inputs / "b")
    common = ["--tokenizer", "char", "--no-progress", "--min-val-tokens", "10", "--val-fraction", "0.3"]
    result = subprocess.run([sys.executable, "data_prep/prepare.py", "--input", str(inputs), "--out",
                             str(tmp_path / "out"), *common], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: {inputs / 'b'}: cannot read file (Too many levels of symbolic links)"
    for name in ("b", "c"):
        (inputs / name).unlink()
    os.symlink("o2", tmp_path / "o1")
    os.symlink("o1", tmp_path / "o2")
    result = subprocess.run([sys.executable, "data_prep/prepare.py", "--input", str(inputs), "--out",
                             str(tmp_path / "o1"), *common], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: --out {tmp_path / 'o1'}: "), result.stderr


def test_a_utf8_prompt_under_a_c_locale_is_read_as_utf8(char_data, tmp_path):
    """Under a genuine C locale (PYTHONUTF8=0, no locale coercion) Python decodes arguments as
    ASCII with surrogateescape: `--prompt "wörld"` reached the vocabulary as 'w\\udcc3\\udcb6rld'."""
    from gpt.trainer import train

    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=1, eval_interval=0, eval_iters=1, log_interval=1))
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONIOENCODING="utf-8")
    result = subprocess.run([sys.executable, "sample.py", "--out_dir", str(run), "--device", "cpu", "--prompt",
                             "ROMEO: thou \u00e9", "--max_new_tokens", "3"], cwd=REPO, capture_output=True,
                            env=env, timeout=120)
    err = result.stderr.decode("utf-8", "replace")
    # tiny-Shakespeare has no 'é': the vocabulary names it, decoded, not a surrogate pair of bytes
    assert result.returncode == 2 and "'\u00e9'" in err and "udcc3" not in err, err


def test_a_dataset_in_a_folder_whose_name_is_not_utf8_loads_its_tokenizer(char_data, tmp_path):
    """A folder named in another encoding (or any non-ASCII name under a C locale) reaches Python
    as surrogates: tokenizers' from_file refused the path, and train.py blamed the dataset
    ("the folder mixes files of different preps")."""
    import shutil

    from gpt.tokenizer import Tokenizer, read_vocab
    from gpt.trainer import train

    data = tmp_path / os.fsdecode(b"data_\xe9")  # 'data_\udce9'
    shutil.copytree(char_data, data)
    assert Tokenizer.from_file(data / "tokenizer.json").vocab_size == 62
    assert read_vocab(data / "tokenizer.json") is not None
    Tokenizer.from_file(data / "tokenizer.json").save(data / "again.json")
    assert (data / "again.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    result = train(tiny_config(data, tmp_path / os.fsdecode(b"run_\xe9"), max_steps=1, eval_interval=1, eval_iters=1))
    assert result.step == 1


# ---- configuration and command lines -------------------------------------------------------

def _toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_a_toml_bool_for_a_string_key_is_a_type_error(tmp_path):
    """`init_from = false` in TOML became the text "false" ("checkpoint path false does not
    exist"); `out_dir = true` made a run folder named "true"."""
    from gpt.config import ConfigError, parse_args

    for text, key in (("init_from = false\n", "init_from"), ("out_dir = true\n", "out_dir")):
        with pytest.raises(ConfigError, match=rf"c.toml: {key} must be a string, got (False|True)"):
            parse_args(["--config", _toml(tmp_path, text)])
    assert parse_args(["--config", _toml(tmp_path, "compile = true\n")]).compile == "true"  # a tri-state key


def test_a_huge_toml_integer_for_a_float_key_is_one_line(tmp_path):
    from gpt.config import ConfigError, parse_args

    with pytest.raises(ConfigError, match=r"c.toml: learning_rate must be a finite number, got an integer of 400 digits"):
        parse_args(["--config", _toml(tmp_path, f"learning_rate = {'9' * 400}\n")])


def test_a_check_of_two_keys_blames_the_file_only_when_the_command_line_set_neither(tmp_path):
    """`python train.py --n_head=3` said `configs/default.toml: n_embd (128) must be divisible by
    n_head (3)`: the file was not what changed."""
    from gpt.config import ConfigError, parse_args

    config = _toml(tmp_path, "n_embd = 128\nmin_lr = 8e-4\n")
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", config, "--n_head=3"])
    assert str(e.value).startswith("n_embd (128) must be divisible by n_head (3)"), str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", config, "--learning_rate=1e-4"])
    assert str(e.value).startswith("min_lr (0.0008) must not exceed learning_rate (0.0001)"), str(e.value)
    with pytest.raises(ConfigError) as e:  # the file alone: named
        parse_args(["--config", _toml(tmp_path, "n_embd = 128\nn_head = 3\n")])
    assert str(e.value).startswith(f"{tmp_path / 'c.toml'}: n_embd (128) must be divisible by n_head (3)")


def test_a_leftover_rank_without_world_size_is_a_config_error(monkeypatch):
    """RANK=1 left in a shell, WORLD_SIZE unset: a ValueError traceback from DistInfo."""
    from gpt.config import ConfigError, check_launch_environment

    with pytest.raises(ConfigError, match=r"RANK=1 must be less than WORLD_SIZE=\(unset: 1\).*unset RANK"):
        check_launch_environment({"RANK": "1"})
    with pytest.raises(ConfigError, match=r"RANK=1 must be less than WORLD_SIZE=1"):
        check_launch_environment({"RANK": "1", "WORLD_SIZE": "1"})
    check_launch_environment({"RANK": "0"})


def test_help_shows_a_config_files_hyphenated_keys(tmp_path, capsys):
    from gpt.config import parse_args

    config = _toml(tmp_path, "n-layer = 2\nlearning-rate = 3e-3\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", config, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 2 from c.toml, built in" in help_text and "(default: 0.003 from c.toml" in help_text


def test_tools_expand_home_refuse_an_empty_path_and_take_negative_numbers(tmp_path, monkeypatch, capsys):
    """`--prompt_file=~/p.txt`, `--hf-dataset=~/rows.jsonl`, `--hf-data-files=~/rows.jsonl` kept
    the '~'; `--out=` (an unset variable) wrote a dataset into the current folder; `sample.py
    --temperature -1e-3` said "expected one argument"."""
    from gpt import prepare, sampling

    monkeypatch.setenv("HOME", str(tmp_path))
    args = prepare.build_parser().parse_args(["--hf-dataset=~/rows.jsonl", "--out", "o"])
    assert args.hf_dataset == str(tmp_path / "rows.jsonl")
    args = prepare.build_parser().parse_args(["--hf-dataset", "json", "--hf-data-files=~/a.jsonl", "--out", "o"])
    assert args.hf_data_files == [str(tmp_path / "a.jsonl")]
    with pytest.raises(SystemExit) as e:
        prepare.build_parser().parse_args(["--input", "x.txt", "--out="])
    assert e.value.code == 2
    assert "argument --out: must name a file or folder, got an empty string" in capsys.readouterr().err
    assert sampling._sample_parser().parse_args(["--out_dir", "r", "--prompt_file=~/p.txt"]).prompt_file == str(
        tmp_path / "p.txt")
    assert sampling.run_sample(["--out_dir", str(tmp_path), "--temperature", "-1e-3"]) == 2
    assert "--temperature must be a finite number >= 0" in capsys.readouterr().err


# ---- portability -----------------------------------------------------------------------------

def test_a_closed_standard_error_or_input_is_no_silent_failure(char_data, tmp_path):
    """`train.py ... 2>&-` exited 1 before its first line (faulthandler.enable raised on
    sys.stderr None), data prep too (tqdm wrote to None); `sample.py --prompt_file - <&-` ended
    in an AttributeError traceback."""
    def close(fd: int):
        return lambda: os.close(fd)

    text = tmp_path / "t.txt"
    text.write_text("some words of text\n" * 400)
    prep = subprocess.run([sys.executable, "data_prep/prepare.py", "--input", str(text), "--out", str(tmp_path / "d"),
                           "--tokenizer", "char", "--val-rule", "tail", "--min-val-tokens", "10"], cwd=REPO,
                          stdout=subprocess.PIPE,
                          preexec_fn=close(2), timeout=120)
    assert prep.returncode == 0 and (tmp_path / "d" / "meta.json").exists()
    from conftest import tiny_args

    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "train.py", *tiny_args(char_data, run, max_steps=2, eval_interval=2,
                                                                      eval_iters=1)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True, preexec_fn=close(2), timeout=300)
    assert result.returncode == 0 and "done: 2 steps" in result.stdout, result.stdout[-2000:]
    result = subprocess.run([sys.executable, "sample.py", "--out_dir", str(run), "--prompt_file", "-",
                             "--max_new_tokens", "3"], cwd=REPO, capture_output=True, text=True,
                            preexec_fn=close(0), timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "error: --prompt_file -: standard input is closed; pipe the prompt in, or name a file"


# ---- damaged and hand-edited files (a fuzzing review: one file damaged at a time) ------------

@pytest.fixture(scope="module")
def finished(char_data, tmp_path_factory) -> Path:
    """A finished 4-step run, to copy and damage."""
    from gpt.trainer import train

    run = tmp_path_factory.mktemp("fuzz") / "run"
    train(tiny_config(char_data, run, max_steps=4, eval_interval=2, eval_iters=1, log_interval=1))
    return run


def _edited_copy(run: Path, to: Path, edit) -> Path:
    """A copy of `run` whose latest checkpoint's state.json went through `edit`, resealed as a
    tool (or a person fixing the manifest too) would leave it."""
    import json
    import shutil

    from gpt import checkpoint as ckpt
    from test_checkpoint import reseal

    shutil.copytree(run, to)
    folder = ckpt.latest_checkpoint(to)
    state = json.loads((folder / "state.json").read_text())
    edit(state)
    (folder / "state.json").write_text(json.dumps(state))
    reseal(folder)
    return to


@pytest.mark.parametrize("name,edit,message", [
    ("num_tokens", lambda s: s["loader"].update(num_tokens="x"), r"'loader' should be an object whose 'num_tokens'"),
    ("windows", lambda s: s["loader"].update(windows_consumed=10**20), r"'windows_consumed' below 2\*\*62"),
    ("nan_sum", lambda s: s["log_interval"].update(loss_sums=[float("nan")]), r"'log_interval' should be"),
    ("numpy_rng", lambda s: s["rng"]["0"]["numpy"][1].pop(), r"'rng' holds no usable RNG state \(IndexError"),
    ("numpy_key", lambda s: s["rng"]["0"]["numpy"][1].__setitem__(0, -1), r"'rng' holds no usable RNG state"),
])
def test_a_damaged_state_json_is_named_at_resume_not_a_traceback(char_data, finished, tmp_path, name, edit, message):
    """A string num_tokens crashed the resume's own error message (ValueError: Cannot specify ','
    with 's'), a huge windows_consumed NumPy (OverflowError), a bad NumPy RNG state the restore
    (IndexError, OverflowError); a NaN loss sum was blamed on training ("not finite at step 5")."""
    from gpt import checkpoint as ckpt
    from gpt.trainer import train

    run = _edited_copy(finished, tmp_path / "run", edit)
    with pytest.raises(ckpt.CheckpointError, match=message):
        train(tiny_config(char_data, run, max_steps=6, eval_interval=2, eval_iters=1, log_interval=1))


def test_latest_naming_a_folder_outside_the_run_is_refused(finished, tmp_path, char_data):
    """`latest` holding an absolute path or '../..' was followed: the run resumed another run's
    checkpoint (and wrote over its own next one), sample.py sampled it without a word."""
    import shutil

    from gpt import checkpoint as ckpt

    other = shutil.copytree(finished, tmp_path / "other")
    run = shutil.copytree(finished, tmp_path / "run")
    for name in (str(other / "checkpoints" / "step_0000002"), "../../other/checkpoints/step_0000002"):
        (run / "latest").write_text(name + "\n")
        with pytest.raises(ckpt.CheckpointError, match=r"names '.*', not a checkpoint folder of this run"):
            ckpt.latest_checkpoint(run)


def test_a_resume_sets_aside_the_lines_of_metrics_it_cannot_read_and_names_a_folder(char_data, finished, tmp_path):
    """A resume rewrote metrics.jsonl: a note written in by hand was deleted, a record holding
    bytes that are not UTF-8 too (and such bytes in others became U+FFFD); metrics.jsonl that is
    a folder was an IsADirectoryError traceback."""
    import shutil

    from gpt.metrics import MetricsError
    from gpt.trainer import train

    run = shutil.copytree(finished, tmp_path / "run")
    metrics = run / "metrics.jsonl"
    original = metrics.read_bytes()
    metrics.write_bytes(b"# lr sweep A\n" + original.replace(b'"step": 1,', b'"note": "caf\xe9", "step": 1,'))
    edited = metrics.read_bytes()
    train(tiny_config(char_data, run, max_steps=6, eval_interval=2, eval_iters=1, log_interval=1))
    # Steps 2-4 were before the checkpoint: kept whole; the note and the step-1 record that is
    # not UTF-8 set aside for the user, byte for byte.
    assert metrics.read_bytes().startswith(original[original.index(b'{"step": 2,'):])
    assert (run / "metrics.jsonl.unreadable").read_bytes() == edited[:edited.index(b'{"step": 2,')]
    metrics.unlink()
    metrics.mkdir()
    with pytest.raises(MetricsError, match=r"cannot read .*metrics.jsonl \(Is a directory\)"):
        train(tiny_config(char_data, run, max_steps=8, eval_interval=2, eval_iters=1, log_interval=1))


def test_a_meta_json_that_is_not_utf8_is_one_line(char_data, tmp_path):
    import shutil

    from gpt.dataset import load_meta
    from gpt.shards import ShardError

    data = shutil.copytree(char_data, tmp_path / "data")
    (data / "meta.json").write_bytes((data / "meta.json").read_bytes().replace(b'"char"', b'"ch\xe9r"'))
    with pytest.raises(ShardError, match=r"meta.json: cannot read dataset metadata \(.*can't decode byte 0xe9"):
        load_meta(data)


def test_sample_cpu_route_pins_how_the_linears_compute(char_data, tmp_path, monkeypatch, capsys):
    """The decoding route is timed at the first token (gpt/linear.py); on a busy machine another
    route (another summation order) could win from run to run, and the same --seed computed other
    logits in their last bits. --cpu_route names one: nothing is timed, every run sums alike."""
    from gpt import linear
    from gpt.sampling import run_sample
    from gpt.trainer import train

    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=2, eval_interval=0, eval_iters=1, log_interval=1))
    capsys.readouterr()
    used = []
    real_decoding = linear.Decoding
    monkeypatch.setattr(linear, "_fastest", lambda *a: pytest.fail("timed the routes though one was named"))
    monkeypatch.setattr(linear, "Decoding", lambda route, packed: used.append(route) or real_decoding(route, packed))
    texts = []
    for route in ("row_blocks", "row_blocks", "plain"):
        args = ["--out_dir", str(run), "--device", "cpu", "--prompt", "ROMEO:", "--max_new_tokens", "40",
                "--seed", "3", "--cpu_route", route]
        assert run_sample(args) == 0
        texts.append(capsys.readouterr().out)
    assert set(used) == {"row_blocks", "plain"} and texts[0] == texts[1]


def test_a_lock_file_follows_the_umask_and_opens_read_only_for_another_user(tmp_path, monkeypatch):
    """The lock file was made 0o644 whatever the umask: in a group folder (umask 002) a teammate
    could not open it for writing, so while it was held their run said "out_dir is not
    writable", and after a kill -9 left the file, every rerun of theirs was refused."""
    from gpt import locks

    old = os.umask(0o002)
    try:
        lock = locks.acquire(tmp_path / ".run-lock")
        assert (tmp_path / ".run-lock").stat().st_mode & 0o777 == 0o664
        lock.release()
    finally:
        os.umask(old)
    # Another user's file, not writable to this one (root passes permission checks: simulated).
    (tmp_path / ".run-lock").write_text("")
    real_open = os.open

    def not_writable(path, flags, *args):
        if flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(locks.os, "open", not_writable)
    lock = locks.acquire(tmp_path / ".run-lock")
    with pytest.raises(locks.FolderBusy):  # it locks: a second holder is refused as busy, not unwritable
        locks.acquire(tmp_path / ".run-lock")
    lock.release()
    with pytest.raises(PermissionError):  # a folder not writable at all still says so
        locks.acquire(tmp_path / "new-lock")


def test_a_run_started_while_a_prep_replaces_its_dataset_waits_for_it(char_data, tmp_path):
    """A prep replacing a dataset deletes the old files and renames the new ones in one by one;
    a run starting in between said "the dataset here is incomplete ... make it again" (or, with
    no file left, began preparing the stdlib corpus there). It now waits for the prep. (The prep
    is played by a process holding its lock while the files are swapped.)"""
    import shutil

    from conftest import tiny_args
    from test_out_dir import ENV, held_by_another_process, wait_until

    data = shutil.copytree(char_data, tmp_path / "data")
    log = tmp_path / "run.log"
    with held_by_another_process(data / ".prepare-lock"):
        (data / "meta.json").unlink()  # mid-publish: the old meta.json gone, the new not yet there
        proc = subprocess.Popen([sys.executable, "train.py", *tiny_args(data, tmp_path / "run", max_steps=2,
                                                                          eval_interval=2, eval_iters=1)],
                                cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=ENV)
        wait_until(lambda: "waiting for it to finish" in log.read_text(), proc, log)
        shutil.copy(char_data / "meta.json", data / "meta.json")
    assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    assert f"a data prep is writing {data}; waiting for it to finish" in log.read_text()


def test_a_metrics_write_error_before_the_first_save_says_a_rerun_starts_over(tmp_path, monkeypatch):
    """A full disk before the run's first checkpoint said "run again to resume from the last
    checkpoint": there was none, and the rerun started from step 0."""
    from gpt.metrics import MetricsError, MetricsLog

    log = MetricsLog(tmp_path)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gpt.metrics.os.write", full)
    with pytest.raises(MetricsError, match=r"\(No space left on device\).*run again \(no checkpoint was saved "
                                           r"yet: it starts from step 0\)"):
        log.write({"step": 1, "loss": 1.0})
    monkeypatch.undo()
    (tmp_path / "latest").write_text("step_0000010\n")
    monkeypatch.setattr("gpt.metrics.os.write", full)
    with pytest.raises(MetricsError, match=r"run again to resume from the last checkpoint"):
        log.write({"step": 11, "loss": 1.0})


def test_sampling_a_row_with_infinite_logits_draws_among_them():
    """float16 logits that overflow to +inf: the shift by the row's maximum made inf - inf = NaN,
    and torch.multinomial raised "probability tensor contains either inf, nan or element < 0"."""
    import torch

    from gpt.generate import sample_next

    logits = torch.tensor([[float("inf"), 0.0, 1.0, float("inf")], [0.0, 5.0, 1.0, 2.0]], dtype=torch.float16)
    generator = torch.Generator().manual_seed(0)
    drawn = {tuple(sample_next(logits, 1.0, generator=generator)[:, 0].tolist()) for _ in range(50)}
    assert {row0 for row0, _ in drawn} == {0, 3}  # only the infinite ones, both of them
    assert all(row1 in range(4) for _, row1 in drawn)
    assert sample_next(logits, 0.7, top_k=1, generator=generator)[0, 0].item() in (0, 3)


_RANK_SCRIPT = """
import datetime, os, shutil, sys, time
import torch, torch.distributed as dist
from pathlib import Path
from gpt import locks, run_data
from gpt.config import TrainConfig
from gpt.distributed import DistInfo

rank, data, source, store = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=20))
barriers = []
real_barrier = run_data.barrier
run_data.barrier = lambda info: barriers.append(1) or real_barrier(info)

def prepare_default(config, data_dir, tokenizer):  # as gpt.prepare does it: the lock held, then the files
    data_dir.mkdir(exist_ok=True)
    with locks.acquire(data_dir / ".prepare-lock"):
        time.sleep(3)
        for f in source.iterdir():
            shutil.copy(f, data_dir / f.name)

run_data._prepare_default = prepare_default
if rank == 1:
    time.sleep(1)  # a rank that starts later than rank 0
info = DistInfo(rank, rank, 2, torch.device("cpu"), True)
run_data.ensure_dataset(TrainConfig(data_dir=str(data), prepare_tokenizer="char"), info)
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
print(f"rank {rank}: {len(barriers)} barrier(s), sum {value.item()}", flush=True)
dist.destroy_process_group()
"""


def test_ranks_meet_at_the_barrier_while_rank_0_prepares_the_default_corpus(char_data, tmp_path):
    """A second rank that reached ensure_dataset while rank 0 prepared a new data_dir waited for
    rank 0's prep lock, then found the dataset and skipped the barrier rank 0 waited in (a
    regression of this session's wait for another prep, found by reviewing the diff)."""
    data, store = tmp_path / "data", tmp_path / "store"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(rank), str(data), str(char_data), str(store)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for rank in (0, 1)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert "rank 0: 1 barrier(s), sum 3.0" in outputs[0] and "rank 1: 1 barrier(s), sum 3.0" in outputs[1], outputs


def test_a_tokenizer_json_that_cannot_be_read_is_one_line_and_empty_defaults_stay(char_data, tmp_path, capsys):
    """Regressions of this session, found by reviewing the diff: reading tokenizer.json's bytes at
    the loaders' start let an OSError through (a folder of that name: a traceback, where it was
    'cannot be loaded ... mixes files of different preps'); an empty --prompt_file or gpt.plot
    --out (an unset variable in a wrapper) meant the default and became an error."""
    import shutil

    from gpt import plot
    from gpt.sampling import _sample_parser
    from gpt.shards import ShardError
    from gpt.trainer import train

    data = shutil.copytree(char_data, tmp_path / "data")
    (data / "tokenizer.json").unlink()
    (data / "tokenizer.json").mkdir()
    with pytest.raises(ShardError, match=r"tokenizer.json cannot be loaded, but .*meta.json says vocab_size"):
        train(tiny_config(data, tmp_path / "run", max_steps=1))
    assert _sample_parser().parse_args(["--out_dir", "r", "--prompt_file", ""]).prompt_file == ""
    assert plot.build_parser().parse_args(["run", "--out", ""]).out == ""


# ---- session 23: a disk and memory review of data prep -------------------------------------

def _corpus(tmp_path):
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))
    (tmp_path / "corpus.txt").write_text(text)
    return tmp_path / "corpus.txt"


@pytest.mark.parametrize("failing", ["tokenizer.json", "meta.json"])
def test_a_full_disk_while_prep_writes_its_tokenizer_or_meta_names_the_file(tmp_path, monkeypatch, capsys, failing):
    # The bare OSError of a write() carries no file name: "error: [Errno 28] No space left on device".
    from gpt import prepare as prepare_module
    from gpt.tokenizer import Tokenizer

    corpus = _corpus(tmp_path)
    out = tmp_path / "data"
    small = ["--val-fraction", "0.1", "--val-chunk-tokens", "256", "--min-val-tokens", "10"]
    assert prepare_module.main(["--input", str(corpus), "--out", str(out), "--tokenizer", "char", "--no-progress",
                                *small]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if failing == "tokenizer.json":
        monkeypatch.setattr(Tokenizer, "save", full)
    else:
        monkeypatch.setattr(prepare_module, "json", types.SimpleNamespace(dump=full))
    capsys.readouterr()
    code = prepare_module.main(["--input", str(corpus), "--out", str(out), "--tokenizer", "char", "--no-progress",
                                *small, "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and f"could not write {failing} of the new dataset (No space left on device)" in err, err
    assert f"Nothing in {out} was changed" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # the old dataset, whole


@pytest.mark.parametrize("tool", ["prepare", "shakespeare"])
@pytest.mark.parametrize("error", ["MemoryError", "PanicException"])
def test_prep_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys, tool, error):
    # Under `ulimit -v` prep ended in a MemoryError traceback, or in a traceback of tokenizers'
    # Rust panic (pyo3's PanicException, a BaseException: no `except Exception` catches it).
    import importlib.util

    if tool == "prepare":
        from gpt import prepare as module
    else:  # a script, not a package module
        spec = importlib.util.spec_from_file_location("edges_shakespeare_script", REPO / "data_prep" / "shakespeare.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    PanicException = type("PanicException", (BaseException,), {})

    def crash(*args, **kwargs):
        raise MemoryError() if error == "MemoryError" else PanicException("The global thread pool has not been initialized.")
    monkeypatch.setattr(module, "prepare", crash)
    out = tmp_path / "data"
    code = module.main(["--input", str(_corpus(tmp_path)), "--out", str(out), "--tokenizer", "char", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert ("ran out of memory" if error == "MemoryError" else "tokenizers library failed") in err
    assert f"nothing was written to {out}" in err


def test_prep_lets_other_base_exceptions_through(tmp_path, monkeypatch):
    from gpt import prepare as prepare_module

    def crash(*args, **kwargs):
        raise SystemExit(7)
    monkeypatch.setattr(prepare_module, "prepare", crash)
    with pytest.raises(SystemExit):
        prepare_module.main(["--input", str(_corpus(tmp_path)), "--out", str(tmp_path / "d"), "--tokenizer", "char"])


def test_a_save_that_runs_out_of_memory_is_not_blamed_on_the_disk(tmp_path):
    # It said "Is the disk full or ... not writable? Fix that and run again to resume", with
    # gigabytes free and no checkpoint to resume from.
    from gpt.checkpoint.save import _write_error

    message = str(_write_error(tmp_path, tmp_path / "checkpoints" / "step_0000002", MemoryError()))
    assert "ran out of memory while writing" in message and "disk" not in message, message
    assert "no earlier checkpoint exists" in message and "starts from step 0" in message
    assert "resume" not in message
    message = str(_write_error(tmp_path, tmp_path / "checkpoints" / "step_0000002", OSError(28, "No space left")))
    assert "Is the disk full" in message and "starts from step 0" in message and "resume" not in message


def test_a_failed_save_lets_go_of_its_writer_before_measuring_free_space(tmp_path):
    # torch.save's zip writer stayed referenced by the error's traceback, its (deleted) file
    # open: the "bytes free" the message quoted was short by that file (65,536 of 98,304).
    import weakref

    from gpt.checkpoint.save import _write_error

    class Writer:
        pass
    refs = []

    def write():
        writer = Writer()  # a local of a frame of the traceback, as torch.save's writer is
        refs.append(weakref.ref(writer))
        raise RuntimeError("unexpected pos 25088 vs 24976")

    def save():
        try:
            write()
        except RuntimeError:  # the writer failing again on its way out chains the first error
            raise RuntimeError("closing the file failed")
    try:
        save()
    except RuntimeError as e:
        assert refs[0]() is not None  # alive while the error is
        _write_error(tmp_path, tmp_path / "checkpoints" / "step_0000030", e)
        assert refs[0]() is None


# ---- session 23: boundary values at run time -----------------------------------------------

def test_the_optimizer_line_promises_no_decay_a_run_ends_before():
    from gpt.config import TrainConfig
    from gpt.model import GPT, GPTConfig
    from gpt.optim import build_optimizer, describe_optimizer
    import torch

    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8))
    line = describe_optimizer(build_optimizer(model, TrainConfig(max_steps=1, optimizer="adamw").validate(),
                                              torch.device("cpu")), TrainConfig(max_steps=1, optimizer="adamw"))
    assert "warmup 100 steps (the run ends within it: no decay)" in line and "cosine" not in line, line
    config = TrainConfig(max_steps=300, optimizer="adamw").validate()
    line = describe_optimizer(build_optimizer(model, config, torch.device("cpu")), config)
    assert "warmup 100 steps, cosine to 0.1x of the peak by step 300" in line, line


def test_a_longer_run_with_its_own_decay_end_is_not_told_its_schedule_changed(char_data, tmp_path, capsys):
    # max_steps is no part of the schedule when lr_decay_steps ends the decay: the note said the
    # schedule "follows the new max_steps from here".
    from gpt.trainer import train

    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=4, lr_decay_steps=8, warmup_steps=2))
    capsys.readouterr()
    train(tiny_config(char_data, run, max_steps=10, lr_decay_steps=8, warmup_steps=2))
    out = capsys.readouterr().out
    assert "max_steps 4 -> 10; the run goes on with the new values" in out, out
    assert "learning-rate schedule" not in out
    # Without lr_decay_steps the decay ends at max_steps: the sentence stays.
    run2 = tmp_path / "run2"
    train(tiny_config(char_data, run2, max_steps=4, warmup_steps=2))
    capsys.readouterr()
    train(tiny_config(char_data, run2, max_steps=10, warmup_steps=2))
    assert "follows the new max_steps from here" in capsys.readouterr().out


def test_the_eta_before_a_compiled_runs_first_eval_prices_its_compile():
    # compile = true: the first eval compiles the eval-mode graph (29 s after a 113 s first step,
    # on a CPU); the ETA before it said 0.8 s.
    from gpt.training_log import Clock, eta_seconds, eval_compile_estimate

    clock = Clock(elapsed_before=0.0, timed_from=0, interval_start=0.0, run_start=0.0,
                  first_step_done=113.0, compiled=True)
    warm = eval_compile_estimate(clock, steady=0.5)
    assert warm == pytest.approx((113.0 - 0.5) / 3)
    eta = eta_seconds(0.5, 1, 1, None, 0.0, eval_iters=1, accum=1, eval_compile_s=warm)
    assert eta > 30
    # Priced once, before any eval was timed; not at all without compile or without an eval to come.
    assert eta_seconds(0.5, 1, 1, 2.0, 0.0, eval_iters=1, accum=1, eval_compile_s=warm) == pytest.approx(2.5)
    assert eta_seconds(0.5, 1, 0, None, 0.0, eval_iters=1, accum=1, eval_compile_s=warm) == pytest.approx(0.5)
    clock.compiled = False
    assert eval_compile_estimate(clock, steady=0.5) == 0.0


# ---- session 23: runs from older versions of this code ---------------------------------------

def _edit_state(saved, edit) -> None:
    """Rewrite a checkpoint's state.json and its manifest entry, as an older version wrote it."""
    import json

    from gpt import checkpoint as ckpt
    from gpt.checkpoint.files import crc32

    state = json.loads((saved / ckpt.STATE_FILE).read_text())
    edit(state)
    (saved / ckpt.STATE_FILE).write_text(json.dumps(state))
    manifest = json.loads((saved / ckpt.MANIFEST_FILE).read_text())
    manifest[ckpt.STATE_FILE] = {"bytes": (saved / ckpt.STATE_FILE).stat().st_size, "crc32": crc32(saved / ckpt.STATE_FILE)}
    (saved / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))


def test_a_run_from_before_two_new_defaults_is_told_both_at_once(char_data, tmp_path):
    # A run from before Muon and vocab_multiple was refused for its optimizer, then, once that
    # was set, for its vocabulary padding: one setting per try.
    from gpt import checkpoint as ckpt
    from gpt.trainer import train

    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=10, optimizer="adamw", vocab_multiple=1))
    with pytest.raises(ckpt.CheckpointError) as refused:
        train(tiny_config(char_data, run, max_steps=20, optimizer="muon", vocab_multiple=64))
    message = str(refused.value)
    assert "set --vocab_multiple=1" in message and "resume with --optimizer=adamw" in message, message
    train(tiny_config(char_data, run, max_steps=20, optimizer="adamw", vocab_multiple=1))  # what it said
    assert ckpt.step_of(ckpt.latest_checkpoint(run).name) == 20
    # Only the optimizer: its own error, as before.
    with pytest.raises(ckpt.CheckpointError, match=r"cannot resume .*resume with --optimizer=adamw, or start a new run"):
        train(tiny_config(char_data, run, max_steps=30, optimizer="muon", vocab_multiple=1))


def test_a_setting_saved_as_a_bool_by_an_older_version_is_not_a_change(char_data, tmp_path, capsys):
    # compile was a JSON bool before "auto": every resume said "compile False -> 'false'".
    from gpt import checkpoint as ckpt
    from gpt.trainer import train

    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=10, compile="false"))

    def old_style(state):
        state["train_config"]["compile"] = False
    _edit_state(ckpt.latest_checkpoint(run), old_style)
    capsys.readouterr()
    train(tiny_config(char_data, run, max_steps=20, compile="false"))
    note = next(line for line in capsys.readouterr().out.splitlines() if "settings changed" in line)
    assert "max_steps 10 -> 20" in note and "compile" not in note, note


def test_init_from_a_checkpoint_from_before_vocab_padding_names_the_setting_and_no_resume(char_data, tmp_path):
    from gpt import checkpoint as ckpt
    from gpt.trainer import train

    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=5, vocab_multiple=1))
    _edit_state(ckpt.latest_checkpoint(run), lambda state: state["model_config"].pop("vocab_multiple"))
    with pytest.raises(ckpt.CheckpointError) as refused:
        train(tiny_config(char_data, tmp_path / "new", max_steps=5, init_from=str(run), vocab_multiple=64))
    message = str(refused.value)
    assert "Fine-tune it with its model settings (--vocab_multiple=1)" in message, message
    assert "resume" not in message
    # Beside another difference too: following the advice takes one try.
    base = dict(vocab_size=65, block_size=32, n_layer=1, n_head=2, n_embd=32, bias=False, tie_weights=True)
    with pytest.raises(ckpt.CheckpointError, match=r"\(--n_layer=1 --vocab_multiple=1\)"):
        ckpt.check_model_config(run, dict(base, vocab_multiple=1), dict(base, n_layer=2, vocab_multiple=64),
                                init_from=True)


def test_a_stop_save_from_before_val_loss_step_is_not_listed_as_its_own_eval(tmp_path):
    # Checkpoints from before state.json recorded val_loss_step took a stop signal's save between
    # evals as scored at its own step: listed (and kept as best) with a loss it never had.
    from gpt import checkpoint as ckpt
    from gpt.checkpoint.find import EARLIER_EVAL, saved_eval, saved_val_loss
    from gpt.checkpoint.listing import format_listing, list_checkpoints

    def checkpoint(step, **state):
        folder = tmp_path / ckpt.CHECKPOINTS_DIR / ckpt.step_dir_name(step)
        folder.mkdir(parents=True)
        (folder / ckpt.STATE_FILE).write_text(json.dumps(
            {"step": step, "train_config": {"eval_interval": 37, "max_steps": 100000}, **state}))
        (folder / ckpt.MANIFEST_FILE).write_text("{}")  # complete, for the listing
        return folder
    evaluated = checkpoint(74, val_loss=3.9064)
    stopped = checkpoint(81, val_loss=3.9064)  # SIGTERM at step 81: the step-74 eval carried on
    assert saved_eval(evaluated) == (3.9064, 74) and saved_val_loss(evaluated) == 3.9064
    # Carried on from an eval whose step is not known (eval_interval may have changed at a resume).
    assert saved_eval(stopped) == (3.9064, EARLIER_EVAL) and saved_val_loss(stopped) is None
    assert ckpt.best_checkpoint([stopped]) is None
    listing = format_listing(tmp_path, list_checkpoints(tmp_path))
    assert "(best)" in listing and "val loss of an earlier eval, carried on" in listing, listing
    # The last step is an eval step whatever the interval; without train_config nothing is known.
    last = checkpoint(100000, val_loss=3.5)
    assert saved_val_loss(last) == 3.5
    bare = tmp_path / ckpt.CHECKPOINTS_DIR / "step_0000090"
    bare.mkdir()
    (bare / ckpt.STATE_FILE).write_text(json.dumps({"step": 90, "val_loss": 3.8}))
    assert saved_eval(bare) == (3.8, None) and saved_val_loss(bare) == 3.8
    # Where val_loss_step is recorded it is what counts.
    recorded = checkpoint(85, val_loss=3.7, val_loss_step=85)
    assert saved_val_loss(recorded) == 3.7


# ---- session 23: wandb, and what a resume says -------------------------------------------------

def test_wandb_gets_non_finite_figures_as_null_as_metrics_jsonl_has_them():
    # Live rows logged NaN where the backfill from metrics.jsonl logs null: one step, two values.
    from gpt.metrics import WandbSink

    logged = []
    sink = WandbSink.__new__(WandbSink)
    sink.first_step = 0
    sink.run = types.SimpleNamespace(log=lambda row, step: logged.append((step, row)))
    sink.write({"step": 4, "loss": float("nan"), "eta_s": float("nan"), "lr": 1e-3})
    assert logged == [(4, {"loss": None, "eta_s": None, "lr": 1e-3})]


def test_wandb_start_failures_give_the_hint_that_fits(monkeypatch):
    # A network failure said "log in first" with WANDB_API_KEY set; offline said it too.
    from gpt.metrics import _start_hint

    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    network = _start_hint("online", RuntimeError("CommError: Timed out while retrying: no such host"))
    assert "could not be reached" in network and "log in" not in network
    monkeypatch.delenv("WANDB_API_KEY")
    assert "log in first" in _start_hint("online", RuntimeError("UsageError: api_key not configured"))
    offline = _start_hint("offline", RuntimeError("UsageError: something"))
    assert "log in" not in offline and "needs no account" in offline


def test_a_wandb_project_with_a_team_before_it_is_refused_before_anything_runs():
    from gpt.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=r"wandb_project = 'team/gpt': a wandb project name cannot hold '/' "
                                          r"\(the team goes in WANDB_ENTITY"):
        TrainConfig(wandb_mode="offline", wandb_project="team/gpt").validate()
    with pytest.raises(ConfigError, match="cannot hold '#', '%', ':'"):
        TrainConfig(wandb_mode="online", wandb_project="a:b#c%").validate()
    TrainConfig(wandb_mode="disabled", wandb_project="team/gpt").validate()  # not used: not checked
    TrainConfig(wandb_mode="offline", wandb_project="").validate()  # wandb takes it
    TrainConfig(wandb_mode="offline", wandb_project="my-project_2").validate()


def test_a_checkpoint_from_before_the_optimizer_setting_is_told_it_had_adamw(char_data, tmp_path):
    # The trainer wrote train_config without "optimizer" until Muon came: every such run was AdamW.
    from gpt import checkpoint as ckpt
    from gpt.trainer import train

    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=5, optimizer="adamw"))
    _edit_state(ckpt.latest_checkpoint(run), lambda state: state["train_config"].pop("optimizer"))
    with pytest.raises(ckpt.CheckpointError, match="trained with optimizer = 'adamw' and this config says 'muon'"):
        train(tiny_config(char_data, run, max_steps=10, optimizer="muon"))


def test_the_thread_note_is_only_for_checkpoints_trained_on_a_cpu(capsys):
    import torch

    from gpt.distributed import DistInfo
    from gpt.resume import note_changed_threads

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    note_changed_threads({"cpu_threads": None}, info)  # trained on a GPU: recorded as null
    note_changed_threads({}, info)  # from before the field
    assert "thread" not in capsys.readouterr().out
    note_changed_threads({"cpu_threads": torch.get_num_threads() + 1}, info)
    assert "not bit for bit" in capsys.readouterr().out


def test_a_cpu_resume_on_another_thread_count_says_it_is_not_bit_for_bit(char_data, tmp_path, capsys):
    import torch

    from gpt.trainer import train

    threads = torch.get_num_threads()
    run = tmp_path / "run"
    try:
        torch.set_num_threads(2)
        train(tiny_config(char_data, run, max_steps=5))
        capsys.readouterr()
        train(tiny_config(char_data, run, max_steps=8))
        assert "CPU thread" not in capsys.readouterr().out
        torch.set_num_threads(1)
        train(tiny_config(char_data, run, max_steps=10))
        out = capsys.readouterr().out
        assert "trained with 2 CPU thread(s) per process, this run has 1" in out and "not bit for bit" in out, out
    finally:
        torch.set_num_threads(threads)
