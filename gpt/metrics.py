"""Where training numbers go: `out_dir/metrics.jsonl`, and optionally wandb (the log lines on
stdout are the trainer's own, `gpt.console.say`).

MFU's denominator, the device's peak FLOP/s, is gpt/mfu.py's.

A sink has `write(record)` and `close()`: `MetricsLog` (the JSONL file every run writes),
`WandbSink` (Weights & Biases, when `wandb_mode` is offline or online), and `Sinks` (several
as one, so the training loop calls a single `write`).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import ConfigError, check_wandb_tags
from .run_layout import LATEST_FILE, METRICS_FILE
WANDB_RUN_ID_FILE = "wandb_run_id"


class MetricsError(ValueError):
    """A metrics file is missing, malformed or cannot be written, or gpt.plot's options are bad;
    the message names the file (and line) or the option."""

def finite_or_null(value: Any) -> Any:
    """`value` (nested dicts and lists) with every non-finite float as None: json.dumps writes
    NaN and Infinity as bare tokens, which are not JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


class MetricsLog:
    """Appends one JSON object per record to `out_dir/metrics.jsonl` (rank 0 only)."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(out_dir) / METRICS_FILE
        self.enabled = enabled
        if enabled and resume_step is not None and self.path.exists():
            self._drop_after(resume_step)

    def _drop_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their old records so
        the file reads as one uninterrupted run. The records before it are kept byte for byte.
        A line that is no record (a note written in by hand, a damaged line, bytes that are not
        UTF-8), which read_metrics (gpt.plot, wandb's backfill) would refuse, is moved to
        metrics.jsonl.unreadable with a note, not lost; a last line cut short by a kill goes."""
        try:
            data = self.path.read_bytes()
        except OSError as e:  # a folder of that name, say
            raise MetricsError(f"cannot read {self.path} ({e.strerror or e}) to resume its records; it should "
                               f"be the run's metrics file: move it aside and run again") from None
        lines = data.split(b"\n")
        if not lines[-1]:
            lines.pop()  # the empty piece after the final newline
        kept, set_aside = [], []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                kept.append(line + b"\n")  # read_metrics skips blank lines
                continue
            try:
                record = json.loads(line)
            except ValueError:  # not JSON, or not UTF-8
                if number == len(lines) and not data.endswith(b"\n"):
                    continue  # the last line, cut short by a kill
                record = None
            if not is_record(record):
                set_aside.append((number, line + b"\n"))
            elif record["step"] <= step:
                kept.append(line + b"\n")
        unreadable = self.path.with_name(self.path.name + ".unreadable")
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            if set_aside:  # first: were the rewrite interrupted, they are not lost
                with open(unreadable, "ab") as f:
                    f.write(b"".join(line for _, line in set_aside))
                    f.flush()
                    os.fsync(f.fileno())
            tmp.write_bytes(b"".join(kept))
            os.replace(tmp, self.path)
        except OSError as e:  # a full disk: metrics.jsonl itself is untouched
            tmp.unlink(missing_ok=True)
            raise self._write_error(e) from e
        if set_aside:
            numbers = ", ".join(str(number) for number, _ in set_aside[:10]) + (", ..." if len(set_aside) > 10 else "")
            print(f"note: {self.path}: {len(set_aside)} line(s) that are no metrics record (line {numbers}) moved "
                  f"to {unreadable}, so that gpt.plot and wandb read the file", file=sys.stderr, flush=True)

    def _write_error(self, error: OSError) -> MetricsError:
        # Before the run's first save there is no checkpoint to resume from: say what a rerun does.
        rerun = ("run again to resume from the last checkpoint" if (self.path.parent / LATEST_FILE).exists()
                 else "run again (no checkpoint was saved yet: it starts from step 0)")
        return MetricsError(f"could not write {self.path} ({error.strerror or error}): is the disk full or "
                            f"the folder not writable? Fix that and {rerun}")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # A loss that is not finite (NaN: every step of the interval skipped under nan_policy =
        # skip) is written as null: json.dumps would write a bare NaN token, which is not JSON, and
        # strict parsers (JavaScript's JSON.parse, Go, serde) reject the whole file over it.
        line = (json.dumps(finite_or_null(record), allow_nan=False) + "\n").encode()
        # A full disk (ENOSPC, a quota, a file size limit) stopped the run with an OSError
        # traceback and could leave part of the line: the next record then ran into it, one
        # invalid line in the middle of the file, which read_metrics and gpt.plot refuse. The
        # file is cut back to its last whole record, and the error says what happened.
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise self._write_error(e) from e
        try:
            size = os.fstat(fd).st_size
            view = memoryview(line)
            while view:  # a write cut short by a full disk reports how much it wrote; the next one fails
                view = view[os.write(fd, view):]
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise self._write_error(e) from e
        finally:
            os.close(fd)

    def close(self) -> None:
        pass  # every write already closed the file


