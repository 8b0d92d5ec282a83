"""Progress bars (gpt/progress.py) in a terminal and in a log file."""

from __future__ import annotations

import fcntl
import io
import os
import struct
import termios
import threading
import time

from gpt.progress import progress_bar


def run_bar(stream, seconds: float = 1.0) -> None:
    bar = progress_bar("encoding", 1000, "B", enabled=True, file=stream)
    for _ in range(100):
        time.sleep(seconds / 100)
        bar.update(10)
    bar.close()


def test_a_bar_in_a_log_is_drawn_when_it_starts_and_closes_not_ten_times_a_second():
    log = io.StringIO()  # not a terminal, as a SLURM job's output or CI's log
    run_bar(log)
    text = log.getvalue()
    assert text.count("\r") <= 2, repr(text)  # it was 10 redraws a second, all kept in the file
    assert "encoding: 100%" in text and text.endswith("\n")


def test_a_bar_in_a_terminal_still_redraws_as_it_goes():
    main, child = os.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    chunks: list[bytes] = []

    def read_all() -> None:
        # Read as it is written (a full pty buffer would block the bar), to the end: Linux answers
        # EIO once the other end is closed and all was read. (One read after the bar had closed
        # got only the first 4 KB of it.)
        while True:
            try:
                chunk = os.read(main, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        with os.fdopen(child, "w") as terminal:  # closed at the end of the block: the reader's EOF
            run_bar(terminal)
        reader.join(10)
    finally:
        os.close(main)
    text = b"".join(chunks).decode()
    assert text.count("\r") >= 5, repr(text)
    assert "encoding: 100%" in text


def test_a_disabled_bar_writes_nothing():
    log = io.StringIO()
    bar = progress_bar("eval val", 10, "tok", enabled=False, file=log)
    bar.update(10)
    bar.close()
    assert log.getvalue() == ""
