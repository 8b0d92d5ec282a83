"""Found by walking through docs/checkpoints.md, docs/interop.md and docs/scale-out.md as a
newcomer: each test is one flow the docs describe that did not work as they say."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch

from gpt import checkpoint as ckpt
from gpt import export, plot
from gpt.model import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)


def save_step(run: Path, step: int, seed: int) -> Path:
    torch.manual_seed(seed)
    model = GPT(CONFIG)
    return ckpt.save_checkpoint(run, step, model, None, {"step": step, "model_config": asdict(CONFIG)})


def test_export_overwrite_replaces_an_earlier_export_inside_the_run(tmp_path, capsys):
    # docs/interop.md: a new --out such as out/default/hf is fine, and --overwrite replaces an
    # earlier export. Exporting the same run there again after more training was refused:
    # "--out out/default/hf is inside the training run folder out/default; refusing to replace it".
    run = tmp_path / "run"
    save_step(run, 1, seed=1)
    hf_dir = run / "hf"
    assert export.main([str(run), "--out", str(hf_dir), "--no-check"]) == 0
    first = (hf_dir / "model.safetensors").read_bytes()
    save_step(run, 2, seed=2)
    capsys.readouterr()
    assert export.main([str(run), "--out", str(hf_dir), "--overwrite", "--no-check"]) == 0, capsys.readouterr().err
    assert (hf_dir / "model.safetensors").read_bytes() != first
    assert json.loads((hf_dir / "config.json").read_text())["n_embd"] == CONFIG.n_embd

    # Other folders of the run stay refused, even one that looks like an export plus something.
    notes = run / "notes"
    notes.mkdir()
    for name in ("config.json", "model.safetensors", "mine.txt"):
        (notes / name).write_text("keep")
    wandb = run / "wandb"
    wandb.mkdir()
    (wandb / "debug.log").write_text("keep")
    for out in (notes, wandb, run / "config.json"):
        if not out.exists():
            out.write_text("{}")
        assert export.main([str(run), "--out", str(out), "--overwrite", "--no-check"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out} is inside the training run folder {run}"), err
    assert (notes / "mine.txt").read_text() == "keep" and (wandb / "debug.log").read_text() == "keep"
    ckpt.verify_checkpoint(ckpt.latest_checkpoint(run))


def test_plot_of_a_folder_inside_a_run_names_the_run(tmp_path, capsys):
    # `python -m gpt.plot out/default/checkpoints/step_N` said only "…/step_N/metrics.jsonl does
    # not exist; give a run folder": not which one.
    run = tmp_path / "run"
    step = save_step(run, 1, seed=1)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.5, "lr": 1e-3, "tokens": 64}) + "\n")
    for folder in (step, run / "checkpoints"):
        assert plot.main([str(folder)]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: {folder} is inside the run folder {run}, which holds its metrics.jsonl: "
                       f"plot that folder (python -m gpt.plot {run})\n"), err
    assert not (step / "metrics.png").exists()
    # A folder outside any run keeps the plain message, as does one under a folder that holds
    # a metrics.jsonl but is no run.
    assert plot.main([str(tmp_path / "elsewhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes").mkdir()
    assert plot.main([str(tmp_path / "notes")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'notes' / 'metrics.jsonl'} does not exist")
    # A run of its own inside the run (a fine-tune into out/default/ft) that has not logged yet
    # is that run, not the outer one: its own plain message.
    (run / "ft" / "checkpoints").mkdir(parents=True)
    assert plot.main([str(run / "ft")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {run / 'ft' / 'metrics.jsonl'} does not exist")


def test_sampling_a_dataset_folder_says_it_is_a_dataset_not_a_run(char_data):
    # `sample.py --out_dir data/shakespeare_char` (the data_dir for the out_dir): "holds no
    # checkpoint" alone left the newcomer to work out what the folder was instead.
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.resolve_checkpoint(char_data)
    assert "holds no checkpoint" in str(e.value) and "prepared dataset" in str(e.value) and "out_dir" in str(e.value)


def test_consolidating_an_hf_prefixed_folder_explains_the_prefix(tmp_path):
    # `python -m gpt.checkpoint consolidate hf:DIR` said "checkpoint path hf:DIR does not exist".
    with pytest.raises(ckpt.CheckpointError, match="used as it is"):
        ckpt.consolidate(f"hf:{tmp_path}")


def test_sampling_a_run_before_its_first_save_says_so(char_data, tmp_path):
    """`sample.py --out_dir RUN` while the run trains toward its first save (step 250 by default):
    "holds no checkpoint (no latest file and no manifest.json)" read as a broken run."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, tiny_args

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    training = subprocess.Popen([sys.executable, "train.py", *tiny_args(char_data, run, max_steps=100_000,
                                                                          eval_interval=50_000)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists():
            assert training.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        sampled = subprocess.run([sys.executable, "sample.py", f"--out_dir={run}", "--max_new_tokens=5"],
                                 cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    finally:
        training.send_signal(signal.SIGKILL)
        training.wait()
    assert sampled.returncode == 2
    assert sampled.stderr.strip() == (
        f"error: {run} holds no checkpoint (no latest file and no manifest.json): it is a training run "
        f"that has not saved a checkpoint yet (or was stopped before its first). A run saves every "
        f"eval_interval = 50,000 steps, at its end, and when stopped with Ctrl-C or SIGTERM: try again "
        f"once it has"), sampled.stderr


def test_only_a_training_config_makes_a_folder_a_run_before_its_first_save(tmp_path):
    """Any config.json made a folder "a training run that has not saved a checkpoint yet" (an
    editor's or another tool's config.json, say); data prep's --tokenizer-from asked for a
    training config (data_dir and out_dir), and both now ask the same question."""
    from gpt.run_layout import is_run_before_first_save

    other = tmp_path / "project"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"editor.tabSize": 4}))
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.resolve_checkpoint(other)
    assert str(e.value) == f"{other} holds no checkpoint (no latest file and no manifest.json)"
    assert not is_run_before_first_save(other)

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"out_dir": str(run), "data_dir": "data", "eval_interval": 10}))
    with pytest.raises(ckpt.CheckpointError, match="has not saved a checkpoint yet .* every eval_interval = 10 steps"):
        ckpt.resolve_checkpoint(run)
    (run / "config.json").unlink()
    (run / "metrics.jsonl").write_text("")  # a run whose config.json is gone
    assert is_run_before_first_save(run)

    # A config.json that is a FIFO: the question is answered, not waited on (a subprocess, so
    # that a hang fails the test instead of stopping the suite).
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "config.json")
    import subprocess
    import sys
    from conftest import REPO
    asked = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                            "from gpt.run_layout import is_run_before_first_save as f; print(f(Path(sys.argv[1])))",
                            str(fifo)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert asked.stdout == "False\n", asked.stderr
