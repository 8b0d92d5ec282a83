"""Paths of training and checkpointing that the rest of the suite did not reach (found by a
coverage run), driven as a user gets there: a weights-only copy put where a run resumes from, a
damaged or foreign state.json or sharded metadata, a save interrupted by Ctrl-C, a run started
from a thread, keys in a TOML file that can never apply."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch

from gpt import checkpoint as ckpt
from gpt.checkpoint import files as ckpt_files
from gpt.config import ConfigError
from gpt.trainer import train

from conftest import REPO, tiny_config
from test_checkpoint import reseal, tiny_saved_run

RUN = dict(max_steps=4, eval_interval=4, log_interval=2)


@pytest.fixture(scope="module")
def run(char_data, tmp_path_factory) -> Path:
    """A finished tiny run (one checkpoint, at step 4), never changed: tests damage copies."""
    out = tmp_path_factory.mktemp("gaps") / "run"
    train(tiny_config(char_data, out, **RUN))
    return out


def copy_run(run: Path, to: Path) -> tuple[Path, Path]:
    shutil.copytree(run, to)
    return to, ckpt.latest_checkpoint(to)


def test_a_weights_only_copy_put_in_a_run_says_to_start_from_it_with_init_from(char_data, run, tmp_path, capsys):
    """consolidate without --optimizer writes weights only; a user who copies it into a run's
    checkpoints/ to resume gets told it cannot resume exactly and how to use it instead. The
    copy of a checkpoint folder outside a run goes to CKPT_consolidated beside it."""
    loose = shutil.copytree(ckpt.latest_checkpoint(run), tmp_path / "step4")
    assert ckpt.main(["consolidate", str(loose)]) == 0
    copy = tmp_path / "step4_consolidated"
    assert capsys.readouterr().out == f"wrote {copy}\n"
    assert not (copy / ckpt.OPTIMIZER_FILE).exists()

    resumed = tmp_path / "resumed"
    shutil.copytree(copy, resumed / ckpt.CHECKPOINTS_DIR / copy.name)
    (resumed / ckpt.LATEST_FILE).write_text(copy.name + "\n")
    with pytest.raises(ckpt.CheckpointError, match=re.escape(
            f"holds weights only (no {ckpt.OPTIMIZER_FILE}), so training cannot resume from it exactly; "
            f"start a new run from its weights with --init_from={resumed / ckpt.CHECKPOINTS_DIR / copy.name} "
            f"--out_dir=ANOTHER_FOLDER")):  # its own out_dir would resume the same checkpoint again
        train(tiny_config(char_data, resumed, **{**RUN, "max_steps": 6}))
    # What the error advises works, from the same weights.
    result = train(tiny_config(char_data, tmp_path / "fresh", **{**RUN, "max_steps": 2, "eval_interval": 2},
                               init_from=str(copy)))
    assert result.step == 2


@pytest.mark.parametrize("content, problem", [
    (b"true", "expected an object, got true/false"),
    (b'{"step": 4, "tok', "unreadable (Unterminated string"),
    (b"\xff\xfe{}", "unreadable ("),
])
def test_a_state_json_that_is_no_object_or_no_json_names_the_file(char_data, run, tmp_path, content, problem):
    """state.json is covered by the manifest, so only an edited or foreign checkpoint holds such
    a file (resealed here to get past the checksums)."""
    copy, saved = copy_run(run, tmp_path / "run")
    (saved / ckpt.STATE_FILE).write_bytes(content)
    reseal(saved)
    with pytest.raises(ckpt.CheckpointError) as caught:
        train(tiny_config(char_data, copy, **{**RUN, "max_steps": 6}))
    assert str(caught.value).startswith(f"{saved / ckpt.STATE_FILE}: {problem}")
    assert (saved / ckpt.STATE_FILE).read_bytes() == content  # nothing rewritten


@pytest.mark.parametrize("content, problem", [
    # Damage is no attempt to run code: these said "refused to load: ... could run code".
    (lambda data: data[: len(data) // 2], "unreadable checkpoint metadata (UnpicklingError: pickle data was truncated)"),
    (lambda data: b"not a pickle", "unreadable checkpoint metadata (UnpicklingError: invalid load key"),
    (lambda data: b"", "unreadable checkpoint metadata (EOFError"),
    (lambda data: pickle.dumps({"state_dict_metadata": {}}), "not torch.distributed.checkpoint metadata"),
    # A persistent id (BINPERSID) would make DCP's unpickler call back into user code.
    (lambda data: b"\x80\x02X\x01\x00\x00\x00aQ.", "refused to load: the file contains objects other than "
                                                   "checkpoint metadata"),
])
def test_damaged_or_foreign_sharded_metadata_is_refused_with_one_line(tmp_path, capsys, content, problem):
    (folder,) = tiny_saved_run(tmp_path / "run", "sharded", (3,))
    metadata = folder / ckpt.DCP_DIR / ckpt.DCP_METADATA
    metadata.write_bytes(content(metadata.read_bytes()))
    reseal(folder)
    capsys.readouterr()
    assert ckpt.main(["consolidate", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {metadata}: {problem}"), err
    assert not (tmp_path / "run" / "consolidated").exists()


def test_saving_the_step_latest_already_names_keeps_that_checkpoint(tmp_path):
    """A second save of the run's latest step (the public save_checkpoint, as a script calling
    it after each eval could) leaves the complete checkpoint in place: replacing it would open
    a moment in which `latest` names nothing."""
    (folder,) = tiny_saved_run(tmp_path / "run", "full", (3,))
    before = {p: (p.stat().st_ino, p.read_bytes()) for p in ckpt_files.files_under(folder)}
    model = torch.nn.Linear(2, 2)
    again = ckpt.save_checkpoint(tmp_path / "run", 3, model, None, {"step": 3})
    assert again == folder
    assert {p: (p.stat().st_ino, p.read_bytes()) for p in ckpt_files.files_under(folder)} == before
    assert sorted(p.name for p in (tmp_path / "run" / ckpt.CHECKPOINTS_DIR).iterdir()) == [folder.name]


def test_ctrl_c_during_a_save_leaves_no_partial_folder_and_the_previous_checkpoint(tmp_path, monkeypatch):
    (earlier,) = tiny_saved_run(tmp_path / "run", "full", (3,))
    before = {p: p.read_bytes() for p in ckpt_files.files_under(tmp_path / "run")}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)  # optimizer.pt, after the weights
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path / "run", 6, model, optimizer, {"step": 6})
    assert {p: p.read_bytes() for p in ckpt_files.files_under(tmp_path / "run")} == before
    assert [p.name for p in (tmp_path / "run" / ckpt.CHECKPOINTS_DIR).iterdir()] == [earlier.name]
    assert ckpt.latest_checkpoint(tmp_path / "run") == earlier


@pytest.mark.parametrize("change, problem", [
    (lambda loader: {**loader, "version": 99}, "loader state version 99 is not supported"),
    (lambda loader: {k: v for k, v in loader.items() if k != "seed"}, "loader state is missing ['seed']"),
])
def test_a_loader_state_from_another_version_is_refused_naming_the_checkpoint(
        char_data, run, tmp_path, change, problem):
    """The loader's ValueError used to escape train() (a traceback from train.py)."""
    copy, saved = copy_run(run, tmp_path / "run")
    state = json.loads((saved / ckpt.STATE_FILE).read_text())
    (saved / ckpt.STATE_FILE).write_text(json.dumps({**state, "loader": change(state["loader"])}))
    reseal(saved)
    with pytest.raises(ckpt.CheckpointError) as caught:
        train(tiny_config(char_data, copy, **{**RUN, "max_steps": 6}))
    assert str(caught.value).startswith(f"{saved / ckpt.STATE_FILE}: {problem}")
    assert str(caught.value).endswith(ckpt.NOT_OURS)


