"""Consolidate: a sharded checkpoint (or any) copied into the single-file format (the command
is `python -m gpt.checkpoint consolidate`, gpt/checkpoint/commands.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..hf import HF_PREFIX
from .files import failed_write, remove_abandoned, seal_all, unfinished_copy
from .find import reading
from .layout import CHECKPOINTS_DIR, TOKENIZER_FILE, CheckpointError
from .load import read_model_state, read_optimizer_state
from .save import complete_folder, full_writer, read_tokenizer_json, write_weight_files
from .verify import read_state, verify_checkpoint


def default_consolidated_path(ckpt_dir: Path) -> Path:
    """out_dir/consolidated/step_N for a run's checkpoint (outside checkpoints/, so pruning and
    `latest` never touch it); CKPT_consolidated beside any other folder."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.parent.name == CHECKPOINTS_DIR:
        return ckpt_dir.parent.parent / "consolidated" / ckpt_dir.name
    return ckpt_dir.with_name(ckpt_dir.name + "_consolidated")


def consolidate(source: str | os.PathLike, out: str | os.PathLike | None = None, *,
                optimizer: bool = False) -> Path:
    """Write checkpoint `source` (a run folder or checkpoint folder, either format) as one
    single-file, device-agnostic checkpoint folder `out`: model.safetensors (CPU tensors),
    state.json, tokenizer.json, manifest.json, and with `optimizer` also optimizer.pt (then the
    folder resumes training like any full checkpoint). Reads in one process: needs CPU memory for
    the whole model (and optimizer state). Returns `out`."""
    if str(source).startswith(HF_PREFIX) and not Path(source).exists():
        raise CheckpointError(f"{source}: consolidate reads a sharded checkpoint of this project; a Hugging "
                              f"Face folder ('{HF_PREFIX}DIR', as init_from names one) is used as it is")
    with reading(source, hf_advice=(
            f"there is nothing to consolidate; a Hugging Face folder is used as it is, named with the "
            f"'{HF_PREFIX}' prefix (init_from = '{HF_PREFIX}{source}')")) as ckpt_dir:
        return _consolidate(ckpt_dir, out, optimizer)


def _consolidate(ckpt_dir: Path, out: str | os.PathLike | None, optimizer: bool) -> Path:
    verify_checkpoint(ckpt_dir)
    state = read_state(ckpt_dir)
    out = Path(out) if out is not None else default_consolidated_path(ckpt_dir)
    if out.exists():
        raise CheckpointError(f"{out} already exists; remove it or choose another --out")
    from ..run_layout import training_output

    inside = training_output(out)
    if inside is not None:  # keep_last would delete it with the checkpoint (or checkpoints/) it is in
        raise CheckpointError(f"--out {out} {inside}; choose another --out (the default is "
                              f"{default_consolidated_path(ckpt_dir)})")
    try:
        model_state = read_model_state(ckpt_dir)
        optimizer_state = read_optimizer_state(ckpt_dir) if optimizer else None
    except BaseException as e:
        if isinstance(e, CheckpointError) or type(e).__name__ != "CheckpointException":
            raise
        raise CheckpointError(f"{ckpt_dir}: could not read the checkpoint ({e})") from None
    state = {k: v for k, v in state.items() if k != "optimizer_param_groups"}
    state.update(format="full", consolidated_from=str(ckpt_dir))

    tmp = unfinished_copy(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(out)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        written = list(write_weight_files(tmp, full_writer(model_state, optimizer_state)))
        complete_folder(tmp, out, state, read_tokenizer_json(ckpt_dir / TOKENIZER_FILE), seal_all(written, tmp))
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not failed_write(e):
            raise
        # A full disk, a read-only folder, or a file where a folder of --out should be: nothing
        # of the source was changed, so only this copy failed.
        raise CheckpointError(
            f"could not write {out} ({type(e).__name__}: {e}); {ckpt_dir} is unchanged. Is the disk "
            f"full or {out.parent} not a writable folder? Fix that, or choose another --out"
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
