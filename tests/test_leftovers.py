"""Loose ends of the data side and the benchmarks: advice for a half-copied dataset, a meta.json
that contradicts tokenizer.json, a scale-out summary with a null MFU, bench_resources' command
line, and one count of usable CPUs."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_script
from gpt.loader import TokenLoader
from gpt.dataset import load_meta
from gpt.shards import ShardError
from gpt.dataset import load_tokenizer
from gpt.tokenizer import train_bpe

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(3000))


@pytest.fixture(scope="module")
def char_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """A char dataset made by prepare.py's command line from one text file: (input, folder)."""
    from gpt.prepare import main

    root = tmp_path_factory.mktemp("leftovers")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    out = root / "data"
    assert main(["--input", str(corpus), "--out", str(out), "--tokenizer", "char", "--no-progress"]) == 0
    return corpus, out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _advised_command(message: str, corpus: Path) -> list[str]:
    command = message.split("python data_prep/prepare.py ", 1)[1]
    return shlex.split(command.replace("YOUR_TEXT", shlex.quote(str(corpus))))


# ---- 1. what a missing piece of a dataset says --------------------------------------------------
def test_an_absent_or_empty_dataset_folder_gets_the_command_for_a_new_one(tmp_path):
    with pytest.raises(ShardError) as e:
        load_meta(tmp_path / "nope")
    message = str(e.value)
    assert "dataset folder does not exist" in message
    assert f"python data_prep/prepare.py --input YOUR_TEXT --out {tmp_path / 'nope'}" in message
    assert "--source stdlib" in message  # the embedded corpus, under its real option name
    assert "--overwrite" not in message  # nothing there to overwrite
    (tmp_path / "empty").mkdir()
    for read in (lambda: load_meta(tmp_path / "empty"), lambda: TokenLoader(tmp_path / "empty", "train", 2, 8)):
        with pytest.raises(ShardError, match="no (meta.json and no )?train shards") as e:
            read()
        assert "--overwrite" not in str(e.value) and "--source stdlib" in str(e.value)


@pytest.mark.parametrize("lost", ["meta.json", "val_000000.bin", "train_000000.bin"])
def test_a_half_copied_dataset_names_the_missing_file_and_a_command_that_remakes_it(char_dataset, tmp_path, lost):
    # The advice was `prepare.py --input YOUR_TEXT --out DIR`, which prepare.py refuses for a
    # folder that still holds part of a dataset (no --overwrite), and said nothing of which file
    # was gone or of the tokenizer the dataset was made with.
    from gpt.prepare import main

    corpus, original = char_dataset
    data = tmp_path / "data"
    shutil.copytree(original, data)
    (data / lost).unlink()
    split = "val" if lost.startswith("val") else "train"
    with pytest.raises(ShardError) as e:
        load_meta(data)
        TokenLoader(data, split, 2, 8)
    message = str(e.value)
    assert "incomplete" in message and lost in message, message
    if lost == "meta.json":
        assert "tokenizer.json but no meta.json" in message  # as docs/errors.md quotes it
    else:
        assert f"no {split} shards" in message and f"its meta.json lists {lost}" in message, message
    assert "--tokenizer char" in message  # from meta.json, or tokenizer.json: the same vocabulary again
    command = _advised_command(message, corpus)
    assert "--overwrite" in command
    # The advice works as given (--input filled in), and remakes the very same files.
    assert main([*command, "--no-progress"]) == 0
    assert _files(data) == _files(original)
    TokenLoader(data, split, 2, 8)


@pytest.mark.parametrize("split", [["--val-rule", "tail", "--val-fraction", "0.1"],
                                   ["--val-fraction", "0.05", "--seed", "3", "--val-chunk-tokens", "300",
                                    "--shard-tokens", "20000"]])
def test_the_remake_command_keeps_the_split_options_the_dataset_was_made_with(char_dataset, tmp_path, split):
    # data_prep/shakespeare.py makes its datasets with the tail rule and val fraction 0.1; the
    # advised remake left both out: train and val were cut elsewhere, and a run trained on the
    # dataset then refused to resume on the remade one (train tokens: 1,003,854 vs 1,099,010).
    from gpt.prepare import main

    corpus, _ = char_dataset
    original = tmp_path / "original"
    assert main(["--input", str(corpus), "--out", str(original), "--tokenizer", "char", "--no-progress", *split]) == 0
    data = tmp_path / "data"
    shutil.copytree(original, data)
    (data / "val_000000.bin").unlink()
    with pytest.raises(ShardError) as e:
        TokenLoader(data, "val", 2, 8)
    command = _advised_command(str(e.value), corpus)
    assert main([*command, "--no-progress"]) == 0
    assert _files(data) == _files(original)