@pytest.mark.parametrize("args, toml, problem", [
    (["--optimizer=muon", "--muon_lr=0"], None, "muon_lr must be positive, got 0.0"),
    (["--beta2=1"], None, "beta2 must be in [0, 1), got 1.0"),
    (["--beta1=-0.1"], None, "beta1 must be in [0, 1), got -0.1"),
    ([], "n_layer = 2\n[model]\nn_embd = 64\n", "run.toml: tables are not used; put keys at the top level "
                                                "(found [model])"),
    ([], "n_lyer = 2\n", "run.toml: unknown key 'n_lyer' (did you mean n_layer"),
])
def test_config_values_that_can_never_train_are_refused_naming_the_key(tmp_path, args, toml, problem):
    from gpt.cli import parse_args

    if toml is not None:
        (tmp_path / "run.toml").write_text(toml)
        args = [*args, f"--config={tmp_path / 'run.toml'}"]
    with pytest.raises(ConfigError) as caught:
        parse_args(args, default_config=str(REPO / "configs" / "default.toml"))
    assert str(caught.value).startswith(problem) or str(caught.value).startswith(f"{tmp_path / problem}"), \
        str(caught.value)


def test_device_mps_where_there_is_none_says_what_to_use(char_data, tmp_path):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(ConfigError, match=re.escape(
            "device = 'mps' but MPS is not available; use --device=cpu or auto")):
        train(tiny_config(char_data, tmp_path / "run", **RUN, device="mps"))
    assert not (tmp_path / "run" / ckpt.CHECKPOINTS_DIR).exists()


