"""Resuming a run with one setting changed: what the docs promise (docs/checkpoints.md,
"Resuming with other settings") held for the rest of the matrix; these are the cases where it
did not."""

from __future__ import annotations

import pytest

from gpt import checkpoint as ckpt
from gpt.metrics import read_metrics
from gpt.trainer import train

from conftest import tiny_config


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_sequential_run_refuses_another_seed_which_picks_its_val_batches(char_data, tmp_path):
    """The seed was checked only under data_order = random. A sequential run resumed with
    another seed trained on as before (its windows and, restored, its dropout generator do not
    depend on it) but evaluated on other val windows, so its val loss jumped at the resume, under a
    note that said the run 'goes on with the new values'. The docs say seed is refused."""
    run = tmp_path / "run"
    train(tiny_config(char_data, run, data_order="sequential", max_steps=4, eval_interval=4))
    before = files_of(run)
    with pytest.raises(ckpt.CheckpointError) as refused:
        train(tiny_config(char_data, run, data_order="sequential", max_steps=8, eval_interval=4, seed=7))
    assert "seed: checkpoint 1337 vs config 7 (it picks the val batches)" in str(refused.value)
    assert files_of(run) == before


def test_the_advice_to_stay_at_min_lr_fits_a_longer_warmup(char_data, tmp_path, capsys):
    """Extending a finished run with a warmup that now ends past the old schedule's end: the
    note advised lr_decay_steps = 4 alone, which validate refuses (it must exceed warmup_steps = 6)."""
    run = tmp_path / "run"
    train(tiny_config(char_data, run, max_steps=4, warmup_steps=2, eval_interval=4))
    capsys.readouterr()
    train(tiny_config(char_data, run, max_steps=8, warmup_steps=6, eval_interval=4))
    out = capsys.readouterr().out
    assert ("that schedule had reached min_lr at step 4: to stay at min_lr, set lr_decay_steps = 4 and "
            "warmup_steps below it (6 now))") in out
    # The advice, followed from the same checkpoint, trains on at min_lr.
    stay = tmp_path / "stay"
    train(tiny_config(char_data, stay, max_steps=4, warmup_steps=2, eval_interval=4))
    config = tiny_config(char_data, stay, max_steps=8, warmup_steps=3, lr_decay_steps=4, eval_interval=4)
    train(config)
    assert [r["lr"] for r in read_metrics(stay) if r["step"] > 4] == [config.min_lr] * 2
