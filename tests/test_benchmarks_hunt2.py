"""The benchmark scripts, second hunt: where trial runs write, and inputs that ended in a
traceback (a folder for a file, an empty or unreadable file, a broken metrics.jsonl) now end in
one line naming what is wrong. Nothing is timed; no benchmark really runs."""

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO


@pytest.fixture
def keep_threads():
    # The suite sets torch's thread count for the whole process: put it back for the next tests.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------
# 1. python -m benchmarks --out-prefix


def _stub_suite(monkeypatch, tmp_path):
    """The suite with every part's measuring stubbed: it only decides what to write where."""
    from benchmarks import bench_generate, bench_resources, bench_train, common

    suite = importlib.import_module("benchmarks.__main__")
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(suite, "peer_available", lambda: True)
    monkeypatch.setattr(bench_resources, "peaks", lambda device: {
        "device": "cpu", "threads": 1, "load_avg": 0.0,
        "measured_float32_gflops": 100.0, "measured_bfloat16_gflops": 200.0})
    monkeypatch.setattr(bench_train, "run_case", lambda shape, dtype, **kw: {"shape": shape, "dtype": dtype})
    monkeypatch.setattr(bench_generate, "run_case", lambda batch, n, **kw: {"batch": batch})
    monkeypatch.setattr(bench_train, "format_case", lambda r: "")
    monkeypatch.setattr(bench_generate, "format_case", lambda r: "")
    monkeypatch.setattr(suite, "table", lambda s: [])
    return suite


@pytest.mark.parametrize("extra, written", [
    # Before: --parts train / generate always replaced the committed train.json and generate.json.
    (["--out-prefix", "trial"], ["trial_generate.json", "trial_suite_generate_train.json", "trial_train.json"]),
    (["--out_prefix=trial.json"], ["trial_generate.json", "trial_suite_generate_train.json", "trial_train.json"]),
    ([], ["generate.json", "suite_generate_train.json", "train.json"]),  # the default is unchanged
])
def test_suite_out_prefix_keeps_the_committed_results(tmp_path, monkeypatch, capsys, keep_threads, extra, written):
    suite = _stub_suite(monkeypatch, tmp_path)
    suite.main(["--threads", "1", "--malloc", "system", "--parts", "train", "generate", *extra])
    assert sorted(p.name for p in tmp_path.iterdir()) == written
    assert f"wrote {tmp_path / written[1]}" in capsys.readouterr().out