def test_bare_llm_c_shards_with_gpt2s_tokenizer_json_are_a_dataset(tmp_path):
    # gpt2_tokenizer() says, where the hub is out of reach, to put GPT-2's tokenizer.json into
    # the dataset folder; load_meta then refused that folder ("tokenizer.json but no meta.json").
    import numpy as np
    import tokenizers
    from tokenizers import models

    from gpt.shards import GPT2_EOS_ID, GPT2_VOCAB_SIZE, write_shard

    vocab = {f"t{i}": i for i in range(GPT2_EOS_ID)} | {"<|endoftext|>": GPT2_EOS_ID}
    tokenizers.Tokenizer(models.BPE(vocab, [])).save(str(tmp_path / "tokenizer.json"))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(2000, dtype=np.uint16))
    meta = load_meta(tmp_path)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eos_id"]) == ("gpt2", GPT2_VOCAB_SIZE, GPT2_EOS_ID)
    assert load_tokenizer(tmp_path).kind == "gpt2"
    (tmp_path / "tokenizer.json").write_text(json.dumps(dict(json.loads((tmp_path / "tokenizer.json").read_text()),
                                                             model={"type": "WordLevel", "vocab": {"a": 0}})))
    with pytest.raises(ShardError, match="tokenizer.json but no meta.json"):  # any other: still refused
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text("3")
    with pytest.raises(ShardError, match="must hold a JSON object"):  # was a TypeError traceback
        load_meta(tmp_path)


# ---- 2. meta.json's tokenizer kind against tokenizer.json's -------------------------------------
def _with_meta_kind(folder: Path, kind: str, vocab_size: int | None = None) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta["tokenizer"] = kind
    if vocab_size is not None:
        meta["vocab_size"] = vocab_size
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("file_kind, meta_kind", [("char", "bpe"), ("char", "gpt2"), ("bpe", "char"), ("bpe", "gpt2")])
def test_a_meta_json_naming_another_tokenizer_kind_is_an_error_naming_both_files(char_dataset, tmp_path,
                                                                                 file_kind, meta_kind):
    # Before: meta.json's kind was forced on the file: a char tokenizer.json failed with "bpe
    # tokenizer has no <|endoftext|> token", a BPE one with "char tokenizer tokens must be single
    # characters" (neither naming meta.json), and a BPE under meta "gpt2" loaded as GPT-2's.
    data = tmp_path / "data"
    shutil.copytree(char_dataset[1], data)
    if file_kind == "bpe":
        train_bpe([TEXT], 300).save(data / "tokenizer.json")
    _with_meta_kind(data, meta_kind)
    with pytest.raises(ShardError) as e:
        load_tokenizer(data)
    message = str(e.value)
    assert f"{data / 'tokenizer.json'} is a {file_kind} tokenizer" in message, message
    assert f"{data / 'meta.json'} says the dataset's tokenizer is '{meta_kind}'" in message, message
    assert "--overwrite" in message


def test_the_tokenizer_kind_comes_from_the_file_and_meta_json_tells_bpe_from_gpt2(char_dataset, tmp_path,
                                                                                 monkeypatch):
    import gpt.tokenizer as tokenizer_module

    data = tmp_path / "data"
    shutil.copytree(char_dataset[1], data)
    assert load_tokenizer(data).kind == "char"
    _with_meta_kind(data, "something new")  # an unknown kind: the file decides, as before
    assert load_tokenizer(data).kind == "char"
    # A BPE of our own that happens to have GPT-2's size and end-of-text id: meta.json says bpe.
    tok = train_bpe([TEXT], 300)
    tok.save(data / "tokenizer.json")
    _with_meta_kind(data, "bpe", tok.vocab_size)
    monkeypatch.setattr(tokenizer_module, "_infer_kind", lambda inner, path: "gpt2")  # a 50257-id BPE
    assert load_tokenizer(data).kind == "bpe"
    assert load_tokenizer(data / "tokenizer.json").kind == "gpt2"  # a file alone: as inferred


