"""Errors of a run itself (as opposed to bad input, which config/shards/checkpoint errors cover).

`train.py` prints them as one line, `error: ...`, and exits with code 1; see docs/errors.md
for every failure a user can meet and what they see.
"""

from __future__ import annotations


class TrainingError(RuntimeError):
    """The run could not go on (loss not finite, out of memory); the message says which step or
    setting is to blame, what to change, and that the last checkpoint is intact."""
