"""Data prep edge cases on the --hf-dataset paths found by a third bug hunt: each test failed on the
code before its fix (except the last, which checks a failed prep keeps the dataset it would replace)."""

import json
from pathlib import Path

import datasets.config
import pytest

from gpt.prepare import main
from gpt.dataset import load_meta
from gpt.hf_dataset import HFDataset
from gpt.sources import LocalFiles, SourceError

pytest.importorskip("datasets")
SMALL = ["--tokenizer", "char", "--val-rule", "tail", "--val-fraction", "0.2", "--min-val-tokens", "5",
         "--no-progress"]


def _hf(path, tmp_path, **kw) -> HFDataset:
    return HFDataset(str(path), cache_dir=str(tmp_path / "hf-cache"), progress=False, **kw)


def test_hf_text_file_and_folder_give_the_same_corpus_as_input(tmp_path, monkeypatch):
    """datasets' text builder opened files in text mode (CRLF and CR became \\n) and read a folder
    of .txt files line by line (one document per line, newlines and blank lines dropped, a BOM
    kept as text): the same files gave another corpus than --input, which keeps the text exactly."""
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"line one\r\nline two\r\n\r\nlast\rold mac\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"\xef\xbb\xbfa one\r\na two\n\nafter blank\n")
    (folder / "b.txt").write_bytes(b"b one\nb two\n")
    (folder / "empty.txt").write_bytes(b"")
    for streaming in (False, True):
        assert list(_hf(crlf, tmp_path, streaming=streaming)) == list(LocalFiles([crlf])) == [
            "line one\r\nline two\r\n\r\nlast\rold mac\n"]
        assert list(_hf(folder, tmp_path, streaming=streaming)) == list(LocalFiles([folder])) == [
            "a one\r\na two\n\nafter blank\n", "b one\nb two\n"]
        builder = HFDataset("text", data_files=[str(folder / "b.txt")], cache_dir=str(tmp_path / "c"),
                            streaming=streaming, progress=False)
        assert list(builder) == ["b one\nb two\n"]
    # The CLI: the same shards and counts either way (its cache in tmp_path: see the test below).
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    assert main(["--input", str(crlf), "--out", str(tmp_path / "in"), *SMALL]) == 0
    assert main(["--hf-dataset", str(crlf), "--out", str(tmp_path / "hf"), *SMALL]) == 0
    for name in ("train_000000.bin", "val_000000.bin", "tokenizer.json"):
        assert (tmp_path / "in" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    assert load_meta(tmp_path / "in")["tokens"] == load_meta(tmp_path / "hf")["tokens"]


def test_hf_text_folder_reads_a_linked_file_once_as_input_does(tmp_path):
    """A link in the folder to another of its files: --input read it once, with a warning;
    --hf-dataset read it twice (in both splits, weighing double in training)."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("the first file\n")
    (folder / "c.txt").write_text("another one\n")
    (folder / "b.txt").symlink_to("a.txt")
    for streaming in (False, True):
        with pytest.warns(UserWarning, match=r"skipping .*b\.txt: the same file as .*a\.txt, read already"):
            assert list(_hf(folder, tmp_path, streaming=streaming)) == list(LocalFiles([folder])) == [
                "the first file\n", "another one\n"]


def test_hf_text_files_other_field_or_split_are_named(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("some text\n")
    with pytest.raises(SourceError, match="--text-field 'body'.*columns are: text"):
        list(_hf(doc, tmp_path, text_field="body"))
    with pytest.raises(SourceError, match=r"--hf-split validation: cannot load it .*validation"):
        list(_hf(doc, tmp_path, split="validation"))


def _folder(tmp_path, name, files) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for file, data in files.items():
        path = folder / file
        if isinstance(data, list):
            pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
            pq.write_table(pa.Table.from_pylist(data), path)
        else:
            path.write_bytes(data)
    return folder


GOOD = b'{"text": "hello world"}\n{"text": "second row"}\n'


@pytest.mark.parametrize("case, files, reason", [
    ("latin1", {"a.jsonl": GOOD, "b.jsonl": b'{"text": "caf\xe9"}\n'}, "b.jsonl: not valid UTF-8 at byte offset 13"),
    ("bad-line", {"a.jsonl": GOOD, "b.jsonl": GOOD + b'{"text": oops}\n'}, "b.jsonl: line 3 is not valid JSON"),
    ("column", {"a.jsonl": GOOD, "b.jsonl": b'{"body": "x"}\n'}, "b.jsonl: has no column 'text'.*columns are: body"),
    ("latin1-txt", {"a.txt": b"ok\n", "b.txt": b"caf\xe9\n"}, "b.txt: not valid UTF-8 at byte offset 3"),
    ("parquet", {"a.parquet": [{"text": "x"}], "b.parquet": b"not parquet" * 9}, "b.parquet: .*magic bytes"),
    ("parquet-column", {"a.parquet": [{"text": "x"}], "b.parquet": [{"body": "y"}]}, "b.parquet: has no column 'text'"),
])
def test_hf_folder_with_one_bad_file_names_it(tmp_path, case, files, reason):
    """A bad file among several in an --hf-dataset folder: the error named only the folder, with
    datasets' or pyarrow's reason (no file; a CastError's schema dump), whether it failed while
    loading or (streamed) while rows were read."""
    folder = _folder(tmp_path, case, files)
    for streaming in (False, True):
        with pytest.raises(SourceError, match=f"--hf-dataset {folder}: {folder}/{reason}") as info:
            list(_hf(folder, tmp_path, streaming=streaming))
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("files, chosen, left_out", [
    ({"a.jsonl": GOOD, "b.txt": b"plain text\n", "c.txt": b"more\n"}, "text", "a.jsonl"),
    ({"a.jsonl": GOOD, "b.parquet": [{"text": "parquet row"}]}, "parquet", "a.jsonl"),
])
def test_hf_folder_of_mixed_file_types_is_refused(tmp_path, files, chosen, left_out):
    """datasets reads only the files of a folder's most common type: the others were left out
    without a word (a folder of one .jsonl and two .txt trained on the .txt alone)."""
    folder = _folder(tmp_path, "mixed", files)
    with pytest.raises(SourceError, match=f"more than one type; datasets reads only its {chosen} files and "
                                          f"would leave out {folder}/{left_out}") as e:
        list(_hf(folder, tmp_path))
    # The alternative names the chosen type's files alone: all of them given to one builder (as a
    # review did, following "name the files") put the JSON lines into the corpus as raw text.
    assert f"or name the {chosen} files alone with --hf-dataset {chosen} --hf-data-files" in str(e.value)
    assert "one dataset is made from files of one type" in str(e.value)


def test_cli_bad_file_in_hf_folder_is_one_line_and_keeps_the_old_dataset(tmp_path, capsys, monkeypatch):
    """From the command line: exit 2, a last line naming the bad file, no traceback; and a failed
    --overwrite leaves the dataset already in --out as it was (no staging folder, no lost shard)."""
    text = tmp_path / "good.txt"
    text.write_text("to be or not to be, that is the question\n" * 20)
    out = tmp_path / "out"
    assert main(["--input", str(text), "--out", str(out), *SMALL]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    folder = _folder(tmp_path, "rows", {"a.jsonl": GOOD, "b.jsonl": GOOD + b"not json\n"})
    # datasets read HF_DATASETS_CACHE as it was imported (an earlier test did): its module setting,
    # or this test's cache files would go to ~/.cache/huggingface.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    capsys.readouterr()
    assert main(["--hf-dataset", str(folder), "--out", str(out), "--overwrite", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: --hf-dataset {folder}: {folder / 'b.jsonl'}: line 3 is not valid JSON"), last
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert json.loads((out / "meta.json").read_text())["documents"] == 1



def test_datasets_error_lines_give_way_to_the_one_that_names_the_file(tmp_path):
    """datasets logged "Failed to load JSON from file ..." (its handler prints to stderr) once
    while loading and again for each file read alone to find the bad one, above the error that
    names the file and the line. Held back then; printed still where our error does not name a
    file. A handler of our own on datasets' logger sees what its handler would print."""
    import logging

    import datasets  # noqa: F401 (sets up its logger's handler, which the filter goes on)

    printed: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: printed.append(record.getMessage())
    logging.getLogger("datasets").addHandler(handler)
    try:
        folder = _folder(tmp_path, "rows", {"a.jsonl": GOOD, "b.jsonl": GOOD + b'{"text": oops}\n'})
        for streaming in (False, True):
            with pytest.raises(SourceError, match="b.jsonl: line 3 is not valid JSON"):
                list(_hf(folder, tmp_path, streaming=streaming))
            assert not [m for m in printed if "Failed to load JSON" in m], (streaming, printed)
        alone = tmp_path / "alone.jsonl"  # one file: --hf-dataset names it, datasets' line the row
        alone.write_bytes(GOOD + b'{"text": oops}\n')
        with pytest.raises(SourceError, match=f"--hf-dataset {alone}: cannot load it"):
            list(_hf(alone, tmp_path))
        assert [m for m in printed if f"Failed to load JSON from file '{alone}'" in m], printed
    finally:
        logging.getLogger("datasets").removeHandler(handler)
