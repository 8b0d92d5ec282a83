"""Messages that said less than they should, or something untrue: a Hugging Face folder or a
run's checkpoints/ folder given where a checkpoint goes, Ctrl-C and OS errors in consolidate,
the count of unknown characters, a run folder given as the dataset, and the NaN stop of a run
that saved no checkpoint yet."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from gpt import checkpoint as ckpt
from gpt import eval as gpt_eval
from gpt import plot as gpt_plot
from gpt.checkpoint import consolidation
from gpt.cli import run_train
from gpt.errors import TrainingError
from gpt.metrics import read_metrics
from gpt.sampling import run_sample
from gpt.tokenizer import char_tokenizer
from gpt.trainer import train

from conftest import tiny_args, tiny_config


@pytest.fixture(scope="module")
def run(char_data, tmp_path_factory) -> Path:
    """A finished 4-step tiny char-level run."""
    out = tmp_path_factory.mktemp("followups") / "run"
    train(tiny_config(char_data, out, max_steps=4, eval_interval=0, eval_iters=1, log_interval=2))
    return out


def hugging_face_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_init_from_a_hugging_face_folder_without_hf_says_to_write_hf(char_data, tmp_path, capsys):
    # `--init_from=DIR` for a Hugging Face folder used to say only "DIR holds no checkpoint (no
    # latest file and no manifest.json)".
    hf = hugging_face_folder(tmp_path / "gpt2")
    assert run_train(tiny_args(char_data, tmp_path / "run", init_from=str(hf))) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"error: {hf} is a Hugging Face model folder, not a run or checkpoint of this project, "
                        f"so it holds no checkpoint. To start from its weights, name it with the 'hf:' prefix: "
                        f"init_from = 'hf:{hf}' (--init_from=hf:{hf})\n"), err
    # consolidate says there is nothing to do, rather than speak of init_from alone
    assert ckpt.main(["consolidate", str(hf)]) == 2
    assert "there is nothing to consolidate; a Hugging Face folder is used as it is" in capsys.readouterr().err


def test_a_runs_checkpoints_folder_given_as_a_run_says_which_was_meant(run, capsys):
    # `sample.py --out_dir RUN/checkpoints` used to say only "... holds no checkpoint".
    folder = run / "checkpoints"
    assert run_sample(["--out_dir", str(folder), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        f"error: {folder} holds no checkpoint (no latest file and no manifest.json): it is a run's folder "
        f"of checkpoint folders (step_N), not itself a run or a checkpoint (did you mean {run}, or one of "
        f"its step_N folders, such as {folder / 'step_0000004'}?)\n")
    with pytest.raises(ckpt.CheckpointError, match=r"\(did you mean .*step_0000004\?\)"):
        ckpt.consolidate(folder)


def test_consolidate_ctrl_c_and_os_errors_are_one_line(run, tmp_path, monkeypatch, capsys):
    # Both used to end in a traceback: main caught only CheckpointError.
    out = tmp_path / "copy"
    real_seal_all = consolidation.seal_all

    def interrupted_while_writing(paths, base):
        assert any(base.iterdir())  # the weights are written into the temporary folder
        raise KeyboardInterrupt

    monkeypatch.setattr(consolidation, "seal_all", interrupted_while_writing)
    before = {p: p.read_bytes() for p in (run / "checkpoints" / "step_0000004").iterdir()}
    try:
        code = ckpt.main(["consolidate", str(run), "--out", str(out)])
    except KeyboardInterrupt:  # (escaping, it would stop the whole pytest session)
        pytest.fail("Ctrl-C escaped `python -m gpt.checkpoint consolidate` as a traceback")
    assert code == 130
    assert capsys.readouterr().err == ("interrupted: stopped consolidating; the checkpoint is unchanged and "
                                       "no unfinished copy was left behind\n")
    assert list(tmp_path.iterdir()) == []  # what the message says: nothing half-written
    assert {p: p.read_bytes() for p in (run / "checkpoints" / "step_0000004").iterdir()} == before

    monkeypatch.setattr(consolidation, "seal_all", real_seal_all)

    def unreadable(ckpt_dir):
        raise OSError(errno.EIO, "Input/output error", str(ckpt_dir / "model.safetensors"))

    monkeypatch.setattr(consolidation, "read_model_state", unreadable)
    assert ckpt.main(["consolidate", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not consolidate {run} (OSError: [Errno 5] Input/output error: ") \
        and err.endswith("; nothing was written\n"), err
    assert not out.exists()


def test_unknown_characters_are_counted_as_they_are_listed():
    # "4 character(s) not in the char vocabulary" used to list 3: it counted occurrences.
    tokenizer = char_tokenizer("abc ")
    with pytest.raises(ValueError) as e:
        tokenizer.encode("a✓b✓ é c✓")
    assert str(e.value).startswith(
        "2 characters not in the char vocabulary: '✓' (U+2713) at position 1 (and 2 more times), "
        "'é' (U+00E9) at position 5. ")
    with pytest.raises(ValueError, match=r"^1 character not in the char vocabulary: 'é' \(U\+00E9\) at position 0\. "):
        tokenizer.encode("é")
    with pytest.raises(ValueError, match=r"^10 characters not .* at position 7 and 2 more\. "):
        tokenizer.encode("ABCDEFGHIJ")


def test_eval_data_dir_that_is_a_run_says_it_is_a_run(run, char_data, capsys):
    # It used to suggest preparing a dataset into the run folder: "Make one with: python
    # data_prep/prepare.py --input YOUR_TEXT --out RUN" (which prep refuses anyway).
    assert gpt_eval.main([str(run), "--data_dir", str(run), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        f"error: {run}: no meta.json and no train shards (train_*.bin) here: it is a training run folder, not a "
        f"dataset folder (meta.json, tokenizer.json, train_*.bin, val_*.bin). Give the dataset folder instead; "
        f"the run trained on data_dir = '{char_data}' (as given to train.py)\n")
    # A checkpoint folder holds a tokenizer.json: it is no half-copied dataset either.
    checkpoint = run / "checkpoints" / "step_0000004"
    assert gpt_eval.main([str(run), "--data_dir", str(checkpoint), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "it is a checkpoint folder, not a dataset folder" in err and "--overwrite" not in err, err


def test_a_nan_stop_before_any_checkpoint_does_not_speak_of_going_on_from_there(char_data, tmp_path):
    # It said "No checkpoint was saved before it. To go on from there: ...": there is no there.
    run = tmp_path / "run"
    diverging = dict(learning_rate=1e6, min_lr=0.0, warmup_steps=0, grad_clip=0.0, log_interval=1, eval_interval=0)
    with pytest.raises(TrainingError) as e:
        train(tiny_config(char_data, run, **diverging))
    message = str(e.value)
    assert "(nan_policy = 'stop'). No checkpoint was saved before it, so running again starts the run over. " \
           "Before you do: lower learning_rate (now 1e+06), set grad_clip (now 0: off)" in message, message
    assert "from there" not in message
    with pytest.raises(TrainingError) as e:
        train(tiny_config(char_data, tmp_path / "skip", nan_policy="skip", max_skipped_steps=1, **diverging))
    assert "The run is diverging. No checkpoint was saved before it, so running again starts the run over. " \
           "Before you do: lower learning_rate" in str(e.value)
    # and what it says is so: the same folder, run again, trains from the first step
    train(tiny_config(char_data, run, max_steps=2, log_interval=1, eval_interval=0))
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_readme_config_reference_rows_match_the_help():
    # The row for `resume` kept the old one-line help after --help had grown.
    from gpt.config import TrainConfig

    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    stale = []
    for name, field in TrainConfig.__dataclass_fields__.items():
        choices = field.metadata["choices"]
        row = (f"| `{name}` | `{field.default!r}` | {field.metadata['help']}"
               + (f" ({', '.join(f'`{c}`' for c in choices)})" if choices else "") + " |")
        if row not in readme.splitlines():
            stale.append(name)
    assert stale == [], f"README's config reference rows differ from --help for {stale}"


def test_ctrl_c_while_plotting_says_so(run, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpt_plot, "plot_runs", interrupt)
    assert gpt_plot.main([str(run)]) == 130
    assert capsys.readouterr().err == "interrupted: stopped plotting\n"


@pytest.mark.parametrize("tool", ["consolidate", "export"])
def test_a_copy_killed_outright_leaves_none_behind_for_good(run, tmp_path, tool):
    """A consolidate or export killed by SIGTERM (kill, timeout, a job's end) left its whole
    unfinished copy in a hidden folder beside --out that nothing removed; so does kill -9, which
    no handler sees: the next one into the same place removes those of processes no longer running."""
    import signal
    import socket
    import subprocess
    import sys

    from conftest import REPO
    from gpt import export

    out = tmp_path / "copy"
    if tool == "consolidate":
        slow = ("from gpt.checkpoint import consolidation as module\n"
                "module.complete_folder = slow\n"
                "from gpt.checkpoint.commands import main\n"
                f"sys.exit(main(['consolidate', {str(run)!r}, '--out', {str(out)!r}]))\n")
        command = lambda: ckpt.main(["consolidate", str(run), "--out", str(out)])  # noqa: E731
        said = "no unfinished copy was left behind\n"
    else:
        slow = ("from gpt import export as module\n"
                "module._publish = slow\n"
                f"sys.exit(module.main([{str(run)!r}, '--out', {str(out)!r}, '--no-check']))\n")
        command = lambda: export.main([str(run), "--out", str(out), "--no-check"])  # noqa: E731
        said = "the unfinished folder was removed\n"
    slow = ("import sys, time\n"
            "def slow(*args, **kwargs):\n"
            "    print('writing', flush=True); time.sleep(60)\n") + slow
    proc = subprocess.Popen([sys.executable, "-c", slow], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "writing\n"
    unfinished = list(tmp_path.glob(".tmp_copy_*"))
    assert len(unfinished) == 1 and (unfinished[0] / "model.safetensors").is_file()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.endswith(said), err
    assert list(tmp_path.iterdir()) == []

    # What kill -9 leaves (a process gone), and one another copy is still writing.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    abandoned = tmp_path / f".tmp_copy_{host}_{int(gone.stdout)}"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        being_written = tmp_path / f".tmp_copy_{host}_{live.pid}"
        for folder in (abandoned, being_written):
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"x" * 1000)
        assert command() == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["copy", being_written.name])
    finally:
        live.kill()
        live.wait()


def test_a_run_without_latest_still_keeps_other_folders_out_of_its_checkpoints(run, tmp_path, capsys):
    """A run whose `latest` is gone (killed in its first save, or deleted) lost the guard:
    consolidate --out RUN/checkpoints/step_N wrote a copy there, which resume, list and pruning
    then took for the run's newest checkpoint."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "latest").unlink()
    target = copy / "checkpoints" / "step_0000030"
    assert ckpt.main(["consolidate", str(copy / "checkpoints" / "step_0000004"), "--out", str(target)]) == 2
    assert f"--out {target} is inside the checkpoints folder of the training run {copy}" in capsys.readouterr().err
    assert not target.exists()
    # A folder that merely holds a subfolder named checkpoints (no checkpoint in it) is no run.
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    assert ckpt.main(["consolidate", str(run), "--out", str(other / "checkpoints" / "mine")]) == 0


def test_a_stray_folder_named_like_a_step_is_ignored(run, tmp_path, capsys):
    # 'step_²'.isdigit() is True and int('²') a ValueError: `list` (and every save's pruning) crashed.
    import shutil

    from gpt.checkpoint.layout import step_of

    assert step_of("step_²") is None and step_of("step_٣") is None and step_of("step_0000004") == 4
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "step_²").mkdir()
    assert ckpt.main(["list", str(copy)]) == 0
    assert "step_²" not in capsys.readouterr().out
