"""Data prep end to end: shards, meta.json, splits, bad input, kills, sources, command line."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt import shards as shards_module
from gpt.prepare import STAGING, PrepareError, prepare
from gpt.dataset import PREP_LOCK_FILE, load_meta
from gpt.shards import list_shards, open_shard, read_header
from gpt.hf_dataset import HFDataset
from gpt.sources import LocalFiles, SourceError, Texts, stdlib_corpus
from gpt.dataset import load_tokenizer
from gpt.tokenizer import EOS_TOKEN

from conftest import child_pids

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared/data/tinyshakespeare.txt"
QUIET = dict(progress=False, log=None)


@pytest.fixture(scope="module")
def docs(shakespeare) -> list[str]:
    """A few documents of varied size, cut from the play."""
    cuts = [0, 30_000, 31_000, 80_000, 120_000]
    return [shakespeare[a:b] for a, b in zip(cuts, cuts[1:])]


def tokens(out: Path, split: str) -> np.ndarray:
    parts = [np.asarray(open_shard(p)) for p in list_shards(out, split)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def stream_of_chunks(out: Path) -> np.ndarray:
    """Undo the documented "chunks" rule: re-interleave train and val into the original stream."""
    meta = load_meta(out)
    f, size = meta["val_fraction"], meta["val_chunk_tokens"]
    phase = random.Random(meta["seed"]).random()
    train, val, parts, i = tokens(out, "train"), tokens(out, "val"), [], 0
    while train.size or val.size:
        is_val = math.floor((i + 1) * f + phase) > math.floor(i * f + phase)
        src = val if is_val else train
        parts.append(src[:size])
        if is_val:
            val = val[size:]
        else:
            train = train[size:]
        i += 1
    return np.concatenate(parts)


def check_folder(out: Path) -> dict:
    meta = load_meta(out)
    for split in ("train", "val"):
        paths = list_shards(out, split)
        assert [p.name for p in paths] == meta["shards"][split]
        assert sum(read_header(p) for p in paths) == meta["tokens"][split] > 0
    assert not (out / STAGING).exists()
    return meta


# ---- end to end -------------------------------------------------------------------------------
def test_char_tail_split_is_nanogpt(shakespeare, tmp_path):
    summary = prepare(tmp_path, Texts([shakespeare]), tokenizer="char", val_fraction=0.1, val_rule="tail", **QUIET)
    meta = check_folder(tmp_path)
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == 65 and meta["eos_id"] is None
    assert meta["tokens"] == {"train": 1_003_854, "val": 111_540}  # nanoGPT's shakespeare_char counts
    assert summary["documents"] == meta["documents"] == 1
    tok = load_tokenizer(tmp_path)
    n = int(len(shakespeare) * 0.9)
    assert tok.decode(tokens(tmp_path, "train")) == shakespeare[:n]
    assert tok.decode(tokens(tmp_path, "val")) == shakespeare[n:]


def test_char_chunk_split_gives_the_text_back(shakespeare, tmp_path):
    prepare(tmp_path, Texts([shakespeare[:300_000]]), tokenizer="char", val_fraction=0.2,
            val_chunk_tokens=5000, **QUIET)
    meta = check_folder(tmp_path)
    assert abs(meta["tokens"]["val"] - 60_000) <= 5000  # the rule holds out f of the chunks
    assert load_tokenizer(tmp_path).decode(stream_of_chunks(tmp_path)) == shakespeare[:300_000]


def test_bpe_documents_with_eos_and_determinism(docs, tmp_path):
    kwargs = dict(tokenizer="bpe", vocab_size=600, val_fraction=0.1, val_chunk_tokens=4096, seed=3, **QUIET)
    prepare(tmp_path / "a", Texts(docs), **kwargs)
    prepare(tmp_path / "b", Texts(docs), **kwargs)
    meta = check_folder(tmp_path / "a")
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 600 and meta["eos_id"] == 0
    assert meta["documents"] == len(docs) and meta["seed"] == 3
    for name in sorted(os.listdir(tmp_path / "a")):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    text = load_tokenizer(tmp_path / "a").decode(stream_of_chunks(tmp_path / "a"))
    assert text == "".join(EOS_TOKEN + d for d in docs)
    prepare(tmp_path / "c", Texts(docs), **dict(kwargs, seed=0))  # phase 0.84 vs 0.24: other chunks
    assert tokens(tmp_path / "c", "val").tolist() != tokens(tmp_path / "a", "val").tolist()


def test_tiny_corpus_with_an_oversized_val_split_gets_a_note(shakespeare, tmp_path):
    """Whole chunks of val_chunk_tokens go to val: on a corpus of a few chunks val can be far more
    than val_fraction. Prep says so (not an error), with the share, the reason and the options."""
    corpus = tmp_path / "small.txt"
    corpus.write_text(shakespeare[:20_000])  # 20,000 char tokens: 3 chunks of 8,192, one of them val
    lines = []
    summary = prepare(tmp_path / "a", LocalFiles([corpus]), tokenizer="char", val_fraction=0.1,
                      progress=False, log=lines.append)
    assert summary["tokens"] == {"train": 11_808, "val": 8_192}
    assert len(lines) == 2 and lines[1].startswith("prepared ")
    assert lines[0] == (
        "note: the val split is 41.0% of the tokens (8,192 of 20,000), not the 10% of --val-fraction 0.1: "
        "the chunks rule holds out whole chunks of 8,192 tokens (--val-chunk-tokens) and the corpus has only "
        "20,000 tokens; for a val share near 10% use a smaller --val-chunk-tokens (well under 2,000) "
        "or --val-rule tail")
    # Chunks small enough to spread val over the corpus, or the tail rule: no note.
    for name, options in [("b", dict(val_chunk_tokens=500)), ("c", dict(val_rule="tail"))]:
        lines = []
        summary = prepare(tmp_path / name, LocalFiles([corpus]), tokenizer="char", val_fraction=0.1,
                          progress=False, log=lines.append, **options)
        assert summary["tokens"]["val"] <= 2_500 and len(lines) == 1 and lines[0].startswith("prepared "), lines


def test_shard_size_limit_makes_several_shards(docs, tmp_path):
    prepare(tmp_path, Texts(docs), tokenizer="char", val_fraction=0.1, shard_tokens=10_000, **QUIET)
    meta = check_folder(tmp_path)
    train = list_shards(tmp_path, "train")
    assert len(train) == math.ceil(meta["tokens"]["train"] / 10_000) > 5
    assert all(read_header(p) == 10_000 for p in train[:-1]) and 0 < read_header(train[-1]) <= 10_000


def test_reusing_a_tokenizer(docs, tmp_path):
    prepare(tmp_path / "a", Texts(docs), tokenizer="bpe", vocab_size=400, val_fraction=0.1, **QUIET)
    tok = load_tokenizer(tmp_path / "a")
    prepare(tmp_path / "b", Texts(docs[:2]), tokenizer=tok, val_fraction=0.2, **QUIET)
    assert (tmp_path / "b/tokenizer.json").read_text() == (tmp_path / "a/tokenizer.json").read_text()
    assert check_folder(tmp_path / "b")["vocab_size"] == 400


# ---- bad input --------------------------------------------------------------------------------
def test_existing_dataset_is_refused_unless_overwrite(docs, tmp_path):
    prepare(tmp_path, Texts(docs), tokenizer="char", val_fraction=0.1, shard_tokens=20_000, **QUIET)
    before = len(list_shards(tmp_path, "train"))
    with pytest.raises(PrepareError, match="already holds a dataset.*--overwrite"):
        prepare(tmp_path, Texts(docs), tokenizer="char", val_fraction=0.1, **QUIET)
    prepare(tmp_path, Texts(docs[:3]), tokenizer="char", val_fraction=0.1, overwrite=True, **QUIET)
    meta = check_folder(tmp_path)
    assert meta["documents"] == 3 and len(list_shards(tmp_path, "train")) == 1 < before


def test_bad_options_are_named(docs, tmp_path):
    with pytest.raises(PrepareError, match="--vocab-size 65,537 is over 65,536"):
        prepare(tmp_path, Texts(docs), vocab_size=65_537, **QUIET)
    with pytest.raises(PrepareError, match="--val-fraction"):
        prepare(tmp_path, Texts(docs), val_fraction=1.0, **QUIET)
    with pytest.raises(SourceError, match="unknown source 'nope'"):
        prepare(tmp_path, "nope", **QUIET)
    assert not any(tmp_path.iterdir())


def test_bpe_training_options_are_checked_before_reading(tmp_path):
    class Unread(Texts):
        def iter_pieces(self, piece_chars=0):
            raise AssertionError("the corpus was read before the options were checked")

    # --tokenizer-train-mb 0 trained BPE on no text: 257 ids, no merges, whatever --vocab-size said.
    for train_bytes in (0, -1_000_000):
        with pytest.raises(PrepareError, match="--tokenizer-train-mb must be positive"):
            prepare(tmp_path / "out", Unread(["x"]), vocab_size=512, tokenizer_train_bytes=train_bytes, **QUIET)
    with pytest.raises(PrepareError, match="--vocab-size 256 is too small for byte-level BPE.*257"):
        prepare(tmp_path / "out", Unread(["x"]), vocab_size=256, **QUIET)
    assert not (tmp_path / "out").exists()
    # The char vocabulary trains nothing: neither option applies to it.
    prepare(tmp_path / "out", Texts(["abc " * 100]), tokenizer="char", vocab_size=1, tokenizer_train_bytes=0,
            val_fraction=0.5, val_chunk_tokens=10, min_val_tokens=10, **QUIET)


def test_out_that_cannot_be_created_is_named(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file/data"
    with pytest.raises(PrepareError, match=f"--out {out}: cannot create the dataset folder there \\(Not a directory"):
        prepare(out, Texts(["abc " * 100]), tokenizer="char", **QUIET)


def test_empty_input(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(PrepareError, match="empty.txt.*no text found"):
        prepare(tmp_path / "out", LocalFiles([tmp_path / "empty.txt"]), tokenizer="char", **QUIET)
    with pytest.raises(PrepareError, match="no text found"):
        prepare(tmp_path / "out", Texts(["", ""]), tokenizer="bpe", **QUIET)
    with pytest.raises(SourceError, match="nothing: no input files"):
        prepare(tmp_path / "out", LocalFiles([tmp_path / "nothing"]), **QUIET)
    assert not (tmp_path / "out").exists()


def test_val_split_too_small(docs, tmp_path):
    with pytest.raises(PrepareError, match="val split has 0 tokens.*--val-fraction"):
        prepare(tmp_path, Texts([docs[0]]), tokenizer="char", val_fraction=0.01, **QUIET)
    with pytest.raises(PrepareError, match="val split has 100 tokens, fewer than --min-val-tokens 1,025"):
        prepare(tmp_path, Texts(["x" * 1000]), tokenizer="char", val_fraction=0.1, val_rule="tail", **QUIET)
    prepare(tmp_path, Texts(["x" * 1000]), tokenizer="char", val_fraction=0.1, val_rule="tail",
            min_val_tokens=65, **QUIET)
    assert load_meta(tmp_path)["tokens"] == {"train": 900, "val": 100}


def bad_utf8_files(tmp_path: Path) -> tuple[Path, int]:
    """A good file and a bad one whose invalid byte sits past the first 1 MiB read."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_good.txt").write_text("good text\n" * 500)
    head = ("é" * 524_287 + "x").encode() + "€".encode()  # a multi-byte char straddles 1 MiB
    (folder / "b_bad.txt").write_bytes(head + b"abc \xff rest\n")
    return folder, len(head) + 4


