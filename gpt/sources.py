"""Corpus readers: streams of documents from local files, the Python standard library, or a
Hugging Face dataset.

A corpus is re-iterable (BPE training reads it twice) and never held in memory whole.
Iterating a corpus yields its documents as strings. Data prep reads `iter_pieces()` instead:
the same text as `Piece`s of about `piece_chars` characters, so that one huge document (a 10 GB
text file) streams in bounded memory too. Pieces are cut only just before a space, tab, newline
or carriage return that follows a non-whitespace character. GPT-2's pre-tokenizer regex (used by
the byte-level BPE) always ends a pre-token there and has no look-behind, so encoding the pieces
one by one gives exactly the ids of encoding the whole document (tests check this); a
character vocabulary is indifferent to cuts anyway. Only a stretch of 16 × `piece_chars`
characters (1M) without such a place is cut anywhere, which may change a few BPE ids there.

Empty documents are skipped: they hold nothing to learn. So are, in an input folder, files that
are not regular files (named pipes, sockets, devices: reading one could wait forever), folders
that hold a prepared dataset (token shards: binary, and an earlier prep's output), and hidden
files and folders (.git, .DS_Store), with a warning. Links to files and folders are followed;
a file or folder reached twice (through a link, or named twice) is read once. A file that
changes while it is read, or between two reads of one `LocalFiles` (data prep reads it twice),
is an error naming it: the vocabulary and meta.json would not match the shards.
"""

from __future__ import annotations

import codecs
import glob
import json
import logging
import os
import re
import stat
import sysconfig
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from gpt.shards import is_shard_name

PIECE_CHARS = 1 << 16  # small enough that the BPE trainer's 256-item read-ahead stays ~16 MB
READ_BYTES = 1 << 20
ENCODING_ERRORS = ("strict", "replace", "skip")

# Extensions the `datasets` library reads with a packaged builder, for local paths.
_HF_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
                ".txt": "text", ".arrow": "arrow"}


class SourceError(ValueError):
    """The corpus cannot be read as asked; the message names the file, dataset or option."""


class NotUTF8Error(SourceError):
    def __init__(self, path: Path, offset: int, reason: str):
        self.path, self.offset, self.reason = path, offset, reason
        super().__init__(
            f"{path}: not valid UTF-8 at byte offset {offset} ({reason}). Convert the file to "
            f"UTF-8, or pass --encoding-errors replace (substitute U+FFFD) or skip (leave it out)"
        )


class Piece(NamedTuple):
    text: str
    starts_document: bool  # True for the first piece of each document


class Corpus(Protocol):
    description: str

    def iter_pieces(self, piece_chars: int = PIECE_CHARS) -> Iterator[Piece]: ...

    def __iter__(self) -> Iterator[str]: ...


class _DocumentsFromPieces:
    """Mixin: documents as whole strings, joined from `iter_pieces` (for small corpora and tests)."""

    def __iter__(self) -> Iterator[str]:
        parts: list[str] = []
        for piece in self.iter_pieces():
            if piece.starts_document and parts:
                yield "".join(parts)
                parts = []
            parts.append(piece.text)
        if parts:
            yield "".join(parts)


# ---- cutting text into pieces ---------------------------------------------------------------
# A clean cut: just before a newline, carriage return, tab or space that follows a non-whitespace
# character. Python's \S is "not str.isspace()", which implies not whitespace for the tokenizer's
# regex either. (\r and \t too: a file of CRLF lines or tab-separated fields without a space was
# cut mid-word every piece_chars, which changed BPE ids at each cut.)
_CLEAN_CUT = re.compile(r"(?<=\S)[\n\r\t ]")


def split_pieces(chunks: Iterable[str], piece_chars: int = PIECE_CHARS,
                 max_chars: int | None = None) -> Iterator[str]:
    """Re-cut a stream of text chunks (one document) into pieces of at least `piece_chars`
    characters (the last may be shorter), each ending at the first clean cut past that size.

    A stretch of `max_chars` (default 16 * piece_chars) without a clean cut is cut anyway.
    """
    buf, start = "", 0
    limit = max_chars or 16 * piece_chars
    scanned = 0  # buf holds no clean cut before this index (searched already)
    for chunk in chunks:
        buf = buf[start:] + chunk
        scanned = max(scanned - start, 0)
        start = 0
        while len(buf) - start > piece_chars:
            # Not from start + piece_chars every time: a long run without a clean cut would be
            # searched again for each piece cut from it (16 searches of 1M characters per MB).
            end = min(start + limit, len(buf))
            match = _CLEAN_CUT.search(buf, max(start + piece_chars, scanned), end)
            scanned = end if match is None else match.start()
            if match:
                cut = match.start()
            elif len(buf) - start >= limit:
                cut = start + piece_chars  # no clean place in a long run: cut anyway
            else:
                break  # read more before giving up on a clean cut
            yield buf[start:cut]
            start = cut
    if len(buf) > start:
        yield buf[start:]


