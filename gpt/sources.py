"""Corpus readers: streams of documents from local files, the Python standard library, or a list
of strings (a Hugging Face dataset's reader, built on these pieces, is gpt.hf_dataset).

A corpus is re-iterable (data prep reads it twice: to count it and train the BPE, then to encode it) and never held in memory whole.
Iterating a corpus yields its documents as strings. Data prep reads `iter_pieces()` instead:
the same text as `Piece`s of about `piece_chars` characters, so that one huge document (a 10 GB
text file) streams in bounded memory too. Pieces are cut only just before a space, tab, newline
or carriage return that follows a non-whitespace character. GPT-2's pre-tokenizer regex (used by
the byte-level BPE) always ends a pre-token there and has no look-behind, so encoding the pieces
one by one gives exactly the ids of encoding the whole document (tests check this); a
character vocabulary is indifferent to cuts anyway (any other tokenizer, reused with
--tokenizer-from, gets each document joined whole again: gpt/prepare.py `_encoded`). Only a stretch of 16 × `piece_chars`
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
import os
import re
import stat
import sysconfig
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from gpt.shards import holds_token_shards, is_shard_name
from gpt.tokenizer import lone_surrogate

PIECE_CHARS = 1 << 16  # small enough that the BPE trainer's 256-item read-ahead stays ~16 MB
READ_BYTES = 1 << 20
ENCODING_ERRORS = ("strict", "replace", "skip")


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
    document: str = ""  # which document, for errors: its file, or "document N"; "" where unnamed


class Corpus(Protocol):
    description: str

    def iter_pieces(self, piece_chars: int = PIECE_CHARS) -> Iterator[Piece]: ...

    def __iter__(self) -> Iterator[str]: ...


class DocumentsFromPieces:
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


def reached_again(read: dict[str, str], path: Path) -> str | None:
    """Why `path` is left out where it is a file read already (through a link to it, named
    besides its folder, given twice): read twice, it would sit in both splits (val then measures
    recall of train text) and weigh double in training. None the first time, which `read` (resolved
    file -> the path it was read under) then records."""
    real = os.path.realpath(path)
    if real not in read:
        read[real] = str(path)
        return None
    return "given twice, read once" if read[real] == str(path) else f"the same file as {read[real]}, read already"


def document_pieces(chunks: Iterable[str], piece_chars: int, document: str = "") -> Iterator[Piece]:
    first = True
    for text in split_pieces(chunks, piece_chars):
        yield Piece(text, first, document)
        first = False


# ---- in-memory texts ------------------------------------------------------------------------


@dataclass
class Texts(DocumentsFromPieces):
    """Documents given as strings (a list, or any re-iterable collection)."""

    texts: Sequence[str]
    description: str = "in-memory texts"

    def iter_pieces(self, piece_chars: int = PIECE_CHARS) -> Iterator[Piece]:
        for number, text in enumerate(self.texts, 1):
            if not isinstance(text, str):
                raise SourceError(f"{self.description}: documents must be str, got {type(text).__name__}")
            # A lone surrogate cannot become UTF-8 bytes: it ended in a bare UnicodeEncodeError
            # deep in the prep, naming no document. Files are decoded strictly, so only texts
            # handed in from Python meet this.
            surrogate = lone_surrogate(text)
            if surrogate is not None:
                raise SourceError(
                    f"{self.description}: document {number} holds a lone surrogate "
                    f"(U+{ord(surrogate[0]):04X}) at character {surrogate.start():,}, which is not "
                    f"text; decode its bytes strictly (or with errors='replace')")
            yield from document_pieces([text], piece_chars, f"document {number}")


# ---- local files ----------------------------------------------------------------------------
def _check_errors_option(errors: str) -> None:
    if errors not in ENCODING_ERRORS:
        raise SourceError(f"--encoding-errors must be one of {', '.join(ENCODING_ERRORS)}, got {errors!r}")


def read_chunks(path: Path, errors: str, stamps: dict[str, tuple[int, int]] | None = None) -> Iterator[str]:
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


def first_decode_error(path: Path) -> NotUTF8Error | None:
    try:
        for _ in read_chunks(path, "strict"):
            pass
    except NotUTF8Error as e:
        return e
    return None


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
        real = Path(os.path.realpath(folder))
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
class LocalFiles(DocumentsFromPieces):
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
    # Files left out as not valid UTF-8 under errors="skip" (all of them: prep's "no text" says why).
    # (A dict as an ordered set: a folder may hold many thousands of binary files.)
    undecodable: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    description: str = ""

    def __post_init__(self):
        _check_errors_option(self.errors)
        if isinstance(self.paths, (str, os.PathLike)):
            self.paths = [self.paths]
        self.paths = [Path(p) for p in self.paths]
        if not self.paths:
            raise SourceError("--input: no paths given")
        # os.path.realpath, not Path.resolve: before Python 3.13 that raises RuntimeError (no
        # OSError, so a traceback) for a link loop, which reading the file then names in one line.
        self.exclude = tuple(Path(os.path.realpath(p)) for p in self.exclude)
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
        read: dict[str, str] = {}  # for reached_again
        for root in self.paths:
            found = False
            for path, skip_reason in _walk_files(root, self.skip_dirs, self.exclude):
                if skip_reason is None:
                    if self.suffixes is not None and path.suffix not in self.suffixes:
                        continue  # another kind of file: not part of the corpus, so no warning
                    found = True
                    skip_reason = reached_again(read, path)
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
                error = first_decode_error(path)  # before any piece: skip the file whole
                if error is not None:
                    self.undecodable.setdefault(path, None)
                    if self.warn_skips:
                        self._warn_once(path, f"skipping {path}: not valid UTF-8 at byte offset {error.offset}")
                    continue
            yield from document_pieces(read_chunks(path, self.errors, self._stamps), piece_chars, str(path))


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


def resolve_source(source, encoding_errors: str = "strict") -> Corpus:
    """A corpus from what `prepare` accepts: "stdlib", a Path, a list of str documents, or a Corpus."""
    if isinstance(source, str):
        if source == "stdlib":
            return stdlib_corpus()
        # Shortened: a whole corpus passed as one str (not [text]) made a message of a million characters.
        shown = repr(source) if len(source) <= 80 else f"{source[:60]!r}... ({len(source):,} characters)"
        raise SourceError(f"unknown source {shown}: the named source is 'stdlib'; "
                          f"pass files as Path objects (or --input), documents as a list of str")
    if isinstance(source, os.PathLike):
        return LocalFiles([source], errors=encoding_errors)
    if hasattr(source, "iter_pieces"):
        return source
    if isinstance(source, (list, tuple)):
        return Texts(source)
    raise SourceError(f"cannot read a corpus from {type(source).__name__}; pass 'stdlib', a Path, "
                      f"a list of str or a corpus from gpt.sources (a generator cannot be read twice)")