def test_parallel_ddp_without_torchrun_trains_the_plain_model_and_says_so(char_data, tmp_path, capsys):
    result = train(tiny_config(char_data, tmp_path / "run", **{**RUN, "max_steps": 2, "eval_interval": 2},
                               parallel="ddp"))
    assert result.step == 2
    assert ("parallel: none (parallel = 'ddp' needs torchrun; this is one process without a process "
            "group, so the plain model trains)") in capsys.readouterr().out


def test_a_run_started_from_a_thread_trains_and_checkpoints(char_data, tmp_path):
    """Signal handlers can be installed from the main thread alone; a notebook or a service that
    calls train() from a worker thread still trains (without stop-signal handling there)."""
    outcome = {}

    def work():
        try:
            outcome["result"] = train(tiny_config(char_data, tmp_path / "run", **{**RUN, "max_steps": 2,
                                                                                 "eval_interval": 2}))
        except BaseException as e:  # reported below, in the test's thread
            outcome["error"] = e

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(timeout=120)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].step == 2
    assert ckpt.latest_checkpoint(tmp_path / "run").name == ckpt.step_dir_name(2)


def test_a_resume_drops_a_metrics_line_torn_by_a_kill(char_data, run, tmp_path):
    """A kill -9 mid-write leaves half a line at the end of metrics.jsonl (the kill tests run in
    subprocesses, where coverage is lost): the resume drops it with the records after its
    checkpoint, and the file reads as one run."""
    from gpt.metrics import read_metrics

    copy, _ = copy_run(run, tmp_path / "run")
    metrics = copy / "metrics.jsonl"
    before = read_metrics(copy)
    with metrics.open("a") as f:
        f.write('{"step": 6, "loss": 2.5}\n{"step": 8, "lo')
    train(tiny_config(char_data, copy, **{**RUN, "max_steps": 6}))
    assert metrics.read_text().endswith("}\n")
    records = read_metrics(copy)
    assert [r["step"] for r in records] == [2, 4, 6]
    assert records[:2] == before
    assert records[2]["loss"] != 2.5 and "lr" in records[2]  # the resumed run's own step 6, not the stale one


def test_read_metrics_skips_blank_lines_and_names_a_file_that_is_not_text(run, tmp_path):
    from gpt.metrics import MetricsError, read_metrics

    lines = (run / "metrics.jsonl").read_text().splitlines()
    spaced = tmp_path / "spaced.jsonl"
    spaced.write_text("\n".join(lines[:1] + ["", "   "] + lines[1:]) + "\n")  # as an editor may leave it
    assert read_metrics(spaced) == read_metrics(run)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"step": 1}\n\xff\xfe\n')
    with pytest.raises(MetricsError, match=re.escape(f"{binary}: cannot read (") + ".*can't decode byte 0xff"):
        read_metrics(binary)


def test_lost_peer_tells_a_dead_process_from_other_runtime_errors(monkeypatch):
    """The signs gpt.distributed.lost_peer looks for (the text of gloo's error as a killed peer
    leaves it; tests/test_slurm_multinode.py sees it for real), and only with several processes."""
    from gpt.distributed import lost_peer

    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[10.0.0.3]:65212: Connection reset by peer. This is typically caused by a remote "
                        "worker hanging or bugs in the application.")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert lost_peer(gloo) == "Connection reset by peer"
    assert lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert lost_peer(ValueError("Connection reset by peer")) is None  # not a collective's error
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert lost_peer(gloo) is None
