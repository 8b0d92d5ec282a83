"""The benchmark scripts used as a user would: device and option checks, where results go, the
suite without the peer installed, and gpu.sh's exit status. No timing is asserted."""

import importlib
import json
import os
import shutil
import statistics
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from gpt.shards import ShardError


def _usage_error(capsys, module: str, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("module", ["benchmarks.__main__", "benchmarks.bench_train", "benchmarks.bench_generate",
                                    "benchmarks.bench_checkpoint"])
def test_cuda_device_without_a_gpu_is_a_usage_error(capsys, module):
    # Before: "Torch not compiled with CUDA enabled" at the end of a traceback, after the peak
    # measurement or a 124M model's build.
    err = _usage_error(capsys, module, ["--device", "cuda"])
    assert "--device" in err and "no CUDA device" in err, err


@pytest.mark.parametrize("value", ["foo", "mps"])
def test_device_that_is_not_cpu_or_cuda_is_a_usage_error(capsys, value):
    err = _usage_error(capsys, "benchmarks.bench_train", ["--device", value])
    assert "--device" in err and "cpu or cuda" in err, err


@pytest.mark.parametrize("argv, option", [
    (["--out", "a/b"], "--out"),
    (["--steps", "0"], "--steps"),
    (["--groups", "0"], "--groups"),
    (["--batch", "0"], "--batch"),
    (["--warmup", "-1"], "--warmup"),
])
def test_bench_mfu_options_are_checked_before_the_gpu(capsys, argv, option):
    # Before: plain ints and any --out, so --steps 0 divided by zero and --groups 0 took the
    # median of nothing, each after a 124M model had compiled on the GPU.
    err = _usage_error(capsys, "benchmarks.bench_mfu", argv)
    assert option in err, err


def test_generate_never_runs_more_rounds_than_asked(monkeypatch):
    # --rounds 1 ran 2 rounds: the floor of 2 was applied after the cap.
    from benchmarks import bench_generate

    monkeypatch.setattr(bench_generate, "SHAPE", dict(n_layer=1, n_head=2, n_embd=32, block_size=16,
                                                     vocab_size=64, batch_size=1))
    r = bench_generate.run_case(1, 4, no_cache=False, device=torch.device("cpu"), rounds=1, budget_s=60)
    assert r["rounds"] == 1
    assert all(len(row["seconds_all"]) == 1 for row in r["results"].values()), r["results"]
    r = bench_generate.run_case(1, 4, no_cache=False, device=torch.device("cpu"), rounds=5, budget_s=1e-9)
    assert r["rounds"] == 2  # a budget too small for one round still gets two


def test_generate_times_the_uncached_path_in_the_same_rounds_as_the_cache(monkeypatch):
    # It ran in a block of its own after the others: its ratio to the cache then carried the
    # machine's drift between the two blocks.
    from benchmarks import bench_generate

    monkeypatch.setattr(bench_generate, "SHAPE", dict(n_layer=1, n_head=2, n_embd=32, block_size=16,
                                                     vocab_size=64, batch_size=1))
    calls = []
    real = bench_generate.interleave

    def spy(contenders, **kwargs):
        calls.append(sorted(contenders))
        return real(contenders, **kwargs)
    monkeypatch.setattr(bench_generate, "interleave", spy)
    r = bench_generate.run_case(1, 4, no_cache=True, device=torch.device("cpu"), rounds=3, budget_s=60)
    timed = calls[1:]  # calls[0] is the warm-up
    assert timed == [["ours_cache", "ours_no_cache", "peer_cache"]], calls
    assert r["rounds"] == 3 and all(len(row["seconds_all"]) == 3 for row in r["results"].values())
    assert r["ratio_cache_over_no_cache"] > 0
    per_round = r["ratio_ours_over_peer_per_round"]
    assert 0 < per_round["q1"] <= per_round["median"] <= per_round["q3"], per_round
    assert "round by round" in bench_generate.format_case(r)


def test_both_benchmarks_take_the_round_by_round_ratio_as_the_peers_time_over_ours(monkeypatch):
    # The ratio is "how many times faster we are": the arguments swapped at a call site gave its
    # inverse, and the checks of the function alone still passed. Timed rounds are made up here
    # (the warm-up runs for real, so the models are built and the tokens compared as ever).
    from benchmarks import bench_generate, bench_train

    def made_up(real):
        calls = []

        def interleave(contenders, *, rounds, **kwargs):
            calls.append(rounds)
            if len(calls) == 1:
                return real(contenders, rounds=rounds, **kwargs)
            return {name: [3.0 if name.startswith("peer") else 1.0] * rounds for name in contenders}
        return interleave

    tiny = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    monkeypatch.setitem(bench_train.SHAPES, "default", {**tiny, "batch_size": 2})
    monkeypatch.setattr(bench_train, "interleave", made_up(bench_train.interleave))
    r = bench_train.run_case("default", "float32", device=torch.device("cpu"), budget_s=1)
    assert r["ratio_ours_over_peer"] == 3.0
    assert r["ratio_ours_over_peer_per_round"] == {"median": 3.0, "q1": 3.0, "q3": 3.0}

    monkeypatch.setattr(bench_generate, "SHAPE", {**tiny, "batch_size": 1})
    monkeypatch.setattr(bench_generate, "interleave", made_up(bench_generate.interleave))
    r = bench_generate.run_case(1, 4, no_cache=False, device=torch.device("cpu"), rounds=3, budget_s=60)
    assert r["ratio_ours_over_peer"] == 3.0
    assert r["ratio_ours_over_peer_per_round"] == {"median": 3.0, "q1": 3.0, "q3": 3.0}


def test_the_ratio_is_also_taken_round_by_round():
    # A VM that moves between a fast and a slow phase: the peer's median fell in its slow phase and
    # ours in our fast one, and the ratio of the medians said 4x where every round said 2x.
    from benchmarks.common import per_round_ratio

    peer = [1.0, 1.0, 2.0, 2.0, 2.0]
    ours = [0.5, 0.5, 0.5, 1.0, 1.0]
    assert statistics.median(peer) / statistics.median(ours) == 4.0
    assert per_round_ratio(peer, ours) == {"median": 2.0, "q1": 2.0, "q3": 2.0}
    # Two rounds (bench_generate's least): quartiles within the two ratios measured.
    two = per_round_ratio([2.0, 3.0], [1.0, 1.0])
    assert two["median"] == 2.5 and 2.0 <= two["q1"] <= two["q3"] <= 3.0, two
    with pytest.raises(ValueError):
        per_round_ratio(peer, ours[:-1])  # rounds of another call


def test_the_loader_benchmark_checks_ids_as_training_does(tmp_path):
    # Without vocab_size it skipped the per-batch check the trainer's loader makes.
    from benchmarks import bench_loader
    from gpt.shards import write_shard

    write_shard(tmp_path / "train_000000.bin", np.full(4096, bench_loader.SYNTHETIC_VOCAB, dtype=np.uint16))
    with pytest.raises(ShardError, match="outside the vocabulary|vocab"):
        bench_loader.time_loader(tmp_path, 2, 16, "random", n_batches=2, repeats=1)


def test_bench_loader_writes_where_out_says(tmp_path, monkeypatch):
    # It had no --out: every run, a trial's too, replaced the committed results/loader.json.
    from benchmarks import bench_loader, common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    bench_loader.main(["--tokens", "2000", "--batches", "2", "--repeats", "1", "--out", "trial.json"])
    assert [p.name for p in tmp_path.iterdir()] == ["trial.json"]
    assert json.loads((tmp_path / "trial.json").read_text())["benchmark"] == "loader"


def test_bench_attention_times_each_implementation_and_says_which_training_takes(tmp_path, monkeypatch):
    from benchmarks import bench_attention, common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bench_attention, "SHAPES", [(1, 2, 16, 8), (1, 1, 600, 8)])
    bench_attention.main(["--rounds", "1", "--out", "trial"])
    cases = json.loads((tmp_path / "trial.json").read_text())["cases"]
    takes = {(c["dtype"], c["positions"]): c["training_takes"] for c in cases}
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # without it SDPA at every length
    assert takes == {("bfloat16", 16): "cpu_attention" if native_bf16 else "sdpa", ("bfloat16", 600): "sdpa",
                     ("float32", 16): "sdpa", ("float32", 600): "sdpa"}
    assert all(set(c["ms"]) == {"sdpa", "cpu_attention", "formula"} and min(c["ms"].values()) > 0 for c in cases)


