"""Hugging Face export/import: the cases a bug hunt found wrong (each test failed before its fix)."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
from dataclasses import asdict
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest

from gpt import checkpoint as ckpt
from gpt import export, hf
from gpt.model import GPT, GPTConfig

pytest.importorskip("transformers")


def tiny_run(root: Path) -> Path:
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)
    ckpt.save_checkpoint(root, 1, GPT(config), None, {"step": 1, "model_config": asdict(config)})
    return root


def test_overwrite_never_deletes_files_an_export_does_not_write(tmp_path, capsys):
    # --overwrite replaced the whole folder: a user's notes, a hub clone's .git, went with it.
    run = tiny_run(tmp_path / "run")
    mine = tmp_path / "mine"
    (mine / ".git").mkdir(parents=True)
    (mine / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (mine / "notes.txt").write_text("precious")
    (mine / "config.json").write_text("{}")
    assert export.main([str(run), "--out", str(mine), "--overwrite", "--no-check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {mine} holds files an export does not write (.git, notes.txt)"), err
    assert (mine / "notes.txt").read_text() == "precious" and (mine / ".git" / "HEAD").exists()
    assert (mine / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # An earlier export (all of its files) is still what --overwrite replaces.
    assert export.main([str(run), "--out", str(tmp_path / "hf"), "--no-check"]) == 0
    assert export.main([str(run), "--out", str(tmp_path / "hf"), "--overwrite", "--no-check"]) == 0


def test_overwrite_through_a_symlink_finishes_cleanly(tmp_path, capsys):
    # The export was published, then rmtree refused the renamed link: an OSError traceback after
    # success, and a ".link.oldPID" left behind.
    run = tiny_run(tmp_path / "run")
    assert export.main([str(run), "--out", str(tmp_path / "v1"), "--no-check"]) == 0
    (tmp_path / "latest").symlink_to(tmp_path / "v1")
    assert export.main([str(run), "--out", str(tmp_path / "latest"), "--overwrite", "--no-check"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run", "v1"]
    assert hf.load_hf_model(tmp_path / "latest").config.n_layer == 1
    assert (tmp_path / "v1" / "model.safetensors").exists()  # the link's target is left alone


def test_export_to_dot_writes_the_current_folder(tmp_path, monkeypatch):
    # "--out ." put the temporary folder inside "." and then tried os.rename(".", ...): EBUSY.
    run = tiny_run(tmp_path / "run")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert export.main([str(run), "--out", ".", "--no-check"]) == 0
    assert sorted(p.name for p in here.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "run"]


def test_a_write_error_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    # A full disk was a traceback (OSError is no user error), unlike consolidate's message.
    run = tiny_run(tmp_path / "run")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export.safetensors.torch, "save_file", full)
    assert export.main([str(run), "--out", str(tmp_path / "hf"), "--no-check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not write {tmp_path / 'hf'} (OSError: [Errno 28]"), err
    assert "is unchanged" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@contextlib.contextmanager
def files_limited_to(size: int):
    """No file over `size` bytes can be written, as on a disk that fills up mid-write."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_real_full_disk_is_one_line_for_export_and_consolidate(trained, tmp_path, capsys):
    """The writers' own errors on a full disk are no OSError: safetensors' SafetensorError ("I/O
    error: File too large (os error 27)"), torch.save's RuntimeError ("unexpected pos ..."). Export
    and consolidate ended in their tracebacks."""
    source = ckpt.latest_checkpoint(trained)
    weights = (source / ckpt.MODEL_FILE).stat().st_size
    assert (source / ckpt.OPTIMIZER_FILE).stat().st_size > 1.5 * weights
    cases = [  # (the command, the file limit, the file that cannot be written)
        (lambda out: export.main([str(trained), "--out", str(out), "--no-check"]), weights // 2, "model.safetensors"),
        (lambda out: ckpt.main(["consolidate", str(source), "--out", str(out)]), weights // 2, "model.safetensors"),
        (lambda out: ckpt.main(["consolidate", str(source), "--out", str(out), "--optimizer"]), int(1.5 * weights),
         "optimizer.pt"),
    ]
    for number, (command, limit, what) in enumerate(cases):
        out = tmp_path / f"out{number}"
        with files_limited_to(limit):
            code = command(out)
        err = capsys.readouterr().err
        assert code == 2, (what, err)
        assert err.startswith(f"error: could not write {out} (") and "is unchanged" in err, err
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert sorted(p.name for p in tmp_path.iterdir()) == [], what  # nothing left behind
    ckpt.verify_checkpoint(source)


def test_failed_write_knows_each_writers_own_error_for_a_full_disk(tmp_path):
    """The errors torch.save, safetensors and tokenizers raise (none an OSError) when a file
    cannot grow: each is a failed write, one line. tokenizers' bare Exception, from writing an
    export's tokenizer.json, still ended in a traceback (a review found it)."""
    import safetensors.torch
    import tokenizers
    import torch

    writers = {
        "torch.save": lambda path: torch.save({"w": torch.zeros(10_000)}, path),
        "safetensors": lambda path: safetensors.torch.save_file({"w": torch.zeros(10_000)}, str(path)),
        "tokenizers": lambda path: tokenizers.Tokenizer(tokenizers.models.BPE()).save(str(path)),
    }
    for name, write in writers.items():
        with files_limited_to(10):
            with pytest.raises(BaseException) as e:
                write(tmp_path / name)
        assert ckpt.failed_write(e.value), (name, type(e.value), e.value)
    for bug in (RuntimeError("shape mismatch"), Exception("some other failure"), ValueError("os error")):
        assert not ckpt.failed_write(bug)


@pytest.mark.parametrize("eps", [None, "1e-5"])
def test_hf_config_with_a_non_number_epsilon_is_an_hf_error(eps):
    # Was a TypeError traceback from math.isclose (sample, eval and train alike).
    with pytest.raises(hf.HFError, match=r"config.json: this GPT-2 variant differs .*layer_norm_epsilon="):
        hf.gpt_config_from_hf({"model_type": "gpt2", "layer_norm_epsilon": eps}, "x/config.json")


def test_publish_puts_the_earlier_export_back_if_the_new_one_cannot_take_its_name(tmp_path, monkeypatch):
    out, tmp = tmp_path / "out", tmp_path / ".out.tmp"
    out.mkdir()
    (out / "config.json").write_text("old")
    tmp.mkdir()
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == tmp:
            raise OSError(errno.EIO, "I/O error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        export._publish(tmp, out)
    assert (out / "config.json").read_text() == "old"  # not left hidden as .out.old<pid>
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp", "out"]


def test_publish_that_cannot_delete_the_earlier_export_warns_and_succeeds(tmp_path, monkeypatch, capsys):
    out, tmp = tmp_path / "out", tmp_path / ".out.tmp"
    out.mkdir()
    tmp.mkdir()
    (tmp / "config.json").write_text("new")

    def rmtree(path, *args, **kwargs):
        raise OSError(errno.EBUSY, "busy")

    monkeypatch.setattr(export.shutil, "rmtree", rmtree)
    export._publish(tmp, out)
    assert (out / "config.json").read_text() == "new"
    assert "warning: exported to" in capsys.readouterr().err
