"""sample.py, python -m gpt.eval and python -m gpt.export as a user drives them after training:
pipes, Ctrl-C, the prompt from standard input, a Hugging Face folder given where a run goes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpt import eval as gpt_eval
from gpt import export as gpt_export
from gpt.sampling import run_sample
from gpt.trainer import train

from conftest import REPO, tiny_config


@pytest.fixture(scope="module")
def run(char_data, tmp_path_factory) -> Path:
    """A finished 4-step tiny char-level run."""
    out = tmp_path_factory.mktemp("sample_flows") / "run"
    train(tiny_config(char_data, out, max_steps=4, eval_interval=0, eval_iters=1, log_interval=2))
    return out


def test_reader_that_stops_reading_ends_sampling_quietly(run):
    # `sample.py ... | head -c 1`: the pipe closes while tokens are still coming. It used to end
    # with a BrokenPipeError traceback.
    proc = subprocess.Popen(
        [sys.executable, "sample.py", "--out_dir", str(run), "--device", "cpu", "--prompt", "A",
         "--max_new_tokens", "5000", "--no_kv_cache"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(1) == b"A"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "Broken" not in err, err


def test_ctrl_c_while_generating_ends_the_line_and_says_so(run, monkeypatch, capsys):
    # Ctrl-C during generation used to print the trainer's message ("without saving;
    # checkpoints already written are intact (run again to resume ...)"), after the half-printed
    # line of text.
    import gpt.generate
    import gpt.sampling

    real = gpt.generate.generate

    def interrupted_after_three(*args, **kwargs):
        for i, token in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield token

    monkeypatch.setattr(gpt.sampling, "generate", interrupted_after_three)
    assert run_sample(["--out_dir", str(run), "--device", "cpu", "--prompt", "A",
                       "--max_new_tokens", "50"]) == 130
    printed = capsys.readouterr()
    assert printed.out.startswith("A") and printed.out.endswith("\n") and len(printed.out) == 1 + 3 + 1
    assert printed.err == "interrupted: stopped generating\n"


def test_ctrl_c_in_eval_and_export_does_not_speak_of_checkpoints(run, monkeypatch, capsys, tmp_path):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpt_eval, "evaluate_split", interrupt)
    assert gpt_eval.main([str(run), "--device", "cpu"]) == 130
    assert capsys.readouterr().err == "interrupted: stopped before the end of the split; no figures to report\n"

    monkeypatch.setattr(gpt_export, "export_hf", interrupt)
    assert gpt_export.main([str(run), "--out", str(tmp_path / "hf")]) == 130
    assert capsys.readouterr().err == "interrupted: stopped exporting; the unfinished folder was removed\n"


def test_prompt_file_dash_reads_standard_input(run, monkeypatch, capsys):
    args = ["--out_dir", str(run), "--device", "cpu", "--max_new_tokens", "3", "--prompt_file", "-"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("First".encode())))
    assert run_sample(args) == 0
    assert capsys.readouterr().out.startswith("First")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"A\xff")))
    assert run_sample(args) == 2
    assert capsys.readouterr().err == "error: --prompt_file -: not UTF-8 text (invalid start byte at byte 1)\n"


def test_a_hugging_face_folder_given_as_a_run_says_to_write_hf(tmp_path, capsys):
    # It used to say only "... holds no checkpoint (no latest file and no manifest.json)".
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (hf / "model.safetensors").write_bytes(b"")
    for argv in (["--out_dir", str(hf)], ["--ckpt", str(hf)]):
        assert run_sample(argv) == 2
        assert capsys.readouterr().err == (f"error: {hf} is a Hugging Face model folder, not a run or checkpoint "
                                           f"of this project: sample it with --init_from hf:{hf}\n")
    assert gpt_eval.main([str(hf)]) == 2
    assert f"evaluate it as hf:{hf} (with --data_dir)" in capsys.readouterr().err
    assert gpt_export.main([str(hf), "--out", str(tmp_path / "out")]) == 2
    assert "it is in Hugging Face's format already, nothing to export" in capsys.readouterr().err


def test_a_run_given_as_hf_folder_says_to_drop_the_prefix(run, tmp_path, capsys):
    # `hf:RUN` used to read the run's config.json (a training config) as a GPT-2 config:
    # "model_type is None; only GPT-2 ('gpt2') models can be loaded".
    checkpoint = next((run / "checkpoints").iterdir())
    assert run_sample(["--init_from", f"hf:{run}"]) == 2
    assert capsys.readouterr().err == (f"error: --init_from hf:{run}: {run} is a run folder of this project, "
                                       f"not a Hugging Face folder; sample it with --out_dir {run}\n")
    assert run_sample(["--init_from", f"hf:{checkpoint}"]) == 2
    assert f"{checkpoint} is a checkpoint folder of this project" in capsys.readouterr().err
    assert gpt_eval.main([f"hf:{run}", "--data_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: init_from = 'hf:{run}': {run} is a run folder of this project, "
                                       f"not a Hugging Face GPT-2 folder: name it without 'hf:'\n")
    # A folder that is neither: no config.json is named before the missing tokenizer.json.
    assert run_sample(["--init_from", f"hf:{tmp_path}"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'config.json'} does not exist: not a Hugging Face model folder\n"


def test_export_output_is_its_own_lines_only(run, tmp_path, capfd):
    # The check's reload used to print transformers' "Loading weights: 100%|████| 16/16" bars.
    pytest.importorskip("transformers")
    assert gpt_export.main([str(run), "--out", str(tmp_path / "hf")]) == 0
    printed = capfd.readouterr()
    assert printed.err == ""
    assert printed.out.startswith("checked: Hugging Face logits equal ours") and printed.out.count("\n") == 2


def test_streaming_decodes_each_token_about_once(run, monkeypatch, capsys):
    # The first sample was printed by decoding its whole continuation at every token: n^2/2
    # token decodes for n tokens, which made long samples crawl (20,000 tokens: ~60 s of it).
    from gpt.tokenizer import Tokenizer

    real = Tokenizer.decode
    decoded = []

    def counting(self, ids):
        ids = list(ids)
        decoded.append(len(ids))
        return real(self, ids)

    monkeypatch.setattr(Tokenizer, "decode", counting)
    n = 400
    assert run_sample(["--out_dir", str(run), "--device", "cpu", "--prompt", "A", "--max_new_tokens", str(n),
                       "--temperature", "0", "--num_samples", "2"]) == 0
    first, second = capsys.readouterr().out.split("-" * 40 + "\n")
    assert first == second and len(first) == 1 + n + 1  # streamed text = the whole decode
    assert sum(decoded) <= 3 * n


def test_sample_out_dir_with_home_is_expanded(tmp_path, monkeypatch):
    from gpt import checkpoint as ckpt

    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint path {tmp_path / 'nowhere'} does not exist"):
        ckpt.resolve_checkpoint("~/nowhere")