def test_bench_data_writes_where_out_says(tmp_path, monkeypatch):
    from benchmarks import bench_data

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(4000)))
    results = tmp_path / "results"
    monkeypatch.setattr(bench_data, "RESULTS_DIR", results)
    bench_data.main(["--mb", "0.1", "--tokenizers", "char", "--input", str(corpus), "--out", "trial"])
    assert [p.name for p in results.iterdir()] == ["trial.json"]
    assert json.loads((results / "trial.json").read_text())["results"][0]["tokenizer"] == "char"


def _stub_resources(monkeypatch, tmp_path):
    from benchmarks import bench_resources, common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bench_resources, "peaks", lambda device: {
        "device": "cpu", "threads": 1, "load_avg": 0.0,
        "measured_float32_gflops": 100.0, "measured_bfloat16_gflops": 200.0})
    monkeypatch.setattr(bench_resources, "loader", lambda: [])
    monkeypatch.setattr(bench_resources, "data_prep", lambda: [{"skipped": "stubbed"}])
    monkeypatch.setattr(bench_resources, "training_rss", lambda extra=(): {"skipped": "stubbed"})


def test_suite_without_transformers_runs_its_other_parts(tmp_path, monkeypatch, capsys):
    # It stopped at once ("the peer needs transformers"), its peer-free parts too.
    suite_module = importlib.import_module("benchmarks.__main__")
    monkeypatch.setattr(suite_module, "peer_available", lambda: False)
    _stub_resources(monkeypatch, tmp_path)
    suite = suite_module.main(["--threads", "1"])
    out, err = capsys.readouterr()
    assert "skipping the train and generate parts" in err and "pip install transformers" in err, err
    assert "train" not in suite and "generate" not in suite and "peak" in suite
    assert "peak matmul GFLOP/s, fp32" in out
    # Not the whole suite: the committed suite.json is not replaced.
    assert [p.name for p in tmp_path.iterdir()] == ["suite_data_loader_peak_rss.json"]


