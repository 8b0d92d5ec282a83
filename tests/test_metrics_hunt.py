"""What a run records, as users hit it: a full disk under metrics.jsonl, damaged lines at a
resume, wandb turned on at a resume, wandb tags it refuses, and gpt.plot's unwritable --out."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gpt.config import ConfigError
from gpt.metrics import MetricsError, MetricsLog, read_metrics

from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def record(step: int) -> dict:
    return {"step": step, "loss": 3.0 - step / 100, "lr": 1e-3, "tokens": 128 * step, "tokens_per_s": 1000.0}


def run_under_file_size_limit(out_dir: Path, statement: str, room: int = 20) -> subprocess.CompletedProcess:
    """`statement` (with `MetricsLog` and `out_dir` at hand) in a child process whose files cannot
    grow past metrics.jsonl's size + `room` bytes: a full disk as a write meets it (part of the
    data written, then an error), without filling one. The child prints a MetricsError and exits
    0; an OSError (the traceback's kind) exits 3, and no error at all 4."""
    limit = (out_dir / "metrics.jsonl").stat().st_size + room
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from pathlib import Path
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        from gpt.metrics import MetricsError, MetricsLog
        out_dir = Path({str(out_dir)!r})
        try:
            {statement}
        except MetricsError as e:
            print("MetricsError:", e)
            sys.exit(0)
        except OSError as e:
            print("OSError:", e)
            sys.exit(3)
        print("no error")
        sys.exit(4)
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_record_cut_short_by_a_full_disk_leaves_no_partial_line(tmp_path):
    """A write that ran out of room left the start of its line in metrics.jsonl and stopped the
    run with an OSError traceback; the next record written (after freeing space: a resume that
    does not cut the file back, or a caller that goes on) ran into it, one invalid line in the
    middle that read_metrics and gpt.plot refuse. Now the file is cut back to its last whole
    record and the error is a MetricsError saying what to check."""
    log = MetricsLog(tmp_path)
    log.write(record(2))
    before = (tmp_path / "metrics.jsonl").read_bytes()
    done = run_under_file_size_limit(
        tmp_path, 'MetricsLog(out_dir).write({"step": 4, "loss": 2.5, "lr": 0.001, "tokens": 512, "note": "x" * 200})')
    assert done.returncode == 0, done.stdout + done.stderr
    assert "disk full" in done.stdout
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    log.write(record(4))  # room again
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4]


def test_cutting_back_at_a_resume_on_a_full_disk_keeps_the_file_and_no_temporary(tmp_path):
    """The resume rewrites metrics.jsonl without the records past its checkpoint; on a full disk
    that was an OSError traceback and a half-written metrics.jsonl.tmp left in the run folder."""
    log = MetricsLog(tmp_path)
    for step in (2, 4, 6):
        log.write(record(step))
    before = (tmp_path / "metrics.jsonl").read_bytes()
    # Room for half the records the copy keeps (all of them: the checkpoint is past them).
    done = run_under_file_size_limit(tmp_path, "MetricsLog(out_dir, resume_step=100)", room=-len(before) // 2)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_resume_sets_aside_lines_that_are_no_record_instead_of_failing(tmp_path, capsys):
    """A damaged line that is valid JSON but no record (a bare number, a list, a string step)
    stopped every resume of the run with an AttributeError or TypeError traceback. Such lines,
    a note written in by hand and a record holding bytes that are not UTF-8 were then dropped
    without a word (the bytes of others replaced by U+FFFD); they now go to
    metrics.jsonl.unreadable, byte for byte, with a note, and read_metrics reads the rest."""
    path = tmp_path / "metrics.jsonl"
    latin1 = json.dumps(dict(record(3), note="caf\u00e9")).encode().replace(b"\\u00e9", b"\xe9")
    lines = [json.dumps(record(2)).encode(), b"5", b"[1, 2]", b'{"step": "4"}', b"# lr sweep A", latin1,
             json.dumps(record(4)).encode(), json.dumps(record(6)).encode(), b'{"step": 8, "lo']
    path.write_bytes(b"\n".join(lines))  # the last line cut short by a kill
    MetricsLog(tmp_path, resume_step=4)
    assert path.read_bytes() == lines[0] + b"\n" + lines[6] + b"\n"
    assert (tmp_path / "metrics.jsonl.unreadable").read_bytes() == b"".join(line + b"\n" for line in lines[1:6])
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4]
    assert (f"note: {path}: 5 line(s) that are no metrics record (line 2, 3, 4, 5, 6) moved to "
            f"{path}.unreadable") in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(MetricsError, match=r"cannot read .*metrics.jsonl \(Is a directory\) to resume its records"):
        MetricsLog(tmp_path, resume_step=4)


