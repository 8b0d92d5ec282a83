"""Second-round reviews (session 22), one area each: command lines and configs, tokenizers and
data prep, the loader, portability. Each test is a reproduced failure of the code before it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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