def test_suite_parts_that_need_transformers_asked_by_name_are_refused(monkeypatch):
    suite_module = importlib.import_module("benchmarks.__main__")
    monkeypatch.setattr(suite_module, "peer_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        suite_module.main(["--threads", "1", "--parts", "generate", "loader"])
    assert "--parts generate" in str(e.value) and "transformers" in str(e.value)


def _gpu_script_copy(tmp_path: Path, python_exit: int) -> tuple[Path, dict]:
    """gpu.sh copied into a scratch tree (it writes its log beside itself, never into the
    repository's results), with a fake nvidia-smi and a Python that exits `python_exit`."""
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(REPO / "benchmarks" / "gpu.sh", tmp_path / "benchmarks" / "gpu.sh")
    (tmp_path / "benchmarks" / "gpu_scaleout.sh").write_text(f"exit {python_exit}\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: Fake GPU (UUID: GPU-0)"\n')
    (bin_dir / "python").write_text(f"#!/bin/sh\nexit {python_exit}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": str(bin_dir / "python")}
    env.pop("GPU_LOG", None)
    return tmp_path / "benchmarks" / "gpu.sh", env


def test_gpu_script_exit_status_says_a_stage_failed(tmp_path):
    # Every stage failing still ended in exit 0: the failures were echoed inside a pipeline.
    script, env = _gpu_script_copy(tmp_path, python_exit=3)
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    log = (tmp_path / "benchmarks" / "results" / "gpu.txt").read_text()
    assert "stage 2 failed or timed out (exit 3)" in log and "failed stages: 1 2 3 4 5 6" in log, log


def test_gpu_script_exits_0_when_every_stage_succeeds(tmp_path):
    script, env = _gpu_script_copy(tmp_path, python_exit=0)
    r = subprocess.run(["bash", str(script)], env={**env, "GPU_LOG": str(tmp_path / "elsewhere.txt")},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "failed" not in (tmp_path / "elsewhere.txt").read_text()
    assert not (tmp_path / "benchmarks" / "results" / "gpu.txt").exists()


def test_gpu_script_log_is_where_gpu_log_says_or_the_script_fails(tmp_path):
    # A relative GPU_LOG was taken after the script's cd (the repository root, not the caller's
    # folder); a log that could not be written still ended "wrote ..." with exit 0.
    script, env = _gpu_script_copy(tmp_path, python_exit=0)
    caller = tmp_path / "caller"
    caller.mkdir()
    r = subprocess.run(["bash", str(script)], env={**env, "GPU_LOG": "mine/log.txt"}, cwd=caller,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and (caller / "mine" / "log.txt").exists(), r.stdout + r.stderr
    (tmp_path / "a_file").write_text("")
    r = subprocess.run(["bash", str(script)], env={**env, "GPU_LOG": str(tmp_path / "a_file" / "log.txt")},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "could not write the log" in r.stderr, r.stdout + r.stderr


def test_every_benchmark_call_in_gpu_sh_parses(tmp_path, monkeypatch):
    """gpu.sh runs only on a GPU, in sessions that get one for minutes: an option renamed or
    dropped in a benchmark script would cost a stage there. Each benchmark call the script makes
    (recorded by a fake Python) must parse with that script's own options. (gpu_scaleout.sh's
    train.py options are checked by test_benchmark_scripts, which runs it on CPU processes.)"""
    import argparse
    import shlex

    script, env = _gpu_script_copy(tmp_path, python_exit=0)
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "python"
    fake.write_text(f'#!/bin/bash\nprintf "%q " "$@" >> {calls}\necho >> {calls}\n')
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr

    class Parsed(Exception):
        pass

    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    checked = []
    for line in calls.read_text().splitlines():
        argv = shlex.split(line)
        if argv[0] == "-m":
            module, argv = argv[1], argv[2:]
        elif argv[0].startswith("benchmarks/"):
            module, argv = argv[0].removesuffix(".py").replace("/", "."), argv[1:]
        else:
            continue  # python -c "import torch ..." (the version line)
        bench = importlib.import_module(module)
        monkeypatch.setattr(bench, "device_name", str, raising=False)  # --device cuda on a CPU machine
        with pytest.raises(Parsed) as parsed:
            bench.main(argv)
        if module == "benchmarks.bench_mfu":
            for variant in parsed.value.args[0].variants:
                bench.parse_variant(variant, parsed.value.args[0].batch)
        checked.append(module)
    assert sorted(checked) == ["benchmarks.bench_checkpoint", "benchmarks.bench_generate", "benchmarks.bench_mfu",
                               "benchmarks.bench_train"], checked