def test_non_utf8_error_names_file_and_offset(tmp_path):
    folder, offset = bad_utf8_files(tmp_path)
    with pytest.raises(SourceError, match=f"b_bad.txt: not valid UTF-8 at byte offset {offset} "):
        prepare(tmp_path / "out", LocalFiles([folder]), tokenizer="char", **QUIET)


def test_non_utf8_replace_and_skip(tmp_path):
    folder, _ = bad_utf8_files(tmp_path)
    opts = dict(tokenizer="char", val_fraction=0.1, val_rule="tail", min_val_tokens=100, **QUIET)
    prepare(tmp_path / "r", LocalFiles([folder], errors="replace"), **opts)
    text = load_tokenizer(tmp_path / "r").decode(np.concatenate([tokens(tmp_path / "r", s) for s in ("train", "val")]))
    assert text.endswith("abc \ufffd rest\n") and load_meta(tmp_path / "r")["documents"] == 2
    with pytest.warns(UserWarning, match="skipping .*b_bad.txt: not valid UTF-8 at byte offset"):
        prepare(tmp_path / "s", folder, encoding_errors="skip", **opts)
    assert load_meta(tmp_path / "s")["documents"] == 1 and load_meta(tmp_path / "s")["characters"] == 5000


def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/ok.txt").write_text("fine")
    (tmp_path / "in/broken.txt").symlink_to(tmp_path / "missing")
    with pytest.raises(SourceError, match="broken.txt: cannot read file"):
        prepare(tmp_path / "out", LocalFiles([tmp_path / "in"]), tokenizer="char", **QUIET)
    with pytest.raises(SourceError, match="missing: no such file"):
        LocalFiles([tmp_path / "missing"])