def test_suite_out_prefix_is_a_bare_name_and_in_the_help(capsys, keep_threads):
    suite = importlib.import_module("benchmarks.__main__")
    with pytest.raises(SystemExit) as e:
        suite.main(["--out-prefix", "a/b"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--out-prefix" in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as e:
        suite.main(["--help"])
    assert e.value.code == 0 and "--out-prefix NAME" in capsys.readouterr().out


def test_suite_run_by_path_shows_its_help():
    # `python benchmarks/__main__.py` failed on `import benchmarks` (not on sys.path), as the
    # other scripts did before they put the repository there.
    r = subprocess.run([sys.executable, "benchmarks/__main__.py", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--out-prefix" in r.stdout, r.stderr[-2000:]


# ----------------------------------------------------------------------------------------
# 2. bench_shakespeare.py --out


def test_bench_shakespeare_takes_out_and_passes_every_train_key_on(tmp_path):
    from benchmarks import bench_shakespeare

    text = tmp_path / "input.txt"
    text.write_text("to be or not to be\n")
    given, overrides, out = bench_shakespeare.parse(
        ["--max_steps", "3", "--input", str(text), "--out", "trial.json", "--eval-interval=5", "--n_embd=64"])
    assert (given, out) == (text, "trial")
    assert overrides == ["--max_steps", "3", "--eval-interval=5", "--n_embd=64"]
    assert bench_shakespeare.parse(["--input", str(text)])[2] == "shakespeare_char_cpu"  # the committed file


@pytest.mark.parametrize("argv, said", [
    (["--out", "a/b"], "--out"),
    (["--out_dir=elsewhere"], "--out_dir"),     # read back from the script's own run folder
    (["--out-dir", "elsewhere"], "--out-dir"),
    (["--data_dir=x"], "--data_dir"),
])
def test_bench_shakespeare_refuses_a_bad_out_and_the_keys_it_sets(capsys, argv, said):
    from benchmarks import bench_shakespeare

    with pytest.raises(SystemExit) as e:
        bench_shakespeare.parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and said in err and "Traceback" not in err, err


def _stub_shakespeare(monkeypatch, tmp_path, train_exit: int):
    from benchmarks import bench_shakespeare, common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    def mkdtemp(prefix):
        (tmp_path / "work").mkdir()
        return str(tmp_path / "work")
    monkeypatch.setattr(bench_shakespeare.tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(bench_shakespeare, "prepare", lambda folder, *a, **kw: folder.mkdir())

    def run(command, cwd=None, check=False):
        if check and train_exit:
            raise subprocess.CalledProcessError(train_exit, command)
        return SimpleNamespace(returncode=train_exit)
    monkeypatch.setattr(bench_shakespeare.subprocess, "run", run)
    monkeypatch.setattr(bench_shakespeare, "read_metrics", lambda out: [
        {"step": 1, "elapsed_s": 1.0, "tokens_per_s": 10.0, "step_ms": 5.0, "val_loss": 2.0},
        {"step": 2, "elapsed_s": 2.0, "tokens_per_s": 12.0, "step_ms": 4.0, "val_loss": 1.9}])
    monkeypatch.setattr(bench_shakespeare, "load_for_eval", lambda *a: (None, None, None, {}))
    monkeypatch.setattr(bench_shakespeare, "evaluate_split", lambda *a, **kw: SimpleNamespace(loss=1.95))
    monkeypatch.setattr(bench_shakespeare, "measure_matmul_flops", lambda *a, **kw: 1e9)
    text = tmp_path / "input.txt"
    text.write_text("to be or not to be\n")
    return bench_shakespeare, text


def test_bench_shakespeare_writes_where_out_says(tmp_path, monkeypatch, capsys):
    # It always replaced the committed results/shakespeare_char_cpu.json, a trial run's too.
    bench_shakespeare, text = _stub_shakespeare(monkeypatch, tmp_path, train_exit=0)
    result = bench_shakespeare.main(["--input", str(text), "--out", "trial", "--max_steps=2"])
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["trial.json"]
    assert result["overrides"] == ["--max_steps=2"]
    assert "wrote" in capsys.readouterr().out
    assert not (tmp_path / "work").exists()  # the prepared data and run were left in /tmp


def test_bench_shakespeare_failed_training_is_one_line(tmp_path, monkeypatch):
    # A bad train.py key or a stop ended in a CalledProcessError traceback.
    bench_shakespeare, text = _stub_shakespeare(monkeypatch, tmp_path, train_exit=3)
    with pytest.raises(SystemExit) as e:
        bench_shakespeare.main(["--input", str(text), "--max_steps=0"])
    assert "train.py exited with status 3" in str(e.value)
    assert not (tmp_path / "results").exists()
    assert (tmp_path / "work" / "shakespeare_char").is_dir() and str(tmp_path / "work") in str(e.value)


def test_bench_shakespeare_failing_after_training_names_the_folder_it_keeps(tmp_path, monkeypatch, capsys):
    # A failure once train.py was done (its metrics unreadable, the whole-split eval) kept the
    # prepared data and run in /tmp without saying where.
    bench_shakespeare, text = _stub_shakespeare(monkeypatch, tmp_path, train_exit=0)

    def unreadable(out):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(bench_shakespeare, "read_metrics", unreadable)
    with pytest.raises(OSError):
        bench_shakespeare.main(["--input", str(text), "--max_steps=2"])
    assert f"the prepared data and run are in {tmp_path / 'work'}" in capsys.readouterr().err
    assert (tmp_path / "work" / "shakespeare_char").is_dir()


def test_bench_shakespeare_input_folder_is_said_to_be_a_folder(tmp_path):
    from benchmarks import bench_shakespeare

    with pytest.raises(SystemExit) as e:
        bench_shakespeare.parse(["--input", str(tmp_path)])
    assert "is a folder" in str(e.value), e.value  # was "not found", for a folder that exists


# ----------------------------------------------------------------------------------------
# 3. scaleout_summary.py


def _runs(tmp_path: Path, metrics: dict[str, str | None], config: str | None = "default",
          meta: bool = True) -> Path:
    runs = tmp_path / "runs"
    data = tmp_path / "data"
    data.mkdir()
    if meta:
        (data / "meta.json").write_text(json.dumps({"vocab_size": 50304}))
    for strategy, text in metrics.items():
        (runs / strategy).mkdir(parents=True)
        if config is not None:
            (runs / strategy / "config.json").write_text(config if config != "default" else json.dumps(
                {"data_dir": str(data), "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64,
                 "device": "cpu", "dtype": "float32", "optimizer": "adamw", "compile": "false"}))
        if text is not None:
            (runs / strategy / "metrics.jsonl").write_text(text)
    return runs


GOOD = "".join(json.dumps({"step": i, "loss": 5.0 - i, "tokens_per_s": 100.0 * i, "tokens_per_s_per_device": 50.0 * i,
                           "mfu": 0.1, "step_ms": 10.0}) + "\n" for i in range(1, 4))


def _summary(capsys, runs: Path, results: Path, *, skip="1", nproc="2", batch="4", strategies=("ddp",)):
    from benchmarks import scaleout_summary

    code = scaleout_summary.main([str(runs), skip, str(results), nproc, batch, *strategies])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.mark.parametrize("case, named, said", [
    ("no runs folder", "runs", "no such folder"),
    ("runs is a file", "runs", "not a folder"),
    ("no metrics.jsonl", "metrics.jsonl", "not found"),
    ("metrics.jsonl is a folder", "metrics.jsonl", "is a folder"),
    ("a line that is not JSON", "metrics.jsonl:2", "not valid JSON"),
    ("a line that is no record", "metrics.jsonl:1", "expected a JSON object"),
    ("a figure that is no number", "metrics.jsonl", "(step 2): tokens_per_s is 'fast'"),
    ("no config.json", "config.json", "not found"),
    ("config.json not JSON", "config.json", "not JSON"),
    ("config.json without a key", "config.json", "no n_layer"),
    ("metrics of a second strategy missing", "fsdp", "not found"),
])
def test_scaleout_summary_bad_inputs_are_one_error_line(tmp_path, capsys, case, named, said):
    # Before: FileNotFoundError, JSONDecodeError, AttributeError, KeyError or ValueError tracebacks.
    results = tmp_path / "results.json"
    strategies = ("ddp",)
    if case == "no runs folder":
        runs = tmp_path / "runs"
    elif case == "runs is a file":
        runs = tmp_path / "runs"
        runs.write_text("")
    elif case == "no metrics.jsonl":
        runs = _runs(tmp_path, {"ddp": None})
    elif case == "metrics.jsonl is a folder":
        runs = _runs(tmp_path, {"ddp": None})
        (runs / "ddp" / "metrics.jsonl").mkdir()
    elif case == "a line that is not JSON":
        runs = _runs(tmp_path, {"ddp": GOOD.replace("\n", "\n{oops\n", 1)})
    elif case == "a line that is no record":
        runs = _runs(tmp_path, {"ddp": "[1, 2]\n" + GOOD})
    elif case == "a figure that is no number":
        runs = _runs(tmp_path, {"ddp": GOOD.replace('"tokens_per_s": 200.0', '"tokens_per_s": "fast"')})
    elif case == "no config.json":
        runs = _runs(tmp_path, {"ddp": GOOD}, config=None)
    elif case == "config.json not JSON":
        runs = _runs(tmp_path, {"ddp": GOOD}, config="{")
    elif case == "config.json without a key":
        runs = _runs(tmp_path, {"ddp": GOOD}, config=json.dumps({"data_dir": "x"}))
    else:
        runs = _runs(tmp_path, {"ddp": GOOD, "fsdp": None})
        strategies = ("ddp", "fsdp")
    code, out, err = _summary(capsys, runs, results, strategies=strategies)
    assert code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert named in lines[0] and said in lines[0], err
    assert not results.exists()


@pytest.mark.parametrize("argv_at, value, name", [(1, "x", "SKIP"), (1, "-1", "SKIP"), (3, "two", "NPROC"),
                                                   (4, "0", "BATCH")])
def test_scaleout_summary_bad_counts_are_usage_errors(tmp_path, capsys, argv_at, value, name):
    from benchmarks import scaleout_summary

    argv = [str(_runs(tmp_path, {"ddp": GOOD})), "1", str(tmp_path / "r.json"), "2", "4", "ddp"]
    argv[argv_at] = value
    code = scaleout_summary.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and f"error: {name} " in err and "Traceback" not in err, err
    assert not (tmp_path / "r.json").exists()  # said before the table, not after it


def test_scaleout_summary_empty_metrics_torn_last_line_and_lost_meta_are_n_a(tmp_path, capsys):
    # Figures that are not there are n/a (the design); a last line cut short by a kill is
    # skipped, as gpt.metrics.read_metrics skips it; the vocabulary of a deleted dataset is n/a.
    runs = _runs(tmp_path, {"ddp": "", "fsdp": GOOD + '{"step": 4, "lo'}, meta=False)
    results = tmp_path / "results.json"
    code, out, err = _summary(capsys, runs, results, strategies=("ddp", "fsdp"))
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["ddp"], ["fsdp"])}
    assert rows["ddp"][1:] == ["n/a"] * 5, out
    written = json.loads(results.read_text())
    assert written["model"] == "1 x 2 x 32, vocab n/a" and "meta.json" in err
    assert written["results"]["fsdp"]["steps_timed"] == 2 and written["results"]["fsdp"]["final_loss"] == 2.0


@pytest.mark.parametrize("stored, device, compiled", [("true", "cpu", True), ("false", "cuda", False),
                                                     ("auto", "cuda", True), ("auto", "cpu", False)])
def test_scaleout_summary_records_the_compile_setting_train_py_ran_with(tmp_path, capsys, stored, device, compiled):
    # It recorded its own COMPILE argument == "true": gpu_scaleout.sh's COMPILE=1 (or auto, on a
    # GPU) compiled the model, stored as "true" (or "auto") in config.json, and was recorded false.
    runs = _runs(tmp_path, {"ddp": GOOD})
    config = json.loads((runs / "ddp" / "config.json").read_text())
    (runs / "ddp" / "config.json").write_text(json.dumps(dict(config, compile=stored, device=device)))
    code, out, err = _summary(capsys, runs, tmp_path / "results.json")
    assert code == 0, err
    assert json.loads((tmp_path / "results.json").read_text())["compile"] is compiled


def test_scaleout_summary_results_that_cannot_be_written_are_one_line(tmp_path, capsys):
    runs = _runs(tmp_path, {"ddp": GOOD})
    (tmp_path / "a_file").write_text("")
    code, out, err = _summary(capsys, runs, tmp_path / "a_file" / "results.json")
    assert code == 1 and err.strip().startswith("error: cannot write the results") and "ddp" in out, err


# ----------------------------------------------------------------------------------------
# 4. bench_data.py --input


@pytest.mark.parametrize("case", ["folder", "empty", "unreadable"])
def test_bench_data_input_that_is_no_readable_text_is_one_line(tmp_path, monkeypatch, case):
    # It checked only .exists(): a folder ended in IsADirectoryError, an empty file in a
    # ZeroDivisionError, an unreadable one in PermissionError, each a traceback.
    import benchmarks.cli
    from benchmarks import bench_data

    monkeypatch.setattr(bench_data, "RESULTS_DIR", tmp_path / "results")
    given = tmp_path / "in"
    if case == "folder":
        given.mkdir()
    else:
        given.write_text("" if case == "empty" else "some text\n")
    if case == "unreadable":
        given.chmod(0)
        if os.geteuid() == 0:  # root reads any file: its open() is made to fail as a user's would
            def refused(path, *args, **kwargs):
                raise PermissionError(13, "Permission denied", str(path))
            monkeypatch.setattr(benchmarks.cli, "open", refused, raising=False)
    with pytest.raises(SystemExit) as e:
        bench_data.main(["--mb", "0.01", "--tokenizers", "char", "--input", str(given), "--out", "trial"])
    message = str(e.value)
    assert message.startswith("error: --input") and str(given) in message, message
    assert {"folder": "a folder", "empty": "empty", "unreadable": "cannot be read"}[case] in message
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------------------
# 5. other scripts' bad option values


@pytest.mark.parametrize("case", ["missing", "no shards", "too short"])
def test_bench_loader_data_dir_that_is_no_dataset_is_one_line(tmp_path, monkeypatch, case):
    # A ShardError traceback before (its message already says what to do).
    from benchmarks import bench_loader, common
    from gpt.shards import write_shard

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    data = tmp_path / "data"
    if case != "missing":
        data.mkdir()
    if case == "too short":
        import numpy as np

        write_shard(data / "train_000000.bin", np.arange(200, dtype=np.uint16))
        monkeypatch.setattr(bench_loader, "CASES", [(2, 512)])
    with pytest.raises(SystemExit) as e:
        bench_loader.main(["--data-dir", str(data), "--batches", "1", "--repeats", "1", "--out", "trial"])
    assert str(e.value).startswith("error: --data-dir: ") and str(data) in str(e.value), e.value
    assert not (tmp_path / "results").exists()


def test_bench_loader_data_dir_too_short_for_a_later_case_fails_before_any_timing(tmp_path, monkeypatch):
    # The small cases were timed and printed first; the error came only at the largest block.
    import numpy as np

    from benchmarks import bench_loader, common
    from gpt.shards import write_shard

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(bench_loader, "CASES", [(2, 16), (2, 512)])
    monkeypatch.setattr(bench_loader, "time_loader", lambda *a: pytest.fail("timed a case first"))
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "train_000000.bin", np.arange(200, dtype=np.uint16))
    with pytest.raises(SystemExit) as e:
        bench_loader.main(["--data-dir", str(data), "--batches", "1", "--repeats", "1"])
    assert "has 200 train tokens" in str(e.value) and "at least 513" in str(e.value), e.value


def test_bench_checkpoint_dir_that_is_no_folder_is_a_usage_error(tmp_path, capsys, monkeypatch):
    # mkdtemp's NotADirectoryError / FileNotFoundError traceback, after the 124M model was built.
    from benchmarks import bench_checkpoint

    monkeypatch.setattr(bench_checkpoint, "build", lambda device: pytest.fail("built the model first"))
    (tmp_path / "a_file").write_text("")
    for given, said in ((tmp_path / "a_file", "not a folder"), (tmp_path / "missing", "no such folder")):
        with pytest.raises(SystemExit) as e:
            bench_checkpoint.main(["--dir", str(given), "--repeats", "1", "--results", "trial"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--dir {given}: {said}" in err, err


def test_a_bad_gpt_cpu_malloc_stops_the_benchmarks_before_any_timing(monkeypatch):
    from benchmarks import __main__ as suite, bench_train

    monkeypatch.setenv("GPT_CPU_MALLOC", "off")
    for main in (suite.main, bench_train.main):
        with pytest.raises(SystemExit, match="^error: GPT_CPU_MALLOC='off': use 'system'"):
            main(["--parts", "peak"] if main is suite.main else ["--shapes", "default"])


def test_out_prefix_given_with_json_is_the_bare_name():
    from benchmarks.cli import results_prefix

    assert results_prefix("trial.json") == results_prefix("trial") == "trial"


# ----------------------------------------------------------------------------------------
# 5. Third hunt: results that must not or cannot be written, and odd options


def test_out_prefix_that_names_committed_results_is_refused(capsys, keep_threads):
    # --out-prefix gpu wrote gpu_train.json and gpu_generate.json: the committed H200 figures were
    # replaced by a trial on a CPU, which the option promises never to do.
    from benchmarks import __main__ as suite
    from benchmarks.cli import committed_results

    assert "gpu_train.json" in committed_results() and "s26_suite.json" in committed_results()
    for prefix in ("gpu", "s26.json"):
        with pytest.raises(SystemExit) as e:
            suite.main(["--parts", "peak", "--out-prefix", prefix])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--out-prefix" in err and "committed results" in err, err
        assert f"benchmarks/results/{prefix.removesuffix('.json')}_" in err, err
    # Names that only start committed files the suite never writes are free (--out-prefix train
    # writes train_train.json, not train_compile.json).
    from benchmarks.cli import results_prefix
    assert results_prefix("train") == "train" and results_prefix("gpu_train_vs") == "gpu_train_vs"


def test_committed_results_are_read_in_a_checkout_another_user_owns(tmp_path, monkeypatch):
    # git refuses a repository of another owner ("dubious ownership": a shared checkout, a
    # container's bind mount), and the check then found no committed results: s26 was let through.
    from benchmarks import cli

    results = tmp_path / "repo" / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "s26_train.json").write_text("{}\n")
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    subprocess.run(["git", "-c", "safe.directory=*", "add", "benchmarks/results/s26_train.json"],
                   cwd=tmp_path / "repo", check=True)
    if os.geteuid() == 0:
        for path in [tmp_path / "repo", *(tmp_path / "repo").rglob("*")]:
            os.lchown(path, 65534, 65534)
    monkeypatch.setattr(cli, "RESULTS_DIR", results)
    assert cli.committed_results() == ["s26_train.json"]
    with pytest.raises(argparse.ArgumentTypeError, match=r"s26_train\.json is a committed result, which a trial"):
        cli.results_prefix("s26")


def test_a_results_folder_that_cannot_be_written_is_said_before_any_timing(tmp_path, monkeypatch, capsys):
    # The timing ran to its end, then write_json's PermissionError traceback lost its figures.
    from benchmarks import bench_loader, cli

    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(cli, "RESULTS_DIR", tmp_path / "a_file" / "results")
    monkeypatch.setattr(bench_loader, "bench_loader", lambda *a, **k: pytest.fail("timed first"))
    with pytest.raises(SystemExit) as e:
        bench_loader.main(["--batches", "1", "--repeats", "1"])  # the default --out: loader
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --out: cannot write into" in err and "Traceback" not in err, err
    # And where the folder fails only at the end (a full disk, made read-only meanwhile): one line.
    with pytest.raises(SystemExit, match=r"^error: cannot write the results .*a_file/trial\.json \(.*\); the "
                                         r"figures are printed above$"):
        cli.write_results("trial", "{}\n", tmp_path / "a_file")


def test_bench_resources_takes_only_the_devices_it_can_measure(capsys):
    # --device meta "measured" 5 PFLOP/s on 2 cores (nothing is computed on the meta device), and
    # mps ended in a traceback: the other scripts' device check now applies.
    from benchmarks import bench_resources

    for device in ("meta", "mps"):
        with pytest.raises(SystemExit) as e:
            bench_resources.main(["--parts", "peak", "--device", device, "--results", "trial"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument --device: '{device}'" in err and "Traceback" not in err, err


def test_bench_loader_reads_a_dataset_of_more_ids_than_gpt2s(tmp_path, monkeypatch):
    # The synthetic shard's vocabulary (GPT-2's 50,257) was applied to every --data-dir: a BPE
    # dataset of 60,001 ids was refused as ids "outside the vocabulary".
    import numpy as np

    from benchmarks import bench_loader, common
    from gpt.shards import shard_name, write_shard

    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / shard_name("train", 0), np.full(5000, 60000, dtype=np.uint16))
    (data / "meta.json").write_text(json.dumps({"tokenizer": "bpe", "vocab_size": 60001}))
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    bench_loader.main(["--data-dir", str(data), "--batches", "1", "--repeats", "1", "--out", "trial"])
    report = json.loads((tmp_path / "results" / "trial.json").read_text())
    assert len(report["results"]) == len(bench_loader.CASES) * len(bench_loader.ORDERS)
    (data / "meta.json").write_text(json.dumps({"tokenizer": "bpe", "vocab_size": 60000}))
    outside = r"token id 60000 at position [0-9,]+ is outside the vocabulary \(vocab_size 60,000\)"
    with pytest.raises(SystemExit, match=outside):
        bench_loader.main(["--data-dir", str(data), "--batches", "1", "--repeats", "1", "--out", "trial"])


def test_bench_train_scores_both_contenders_on_the_same_targets():
    # The peer was given labels=x, which HF shifts itself: it scored B x (T - 1) targets x[:, 1:]
    # where ours scored B x T targets y, so the two steps did not compute the same function.
    pytest.importorskip("transformers")
    from benchmarks.bench_train import build_pair, loss_of

    shape = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=3, vocab_size=512)
    ours, peer, _ = build_pair(shape, torch.device("cpu"))
    window = torch.randint(0, 512, (3, 17), generator=torch.Generator().manual_seed(1))
    x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()
    with torch.no_grad():
        ours.eval(), peer.eval()
        mine, theirs = loss_of(ours, x, y, peer=False), loss_of(peer, x, y, peer=True)
        by_hand = torch.nn.functional.cross_entropy(ours(x)[0].reshape(-1, 512), y.reshape(-1))
    torch.testing.assert_close(theirs, mine, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mine, by_hand, rtol=1e-6, atol=1e-6)


def test_bench_train_measures_the_peak_as_the_suite_does_and_records_it(monkeypatch):
    # Standalone bench_train measured with train.py's quick start-up budget (up to 2048 x 2048,
    # 0.25 s): on a busy moment 67 GFLOP/s, and it printed an MFU of 132% without the peak.
    from benchmarks import bench_train
    from gpt import mfu

    asked = {}
    monkeypatch.setattr(mfu, "measure_matmul_flops",
                        lambda device, dtype, **kw: asked.update(kw, dtype=dtype) or 50e9)
    assert bench_train.case_peak(torch.device("cpu"), "bfloat16") == {"measured": 50e9}
    assert asked == {"max_seconds": 1.5, "dtype": torch.bfloat16}
    r = {"dtype": "float32", "peak_gflops": {"measured": 50.0}, "ratio_ours_over_peer": 1.0,
         "ratio_ours_over_peer_per_round": {"median": 1.0, "q1": 1.0, "q3": 1.0}, "load_avg_before": 1,
         "load_avg_after": 1, "rounds": 3,
         "results": {"ours": {"step_ms": 1.0, "tokens_per_s": 1.0, "mfu_vs_measured": 1.32}}}
    assert "note: MFU over 100% of the measured peak ({'measured': 50.0})" in bench_train.format_case(r)


def test_suite_rss_part_on_a_gpu_gives_train_py_no_gpu_peak(monkeypatch, tmp_path, keep_threads):
    # training_rss runs train.py on the CPU; on --device cuda it was given the GPU's measured peak
    # as --peak_tflops, so the trainer's MFU there was a CPU's FLOP/s over an H200's.
    suite = importlib.import_module("benchmarks.__main__")
    from benchmarks import bench_resources

    given = []
    monkeypatch.setattr(bench_resources, "peaks",
                        lambda device: {"measured_float32_gflops": 380000.0, "measured_bfloat16_gflops": 1.0})
    monkeypatch.setattr(bench_resources, "training_rss", lambda extra=(): given.append(extra) or {})
    monkeypatch.setattr(suite, "table", lambda s: "")
    monkeypatch.setattr(suite, "write_json", lambda name, data: tmp_path / f"{name}.json")
    monkeypatch.setattr(suite, "device_name", lambda value: value)
    suite.main(["--device", "cuda", "--parts", "rss", "--out-prefix", "trial_rss"])
    suite.main(["--device", "cpu", "--parts", "rss", "--out-prefix", "trial_rss"])
    assert given == [(), ("--peak_tflops=380.0",)]