def _document_pieces(chunks: Iterable[str], piece_chars: int) -> Iterator[Piece]:
    first = True
    for text in split_pieces(chunks, piece_chars):
        yield Piece(text, first)
        first = False


# ---- in-memory texts ------------------------------------------------------------------------
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Texts(_DocumentsFromPieces):
    """Documents given as strings (a list, or any re-iterable collection)."""

    texts: Sequence[str]
    description: str = "in-memory texts"

    def iter_pieces(self, piece_chars: int = PIECE_CHARS) -> Iterator[Piece]:
        for number, text in enumerate(self.texts, 1):
            if not isinstance(text, str):
                raise SourceError(f"{self.description}: documents must be str, got {type(text).__name__}")
            # A lone surrogate (text decoded with errors="surrogateescape", or cut from a UTF-16
            # pair) cannot become UTF-8 bytes: it ended in a bare UnicodeEncodeError deep in the
            # prep, naming no document. Files are decoded strictly, so only texts handed in from
            # Python meet this. (A search, not an encode: no copy of a large document.)
            surrogate = None if text.isascii() else _SURROGATE.search(text)
            if surrogate is not None:
                raise SourceError(
                    f"{self.description}: document {number} holds a lone surrogate "
                    f"(U+{ord(surrogate[0]):04X}) at character {surrogate.start():,}, which is not "
                    f"text; decode its bytes strictly (or with errors='replace')")
            yield from _document_pieces([text], piece_chars)


# ---- local files ----------------------------------------------------------------------------
def _check_errors_option(errors: str) -> None:
    if errors not in ENCODING_ERRORS:
        raise SourceError(f"--encoding-errors must be one of {', '.join(ENCODING_ERRORS)}, got {errors!r}")


def _read_chunks(path: Path, errors: str, stamps: dict[str, tuple[int, int]] | None = None) -> Iterator[str]:
    """Decode a UTF-8 file chunk by chunk; strict errors name the file and byte offset.

    A byte order mark (U+FEFF) that starts the file is left out, as the utf-8-sig codec does
    (editors on Windows write one; kept, it became a character of the text and of a char
    vocabulary); one anywhere else is text and kept. Offsets in errors still count its bytes.

    With `stamps` (path -> size and modification time, from earlier reads), a file that changes
    while it is read, or since an earlier read, is a SourceError naming it."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace" if errors == "replace" else "strict")
    offset = 0
    first = True  # the first text decoded starts at the file's first character
    try:
        with open(path, "rb") as f:
            if stamps is not None:
                stamp = _check_stamp(path, f, stamps.get(str(path)))
            while True:
                data = f.read(READ_BYTES)
                try:
                    text = decoder.decode(data, final=not data)
                except UnicodeDecodeError as e:
                    pending = len(decoder.getstate()[0])  # bytes held back from the last chunk
                    raise NotUTF8Error(path, offset - pending + e.start, e.reason) from None
                if text and first:
                    first = False
                    if text[0] == "\ufeff":
                        text = text[1:]
                if text:
                    yield text
                if not data:
                    if stamps is not None:
                        stamps[str(path)] = _check_stamp(path, f, stamp)
                    return
                offset += len(data)
    except OSError as e:
        raise SourceError(f"{path}: cannot read file ({e.strerror or e})") from e


def _check_stamp(path: Path, f, expected: tuple[int, int] | None) -> tuple[int, int]:
    """The open file's (size, modification time); a SourceError when it is not `expected`.

    Data prep reads the corpus twice (vocabulary, then tokens): a file that grows or is rewritten
    in between gives shards that disagree with the vocabulary and with meta.json's counts."""
    st = os.fstat(f.fileno())
    stamp = (st.st_size, st.st_mtime_ns)
    if expected is not None and stamp != expected:
        how = (f"{expected[0]:,} bytes, then {stamp[0]:,}" if stamp[0] != expected[0]
               else f"rewritten at the same size, {stamp[0]:,} bytes")
        raise SourceError(f"{path}: changed while data prep read it ({how}; a file still being written?); "
                          f"run the prep again once it is complete, or leave it out of --input")
    return stamp


def _first_decode_error(path: Path) -> NotUTF8Error | None:
    try:
        for _ in _read_chunks(path, "strict"):
            pass
    except NotUTF8Error as e:
        return e
    return None


def holds_token_shards(folder: Path) -> bool:
    """Whether `folder` holds a prepared dataset's token shards (train_*.bin, val_*.bin)."""
    return any(is_shard_name(name) for name in os.listdir(folder))