def tiny_run(folder: Path) -> Path:
    """A training run folder with one real checkpoint (tiny model, tokenizer.json included); its path."""
    from gpt import checkpoint as ckpt
    from gpt.model import GPT, GPTConfig
    from gpt.tokenizer import char_tokenizer

    char_tokenizer(set("abc")).save(folder.parent / "tok.json")
    config = GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=8)
    return ckpt.save_checkpoint(folder, 10, GPT(config), None, {"step": 10},
                                tokenizer_path=folder.parent / "tok.json")


def test_prep_never_writes_into_a_training_run(tmp_path):
    from gpt import checkpoint as ckpt

    step = tiny_run(tmp_path / "run")
    text = Texts(["abc " * 500])
    opts = dict(tokenizer="char", val_fraction=0.1, val_rule="tail", min_val_tokens=10, overwrite=True, **QUIET)
    for out, what in [(step, "is a checkpoint folder"),
                      (step / "sub", f"is inside the checkpoint folder {step}"),
                      (tmp_path / "run/checkpoints", "is the checkpoints folder of the training run"),
                      (tmp_path / "run/checkpoints/step_0000011", "is inside the checkpoints folder"),
                      (tmp_path / "run", "is a training run folder")]:
        with pytest.raises(PrepareError, match=f"--out {out}: {what}.*choose another --out"):
            prepare(out, text, **opts)
    ckpt.verify_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))  # tokenizer.json untouched
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == [step.name]
    result = run_cli("data_prep/prepare.py", "--input", str(tmp_path / "tok.json"), "--out", str(step),
                     "--overwrite", "--tokenizer=char", "--no-progress")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --out {step}: is a checkpoint folder")
    ckpt.verify_checkpoint(step)


def test_prep_never_writes_into_a_model_folder_or_a_run_before_its_first_save(tmp_path):
    """A Hugging Face export's folder was "a dataset", and --overwrite, as advised, replaced the
    model's tokenizer.json with the new vocabulary's; a folder of weights without one took a
    dataset beside them without a word. So did a run stopped before its first checkpoint."""
    text = Texts(["abc " * 500])
    opts = dict(tokenizer="char", val_fraction=0.1, val_rule="tail", min_val_tokens=10, **QUIET)
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gpt2"}')
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "tokenizer.json").write_text("the model's")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"data_dir": "data", "out_dir": "run"}')
    for out, what in [(model, "holds a Hugging Face model"), (run, "is a training run's folder")]:
        before = sorted(p.name for p in out.iterdir())
        for overwrite in (False, True):
            with pytest.raises(PrepareError, match=f"--out {out}: {what}.*choose another --out"):
                prepare(out, text, overwrite=overwrite, **opts)
        assert sorted(p.name for p in out.iterdir()) == before
    assert (model / "tokenizer.json").read_text() == "the model's"


