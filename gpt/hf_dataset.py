"""A Hugging Face dataset as a corpus (`--hf-dataset`): rows of a hub dataset, a packaged builder's
data files, or local files and folders, read through the `datasets` library.

Local .txt files are read exactly as --input reads them (gpt.sources), so the same file gives the
same tokens either way. Most of this module turns what `datasets` raises or logs into one line
that names the file, the row and the option to change: its own errors name neither.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gpt.sources import (PIECE_CHARS, DocumentsFromPieces, NotUTF8Error, Piece, SourceError, reached_again,
                         document_pieces, first_decode_error, read_chunks)

# Extensions the `datasets` library reads with a packaged builder, for local paths.
_HF_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
                ".txt": "text", ".arrow": "arrow"}


@dataclass
class HFDataset(DocumentsFromPieces):
    """Rows of a Hugging Face dataset; each row's `text_field` is one document.

    `name` is a hub name ("HuggingFaceFW/fineweb"), a packaged builder ("json", "parquet",
    "text", "csv") used with `data_files`, or a local file or folder: a local file's builder
    follows its extension (.jsonl/.json, .parquet, .csv, .arrow; .txt reads the whole file as
    one document), and a local folder is read as `datasets` reads any data folder, or, when
    written by `save_to_disk`, by its own splits (a saved Dataset is the split "train").
    Local .txt files (a file, a folder of them, or the "text" builder's local data files) are
    read as --input reads them: each file one document, its text exactly (CRLF kept, a leading
    byte order mark left out), streamed; datasets' text builder would turn CRLF into LF and read
    a folder line by line. Which files, and in what order, is still datasets' choice for the
    split: a folder's files named like a split (test.txt, validation/...) go to that split, not
    to "train", and nested files come in path order; --input reads every file, a folder's own
    files before its subfolders'. A single file or a flat folder without such names gives the
    same corpus as --input. A folder with data files of several types is an error (datasets reads
    only one type), and a bad file among several is named in the error.
    """

    name: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    data_files: Sequence[str] | None = None
    cache_dir: str | None = None
    description: str = ""
    progress: bool = True  # datasets' own progress bars ("Generating train split"); prep's --no-progress
    # Local text files' sizes and modification times when read (a file that changes between data
    # prep's two reads is an error, as for --input); the split's local data files and datasets'
    # builder for them, once loaded (to name a bad file among several).
    _stamps: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _files: list | None = field(default=None, init=False, repr=False, compare=False)
    _module: str | None = field(default=None, init=False, repr=False, compare=False)
    _warned: set = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.description:
            files = f" files {', '.join(map(str, self.data_files))}" if self.data_files else ""
            config = f" config {self.config}" if self.config else ""
            self.description = (f"Hugging Face dataset {self.name}{config}{files}, split {self.split}, "
                                f"field {self.text_field!r}")

    def _resolve(self) -> tuple[str, dict]:
        """What to hand `datasets.load_dataset`: the path (a builder name for local files) and
        its keyword arguments; SourceError for local files that do not exist."""
        path, kwargs = str(self.name), {}
        local = Path(self.name)
        if not local.exists() and _looks_like_a_path(self.name):
            # Else datasets looks for it on the Hub and says only that the Hub cannot be reached.
            raise SourceError(f"--hf-dataset {self.name}: no such file or folder")
        for file in self.data_files or ():
            # Else datasets' "Unable to find" came with a hint about the network; globs and URLs
            # are datasets' to resolve.
            file = str(file)
            if "://" in file or os.path.exists(file):
                continue
            if not any(c in file for c in "*?["):
                raise SourceError(f"--hf-data-files {file}: no such file or folder")
            if not glob.glob(os.path.expanduser(file), recursive=True):
                raise SourceError(f"--hf-data-files {file}: the pattern matches no file")
        saved = _saved_to_disk(local) if local.is_dir() and not self.data_files else None
        if saved is not None:
            path, kwargs["data_files"] = "arrow", saved
        elif local.is_file() and not self.data_files:
            builder = _HF_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise SourceError(f"--hf-dataset {local}: cannot tell the file type from its extension; "
                                  f"use one of {', '.join(sorted(_HF_BUILDERS))}")
            path, kwargs["data_files"] = builder, str(local)
        elif self.data_files:
            kwargs["data_files"] = [str(f) for f in self.data_files]
        if path == "text":
            # As --input files: the whole file is one document (not one per line), and a byte
            # order mark that starts a file is left out, not text. (Local text files are read by
            # _text_file_pieces below; these options serve remote ones and split slices.)
            kwargs.update(sample_by="document", encoding="utf-8-sig")
        if self.cache_dir:
            kwargs["cache_dir"] = self.cache_dir
        return path, kwargs

    def _is_local(self, kwargs: dict) -> bool:
        """Whether the data are local files (a file, a folder, or a builder's local data files)."""
        if Path(self.name).exists():
            return True
        files = kwargs.get("data_files")
        return bool(files) and isinstance(files, list) and all("://" not in str(f) for f in files)

    @contextmanager
    def _datasets_errors(self):
        """datasets' progress bars off when asked or when stderr is no terminal, and its errors as
        one-line SourceErrors."""
        import datasets  # slow to import; only this source needs it

        # datasets' switch is global: turned off for this call only, and back on only if it was on.
        # Its bars redraw several times a second, cursor-up codes and all: into a log file, a line
        # each time (gpt/progress.py's own bars redraw there every 30 s).
        shown = self.progress and sys.stderr.isatty()
        quiet = not shown and datasets.is_progress_bar_enabled()
        if quiet:
            datasets.disable_progress_bars()
        local = Path(self.name)
        held = _HeldErrorLogs()
        try:
            with held:
                yield datasets
        except SourceError:
            raise
        except Exception as e:  # datasets raises many types; the user needs the reason and the name
            if local.is_dir() and type(e).__name__ in ("EmptyDatasetError", "DataFilesNotFoundError"):
                raise SourceError(f"--hf-dataset {self.name}: no data files in this folder that datasets "
                                  f"reads ({', '.join(sorted(_HF_BUILDERS))} files, or a folder written "
                                  f"by save_to_disk); datasets says: {e}") from e
            blame = self._blame_holding(datasets, held)
            if blame is not None:
                raise SourceError(f"{self._named()}: {blame}") from e
            # (Local data files exist, or their patterns match: checked in _resolve.)
            on_disk = local.exists() or (self.data_files and all("://" not in str(f) for f in self.data_files))
            hint = "" if on_disk else ". No network? Point --hf-dataset at local files or a folder"
            raise SourceError(f"{self._named()}: cannot load it ({_reason(e)}){hint}") from e
        finally:
            held.release()
            if quiet:
                datasets.enable_progress_bars()

    def _load(self):
        """The dataset's rows (a datasets Dataset or IterableDataset), or, for local text files,
        the list of those files (read as --input reads them)."""
        path, kwargs = self._resolve()
        self._files, self._module = None, None
        with self._datasets_errors() as datasets:
            if self._is_local(kwargs):
                builder = datasets.load_dataset_builder(path, self.config, **kwargs)
                self._module = builder.name
                by_split = {str(k): [str(f) for f in v] for k, v in (builder.config.data_files or {}).items()}
                if Path(self.name).is_dir() and not self.data_files and path != "arrow":
                    _check_one_file_type(Path(self.name), builder.name, by_split)
                self._files = by_split.get(self.split)
                if builder.name == "text" and self._files is not None:
                    # datasets' text builder turns \r\n and \r into \n (text mode), and reads a
                    # folder's files line by line (one document per line, newlines dropped):
                    # the same file gave another corpus than --input. Read them as --input does.
                    return self._each_file_once([Path(f) for f in self._files])
                if builder.name == "text" and "sample_by" not in kwargs:
                    kwargs.update(sample_by="document", encoding="utf-8-sig")  # a folder of .txt, sliced
            return datasets.load_dataset(path, self.config, split=self.split, streaming=self.streaming,
                                         **kwargs)

    def _each_file_once(self, files: list[Path]) -> list[Path]:
        """`files` less those reached again (a link to another of them), as --input reads a folder:
        twice, a file would sit in both splits and weigh double in training."""
        read: dict[str, str] = {}
        kept = []
        for path in files:
            again = reached_again(read, path)
            if again is None:
                kept.append(path)
            elif path not in self._warned:
                self._warned.add(path)  # (data prep reads the corpus twice: said once)
                warnings.warn(f"skipping {path}: {again}", stacklevel=3)
        return kept

    def _blame(self, datasets) -> str | None:
        """Which of several local data files makes loading fail, and why ("FILE: reason"), or None
        (one file: --hf-dataset names it already; files not known; no one file fails alone).

        datasets' errors name no file (its log line does, above a traceback). Each file is read
        alone, streamed, until one fails or has other columns than the first."""
        files, module = self._files, self._module
        if not files or module is None or (len(files) == 1 and not Path(self.name).is_dir()):
            return None
        kwargs = {"cache_dir": self.cache_dir} if self.cache_dir else {}
        if module == "text":
            kwargs.update(sample_by="document", encoding="utf-8-sig")
        first: tuple[str, list[str]] | None = None
        for file in files:
            try:
                rows = iter(datasets.load_dataset(module, data_files=[file], split="train", streaming=True, **kwargs))
                row = next(rows, None)
                for _ in rows:
                    pass
            except Exception as e:
                if isinstance(_cause(e), StopIteration):
                    # An empty file, read alone, fails in the json builder; among others it is
                    # read as no rows. Blamed, it hid the file that makes the load fail.
                    continue
                return f"{file}: {_file_reason(Path(file), e)}"
            if row is None:
                continue
            columns = list(row)
            if self.text_field not in columns:
                return (f"{file}: has no column {self.text_field!r} (--text-field); its columns are: "
                        f"{', '.join(columns) or '(none)'}")
            if first is None:
                first = (file, columns)
            elif sorted(columns) != sorted(first[1]):
                return (f"{file}: its columns ({', '.join(columns)}) are not those of {first[0]} "
                        f"({', '.join(first[1])}); datasets needs the same columns in every file")
        return None

    def _blame_holding(self, datasets, held: _HeldErrorLogs) -> str | None:
        """_blame, its datasets error lines held too; all of them forgotten when it names the file
        (datasets' "Failed to load JSON from file ..." lines, said better by our one line)."""
        with held:
            blame = self._blame(datasets)
        if blame is not None:
            held.drop()
        return blame

    def _named(self) -> str:
        """The options that name the data, for errors: with a builder, the files are what is bad;
        a configuration or split other than the default may be (datasets' "Unknown split")."""
        files = f" --hf-data-files {' '.join(map(str, self.data_files))}" if self.data_files else ""
        config = f" --hf-config {self.config}" if self.config else ""
        split = f" --hf-split {self.split}" if self.split != "train" else ""
        return f"--hf-dataset {self.name}{config}{files}{split}"

    def iter_pieces(self, piece_chars: int = PIECE_CHARS) -> Iterator[Piece]:
        dataset = self._load()
        if isinstance(dataset, list):
            yield from self._text_file_pieces(dataset, piece_chars)
            return
        columns = getattr(dataset, "column_names", None)
        if columns is not None:
            self._check_field(columns)
        rows = iter(dataset)
        held = _HeldErrorLogs()
        while True:
            # Rows are decoded as they are read (always so when streaming), so a bad file can fail
            # here, with an error of datasets or pyarrow that names neither the file nor the option.
            try:
                with held:
                    row = next(rows)
            except StopIteration:
                return
            except Exception as e:
                import datasets

                blame = self._blame_holding(datasets, held)
                raise SourceError(f"{self._named()}: {blame or f'cannot read its rows ({_reason(e)})'}") from e
            finally:
                held.release()
            if self.text_field not in row:
                self._check_field(list(row))
            text = row[self.text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise SourceError(f"--text-field {self.text_field!r} of {self.name} holds "
                                  f"{type(text).__name__}, not text")
            yield from document_pieces([text], piece_chars)

    def _text_file_pieces(self, files: list[Path], piece_chars: int) -> Iterator[Piece]:
        """Local text files, each one document, read exactly as --input reads them."""
        self._check_field(["text"])
        for path in files:
            try:
                yield from document_pieces(read_chunks(path, "strict", self._stamps), piece_chars, str(path))
            except NotUTF8Error as e:
                raise SourceError(f"{self._named()}: {path}: not valid UTF-8 at byte offset {e.offset} "
                                  f"({e.reason}); convert the file to UTF-8, or read it with --input "
                                  f"and --encoding-errors replace or skip") from None

    def _check_field(self, columns: list[str]) -> None:
        if self.text_field not in columns:
            raise SourceError(f"--text-field {self.text_field!r}: {self.name} has no such column; "
                              f"its columns are: {', '.join(columns) or '(none)'}")


class _HeldErrorLogs(logging.Filter):
    """While entered (`with held:`), the error lines datasets logs (its handler prints them as they
    come) are held back; release() prints them, drop() forgets them. For a bad file among several,
    datasets logs "Failed to load JSON from file ..." as it fails, and again for each file _blame
    reads alone, above our one line that names the file and the line. Warnings pass at once.
    Entered around datasets' calls only, never across a yield to our caller."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.handlers = list(logging.getLogger("datasets").handlers)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record not in self.records:  # one record passes every handler's filter
            self.records.append(record)
        return False

    def __enter__(self) -> "_HeldErrorLogs":
        for handler in self.handlers:
            handler.addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        for handler in self.handlers:
            handler.removeFilter(self)

    def drop(self) -> None:
        self.records = []

    def release(self) -> None:
        for record in self.records:
            for handler in self.handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)
        self.records = []


def _looks_like_a_path(name: str) -> bool:
    """Whether an --hf-dataset name can only be a local path: absolute, ./ or ~, or a data file's
    extension (Hub names are "owner/dataset")."""
    return (os.path.isabs(name) or name.startswith((".", "~"))
            or Path(name).suffix.lower() in _HF_BUILDERS)


def _saved_to_disk(folder: Path) -> dict[str, list[str]] | None:
    """The arrow files of a folder written by `save_to_disk`, by split, or None for other folders.

    `load_dataset` refuses a saved Dataset, and takes a saved DatasetDict's splits from folder
    names it knows (train, test, validation, ...), reading any other split as "train". Given its
    files by split, the arrow builder reads either (slices such as "train[:100]" and streaming
    included); a saved Dataset is the split "train"."""
    try:
        if (folder / "dataset_dict.json").is_file():
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
            return {split: _saved_arrow_files(folder / split) for split in splits}
        if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
            return {"train": _saved_arrow_files(folder)}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(f"--hf-dataset {folder}: looks like a folder written by save_to_disk, but "
                          f"cannot read it ({type(e).__name__}: {e})") from e
    return None


def _saved_arrow_files(folder: Path) -> list[str]:
    state = json.loads((folder / "state.json").read_text())
    return [str(folder / f["filename"]) for f in state["_data_files"]]


# The file types of a local folder that datasets reads with one builder each ("json", "text", ...).
_FOLDER_TYPES = {**_HF_BUILDERS, ".ndjson": "json", ".tsv": "csv"}


def _check_one_file_type(folder: Path, module: str, by_split: dict[str, list[str]]) -> None:
    """A folder's data files of another type than the one datasets chose: datasets reads only the
    files of its most common type, and left the others out without a word."""
    read = {os.path.realpath(f) for files in by_split.values() for f in files}
    left_out: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for name in sorted(files):
            kind = _FOLDER_TYPES.get(Path(name).suffix.lower())
            path = os.path.join(root, name)
            if (kind is not None and kind != module and not name.startswith((".", "__"))
                    and os.path.realpath(path) not in read):
                left_out.append(path)
    if left_out:
        shown = ", ".join(left_out[:3]) + (f" and {len(left_out) - 3:,} more" if len(left_out) > 3 else "")
        raise SourceError(f"--hf-dataset {folder}: holds data files of more than one type; datasets reads "
                          f"only its {module} files and would leave out {shown}; put each type in a folder "
                          f"of its own (one dataset is made from files of one type: a builder reads every "
                          f"file it is given as its own format), or name the {module} files alone with "
                          f"--hf-dataset {module} --hf-data-files FILE...")


def _file_reason(path: Path, e: BaseException) -> str:
    """Why one local data file cannot be read, in words, with the byte offset or line when known."""
    if isinstance(_cause(e), UnicodeDecodeError):
        bad = first_decode_error(path)
        if bad is not None:
            return (f"not valid UTF-8 at byte offset {bad.offset} ({bad.reason}); convert the file "
                    f"to UTF-8 (--encoding-errors applies to --input files only)")
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        line = _bad_json_line(path)
        if line is not None:
            return line
    return _reason(e)


def _bad_json_line(path: Path) -> str | None:
    """"line N: <reason>" for the first line of a JSON-lines file that is not a JSON object."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            first = f.read(1)
            if first in ("[", ""):  # one JSON document (a list of rows), not JSON lines
                return None
            f.seek(0)
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    return f"line {number} is not valid JSON ({e}); fix or remove that line"
                if not isinstance(row, dict):
                    return f"line {number} is JSON but not an object ({type(row).__name__}): each line must be one row"
    except (OSError, UnicodeDecodeError):
        return None
    return None


def _cause(e: BaseException) -> BaseException:
    """The error inside datasets' wrapper: DatasetGenerationError says only "An error occurred
    while generating the dataset"."""
    while type(e).__name__ == "DatasetGenerationError" and e.__cause__ is not None:
        e = e.__cause__
    return e


def _reason(e: BaseException) -> str:
    """What went wrong inside datasets, in words: the cause that its wrapper errors hide."""
    e = _cause(e)
    if isinstance(e, UnicodeDecodeError):
        return (f"not valid UTF-8: byte 0x{e.object[e.start]:02x}, {e.reason}; convert the file to "
                f"UTF-8 (--encoding-errors applies to --input files only)")
    if isinstance(e, StopIteration):  # the json builder finds no first batch of rows
        return "no rows: is the file empty?"
    return f"{type(e).__name__}: " + " ".join(str(e).split())  # one line (pyarrow's span several)
