"""Progress bars (gpt/progress.py) in a terminal and in a log file."""

from __future__ import annotations

import fcntl
import io
import os
import struct
import termios
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
    try:
        with os.fdopen(child, "w", closefd=False) as terminal:
            run_bar(terminal)
        os.set_blocking(main, False)
        text = os.read(main, 1 << 20).decode()
    finally:
        os.close(main)
        os.close(child)
    assert text.count("\r") >= 5, repr(text)
    assert "encoding: 100%" in text


def test_a_disabled_bar_writes_nothing():
    log = io.StringIO()
    bar = progress_bar("eval val", 10, "tok", enabled=False, file=log)
    bar.update(10)
    bar.close()
    assert log.getvalue() == ""