def test_a_wandb_tag_too_long_is_a_config_error_naming_wandb_tags(tmp_path, monkeypatch):
    """wandb refuses tags over 64 characters in wandb.init; that was reported as 'could not
    start the wandb run' with a hint to log in, after the model was built."""
    pytest.importorskip("wandb")
    from gpt.metrics import WandbSink

    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.raises(ConfigError) as error:
        WandbSink(tmp_path, mode="offline", project="hunt", tags=["ok", "x" * 65])
    assert "wandb_tags" in str(error.value) and "65 characters" in str(error.value)
    assert "login" not in str(error.value)


def test_wandb_turned_on_at_a_resume_holds_the_steps_before_it(char_data, tmp_path, monkeypatch):
    """A run started without wandb and resumed with wandb_mode = offline (or whose wandb_run_id
    was lost) starts a new wandb run; it began at the checkpoint, every step before it missing.
    It is now filled from metrics.jsonl first, as a resume of the same wandb run is."""
    pytest.importorskip("wandb")
    from gpt.trainer import train
    from test_interop import finished_records, wandb_history

    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    config = tiny_config(char_data, run, max_steps=4, eval_interval=2, log_interval=2, eval_iters=1,
                         n_layer=1, n_embd=32, block_size=32, batch_size=4)
    train(config)
    train(replace(config, max_steps=6, wandb_mode="offline", wandb_project="hunt"))
    run_id = (run / "wandb_run_id").read_text().strip()
    (file,) = run.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    history = wandb_history(finished_records(file))
    assert sorted(history) == [2, 4, 6]
    records = {r["step"]: r for r in read_metrics(run)}
    assert history[2]["loss"] == pytest.approx(records[2]["loss"])


def test_plot_to_an_unwritable_out_is_a_one_line_error(tmp_path):
    """--out under a path that is a file (or on a full or read-only disk) was an OSError
    traceback after the whole figure was drawn."""
    pytest.importorskip("matplotlib")
    from gpt.plot import main, plot_runs

    MetricsLog(tmp_path).write(record(2))
    with pytest.raises(MetricsError, match="cannot write"):
        plot_runs([tmp_path], tmp_path / "metrics.jsonl" / "x.png")
    assert main([str(tmp_path), "--out", str(tmp_path / "metrics.jsonl" / "x.png")]) == 2


def test_a_resume_keeps_the_measured_peak_so_mfu_compares(char_data, tmp_path, capsys, monkeypatch):
    """The CPU peak behind MFU was measured afresh at every start: on a busier or quieter machine
    one run's MFU moved 2x across a resume at the same tokens/s (review finding). The figure is
    recorded in each checkpoint and a resume keeps it (raised to training's speed as before)."""
    import json

    from conftest import tiny_config
    from gpt import checkpoint as ckpt
    from gpt import mfu
    from gpt.trainer import train

    config = tiny_config(char_data, tmp_path / "run", peak_tflops=0.0, max_steps=4, eval_interval=4)
    monkeypatch.setattr(mfu, "measure_matmul_flops", lambda device, dtype, **kw: 123.0e9)
    train(config)
    state = json.loads((ckpt.latest_checkpoint(tmp_path / "run") / "state.json").read_text())
    flops, source = state["peak_flops"]
    assert source.startswith("measured cpu float32 matmul") and flops >= 123.0e9
    capsys.readouterr()

    def measured_again(device, dtype, **kw):
        raise AssertionError("a resume measured the peak again")

    monkeypatch.setattr(mfu, "measure_matmul_flops", measured_again)
    train(replace(config, max_steps=8, eval_interval=8))
    out = capsys.readouterr().out
    assert f"peak {flops / 1e12:.2f} TFLOP/s per device ({source}, kept from the run's earlier start)" in out, out
    # Another dtype is another peak: measured for it.
    monkeypatch.setattr(mfu, "measure_matmul_flops", lambda device, dtype, **kw: 456.0e9)
    assert mfu.peak_flops(torch.device("cpu"), torch.bfloat16, earlier=state["peak_flops"]) == (
        456.0e9, "measured cpu bfloat16 matmul")


def test_plot_with_an_empty_out_writes_the_default_image(tmp_path, capsys):
    """`--out=$UNSET` means the default, as path_or_default_arg says: plot_runs took "" for the
    current folder and refused it ('--out . is a folder')."""
    pytest.importorskip("matplotlib")
    from gpt.plot import main

    MetricsLog(tmp_path).write(record(2))
    assert main([str(tmp_path), "--out="]) == 0
    assert (tmp_path / "metrics.png").stat().st_size > 0
    assert f"wrote {tmp_path / 'metrics.png'}" in capsys.readouterr().out