def _special_file(path: Path) -> str | None:
    """What `path` is when it is neither a regular file nor a folder ("a named pipe"), else None.

    Opening a named pipe or a device to read it can wait forever. A path that cannot be looked
    at (a broken link) gives None: reading it then fails with an error that names it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "neither a file nor a folder"


def _walk_files(path: Path, skip_dirs: tuple[str, ...] = (),
                exclude: tuple[Path, ...] = ()) -> Iterator[tuple[Path, str | None]]:
    """Files under `path` in sorted order, depth first, each with None (read it) or why it is
    left out; also the folders left out, with why. Streams (never lists the whole tree).

    Left out: folders named in `skip_dirs` (silently), folders in `exclude` (resolved paths),
    folders holding token shards, hidden files and folders (names starting with "."), a folder
    reached a second time through links, and files that are not regular files."""
    if not path.is_dir():
        yield path, None
        return
    # Links to folders are followed, as links to files are (os.walk alone would drop them without
    # a word); a folder reached twice (a second link to it, or a link back up, which would
    # otherwise loop forever) is read the first time only.
    walked: dict[Path, Path] = {}  # resolved folder -> the path it was read under
    for root, dirs, files in os.walk(path, onerror=_raise_walk_error, followlinks=True):
        folder = Path(root)
        real = folder.resolve()
        if exclude and real in exclude:
            reason = "the folder this data prep writes (--out)"
        elif real in walked:
            reason = f"the same folder as {walked[real]}, read already"
        elif any(is_shard_name(name) for name in files):  # the listing os.walk already made
            reason = "a prepared dataset (token shards), not text"
        else:
            reason = None
        if reason is not None:
            dirs[:] = []  # nothing below it is read either
            yield folder, reason
            continue
        walked[real] = folder
        # Hidden entries (.git, .DS_Store, editor swap files) are a tool's state, not the corpus:
        # a repository's .git alone would stop a prep at its first binary object.
        for name in sorted(d for d in dirs if d.startswith(".")):
            yield folder / name, "a hidden folder"
        dirs[:] = sorted(d for d in dirs if d not in skip_dirs and not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                yield folder / name, "a hidden file"
                continue
            special = _special_file(folder / name)
            yield folder / name, None if special is None else f"not a regular file ({special})"


def _raise_walk_error(e: OSError) -> None:
    raise SourceError(f"{e.filename}: cannot list folder ({e.strerror or e})")


@dataclass
class LocalFiles(_DocumentsFromPieces):
    """Files and folders (walked recursively, sorted, links followed, hidden entries left out);
    each file is one document.

    errors: what to do with bytes that are not UTF-8: "strict" (an error naming the file and
    byte offset), "replace" (U+FFFD), or "skip" (leave the file out, with a warning).
    """

    paths: Sequence[str | os.PathLike]
    errors: str = "strict"
    suffixes: tuple[str, ...] | None = None  # e.g. (".py",); None reads every file
    skip_dirs: tuple[str, ...] = ()  # folder names to leave out wherever they occur
    exclude: Sequence[str | os.PathLike] = ()  # folders never read (data prep passes its --out)
    warn_skips: bool = True
    # Paths already warned about: data prep reads the corpus twice, and says each skip once.
    _warned: set = field(default_factory=set, init=False, repr=False, compare=False)
    # Each file's size and modification time when read: a file that changes between reads is an error.
    _stamps: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    description: str = ""

    def __post_init__(self):
        _check_errors_option(self.errors)
        if isinstance(self.paths, (str, os.PathLike)):
            self.paths = [self.paths]
        self.paths = [Path(p) for p in self.paths]
        if not self.paths:
            raise SourceError("--input: no paths given")
        self.exclude = tuple(Path(p).resolve() for p in self.exclude)
        for p in self.paths:
            if not p.exists():
                raise SourceError(f"{p}: no such file or folder (--input)")
            special = _special_file(p)
            if special is not None:
                raise SourceError(f"{p}: not a regular file ({special}); --input takes text files "
                                  f"and folders of them")
            if p.is_dir() and holds_token_shards(p):
                raise SourceError(f"{p}: is a prepared dataset (token shards), not text; --input "
                                  f"takes text files and folders of them")
        if not self.description:
            self.description = "files: " + ", ".join(str(p) for p in self.paths)

    def files(self) -> Iterator[Path]:
        # A file reached twice (a link to a file of the corpus, a file named besides its folder,
        # a path given twice) is read once: twice, it would sit in both splits (val then measures
        # recall of train text) and weigh double in training.
        read: dict[str, str] = {}  # resolved file -> the path it was read under (str: compact)
        for root in self.paths:
            found = False
            for path, skip_reason in _walk_files(root, self.skip_dirs, self.exclude):
                if skip_reason is None:
                    if self.suffixes is not None and path.suffix not in self.suffixes:
                        continue  # another kind of file: not part of the corpus, so no warning
                    found = True
                    real = str(path.resolve())
                    if real in read:
                        skip_reason = ("given twice, read once" if read[real] == str(path)
                                       else f"the same file as {read[real]}, read already")
                    else:
                        read[real] = str(path)
                if skip_reason is not None:
                    if self.warn_skips:
                        self._warn_once(path, f"skipping {path}: {skip_reason}")
                    continue
                yield path
            if not found:
                raise SourceError(f"{root}: no input files in this folder")

    def _warn_once(self, path: Path, message: str) -> None:
        if path not in self._warned:
            self._warned.add(path)
            warnings.warn(message, stacklevel=3)

    def iter_pieces(self, piece_chars: int = PIECE_CHARS) -> Iterator[Piece]:
        for path in self.files():
            if self.errors == "skip":
                error = _first_decode_error(path)  # before any piece: skip the file whole
                if error is not None:
                    if self.warn_skips:
                        self._warn_once(path, f"skipping {path}: not valid UTF-8 at byte offset {error.offset}")
                    continue
            yield from _document_pieces(_read_chunks(path, self.errors, self._stamps), piece_chars)


# ---- the Python standard library ------------------------------------------------------------
def stdlib_corpus() -> LocalFiles:
    """The `.py` files of this Python's standard library: a code corpus every machine has.

    Located with `sysconfig.get_paths()["stdlib"]`; site-packages (installed third-party
    packages, different on every machine) is left out, its test suites are kept: without them
    the corpus would be only ~12 MB. On CPython 3.11.7 that is 1,790 files (1,758 non-empty
    documents), 31.5 MB, about 8.6M tokens with an 8192-token BPE; the four files that are
    deliberately not UTF-8 (encoding tests) are skipped silently. The corpus, and so the
    prepared dataset, differs between Python versions.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise SourceError(f"{root}: the Python standard library folder does not exist")
    version = sysconfig.get_python_version()
    return LocalFiles(
        [root], errors="skip", suffixes=(".py",), warn_skips=False,
        skip_dirs=("site-packages", "dist-packages", "__pycache__"),
        description=f"stdlib: the .py files of the Python {version} standard library at {root} "
                    f"(site-packages excluded)",
    )


