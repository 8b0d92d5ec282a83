"""The GPU benchmark scripts, smoke-run on CPU: a session lent a GPU has minutes, so a bash or
flag mistake in them must show up here, not there."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def run_scaleout(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "DATA": str(tmp_path / "data"), "RUNS": str(tmp_path / "runs"),
           "OUT": str(tmp_path / "out"), "RESULTS": str(tmp_path / "results.json"), **env}
    return subprocess.run(["bash", "benchmarks/gpu_scaleout.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_gpu_scaleout_script_runs_fsdp_on_two_cpu_processes_and_summarizes(tmp_path):
    # The GPU shape, overridden by EXTRA_ARGS to a tiny model (as gpu.sh picks the optimizer);
    # synthetic shards of 100k tokens.
    r = run_scaleout(tmp_path, DEVICE="cpu", DTYPE="float32", NPROC="2", STRATEGIES="fsdp", STEPS="4",
                     SKIP="1", BATCH="2", COMPILE="false", TRAIN_TOKENS="100000",
                     EXTRA_ARGS="--n_layer=1 --n_head=2 --n_embd=32 --block_size=64 --optimizer=adamw")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 x 2 x 32, block 64, cpu float32, adamw" in r.stdout
    result = json.loads((tmp_path / "results.json").read_text())
    assert (result["nproc"], result["device"], result["dtype"], result["block"]) == (2, "cpu", "float32", 64)
    assert result["optimizer"] == "adamw"
    assert result["model"] == "1 x 2 x 32, vocab 50304"
    fsdp = result["results"]["fsdp"]
    assert fsdp["steps_timed"] == 3 and fsdp["tokens_per_s"] > 0 and 0 < fsdp["mfu"] < 1
    assert math.isfinite(fsdp["final_loss"]) and abs(fsdp["final_loss"] - math.log(50257)) < 0.5
    assert (tmp_path / "runs" / "fsdp" / "metrics.jsonl").exists()
    assert not (tmp_path / "out").exists()  # the GPU machine copies $OUT back: no checkpoints there


def test_gpu_scaleout_script_without_a_gpu_says_so(tmp_path):
    r = run_scaleout(tmp_path, PATH=f"{tmp_path}:/usr/bin:/bin")  # no nvidia-smi on this PATH
    assert r.returncode == 2 and "no GPU visible" in r.stderr
    assert not (tmp_path / "data").exists()  # stopped before writing anything


def test_busy_cores_counts_a_process_spinning_now():
    # The suite's --threads auto leaves out the cores other jobs use now; the 1-minute load
    # average it used before still read ~1 a minute after a job had ended.
    from benchmarks.common import busy_cores

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = busy_cores(window_s=1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.6 <= busy <= os.cpu_count()


def test_gpu_script_without_a_gpu_fails_and_keeps_the_last_log(tmp_path):
    # The check used to run inside `{ ...; } | tee LOG`, where `exit 2` left only that subshell:
    # the script said "wrote ..." and exited 0, its log replaced by the error.
    log = REPO / "benchmarks" / "results" / "gpu.txt"
    before = log.read_bytes() if log.exists() else None
    env = {**os.environ, "PYTHON": sys.executable, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    r = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "no GPU visible" in r.stderr, r.stdout + r.stderr
    assert "wrote" not in r.stdout
    assert (log.read_bytes() if log.exists() else None) == before


def test_gpu_scaleout_script_rejects_an_nproc_that_is_not_a_number(tmp_path):
    r = run_scaleout(tmp_path, NPROC="two")
    assert r.returncode == 2 and "NPROC=two" in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "data").exists()


def test_gpu_scaleout_script_counts_gpus_not_mig_instances(tmp_path):
    # A GPU in MIG mode: `nvidia-smi -L` lists the GPU and, indented, each of its instances.
    # PYTHON is a stand-in that prints its arguments, so no training runs.
    (tmp_path / "nvidia-smi").write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-x)'\n"
        "echo '  MIG 3g.71gb     Device  0: (UUID: MIG-a)'\necho '  MIG 3g.71gb     Device  1: (UUID: MIG-b)'\n")
    (tmp_path / "python").write_text('#!/bin/sh\necho "python $*"\n')
    for name in ("nvidia-smi", "python"):
        (tmp_path / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "NPROC"}
    r = subprocess.run(["bash", "benchmarks/gpu_scaleout.sh"], cwd=REPO, capture_output=True, text=True,
                       timeout=60, env={**env, "PATH": f"{tmp_path}:{os.environ['PATH']}",
                                        "PYTHON": str(tmp_path / "python"), "STRATEGIES": "ddp",
                                        "DATA": str(tmp_path / "data"), "RUNS": str(tmp_path / "runs"),
                                        "RESULTS": str(tmp_path / "results.json")})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "=== ddp on 1 x cuda" in r.stdout and "--nproc_per_node=1 " in r.stdout, r.stdout


def _exit_code_and_error(capsys, main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("module, argv, option", [
    ("benchmarks.__main__", ["--threads", "-1"], "--threads"),
    ("benchmarks.__main__", ["--threads", "0"], "--threads"),
    ("benchmarks.__main__", ["--threads", "many"], "--threads"),
    ("benchmarks.__main__", ["--train-budget-s", "0"], "--train-budget-s"),
    ("benchmarks.bench_train", ["--threads", "-1"], "--threads"),
    ("benchmarks.bench_train", ["--vocab-multiple", "0"], "--vocab-multiple"),
    ("benchmarks.bench_train", ["--out", "../train"], "--out"),
    ("benchmarks.bench_generate", ["--batches", "0"], "--batches"),
    ("benchmarks.bench_generate", ["--new-tokens", "300"], "--new-tokens"),
    ("benchmarks.bench_generate", ["--rounds", "0"], "--rounds"),
    ("benchmarks.bench_loader", ["--batches", "0"], "--batches"),
    ("benchmarks.bench_loader", ["--tokens", "1000"], "--tokens"),
    ("benchmarks.bench_checkpoint", ["--repeats", "0"], "--repeats"),
    ("benchmarks.bench_checkpoint", ["--results", "a/b.json"], "--results"),
    ("benchmarks.bench_data", ["--mb", "0"], "--mb"),
])
def test_benchmark_options_with_bad_values_are_usage_errors(capsys, module, argv, option):
    # Before: tracebacks (set_num_threads, ZeroDivisionError, an empty median), some only after
    # minutes of work or a model of 124M parameters built.
    import importlib

    code, err = _exit_code_and_error(capsys, importlib.import_module(module).main, argv)
    assert code == 2, err
    assert "error:" in err and option in err and "Traceback" not in err, err


def test_results_names_with_or_without_json_are_the_same_file():
    from benchmarks.cli import results_name

    assert results_name("gpu_checkpoint.json") == results_name("gpu_checkpoint") == "gpu_checkpoint"


@pytest.mark.parametrize("script", ["bench_train.py", "bench_generate.py", "bench_loader.py"])
def test_benchmark_scripts_run_by_path_show_their_help(script):
    # `python benchmarks/bench_train.py` used to fail on `import benchmarks` (not on sys.path).
    r = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]


def test_results_json_is_strict_with_non_finite_figures_as_null(tmp_path, monkeypatch):
    from benchmarks import common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    path = common.write_json("x", {"loss": float("nan"), "rows": [{"ratio": float("inf")}, 1.5]})

    def reject(constant):
        raise ValueError(f"not JSON: {constant}")
    assert json.loads(path.read_text(), parse_constant=reject) == {"loss": None, "rows": [{"ratio": None}, 1.5]}


def test_same_model_check_fails_on_nan_logits(monkeypatch):
    # A NaN logit difference compared `diff > 1e-3` as False: the check passed.
    import torch

    from benchmarks import bench_train

    real = bench_train.to_hf_state_dict

    def poisoned(model):
        state = real(model)
        state["transformer.wte.weight"] = torch.full_like(state["transformer.wte.weight"], float("nan"))
        return state
    monkeypatch.setattr(bench_train, "to_hf_state_dict", poisoned)
    shape = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=1, vocab_size=64)
    with pytest.raises(AssertionError, match="not the same model"):
        bench_train.build_pair(shape, torch.device("cpu"))


def test_the_suite_prepares_char_and_bpe_data(tmp_path, monkeypatch):
    # It passed --vocab-size to the char prep too, which prep now refuses: the suite stopped there.
    from benchmarks import bench_resources

    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    monkeypatch.setattr(bench_resources, "SHAKESPEARE", corpus)
    rows = bench_resources.data_prep(mb=1.0, tokenizers=("char", "bpe"), vocab_size=300)
    assert [(r["tokenizer"], r["vocab_size"]) for r in rows] == [("char", len(set(text))), ("bpe", 300)]
    # The prep process's own peak, and with its encoding workers (never less than its own).
    assert all(r["peak_rss_all_processes_mb"] >= r["peak_rss_mb"] > 0 for r in rows), rows
