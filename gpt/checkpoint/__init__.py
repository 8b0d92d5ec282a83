"""Checkpoints that never lose work.

Layout of a run folder (docs/checkpoints.md has the whole story):

    out_dir/
      checkpoints/
        step_0000250/        one complete checkpoint, in one of two formats:
          model.safetensors    full: weights (safetensors: plain tensors, no code can hide in it)
          optimizer.pt         full: optimizer state, loaded with torch.load(weights_only=True)
          dcp/                 sharded: model + optimizer state as torch.distributed.checkpoint files,
            .metadata            written by every rank in parallel (one __RANK_0.distcp each);
            __0_0.distcp         any world size, or one process, can read them back
          state.json         step, tokens seen, loader position, every rank's RNG state, configs
          tokenizer.json     copy of the dataset's tokenizer, so a checkpoint samples on its own
          manifest.json      size and CRC-32 of every file above; written last
      latest                 the name of the newest complete checkpoint

Why it is safe to kill at any moment: a checkpoint is assembled in a hidden temporary folder
(by rank 0 alone, or by every rank for the sharded format), every file is fsynced, and only then
does rank 0 rename the folder to its final name (a rename is atomic on POSIX file systems).
`latest` is replaced the same way, after the rename, and old checkpoints are pruned only after
that (renamed to `.trash_*`, then deleted, in the background after a synchronous save). So
`latest` always names a complete checkpoint, and a crash mid-save leaves at worst a `.tmp_*` or
`.trash_*` folder that the next save removes.

The package, in the order a checkpoint lives:

    layout.py         the names above, CheckpointError, resolve_format, and quiet_dcp (the
                      warning filter around torch.distributed.checkpoint)
    files.py          fsync, checksums, permissions: what "written" means here
    state_json.py     RNG states and optimizer hyperparameters as plain JSON
    full_state.py     the whole model and optimizer state gathered (or scattered) under DDP,
                      FSDP or none, in the single-process format of the full files
    save.py           save_checkpoint (one process) and Checkpointer (the trainer's: full or
                      sharded, synchronous or in a background thread); it asks find.py
                      and verify.py what is there already
    find.py           latest_checkpoint, best_checkpoint, resolve_checkpoint, reading (held off pruning)
    verify.py         verify_checkpoint (files against the manifest), read_state
    dcp_read.py       the sharded format's files, read without unpickling anything
    load.py           load_model, load_model_weights / read_model_state (either format), load_checkpoint
                      (the trainer's resume)
    consolidation.py  consolidate: a sharded checkpoint to the single-file format
    listing.py        list_checkpoints: a run's checkpoints, their val loss, latest and best
    commands.py       `python -m gpt.checkpoint list|consolidate RUN`
"""

import sys

if sys.argv[:1] == ["-m"]:
    # `python -m gpt.checkpoint`: Python imports this package (and torch with it, a second or
    # more) before its __main__ runs, while sys.argv[0] is still "-m"; a Ctrl-C then printed a
    # traceback from torch's import machinery. One line instead, as the other tools give.
    from gpt.early_signals import ImportInterrupted

    ImportInterrupted.install("interrupted: stopped before reading the checkpoint; nothing was written")

from .commands import main
from .consolidation import consolidate, default_consolidated_path
from .dcp_read import read_dcp_metadata, read_sharded_state
from .files import failed_write, give_ordinary_permissions, remove_abandoned, unfinished_copy, write_text_atomic
from .find import best_checkpoint, complete_checkpoints, latest_checkpoint, reading, resolve_checkpoint
from .listing import list_checkpoints
from .layout import (CHECKPOINTS_DIR, DCP_DIR, DCP_METADATA, FORMATS, LATEST_FILE, MANIFEST_FILE, MODEL_FILE,
                     OPTIMIZER_FILE, STATE_FILE, STATE_VERSION, TOKENIZER_FILE, TRASH_PREFIX, CheckpointError, resolve_format,
                     step_dir_name, step_of)
from .load import check_model_config, load_checkpoint, load_model, load_model_weights, read_model_state, read_optimizer_state
from .save import Checkpointer, read_tokenizer_json, save_checkpoint
from .state_json import capture_rng_state, gather_rng_states, restore_rank_rng, restore_rng_state, rng_state_for
from .verify import (ALWAYS_IN_STATE, NOT_OURS, RESUME_NEEDS, checkpoint_format, read_manifest, read_state,
                     verify_checkpoint)

__all__ = [
    "ALWAYS_IN_STATE", "CHECKPOINTS_DIR", "DCP_DIR", "DCP_METADATA", "FORMATS", "LATEST_FILE", "MANIFEST_FILE",
    "MODEL_FILE", "NOT_OURS", "OPTIMIZER_FILE", "RESUME_NEEDS", "STATE_FILE", "STATE_VERSION", "TOKENIZER_FILE",
    "TRASH_PREFIX",
    "CheckpointError", "Checkpointer", "best_checkpoint", "capture_rng_state", "check_model_config", "checkpoint_format",
    "complete_checkpoints", "consolidate", "default_consolidated_path", "failed_write", "gather_rng_states", "list_checkpoints",
    "give_ordinary_permissions", "latest_checkpoint", "load_checkpoint", "load_model", "load_model_weights", "main",
    "read_dcp_metadata", "read_manifest", "read_model_state", "read_optimizer_state", "read_sharded_state",
    "read_state", "reading", "resolve_checkpoint", "resolve_format", "restore_rank_rng", "restore_rng_state",
    "read_tokenizer_json", "remove_abandoned", "rng_state_for", "save_checkpoint", "step_dir_name", "step_of",
    "unfinished_copy", "verify_checkpoint", "write_text_atomic",
]
