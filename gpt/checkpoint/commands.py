"""`python -m gpt.checkpoint list RUN` and `python -m gpt.checkpoint consolidate RUN`."""

from __future__ import annotations

import json
import sys

from ..config import ArgumentParser, path_arg
from ..console import report, write_result
from ..held_signals import terminate_as_interrupt
from .consolidation import consolidate
from .find import latest_checkpoint
from .layout import CheckpointError
from .listing import format_listing, list_checkpoints


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m gpt.checkpoint",
        description="Checkpoint tools. list: a run's checkpoints with their step, val loss and size, "
                    "the latest and the best (lowest val loss) marked. consolidate: copy a sharded "
                    "(torch.distributed.checkpoint) checkpoint into the single-file format "
                    "(model.safetensors), to hand on or use outside this project; sample.py, gpt.eval, "
                    "gpt.export and a resume on any world size read either format as it is.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="a run's checkpoints: step, val loss, size; latest and best marked")
    listing.add_argument("run", type=path_arg, help="a run folder (out_dir)")
    listing.add_argument("--json", action="store_true", help="one JSON object per checkpoint instead of a table")
    cons = commands.add_parser("consolidate", help="write a single-file copy of a checkpoint")
    cons.add_argument("source", type=path_arg, help="a run folder (its latest checkpoint) or a checkpoint folder")
    cons.add_argument("--out", default=None, type=path_arg,
                      help="output folder (default: RUN/consolidated/step_N for a checkpoint of a run, "
                           "given as the run or as RUN/checkpoints/step_N; CKPT_consolidated beside "
                           "a checkpoint folder outside a run)")
    cons.add_argument("--optimizer", action="store_true",
                      help="include the optimizer state (optimizer.pt), so training can resume from the copy")
    from ..cli import check_stdout, report_errors  # (gpt/cli.py imports this package: at the top, a cycle)

    def run() -> None:
        args = parser.parse_args(argv)
        if args.command == "list":
            check_stdout("the listing", "checkpoints.txt")
            rows = list_checkpoints(args.run)
            listing = "\n".join(json.dumps(row) for row in rows) if args.json else format_listing(args.run, rows)
            if not any(row["latest"] for row in rows):
                # `latest` names a missing or broken folder, which a resume and sample.py refuse:
                # said, with its fix, not only left unmarked in the listing.
                try:
                    latest_checkpoint(args.run)
                except (CheckpointError, OSError) as e:
                    print(f"warning: {e}", file=sys.stderr)
            write_result(listing, what="the listing")
            return
        # SIGTERM stops it as Ctrl-C does, removing the unfinished copy on the way out (a kill -9
        # leaves it to the next consolidate).
        try:
            with terminate_as_interrupt():
                out = consolidate(args.source, args.out, optimizer=args.optimizer)
        except OSError as e:
            # Reading the source (a write error is a CheckpointError already): one line, not a
            # traceback. Nothing was written.
            raise CheckpointError(f"could not consolidate {args.source} ({type(e).__name__}: {e}); "
                                  f"nothing was written") from e
        report(f"wrote {out}")

    # `consolidate` removes its unfinished copy on the way out (KeyboardInterrupt included), and
    # never writes into the source checkpoint; `list` writes nothing.
    consolidating = "consolidate" in (sys.argv[1:] if argv is None else argv)
    return report_errors(run, interrupted="interrupted: stopped consolidating; the checkpoint is unchanged "
                                          "and no unfinished copy was left behind" if consolidating
                                          else "interrupted: stopped listing")