class WandbSink:
    """Logs each record to a Weights & Biases run (rank 0 only; construct it there alone).

    The run's files go under `out_dir/wandb/` (in offline mode they are all there is; upload
    them later with `wandb sync out_dir/wandb/offline-run-*`). The run id is kept in
    `out_dir/wandb_run_id`, so a run resumed from a checkpoint continues the same wandb run
    instead of starting a new one; a fresh start in the same folder gets a new id.
    """

    def __init__(self, out_dir: str | os.PathLike, *, mode: str, project: str, name: str = "",
                 tags: Sequence[str] = (), config: dict[str, Any] | None = None,
                 resumed: bool = False, resume_step: int | None = None,
                 note: Callable[[str], None] | None = None) -> None:
        if mode not in ("offline", "online"):
            raise ValueError(f"WandbSink mode must be 'offline' or 'online', got {mode!r}")
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                f"wandb_mode = {mode!r} needs the wandb package, which is not installed: "
                f"pip install 'gpt-from-scratch[wandb]' (or pip install wandb), or set "
                f"wandb_mode = 'disabled'"
            ) from None
        check_wandb_tags(tags)
        out_dir = Path(out_dir)
        id_file = out_dir / WANDB_RUN_ID_FILE
        # An empty file (a run killed, or a disk full, while writing it) holds no run to continue:
        # wandb refuses an empty id, which would stop every resume of this run folder.
        run_id = (id_file.read_text().strip() or None) if resumed and id_file.exists() else None
        if run_id is not None:
            set_aside_empty_offline_runs(out_dir / "wandb", run_id, note)
        try:
            self.run = wandb.init(
                mode=mode, project=project, name=name or out_dir.resolve().name,
                tags=list(tags) or None, config=config, dir=str(out_dir), id=run_id,
                resume="allow" if run_id else None,
            )
        except Exception as e:  # wandb raises its own error types (no login, no network, ...)
            raise ConfigError(f"wandb_mode = {mode!r}: could not start the wandb run ({type(e).__name__}: "
                              f"{str(e).strip()}). {_start_hint(mode, e)}") from e
        if run_id is None:
            id_file.write_text(self.run.id + "\n")
        # Online, a resumed run knows its last step; steps below it were logged before the
        # interruption (and a resume repeats them exactly), and wandb would reject them. Offline
        # it says 0: the steps the earlier processes' run files hold tell instead.
        self.first_step = self.run.step
        if run_id is not None:
            self.first_step = max(self.first_step, wandb_last_step(out_dir / "wandb", run_id) + 1)
        if run_id is not None and resume_step is not None and self.first_step > resume_step + 1 and note:
            # A process that ended without a checkpoint (a crash, kill -9, a second Ctrl-C) had
            # logged steps past the one resumed from; wandb cannot replace a run's history.
            note(f"note: wandb run {run_id} already holds steps up to {self.first_step - 1}, logged by a "
                 f"process that ended without saving them (this run resumes from step {resume_step}): "
                 f"wandb keeps that process's values for steps {resume_step + 1}-{self.first_step - 1} "
                 f"and gets this run's from step {self.first_step} on; metrics.jsonl has this run's for "
                 f"every step")
        if resumed:
            # A resume that starts a new wandb run (wandb turned on at this resume, or an id file
            # lost or empty) fills it from the start too: it began at the checkpoint, every step
            # before it missing from the run's charts.
            self._backfill(out_dir)

    def _backfill(self, out_dir: Path) -> None:
        """Log the records up to the checkpoint (metrics.jsonl, already cut back to it) that
        the earlier processes' wandb files lack. wandb keeps up to 15 s of records in memory
        (`x_transaction_log_flush_interval`); a process killed (kill -9, out of memory, a node
        lost) loses them, and a resume re-logs only the steps after its checkpoint: the run's
        wandb history had a hole up to the checkpoint (all of it for a short run)."""
        try:
            records = read_metrics(out_dir)
        except MetricsError:
            return
        for record in records:
            if record["step"] >= self.first_step:
                self.write(record)
                self.first_step = record["step"] + 1

    @property
    def run_id(self) -> str:
        return self.run.id

    def write(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if step < self.first_step:
            return
        # Non-finite figures (a skipped step's NaN loss, an ETA of "?") as null, as metrics.jsonl
        # has them and as the backfill from it logs them: one value for one step in both.
        self.run.log({k: finite_or_null(v) for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        self.run.finish()


def _start_hint(mode: str, error: Exception) -> str:
    """What to do when wandb.init fails: offline needs nothing; online, a network failure is
    not fixed by logging in (a key may well be set)."""
    if mode == "offline":
        return "wandb_mode = 'offline' needs no account or network: check the setting named above"
    text = f"{type(error).__name__} {error}".lower()
    if any(word in text for word in ("commerror", "timed out", "timeout", "no such host", "connection", "network")):
        return ("The wandb server could not be reached: check the network, or train with wandb_mode = "
                "'offline' and upload later with wandb sync out_dir/wandb/offline-run-*")
    if not os.environ.get("WANDB_API_KEY"):
        return ("For online mode log in first (wandb login, or set WANDB_API_KEY); wandb_mode = "
                "'offline' needs no account")
    return "wandb_mode = 'offline' needs no account or network"


def set_aside_empty_offline_runs(wandb_dir: Path, run_id: str, note: Callable[[str], None] | None) -> None:
    """Rename the offline folders of run `run_id` whose run file holds no record at all (a
    process killed while its wandb run started) to empty-offline-run-*: `wandb sync
    out_dir/wandb/offline-run-*` stopped at such a file ("transactionlog: error getting next
    record: EOF"), exited 0, and never uploaded the folders after it."""
    try:
        from wandb.proto import wandb_internal_pb2  # noqa: F401  (without it no file reads as holding records)
    except ImportError:
        return
    for run_file in sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        if next(wandb_file_records(run_file), None) is not None:
            continue
        folder = run_file.parent
        try:
            folder.rename(folder.with_name("empty-" + folder.name))
        except OSError:
            continue
        if note:
            note(f"note: {folder} held no wandb records (its process was stopped as it started): renamed "
                 f"to empty-{folder.name}, so that wandb sync offline-run-* uploads the others")


def wandb_file_records(path: Path):
    """The protobuf records of one wandb run file (`run-ID.wandb`, its transaction log): a
    header, then 32 KiB blocks of chunks (crc32, length, kind: 1 whole, 2-4 first/middle/last).
    Stops quietly at a chunk cut short or damaged by a kill, and yields nothing for a file it
    cannot read."""
    try:
        from wandb.proto import wandb_internal_pb2 as pb

        data = path.read_bytes()
    except (ImportError, OSError):
        return
    if data[:4] != b":W&B":
        return
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # too little room for a chunk header: padding up to the next block
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if (length == 0 and kind == 0) or pos + 7 + length > len(data) or kind not in (1, 2, 3, 4):
            return
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            try:
                record.ParseFromString(pending)
            except Exception:  # protobuf's DecodeError: a damaged tail
                return
            pending = b""
            yield record


def wandb_last_step(wandb_dir: Path, run_id: str) -> int:
    """The last step the run files of wandb run `run_id` under `wandb_dir` hold on disk (every
    process of a resumed run writes its own folder, offline-run-*-ID or run-*-ID); -1 for none.

    Newest folder first (named by its start time), stopping at the first with any step: a later
    process logs only steps past the earlier ones', so the files of a long run are not all read."""
    last = -1
    folders = sorted(wandb_dir.glob(f"*-{run_id}/run-{run_id}.wandb"),
                     key=lambda path: path.parent.name.removeprefix("offline-"), reverse=True)
    for path in folders:
        if last >= 0:
            break
        for record in wandb_file_records(path):
            if record.WhichOneof("record_type") != "history":
                continue
            for item in record.history.item:
                if (item.key or "/".join(item.nested_key)) == "_step":
                    try:
                        last = max(last, int(json.loads(item.value_json)))
                    except (ValueError, TypeError):
                        pass
    return last


class Sinks:
    """Several sinks behind one `write` / `close`."""

    def __init__(self, *sinks) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def is_record(record: Any) -> bool:
    """Whether a parsed metrics line is a record: a JSON object with an integer "step"."""
    step = record.get("step") if isinstance(record, dict) else None
    return isinstance(step, int) and not isinstance(step, bool)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (given the run folder or the file), in order.

    A last line without its newline was cut short by a kill mid-write and is skipped; any other
    line that is not a JSON object with an integer "step" is an error naming the file and line.
    An empty file gives an empty list.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MetricsError(f"{path} does not exist; give a run folder (out_dir) that has logged "
                           f"at least one step") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MetricsError(f"{path}: cannot read ({e})") from e
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                continue
            raise MetricsError(f"{path}:{number}: not valid JSON ({e.msg}): {line[:60]!r}") from None
        if not is_record(record):
            raise MetricsError(f"{path}:{number}: expected a JSON object with an integer \"step\", "
                               f"got {line[:60]!r}")
        records.append(record)
    return records