def test_files_that_are_not_regular_files_are_skipped_or_refused(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.txt").write_text("hello world\n" * 100)
    os.mkfifo(tmp_path / "in/pipe")  # opening it for reading would wait forever for a writer
    corpus = LocalFiles([tmp_path / "in"])
    with pytest.warns(UserWarning, match="skipping .*pipe: not a regular file \\(a named pipe\\)"):
        assert list(corpus.files()) == [tmp_path / "in/a.txt"]
    with pytest.raises(SourceError, match="pipe: not a regular file \\(a named pipe\\); --input"):
        LocalFiles([tmp_path / "in/pipe"])
    # End to end, with a time limit: before the fix the prep hung here with no message.
    result = subprocess.run([sys.executable, "data_prep/prepare.py", "--input", str(tmp_path / "in"),
                             "--out", str(tmp_path / "out"), "--tokenizer=char", "--val-rule=tail",
                             "--val-fraction=0.1", "--min-val-tokens=10", "--no-progress"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "warning: skipping" in result.stderr and "pipe: not a regular file" in result.stderr
    assert load_meta(tmp_path / "out")["documents"] == 1


def test_prep_output_in_an_input_folder_is_not_read(tmp_path):
    text = "hello world\n" * 300
    opts = dict(tokenizer="char", val_fraction=0.1, val_rule="tail", min_val_tokens=10, **QUIET)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text(text)
    prepare(folder / "old", Texts(["older text, other tokens"] * 50), **opts)  # an earlier dataset
    notes = {f"skipping {folder / 'old'}: a prepared dataset (token shards), not text",
             f"skipping {folder / 'new'}: the folder this data prep writes (--out)"}
    # --out inside the input folder: its staging folder fills with shards while the input is read.
    with pytest.warns(UserWarning) as caught:
        prepare(folder / "new", LocalFiles([folder]), **opts)
    assert {str(w.message) for w in caught} == notes
    meta = load_meta(folder / "new")
    assert meta["documents"] == 1
    decoded = load_tokenizer(folder / "new").decode(np.concatenate([tokens(folder / "new", s) for s in ("train", "val")]))
    assert decoded == text
    # Again with --overwrite: "new" is now a dataset too, and is still not read.
    with pytest.warns(UserWarning) as caught:
        prepare(folder / "new", LocalFiles([folder]), overwrite=True, **opts)
    assert {str(w.message) for w in caught} == notes
    assert load_meta(folder / "new")["documents"] == 1
    with pytest.raises(SourceError, match=f"{folder / 'old'}: is a prepared dataset.*not text"):
        prepare(tmp_path / "x", LocalFiles([folder / "old"]), **opts)
    with pytest.raises(PrepareError, match=f"--input {folder}: is the --out folder"):
        prepare(folder, LocalFiles([folder]), overwrite=True, **opts)
    assert load_meta(folder / "old")["documents"] == 50


def test_links_to_folders_are_followed_once_and_hidden_entries_left_out(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.txt").write_text("text behind a link to a folder\n")
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a\n")
    (folder / "sub/b.txt").write_text("b\n")
    (folder / "linked").symlink_to(outside)  # os.walk alone dropped it without a word
    (folder / "sub/again").symlink_to(outside)  # the same folder twice: read once
    (folder / "sub/loop").symlink_to(folder)  # a link back up must not walk forever
    (folder / ".git").mkdir()  # a repository's state: binary objects, not the corpus
    (folder / ".git/index").write_bytes(b"DIRC\x00\x00\x00\x02\xff\xfe")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1\xff")
    with pytest.warns(UserWarning) as caught:
        files = list(LocalFiles([folder]).files())
    assert files == [folder / "a.txt", folder / "linked/x.txt", folder / "sub/b.txt"]
    notes = {str(w.message) for w in caught}
    assert notes == {f"skipping {folder / '.DS_Store'}: a hidden file",
                     f"skipping {folder / '.git'}: a hidden folder",
                     f"skipping {folder / 'sub/again'}: the same folder as {folder / 'linked'}, read already",
                     f"skipping {folder / 'sub/loop'}: the same folder as {folder}, read already"}
    # A hidden file named on the command line is read: only folders' hidden entries are left out.
    assert list(LocalFiles([folder / ".DS_Store"], errors="replace").files()) == [folder / ".DS_Store"]


def test_hf_folder_holding_out_is_refused(hf_files, tmp_path):
    # datasets reads every data file in the folder: after one prep into it, the next read saw
    # meta.json, tokenizer.json and the shards, and failed saying the folder had no data files.
    _, _, parquet, _ = hf_files
    folder = parquet.parent / "folder"
    corpus = HFDataset(str(folder), text_field="body", cache_dir=str(tmp_path / "c"))
    opts = dict(tokenizer="char", val_fraction=0.1, val_rule="tail", min_val_tokens=10, **QUIET)
    for out, where in ((folder / "prepared", "is inside"), (folder, "is")):
        with pytest.raises(PrepareError, match=f"--out {out}: {where} the --hf-dataset folder"):
            prepare(out, corpus, **opts)
    assert sorted(p.name for p in folder.iterdir()) == ["part-0.parquet", "part-1.parquet"]
    prepare(tmp_path / "out", corpus, **opts)  # beside it is fine
    assert check_folder(tmp_path / "out")["documents"] == 40


def test_no_progress_silences_the_datasets_progress_bars(hf_files, tmp_path, capfd):
    datasets = pytest.importorskip("datasets")
    _, jsonl, _, _ = hf_files
    corpus = HFDataset(str(jsonl), text_field="body", cache_dir=str(tmp_path / "c"))
    prepare(tmp_path / "out", corpus, tokenizer="char", val_fraction=0.1, val_rule="tail",
            min_val_tokens=10, progress=False, log=None)
    captured = capfd.readouterr()
    assert "Generating train split" not in captured.err + captured.out
    assert datasets.is_progress_bar_enabled()  # datasets' global switch is back as it was


def test_datasets_progress_bars_stay_out_of_a_log_file(hf_files, tmp_path, capfd, monkeypatch):
    """With progress on but stderr not a terminal (a log file, a pipe), datasets' own bars redrew
    several times a second into the file, cursor-up codes and all; at a terminal they show."""
    datasets = pytest.importorskip("datasets")
    _, jsonl, _, _ = hf_files
    opts = dict(tokenizer="char", val_fraction=0.1, val_rule="tail", min_val_tokens=10, progress=True, log=None)
    prepare(tmp_path / "out", HFDataset(str(jsonl), text_field="body", cache_dir=str(tmp_path / "c1")), **opts)
    captured = capfd.readouterr()
    assert "Generating train split" not in captured.err + captured.out
    assert datasets.is_progress_bar_enabled()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    prepare(tmp_path / "out2", HFDataset(str(jsonl), text_field="body", cache_dir=str(tmp_path / "c2")), **opts)
    assert "Generating train split" in capfd.readouterr().err


# ---- a prep that dies -------------------------------------------------------------------------
def test_exception_between_shards_leaves_no_shard(docs, tmp_path, monkeypatch):
    real = shards_module.write_shard
    written = []

    def write_then_die(path, toks):
        if len(written) == 3:
            raise OSError("disk full (injected)")
        real(path, toks)
        written.append(path)

    monkeypatch.setattr(shards_module, "write_shard", write_then_die)
    with pytest.raises(OSError, match="injected"):
        prepare(tmp_path, Texts(docs), tokenizer="char", shard_tokens=5000, **QUIET)
    assert len(written) == 3
    assert sorted(os.listdir(tmp_path)) == []  # staging removed, nothing published


def test_killed_prep_leaves_no_final_shard(shakespeare, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare * 2)
    out = tmp_path / "out"
    cmd = [sys.executable, "data_prep/prepare.py", "--input", str(corpus), "--out", str(out),
           "--tokenizer", "bpe", "--vocab-size", "300", "--shard-tokens", "1000", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(list((out / STAGING).glob("train_*.bin"))) < 3:
            if proc.poll() is not None:
                pytest.fail("the prep ended before it could be killed mid-write")
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert list(out.glob("*.bin")) == [] and not (out / "meta.json").exists()
    for shard in (out / STAGING).glob("*.bin"):
        read_header(shard)  # whatever carries a shard name is a complete shard
    # The next prep clears the leftovers and succeeds without --overwrite.
    prepare(out, Texts([shakespeare[:50_000]]), tokenizer="char", val_fraction=0.1, **QUIET)
    check_folder(out)


def test_ctrl_c_while_workers_encode_stops_everything_and_writes_nothing(shakespeare, tmp_path):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does) once the encoding
    workers run: one line, exit 130, no worker left behind, no dataset folder."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare * 8)  # 9 MB: workers take over after the first 2 MB
    out = tmp_path / "out"
    cmd = [sys.executable, "data_prep/prepare.py", "--input", str(corpus), "--out", str(out),
           "--vocab-size", "300", "--tokenizer-train-mb", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,  # its own group, as under a terminal
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not child_pids(proc.pid):
            assert proc.poll() is None, "the prep ended before its workers started"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, output
    assert output.strip().splitlines()[-1] == f"interrupted: nothing was written to {out}", output
    assert "Traceback" not in output
    deadline = time.monotonic() + 10
    while _group_alive(proc.pid):  # the workers, and any replacement forked for one of them
        assert time.monotonic() < deadline, "an encoding worker outlived the interrupted prep"
        time.sleep(0.05)
    assert not out.exists()


# A prep whose os.replace sends it `signal` at the first shard it moves into place: the moment
# the old dataset is partly gone and the new one not yet whole.
_SIGNAL_MID_PUBLISH = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
from gpt.prepare import main
real_replace = os.replace
def replace(src, dst, **kwargs):
    if str(src).endswith(".bin") and not replace.sent:
        replace.sent = True
        signal.raise_signal(getattr(signal, sys.argv[1]))
    return real_replace(src, dst, **kwargs)
replace.sent = False
os.replace = replace
raise SystemExit(main(sys.argv[2:]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_sigterm_to_a_prep_and_its_encoding_workers_stops_it_cleanly(shakespeare, tmp_path):
    """SIGTERM to the whole process group (a job's end, scancel) while worker processes encode:
    the prep ended on the spot, its staging folder and lock left behind, and the workers, ended
    mid-task, printed screenfuls of BrokenPipeError tracebacks. Now SIGTERM stops it as Ctrl-C
    does: the workers leave the signal to their parent, which removes its staging folder."""
    corpus = tmp_path / "big.txt"
    corpus.write_text(shakespeare * 3)  # past the 2M characters encoded before workers start
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "data_prep/prepare.py", "--input", str(corpus), "--out", str(out),
                             "--vocab-size", "300", "--tokenizer-train-mb", "0.2", "--no-progress"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not child_pids(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = child_pids(proc.pid)
    assert workers, "the prep ended before its workers started"
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == f"interrupted: nothing was written to {out}", err
    assert not out.exists()  # made by this prep: removed with its staging folder and lock
    time.sleep(0.5)
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")
                and "\nState:\tZ" not in open(f"/proc/{pid}/status").read()], "workers outlived the prep"


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_while_a_prep_replaces_a_dataset_waits_until_the_new_one_is_whole(shakespeare, tmp_path, sig):
    """Ctrl-C or SIGTERM between removing the old dataset's files and moving the last new one in:
    the old meta.json was gone, the staging folder's removal took the new files too, and the
    message said "nothing was written". The signal now waits for the last rename."""
    out = tmp_path / "out"
    old, new = tmp_path / "old.txt", tmp_path / "new.txt"
    old.write_text(shakespeare[:60_000])
    new.write_text(shakespeare[200_000:230_000])
    prep = ["--out", str(out), "--tokenizer", "char", "--val-rule", "tail", "--val-fraction", "0.1",
            "--min-val-tokens", "100", "--no-progress"]
    subprocess.run([sys.executable, "data_prep/prepare.py", "--input", str(old), "--shard-tokens", "5000", *prep],
                   cwd=REPO, check=True, capture_output=True)
    assert len(load_meta(out)["shards"]["train"]) == 11
    done = subprocess.run([sys.executable, "-c", _SIGNAL_MID_PUBLISH, sig, "--input", str(new), "--overwrite",
                           "--shard-tokens", "20000", *prep], cwd=REPO, capture_output=True, text=True, timeout=120)
    # (SIGTERM as Ctrl-C: its default action ended the process, staging folder and lock left behind)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"interrupted as the new dataset was being moved into place: it was finished first, and {out} holds "
        f"it, whole"), done.stderr
    check_folder(out)
    assert not (out / STAGING).exists() and not (out / PREP_LOCK_FILE).exists()
    meta = load_meta(out)
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(meta["shards"]["train"] + meta["shards"]["val"])
    decoded = load_tokenizer(out).decode(np.concatenate([tokens(out, "train"), tokens(out, "val")]).tolist())
    assert decoded == new.read_text()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# ---- sources ----------------------------------------------------------------------------------
def test_big_file_streams_in_pieces(shakespeare, tmp_path):
    (tmp_path / "big.txt").write_text(shakespeare)
    pieces = list(LocalFiles([tmp_path / "big.txt"]).iter_pieces(piece_chars=100_000))
    assert len(pieces) > 5 and max(len(p.text) for p in pieces) < 100_100
    assert [p.starts_document for p in pieces] == [True] + [False] * (len(pieces) - 1)
    assert "".join(p.text for p in pieces) == shakespeare


def test_stdlib_corpus_lists_sources_in_order():
    corpus = stdlib_corpus()
    files = list(corpus.files())
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert files == list(stdlib_corpus().files())
    assert "stdlib" in corpus.description


@pytest.fixture
def hf_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"id": i, "body": f"row {i}: Now is the winter of our discontent\n" * (i + 1)} for i in range(40)]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    (tmp_path / "folder").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:20]), tmp_path / "folder/part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[20:]), tmp_path / "folder/part-1.parquet")
    text = tmp_path / "play.txt"
    text.write_text("".join(r["body"] for r in rows))
    return rows, jsonl, parquet, text


@pytest.mark.parametrize("kind", ["jsonl", "builder+data_files", "parquet-streaming", "text", "folder"])
def test_hf_datasets_on_local_files(hf_files, tmp_path, kind):
    rows, jsonl, parquet, text = hf_files
    cache = str(tmp_path / "hf-cache")
    corpus = {
        "jsonl": HFDataset(str(jsonl), text_field="body", cache_dir=cache),
        "builder+data_files": HFDataset("json", data_files=[str(jsonl)], text_field="body", cache_dir=cache),
        "parquet-streaming": HFDataset(str(parquet), text_field="body", streaming=True, cache_dir=cache),
        "text": HFDataset(str(text), cache_dir=cache),
        "folder": HFDataset(str(parquet.parent / "folder"), text_field="body", cache_dir=cache),
    }[kind]
    expected = ["".join(r["body"] for r in rows)] if kind == "text" else [r["body"] for r in rows]
    assert list(corpus) == expected
    prepare(tmp_path / "out", corpus, tokenizer="char", val_fraction=0.1, val_rule="tail", min_val_tokens=10, **QUIET)
    assert check_folder(tmp_path / "out")["documents"] == len(expected)


def test_hf_missing_text_field_lists_columns(hf_files, tmp_path):
    _, jsonl, _, _ = hf_files
    for streaming in (False, True):
        corpus = HFDataset(str(jsonl), streaming=streaming, cache_dir=str(tmp_path / "c"))
        with pytest.raises(SourceError, match="--text-field 'text'.*columns are: id, body"):
            list(corpus)



def test_hf_folders_written_by_save_to_disk(tmp_path):
    """A Dataset saved with save_to_disk (load_dataset refuses it), and a DatasetDict whose split
    has a name other than train/validation/test (load_dataset read its rows as "train")."""
    datasets = pytest.importorskip("datasets")
    rows = [{"id": i, "body": f"row {i} of the saved set\n" * (i + 1)} for i in range(12)]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds.select(range(4)), "extra": ds.select(range(4, 12))}).save_to_disk(
        str(tmp_path / "dict"))
    datasets.DatasetDict({"mine": ds}).save_to_disk(str(tmp_path / "one"))
    cache = str(tmp_path / "hf-cache")
    bodies = [r["body"] for r in rows]
    for streaming in (False, True):
        assert list(HFDataset(str(tmp_path / "saved"), text_field="body", streaming=streaming,
                              cache_dir=cache)) == bodies
        assert list(HFDataset(str(tmp_path / "dict"), split="extra", text_field="body", streaming=streaming,
                              cache_dir=cache)) == bodies[4:]
        assert list(HFDataset(str(tmp_path / "dict"), text_field="body", streaming=streaming,
                              cache_dir=cache)) == bodies[:4]
        with pytest.raises(SourceError, match="one.*split.*mine"):
            list(HFDataset(str(tmp_path / "one"), text_field="body", streaming=streaming, cache_dir=cache))
    assert list(HFDataset(str(tmp_path / "dict"), split="extra[:2]", text_field="body",
                          cache_dir=cache)) == bodies[4:6]


