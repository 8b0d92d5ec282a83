"""The tools' standard output failing: on a full disk (`> /dev/full`), closed (`>&-`), or read by
a reader that stops (`| head`). A result (gpt.eval's figures, a checkpoint listing) that cannot
be written is one line, exit 1 (closed: exit 2, before any work; `| head`: exit 141, quietly);
a line about work done (data prep's summary, "wrote FILE", an export's check) goes on to
standard error with a warning, and the work stands. Each ran in-process, with sys.stdout
replaced as the shell would have opened it."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest



@pytest.fixture
def stdout_to(monkeypatch):
    """Make sys.stdout "full" (/dev/full), "broken" (a pipe whose reader has gone) or "closed"."""
    opened = []

    def use(kind: str) -> None:
        if kind == "closed":
            monkeypatch.setattr(sys, "stdout", None)
            return
        if kind == "full":
            stream = open("/dev/full", "w")
        else:
            reader, writer = os.pipe()
            os.close(reader)
            stream = os.fdopen(writer, "w")
        opened.append(stream)
        monkeypatch.setattr(sys, "stdout", stream)

    yield use
    for stream in opened:
        with contextlib.suppress(OSError):
            stream.close()


def _tools(run: Path) -> dict:
    from gpt import eval as gpt_eval
    from gpt.checkpoint.commands import main as checkpoint_main

    return {
        "listing": lambda: checkpoint_main(["list", str(run)]),
        "figures": lambda: gpt_eval.main([str(run), "--max_batches", "1", "--no-progress", "--json"]),
    }


@pytest.mark.parametrize("tool", ["listing", "figures"])
def test_a_result_that_cannot_be_written_is_one_line_not_a_traceback_or_a_silent_success(
        trained, stdout_to, capfd, tool):
    # Before: `> /dev/full` and `| head` ended in an OSError or BrokenPipeError traceback (exit 1),
    # and `>&-` exited 0 with the figures lost.
    main = _tools(trained)[tool]
    stdout_to("full")
    assert main() == 1
    err = capfd.readouterr().err
    assert err == (f"error: cannot write the {tool} to standard output (No space left on device); the text "
                   f"there is incomplete\n"), err
    stdout_to("broken")
    assert main() == 141
    assert capfd.readouterr().err == ""
    stdout_to("closed")
    assert main() == 2
    err = capfd.readouterr().err
    assert err.startswith(f"error: standard output is closed: there is nowhere to write the {tool}; "
                          f"redirect it to a file instead"), err


def test_work_done_stands_when_its_closing_lines_cannot_be_written(trained, tmp_path, stdout_to, capfd):
    # Data prep exited 2 ("error: [Errno 28] No space left on device") after writing a complete
    # dataset; an export was deleted whole, and the disk it went to blamed, when its check line
    # failed; plot and consolidate wrote their file, then ended in a traceback.
    from gpt import export, plot, prepare

    warned = "warning: standard output cannot be written (No space left on device)"
    text = tmp_path / "corpus.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 400)
    stdout_to("full")
    assert prepare.main(["--input", str(text), "--out", str(tmp_path / "data"), "--tokenizer", "char",
                         "--no-progress", "--val-rule", "tail", "--min-val-tokens", "64"]) == 0
    err = capfd.readouterr().err
    assert warned in err and f"prepared {tmp_path / 'data'}" in err, err
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["vocab_size"] > 0

    stdout_to("full")
    assert export.main([str(trained), "--out", str(tmp_path / "hf")]) == 0
    err = capfd.readouterr().err
    assert warned in err and "checked: Hugging Face logits equal ours" in err, err
    assert (tmp_path / "hf" / "model.safetensors").is_file()

    stdout_to("full")
    assert plot.main([str(trained), "--out", str(tmp_path / "curves.png")]) == 0
    assert f"wrote {tmp_path / 'curves.png'}" in capfd.readouterr().err
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_sample_whose_standard_error_reader_stops_ends_quietly(trained, monkeypatch):
    # `sample.py 2>&1 >/dev/null | head`: the speed line's BrokenPipeError on standard error ends
    # sampling as quietly as standard output's (exit 141, no traceback on a stream that is gone).
    from gpt.sampling import run_sample

    reader, writer = os.pipe()
    os.close(reader)
    with open(os.devnull, "w") as out, os.fdopen(writer, "w") as err:
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        assert run_sample(["--out_dir", str(trained), "--max_new_tokens", "5", "--device", "cpu"]) == 141


def test_a_broken_pipe_other_than_the_results_reader_is_no_quiet_exit():
    # Only a result whose reader stopped is hushed (exit 141): a library's own pipe breaking (a
    # logger's service gone) is a failure, and keeps its traceback.
    from gpt.cli import report_errors

    def fails() -> None:
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        report_errors(fails)


def test_a_prep_whose_progress_bar_cannot_be_written_finishes_its_dataset(tmp_path, monkeypatch):
    # `prepare.py 2>&1 | head`: the bar's write to the broken standard error was an OSError that
    # abandoned the prep (no dataset), and its one-line error failed on the same stream (exit 1).
    from gpt import prepare

    text = tmp_path / "corpus.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 400)
    reader, writer = os.pipe()
    os.close(reader)
    with open(os.devnull, "w") as out, os.fdopen(writer, "w") as err:
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        assert prepare.main(["--input", str(text), "--out", str(tmp_path / "data"), "--tokenizer", "char",
                             "--val-rule", "tail", "--min-val-tokens", "64"]) == 0
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["vocab_size"] > 0
