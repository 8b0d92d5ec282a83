"""Found by reading the code as a learner would, module by module: each test is one place where
the code did not do what its own docstrings, the README or DESIGN.md say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt.model import GPT, GPTConfig
from gpt.shards import ShardError, write_shard
from gpt.tokenizer import char_tokenizer


def test_eval_names_a_token_id_outside_the_vocabulary_before_the_model_sees_it(tmp_path):
    """gpt.eval checked the ids only after the forward pass, so an id past the embedding's rows
    (shards of another tokenizer) was an IndexError traceback from inside the model on a CPU (a
    device-side assert on a GPU); the check only ever caught ids in the padding rows."""
    from gpt.eval import evaluate_split

    tokenizer = char_tokenizer("abcdefghij")
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=16, vocab_multiple=1))
    tokens = np.arange(40) % 10
    tokens[17] = 200
    write_shard(tmp_path / "val_000000.bin", tokens)
    with pytest.raises(ShardError, match=r"token id 200 in the val shards is outside the tokenizer's vocabulary "
                                         r"\(10 ids\)"):
        evaluate_split(model, tmp_path, tokenizer, batch_size=2)
    write_shard(tmp_path / "val_000000.bin", np.arange(40) % 10)
    result = evaluate_split(model, tmp_path, tokenizer, batch_size=2)
    assert np.isfinite(result.loss) and torch.isfinite(torch.tensor(result.loss))


def test_one_rule_says_what_a_checkpoint_folder_is(tmp_path):
    """gpt/hf.py called any folder with a manifest.json "a checkpoint folder of this project"
    (refusing it as init_from = hf:DIR), while the rule prep and export ask (now gpt/run_layout.py's)
    wants manifest.json and state.json both: manifest.json alone is common elsewhere (web apps)."""
    from gpt import hf
    from gpt.run_layout import training_output

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    assert hf.project_folder_kind(folder) is None and training_output(folder) is None
    (folder / "state.json").write_text("{}")
    assert hf.project_folder_kind(folder) == "a checkpoint folder of this project"
    assert training_output(folder) == "is a checkpoint folder"


def test_a_run_without_latest_is_a_run_folder_to_hf_too(tmp_path):
    """A run killed in its first save, or its `latest` deleted, is a run folder to prep and
    export (its checkpoints/ holds a checkpoint); gpt/hf.py looked for `latest` alone, so
    init_from = hf:RUN read the run's training config.json as a GPT-2 config."""
    from gpt import hf
    from gpt.run_layout import training_output

    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000010").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    assert hf.project_folder_kind(run) is None  # checkpoints/ alone: any folder may have one
    for name in ("manifest.json", "state.json"):
        (run / "checkpoints" / "step_0000010" / name).write_text("{}")
    assert training_output(run) == "is a training run folder"
    assert hf.project_folder_kind(run) == "a run folder of this project"
    with pytest.raises(hf.HFError, match="is a run folder of this project, not a Hugging Face GPT-2 folder"):
        hf.parse_init_from(f"hf:{run}")


def test_a_new_out_dir_next_to_a_run_of_nearly_its_name_says_so(char_data, tmp_path, capsys):
    """A sweep's `--out_dir out/sweep/lr_3e3`, meant to extend out/sweep/lr_3e-3, silently
    started a fresh run from step 0 in a new folder."""
    from conftest import tiny_config
    from gpt.trainer import train

    sweep = tmp_path / "sweep"
    train(tiny_config(char_data, sweep / "lr_3e-3", max_steps=2, eval_interval=2))
    capsys.readouterr()
    train(tiny_config(char_data, sweep / "lr_3e3", max_steps=2, eval_interval=2))
    out = " ".join(capsys.readouterr().out.split())
    assert (f"note: out_dir {sweep / 'lr_3e3'} is a new folder: this is a fresh run from step 0. Did you mean "
            f"{sweep / 'lr_3e-3'}, the run beside it?") in out
    # Its own folder again (a resume), a name like no other run's, or one that differs from a
    # run's in its numbers alone (a sweep's next point, named so on purpose): no note.
    train(tiny_config(char_data, sweep / "lr_3e3", max_steps=3, eval_interval=3))
    train(tiny_config(char_data, sweep / "dropout_0.1", max_steps=2, eval_interval=2))
    train(tiny_config(char_data, sweep / "lr_1e-3", max_steps=2, eval_interval=2))
    train(tiny_config(char_data, sweep / "dropout_0.2", max_steps=2, eval_interval=2))
    assert "is a new folder" not in capsys.readouterr().out


def test_a_missing_dataset_names_the_current_folder_and_a_dataset_of_nearly_its_name(char_data, tmp_path,
                                                                                      monkeypatch):
    """`--data_dir=data/shakespear_char` (a typo) and a relative data_dir from another folder
    (a job script's) both said only that the folder does not exist, with a command to make a
    new dataset there."""
    import shutil

    from conftest import REPO
    from gpt.dataset import load_meta

    shutil.copytree(char_data, tmp_path / "data" / "shakespeare_char")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShardError) as e:
        load_meta("data/shakespear_char")
    assert (f"data/shakespear_char: dataset folder does not exist (from the current folder, {tmp_path}); did you "
            f"mean data/shakespeare_char, the dataset beside it? Or make one with:") in str(e.value)
    # The command to make one runs from there too: data_prep/prepare.py is not in this folder.
    script = REPO / "data_prep" / "prepare.py"
    assert f"make one with: python {script} --input YOUR_TEXT --out data/shakespear_char" in str(e.value)
    with pytest.raises(ShardError) as e:
        load_meta(tmp_path / "elsewhere")
    assert "current folder" not in str(e.value) and "did you mean" not in str(e.value)
    monkeypatch.chdir(REPO)  # in the repository: the short form
    with pytest.raises(ShardError, match="Make one with: python data_prep/prepare.py --input YOUR_TEXT"):
        load_meta(tmp_path / "elsewhere")