def test_hf_bad_files_are_named_with_the_reason(tmp_path):
    """Broken local data gives a SourceError naming the file and the real reason, whether datasets
    fails while loading (its DatasetGenerationError hides the reason) or while rows are read."""
    pytest.importorskip("datasets")
    cache = str(tmp_path / "hf-cache")
    files = {"latin1.jsonl": b'{"text": "caf\xe9"}\n', "latin1.txt": b"caf\xe9\n", "latin1.csv": b"text\ncaf\xe9\n",
             "empty.jsonl": b"", "garbage.jsonl": b"not json\n", "garbage.parquet": b"not parquet\n" * 9}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    cases = [("latin1.jsonl", "not valid UTF-8"), ("latin1.txt", "not valid UTF-8"),
             ("latin1.csv", "not valid UTF-8"), ("empty.jsonl", "no rows"),
             ("garbage.jsonl", "JSON parse error"), ("garbage.parquet", "magic bytes")]
    for name, reason in cases:
        for streaming in (False, True):
            corpus = HFDataset(str(tmp_path / name), streaming=streaming, cache_dir=cache)
            with pytest.raises(SourceError, match=f"--hf-dataset {tmp_path / name}: .*{reason}") as info:
                list(corpus)
            assert "No network" not in str(info.value), (name, streaming)
    with pytest.raises(SourceError, match="--hf-dataset json --hf-data-files .*latin1.jsonl: .*not valid UTF-8"):
        list(HFDataset("json", data_files=[str(tmp_path / "latin1.jsonl")], cache_dir=cache))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/readme.md").write_text("no data here")
    for missing, reason in [(tmp_path / "nope.jsonl", "no such file or folder"),
                            (Path("no/such/dir/rows.jsonl"), "no such file or folder"),
                            (tmp_path / "docs", "no data files")]:
        with pytest.raises(SourceError, match=f"--hf-dataset {missing}: .*{reason}") as info:
            list(HFDataset(str(missing), cache_dir=cache))
        assert "No network" not in str(info.value)