# ---- 3. gpu_scaleout.sh's summary with a null MFU -----------------------------------------------
def _fake_runs(root: Path, mfus: dict[str, list]) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    (data / "meta.json").write_text(json.dumps({"tokenizer": "synthetic", "vocab_size": 50304}))
    runs = root / "runs"
    for strategy, values in mfus.items():
        (runs / strategy).mkdir(parents=True)
        config = {"data_dir": str(data), "n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024,
                  "device": "cuda", "dtype": "bfloat16", "optimizer": "adamw", "compile": "true"}
        (runs / strategy / "config.json").write_text(json.dumps(config))
        lines = [json.dumps({"step": i + 1, "loss": 10.9 - i / 10, "tokens_per_s": 1000.0 + i,
                             "tokens_per_s_per_device": 500.0 + i, "mfu": mfu, "step_ms": 30.0})
                 for i, mfu in enumerate(values)]
        (runs / strategy / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return runs


def test_gpu_scaleout_summary_prints_n_a_for_a_null_mfu(tmp_path):
    # A GPU missing from the datasheet table logged "mfu": null; statistics.median(None, ...)
    # and `None * 100` failed the summary after the whole GPU run.
    runs = _fake_runs(tmp_path, {"ddp": [None] * 4, "fsdp": [None, 0.4, None, 0.5]})
    results = tmp_path / "results.json"
    r = subprocess.run([sys.executable, "benchmarks/scaleout_summary.py", str(runs), "1", str(results), "2", "16",
                        "ddp", "fsdp"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split()[0]: line for line in r.stdout.splitlines() if line.split()[:1] in (["ddp"], ["fsdp"])}
    assert rows["ddp"].split()[3] == "n/a", r.stdout
    assert rows["fsdp"].split()[3] == "45.0%", r.stdout  # the median of the figures there are
    written = json.loads(results.read_text())["results"]
    assert written["ddp"]["mfu"] is None and written["fsdp"]["mfu"] == 0.45
    assert written["ddp"]["steps_timed"] == 3 and written["ddp"]["tokens_per_s"] == 1002.0


def test_gpu_scaleout_script_runs_its_summary_from_the_summary_module():
    script = (REPO / "benchmarks" / "gpu_scaleout.sh").read_text()
    assert '"$PYTHON" benchmarks/scaleout_summary.py "$RUNS" "$SKIP" "$RESULTS"' in script
    assert "statistics.median" not in script  # no second copy of the summary to drift


# ---- 4. bench_resources.py's command line -------------------------------------------------------
def test_bench_resources_run_by_path_shows_its_help():
    r = subprocess.run([sys.executable, "benchmarks/bench_resources.py", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout and "--loader-tokens" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("argv, option", [
    (["--loader-tokens", "0"], "--loader-tokens"),
    (["--loader-tokens", "100"], "--loader-tokens"),
    (["--repeats", "0"], "--repeats"),
    (["--data-mb", "-1"], "--data-mb"),
    (["--vocab-size", "100"], "--vocab-size"),
    (["--parts", "everything"], "--parts"),
    (["--results", "a/b.json"], "--results"),
])
def test_bench_resources_bad_options_are_usage_errors_before_any_work(capsys, monkeypatch, argv, option):
    from benchmarks import bench_resources

    def no_work(*args, **kwargs):
        raise AssertionError("a part ran before the options were checked")
    for part in ("peaks", "loader", "data_prep", "training_rss"):
        monkeypatch.setattr(bench_resources, part, no_work)
    with pytest.raises(SystemExit) as e:
        bench_resources.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error:" in err and option in err and "Traceback" not in err, err


def test_bench_resources_smallest_run_writes_its_results(tmp_path, monkeypatch):
    from benchmarks import bench_resources, common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    record = bench_resources.main(["--parts", "loader", "--loader-tokens", "1025", "--loader-batches", "1",
                                   "--repeats", "1", "--results", "smoke"])
    written = json.loads((tmp_path / "smoke.json").read_text())
    assert len(written["loader"]) == len(record["loader"]) == 4 and "rss" not in written


# ---- 5. one count of usable CPUs ----------------------------------------------------------------
def test_checksums_and_data_prep_workers_count_usable_cpus_in_one_place(monkeypatch):
    import os

    import gpt.crc as crc
    import gpt.wordcache as wordcache

    assert wordcache.usable_cpus is crc.usable_cpus
    assert not hasattr(wordcache, "default_workers") and not hasattr(crc, "_usable_cpus")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    assert crc.usable_cpus() == 2  # the affinity mask (taskset, cpusets), not every core
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert crc.usable_cpus() == 1
    # Data prep imports it without torch.
    r = subprocess.run([sys.executable, "-c", "import sys, gpt.prepare; print('torch' in sys.modules)"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr[-2000:]


@pytest.mark.parametrize("script", ["prepare", "shakespeare"])
def test_encoding_errors_skip_that_leaves_no_file_says_so(tmp_path, script):
    # Following "pass --encoding-errors replace or skip" for one Latin-1 file (every
    # data_prep/shakespeare.py input is one file) ended in "no text found (the input is empty)";
    # shakespeare.py also showed the skip as Python's raw two-line warning.
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9 au lait\n" * 50)
    args = ["--input", str(latin), "--out", str(tmp_path / "out"), "--encoding-errors", "skip", "--no-progress"]
    if script == "prepare":
        args += ["--tokenizer", "char"]
    result = run_script(f"data_prep/{script}.py", *args)
    assert result.returncode == 2, result.stderr
    assert f"warning: skipping {latin}: not valid UTF-8 at byte offset 3" in result.stderr
    assert "UserWarning" not in result.stderr and "Traceback" not in result.stderr
    assert ("no text left: 1 file(s) skipped as not valid UTF-8 (--encoding-errors skip)"
            in result.stderr.strip().splitlines()[-1]), result.stderr
    assert not (tmp_path / "out").exists()