def test_keep_best_keeps_the_lowest_val_loss_and_list_shows_it(char_data, tmp_path, capsys, monkeypatch):
    """A sweep user could neither find nor keep a run's best checkpoint: keep_last pruned it once
    later evals were worse, and nothing listed the checkpoints with their val loss."""
    import json

    from conftest import tiny_config
    from gpt import checkpoint as ckpt
    from gpt import trainer
    from gpt.trainer import train

    # Evals made to come out worse after the second one, whatever the model learns.
    losses = iter([3.0, 2.0, 2.5, 2.7, 2.9, 3.1])
    monkeypatch.setattr(trainer, "timed_evaluate", lambda *args: next(losses))
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=12, eval_interval=2, keep_last=2, keep_best=True))
    kept = [p.name for p in ckpt.complete_checkpoints(run)]
    assert kept == ["step_0000004", "step_0000010", "step_0000012"]  # the best (2.0) beyond the last 2
    rows = ckpt.list_checkpoints(run)
    assert [(r["step"], r["val_loss"], r["latest"], r["best"]) for r in rows] == [
        (4, 2.0, False, True), (10, 2.9, False, False), (12, 3.1, True, False)]
    assert ckpt.main(["list", str(run)]) == 0
    out = capsys.readouterr().out
    assert "        4    2.0000  full" in out and "(best)" in out and "(latest)" in out
    assert f"the best is not the latest: sample it with sample.py --ckpt {run / 'checkpoints' / 'step_0000004'}" in out
    assert ckpt.main(["list", str(run), "--json"]) == 0
    assert [json.loads(line)["step"] for line in capsys.readouterr().out.splitlines()] == [4, 10, 12]
    # Without keep_best, keep_last alone (as before).
    other = tmp_path / "other"
    losses = iter([3.0, 2.0, 2.5, 2.7, 2.9, 3.1])
    train(tiny_config(char_data, other, max_steps=12, eval_interval=2, keep_last=2))
    assert [p.name for p in ckpt.complete_checkpoints(other)] == ["step_0000010", "step_0000012"]
    assert ckpt.main(["list", str(tmp_path / "nothing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert ckpt.main(["list", str(tmp_path / "rnu")]) == 2
    assert f"did you mean {run}?" in capsys.readouterr().err
    for inside in (run / "checkpoints", run / "checkpoints" / "step_0000004"):
        assert ckpt.main(["list", str(inside)]) == 2
        assert "list the run itself (its out_dir)" in capsys.readouterr().err
    # A `latest` naming a folder that is gone, which a resume and sample.py refuse: the listing
    # marked no row latest and said nothing of it. It still lists, and says so, with the fix.
    (run / "latest").write_text("step_0000099\n")
    for json_rows in ([], ["--json"]):
        assert ckpt.main(["list", str(run), *json_rows]) == 0
        captured = capsys.readouterr()
        assert "step_0000099" not in captured.out and "12" in captured.out
        assert captured.err.startswith(f"warning: {run / 'latest'} names checkpoint 'step_0000099', but "), captured.err
        assert "the newest is step_0000012: write 'step_0000012' into it" in captured.err


def test_a_mistyped_data_dir_that_gets_the_default_corpus_names_the_dataset_meant(char_data, tmp_path, capsys,
                                                                                monkeypatch):
    """Under the default prepare_source = 'stdlib', `--data_dir data/shakespear_char` prepared the
    stdlib corpus into the typo's folder and trained on it, saying only that it was preparing."""
    import shutil

    import gpt.prepare
    from conftest import tiny_config
    from gpt.run_data import _prepare_default

    shutil.copytree(char_data, tmp_path / "shakespeare_char")
    prepared = []
    monkeypatch.setattr(gpt.prepare, "prepare", lambda **kwargs: prepared.append(kwargs["out_dir"]))
    typo = tmp_path / "shakespear_char"
    _prepare_default(tiny_config(typo, tmp_path / "run", prepare_source="stdlib"), typo, "bpe")
    assert prepared == [typo]
    assert (f"{typo} does not exist (did you mean {tmp_path / 'shakespeare_char'}, the dataset beside it? Then press "
            f"Ctrl-C, and again once it answers, which stops this run before it saves anything; and give that "
            f"data_dir); preparing the 'stdlib' corpus there") in capsys.readouterr().out


def test_following_the_mistyped_data_dir_advice_leaves_a_run_that_trains_on_the_dataset_meant(char_data, tmp_path):
    """The advice said "stop this run with Ctrl-C": one Ctrl-C during set-up lets the run prepare
    the corpus, train a step and save a checkpoint, and the rerun with the data_dir meant was then
    refused (the checkpoint's tokenizer maps tokens to other ids)."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, tiny_args

    shutil.copytree(char_data, tmp_path / "shakespeare_char")
    typo, run = tmp_path / "shakespear_char", tmp_path / "run"
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "train.py", *tiny_args(typo, run, max_steps=10),
                                 "--prepare_source=stdlib"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "did you mean" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        advice = log.read_text()
        assert "press Ctrl-C, and again once it answers" in advice, advice
        # As a user does: the second Ctrl-C once the first is answered (two signals during a
        # long call into Rust, such as BPE training, reach Python's handler as one).
        os.kill(proc.pid, signal.SIGINT)
        while "Ctrl-C: training has not started" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log.read_text()
    finally:
        proc.kill()
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    rerun = subprocess.run([sys.executable, "train.py", *tiny_args(tmp_path / "shakespeare_char", run, max_steps=10)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resumed from" not in rerun.stdout


@pytest.mark.parametrize("tool, args", [("gpt.eval", ["out/none"]), ("gpt.export", ["out/none", "--out", "x"]),
                                        ("gpt.plot", ["out/none"]), ("gpt.checkpoint", ["list", "out/none"])])
def test_ctrl_c_while_a_tool_imports_torch_is_one_line(tool, args, tmp_path):
    """`python -m gpt.eval` (export, plot, checkpoint) answered a Ctrl-C in its first second or so,
    while torch imports and before its own handling is in place, with Python's 18-line
    KeyboardInterrupt traceback into torch's import machinery; sample.py and train.py said one line.
    (gpt.checkpoint is a package: Python imports it, and torch, before its __main__ runs.)"""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    proc = subprocess.Popen([sys.executable, "-m", tool, *args], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    time.sleep(0.4)  # the tool has started (its handler is set within ~0.1 s); torch takes longer
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted: stopped"), err


def test_ctrl_c_while_torch_imports_ends_the_tool_even_inside_a_bare_except():
    """The handler raised SystemExit into whatever was running; inside a library's bare `except:`
    around an optional import it was swallowed, and the tool went on after saying it had stopped
    (gpt.export then failed with exit 2: seen once in a full test run)."""
    import subprocess
    import sys

    from conftest import REPO

    code = ("import os, signal, time\n"
            "from gpt.early_signals import ImportInterrupted\n"
            "ImportInterrupted.install('interrupted: stopped before anything')\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(2)\n"
            "except:\n"  # noqa: E722  what some import-time code does
            "    pass\n"
            "print('went on')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and "went on" not in r.stdout, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.strip() == "interrupted: stopped before anything"


def test_a_stop_between_evals_saves_the_last_eval_as_an_earlier_steps(char_data, tmp_path, capsys, monkeypatch):
    """A stop signal's save between evals records the run's latest val loss (so a resume with
    nothing left to train reports it), but `gpt.checkpoint list` showed it as the new checkpoint's
    own, and on the tie called the measured checkpoint "best" as if the newer one were worse."""
    import json
    import os
    import signal

    from conftest import tiny_config
    from gpt import checkpoint as ckpt
    from gpt import trainer
    from gpt.trainer import train

    losses = iter([2.0, 1.5, 1.7])
    monkeypatch.setattr(trainer, "timed_evaluate", lambda *args: next(losses))
    real_step = trainer.train_step

    def step_then_stop_at_5(*args):
        real_step(*args)
        if args[-2] == 4:  # the step about to end as step 5: SIGUSR1, as a SLURM warning sends
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(trainer, "train_step", step_then_stop_at_5)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train(tiny_config(char_data, run, max_steps=12, eval_interval=4, keep_last=3))
    assert stopped.value.code == 75
    rows = ckpt.list_checkpoints(run)
    assert [(r["step"], r["val_loss"], r["val_loss_step"], r["latest"], r["best"]) for r in rows] == [
        (4, 2.0, 4, False, True), (5, 2.0, 4, True, False)]
    assert ckpt.best_checkpoint(ckpt.complete_checkpoints(run)).name == "step_0000004"
    assert ckpt.main(["list", str(run)]) == 0
    out = capsys.readouterr().out
    assert "        5    2.0000  full" in out and "(latest, val loss of step 4, carried on)" in out

    # The resume measures its own at 8 and 12; the stop's checkpoint is no candidate for best.
    monkeypatch.setattr(trainer, "train_step", real_step)
    result = train(tiny_config(char_data, run, max_steps=12, eval_interval=4, keep_last=3, keep_best=True))
    assert result.val_loss == 1.7
    rows = ckpt.list_checkpoints(run)
    assert [(r["step"], r["val_loss_step"], r["best"]) for r in rows] == [
        (5, 4, False), (8, 8, True), (12, 12, False)]
    assert json.loads((run / "checkpoints" / "step_0000012" / "state.json").read_text())["val_loss_step"] == 12