def test_cli_hf_bad_rows_are_one_line(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    result = run_cli("data_prep/prepare.py", "--hf-dataset", str(bad), "--out", str(tmp_path / "o"),
                     "--no-progress", env_home=tmp_path / "hf")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --hf-dataset {bad}: ") and "not valid UTF-8" in last, last
    assert "Traceback" not in result.stderr

# ---- command line -----------------------------------------------------------------------------
def run_cli(script: str, *args: str, env_home: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if env_home is not None:
        env.update(HF_HOME=str(env_home), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_help_lists_every_option():
    result = run_cli("data_prep/prepare.py", "--help")
    assert result.returncode == 0
    for option in ("--input", "--source", "--hf-dataset", "--hf-config", "--hf-split", "--hf-data-files",
                   "--text-field", "--streaming", "--out", "--tokenizer", "--vocab-size", "--val-fraction",
                   "--val-rule", "--seed", "--shard-tokens", "--overwrite", "--encoding-errors",
                   "--min-val-tokens", "--vocab_size", "--val_fraction", "--val-chunk-tokens",
                   "--tokenizer-train-mb", "--no-progress", "--val-rule"):
        assert option in result.stdout, option


def test_cli_spellings(docs, tmp_path):
    corpus = tmp_path / "in.txt"
    corpus.write_text(docs[0])
    a = run_cli("data_prep/prepare.py", f"--input={corpus}", "--out", str(tmp_path / "a"), "--tokenizer=char",
                "--val-fraction", "0.1", "--val-chunk-tokens=1000", "--shard_tokens=9000", "--seed=1",
                "--no-progress")
    assert a.returncode == 0, a.stderr
    assert "prepared" in a.stdout and "bytes/token" in a.stdout
    b = run_cli("data_prep/prepare.py", "--input", str(corpus), "--out=" + str(tmp_path / "b"), "--tokenizer",
                "char", "--val_fraction=0.1", "--val_chunk_tokens", "1000", "--shard-tokens", "9000", "--seed", "1",
                "--no_progress")
    assert b.returncode == 0, b.stderr
    for name in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    meta = check_folder(tmp_path / "a")
    assert meta["seed"] == 1 and meta["tokens"]["val"] == 3000
    assert len(meta["shards"]["train"]) == math.ceil(meta["tokens"]["train"] / 9000) == 3


def test_cli_errors_are_one_line(docs, tmp_path):
    corpus = tmp_path / "in.txt"
    corpus.write_bytes(b"ok\n\xfe")
    for args, message in [
        (["--input", str(corpus), "--out", str(tmp_path / "o")], "in.txt: not valid UTF-8 at byte offset 3"),
        (["--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "nope: no such file"),
        (["--input", str(corpus), "--out", str(tmp_path / "o"), "--vocab-size=70000"], "65,536"),
    ]:
        result = run_cli("data_prep/prepare.py", *args)
        assert result.returncode == 2
        last = result.stderr.strip().splitlines()[-1]  # after any progress bar
        assert last.startswith("error: ") and message in last
        assert "Traceback" not in result.stderr


def test_cli_hf_json(hf_files, tmp_path):
    _, jsonl, _, _ = hf_files
    result = run_cli("data_prep/prepare.py", "--hf-dataset", "json", "--hf-data-files", str(jsonl),
                     "--text_field=body", "--out", str(tmp_path / "o"), "--tokenizer", "char",
                     "--val-rule=tail", "--val-fraction=0.1", "--min-val-tokens=10", "--no-progress",
                     env_home=tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert check_folder(tmp_path / "o")["documents"] == 40


def test_shakespeare_script(shakespeare, tmp_path):
    result = run_cli("data_prep/shakespeare.py", "--input", str(SHAKESPEARE), "--out", str(tmp_path / "s"),
                     "--no-progress")
    assert result.returncode == 0, result.stderr
    train = tokens(tmp_path / "s", "train")
    chars = sorted(set(shakespeare))
    n = int(len(shakespeare) * 0.9)
    assert train.tolist() == [chars.index(c) for c in shakespeare[:n]]
    assert len(tokens(tmp_path / "s", "val")) == len(shakespeare) - n


def test_shakespeare_download_failure_suggests_input():
    sys.path.insert(0, str(REPO / "data_prep"))
    try:
        import shakespeare as script
    finally:
        sys.path.remove(str(REPO / "data_prep"))
    with pytest.raises(ValueError, match="could not download .*--input PATH"):
        script.download("http://127.0.0.1:9/input.txt", timeout=5)


def shakespeare_main(capsys, *args: str) -> tuple[int, str]:
    """data_prep/shakespeare.py run in this process: its exit code and last stderr line."""
    sys.path.insert(0, str(REPO / "data_prep"))
    try:
        import shakespeare as script
    finally:
        sys.path.remove(str(REPO / "data_prep"))
    code = script.main([*args, "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines[-1] if lines else ""


def test_shakespeare_errors_suggest_options_it_accepts(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("To be, or not to be\n" * 200)  # 4,000 characters: val 400 < 1,025
    code, err = shakespeare_main(capsys, "--input", str(small), "--out", str(tmp_path / "a"))
    assert code == 2 and "raise --val-fraction (now 0.1)" in err
    assert shakespeare_main(capsys, "--input", str(small), "--out", str(tmp_path / "a"),
                            "--val-fraction=0.5")[0] == 0
    assert load_meta(tmp_path / "a")["tokens"]["val"] == 2000
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"To be\xff " * 300)
    code, err = shakespeare_main(capsys, "--input", str(binary), "--out", str(tmp_path / "b"))
    assert code == 2 and "--encoding-errors replace" in err
    assert shakespeare_main(capsys, "--input", str(binary), "--out", str(tmp_path / "b"),
                            "--encoding_errors", "replace", "--min-val-tokens=100")[0] == 0


def test_concurrent_prep_into_one_folder_is_refused_and_spares_the_other(docs, tmp_path):
    """A second prep into a folder another prep is writing must not delete that prep's staging
    folder (which made the first fail with a misleading "is the disk full?"); it is refused."""
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "ds"
    (out / STAGING).mkdir(parents=True)
    (out / STAGING / "train_000000.bin.tmp").write_bytes(b"in progress")
    with open(out / ".prepare-lock", "a") as held:  # what a live prep holds
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(PrepareError, match="another data prep is writing"):
            prepare(out, docs, tokenizer="char", **QUIET)
    assert (out / STAGING / "train_000000.bin.tmp").read_bytes() == b"in progress"
    prepare(out, docs, tokenizer="char", val_chunk_tokens=256, **QUIET)  # once it is gone, a prep goes ahead
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train_000000.bin",
                                                     "val_000000.bin"]


def test_a_shard_size_that_makes_very_many_shards_is_noted(shakespeare, tmp_path, monkeypatch):
    # Each shard is a memory map while training, and Linux allows 65,530 a process: a tiny
    # --shard-tokens was said only once a run failed to map one.
    from gpt import prepare as prepare_module

    names = {"train": [f"train_{i:06d}.bin" for i in range(9_000)], "val": [f"val_{i:06d}.bin" for i in range(1_001)]}
    assert prepare_module._shard_count_note(names, 5) == (
        "note: 10,001 shards of --shard-tokens 5: each is a file, and a memory map while a run trains on it (Linux "
        "allows a process 65,530 unless vm.max_map_count is raised); a larger --shard-tokens makes fewer (the "
        "default is 100,000,000)")
    names["val"].pop()
    assert prepare_module._shard_count_note(names, 5) is None  # 10,000
    # prepare() says it before its summary (the threshold lowered: 10,000 files take a minute here).
    monkeypatch.setattr(prepare_module, "MANY_SHARDS", 10)
    said: list[str] = []
    summary = prepare(tmp_path / "many", Texts([shakespeare[:60_000]]), tokenizer="char", val_fraction=0.1,
                      val_rule="tail", shard_tokens=5_000, progress=False, log=said.append)
    assert len(summary["shards"]["train"]) + len(summary["shards"]["val"]) == 13
    assert said[0].startswith("note: 13 shards of --shard-tokens 5,000: each is a file") and len(said) == 2, said