# ---- Hugging Face datasets ------------------------------------------------------------------
@dataclass
class HFDataset(_DocumentsFromPieces):
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
        """datasets' progress bars off when asked, and its errors as one-line SourceErrors."""
        import datasets  # slow to import; only this source needs it

        # datasets' switch is global: turned off for this call only, and back on only if it was on.
        quiet = not self.progress and datasets.is_progress_bar_enabled()
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
                    return [Path(f) for f in self._files]
                if builder.name == "text" and "sample_by" not in kwargs:
                    kwargs.update(sample_by="document", encoding="utf-8-sig")  # a folder of .txt, sliced
            return datasets.load_dataset(path, self.config, split=self.split, streaming=self.streaming,
                                         **kwargs)

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
            yield from _document_pieces([text], piece_chars)

    def _text_file_pieces(self, files: list[Path], piece_chars: int) -> Iterator[Piece]:
        """Local text files, each one document, read exactly as --input reads them."""
        self._check_field(["text"])
        for path in files:
            try:
                yield from _document_pieces(_read_chunks(path, "strict", self._stamps), piece_chars)
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
                          f"of its own, or name the files with --hf-dataset {module} --hf-data-files FILE...")


def _file_reason(path: Path, e: BaseException) -> str:
    """Why one local data file cannot be read, in words, with the byte offset or line when known."""
    if isinstance(_cause(e), UnicodeDecodeError):
        bad = _first_decode_error(path)
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


def resolve_source(source, encoding_errors: str = "strict") -> Corpus:
    """A corpus from what `prepare` accepts: "stdlib", a Path, a list of str documents, or a Corpus."""
    if isinstance(source, str):
        if source == "stdlib":
            return stdlib_corpus()
        raise SourceError(f"unknown source {source!r}: the named source is 'stdlib'; "
                          f"pass files as Path objects (or --input), documents as a list of str")
    if isinstance(source, os.PathLike):
        return LocalFiles([source], errors=encoding_errors)
    if hasattr(source, "iter_pieces"):
        return source
    if isinstance(source, (list, tuple)):
        return Texts(source)
    raise SourceError(f"cannot read a corpus from {type(source).__name__}; pass 'stdlib', a Path, "
                      f"a list of str or a corpus from gpt.sources (a generator cannot be read twice)")
