"""Errors of a run itself (as opposed to bad input, which config/shards/checkpoint errors cover).

`train.py` prints them as one line, `error: ...`, and exits with code 1; see docs/errors.md
for every failure a user can meet and what they see.
"""

from __future__ import annotations


class TrainingError(RuntimeError):
    """The run could not go on (loss not finite, out of memory); the message says which step or
    setting is to blame, what to change, and that the last checkpoint is intact."""


class FollowOnFailure(TrainingError):
    """This process failed only because another process of the run had failed first: it had
    been told to stop (SIGTERM: torchrun stops the other workers when one fails) and then lost its
    connection to that process. The other process's error is the run's; this one is a note,
    printed at once as `stopped: ...`, so a job refused by rank 0 reads as refused once."""


class InterruptedAfterSave(KeyboardInterrupt):
    """A second Ctrl-C while the stop's own checkpoint was being finished (an async save in
    flight): the save completed all the same (the process waits for its thread), so the usual
    "stopped at once, without saving" would be untrue. The message says which step was saved."""
