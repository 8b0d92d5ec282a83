"""A run that starts from a checkpoint: what it checks before any weights are read, and what it
says about settings that changed since.

Resuming continues a run exactly (same windows, same schedule), so the checkpoint must fit the
dataset and the settings that decide where the run is; init_from only needs the same vocabulary.
The trainer's `build_model` calls these; docs/checkpoints.md has the rules in prose.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint as ckpt
from . import hf
from .config import ConfigError, TrainConfig, tokens_per_optimizer_step
from .dataset import prepare_with_tokenizer_of
from .distributed import DistInfo, log
from .loader import TokenLoader
from .optim import learning_rate_at
from .shards import list_shards, read_header
from .tokenizer import same_vocab


def check_checkpoint_fits_data(source: Path, config: TrainConfig, meta: dict[str, Any],
                               resuming: bool, current_model: dict[str, Any] | None = None,
                               fingerprint: Callable[[], int] | None = None) -> dict[str, Any]:
    """A checkpoint must have been trained on this dataset's vocabulary (same ids for the same
    tokens); a resumed run must also read the same train split in the same window order, or it
    could not continue its exact window sequence. Reads state.json and both tokenizer.json
    files, and when resuming the train shards' headers and their token fingerprint
    (`TokenLoader.fingerprint`); returns state.json. `current_model`: the model config this run
    builds, whose differences from the checkpoint's (and another optimizer) a refusal names too:
    they were refused one at a time, each fix met by the next refusal. `fingerprint`: that of the
    run's own train loader, already open (a second loader maps every shard again: a dataset of
    30,000 shards a split then passed the system's limit of memory maps)."""
    try:
        state = ckpt.read_state(source)
    except (OSError, ValueError) as e:
        raise ckpt.CheckpointError(f"{source}: cannot read {ckpt.STATE_FILE} ({e})") from e
    data_dir = Path(config.data_dir)
    saved = state.get("dataset") or {}
    ours = data_dir / ckpt.TOKENIZER_FILE
    same = same_vocab(ours, source / ckpt.TOKENIZER_FILE)
    problem = None
    if same is not None:
        if not same:
            problem = f"its {ckpt.TOKENIZER_FILE} maps tokens to other ids than {ours}"
    elif saved and (saved.get("tokenizer"), saved.get("vocab_size")) != (meta.get("tokenizer"), meta.get("vocab_size")):
        problem = (f"it was trained on {saved.get('tokenizer')} tokens (vocab_size {saved.get('vocab_size')}), "
                   f"{data_dir} holds {meta.get('tokenizer')} tokens (vocab_size {meta.get('vocab_size')})")
    if problem:
        again = prepare_with_tokenizer_of(source, source / ckpt.TOKENIZER_FILE, data_dir, meta)
        # A resume continues the same data, so a dataset made again for it would be refused too:
        # training the model on this text is a new run from its weights.
        instead = (f"; to train it on this text instead, start a new run (another out_dir) with init_from = "
                   f"'{source}', on this text tokenized with its tokenizer ({again})" if resuming else
                   f", or tokenize this text with its tokenizer: {again}")
        raise ckpt.CheckpointError(
            f"{source} does not fit the dataset in {data_dir}: {problem}, so token ids would mean "
            f"other text to the model. Use the dataset it was trained on (data_dir "
            f"{state.get('train_config', {}).get('data_dir', '?')!r}, source "
            f"{saved.get('source', '?')!r}){instead}"
        )
    saved_model = state.get("model_config", {})
    if not resuming and config.block_size > saved_model.get("block_size", config.block_size):
        shape = _shape_problem(source, saved_model, current_model, init_from=True, context_said=True)
        raise ConfigError(
            f"block_size = {config.block_size} is larger than the {saved_model['block_size']} "
            f"positions the model in {source} (init_from) has position embeddings for; set "
            f"block_size = {saved_model['block_size']}" + (f". Also, {shape}" if shape else "")
        )
    if not resuming:
        return state
    loader_state = state.get("loader", {})
    train_tokens = sum(read_header(p) for p in list_shards(data_dir, "train"))
    mismatches = []
    if loader_state.get("num_tokens", train_tokens) != train_tokens:
        mismatches.append(f"train tokens: checkpoint {loader_state['num_tokens']:,} vs {data_dir} {train_tokens:,}")
    if loader_state.get("block_size", config.block_size) != config.block_size:
        # (Also the model's context, except where it took its shape from hf:DIR: then only here.)
        mismatches.append(f"block_size: checkpoint {loader_state['block_size']} vs config {config.block_size}, "
                          f"the length of the windows it reads; resume with --block_size="
                          f"{loader_state['block_size']}")
    if loader_state.get("order", config.data_order) != config.data_order:
        mismatches.append(f"data_order: checkpoint {loader_state['order']!r} vs config {config.data_order!r}")
    if loader_state.get("seed", config.seed) != config.seed:
        # Sequential order reads the train windows without it, but the val batches are drawn with
        # it: a new seed would evaluate on other windows, and val losses across the resume would
        # not compare (dropout's generator is the checkpoint's either way).
        val = "" if config.data_order == "random" else " (it picks the val batches)"
        mismatches.append(f"seed: checkpoint {loader_state['seed']} vs config {config.seed}{val}")
    # As many tokens, but other ones (prepared again with another --seed or input): checked here,
    # before any weights are read, as well as by the loader itself.
    if not mismatches and "fingerprint" in loader_state and (
            (fingerprint or TokenLoader(data_dir, "train", 1, config.block_size).fingerprint)()
            != loader_state["fingerprint"]):
        mismatches.append(f"train tokens: {data_dir} holds as many as the checkpoint's dataset, but not "
                          f"the same ones (it was prepared again: another input, --seed or split rule)")
    if mismatches:
        started = str((state.get("train_config") or {}).get("init_from") or "")
        if hf.HF_PREFIX in (config.init_from[:len(hf.HF_PREFIX)], started[:len(hf.HF_PREFIX)]):
            # Its shape is the hf folder's (the checkpoint's), not this config's: the trainer takes
            # it from the checkpoint, or check_resumed_model says to name the folder again.
            current_model = None
        # A block_size difference is listed above already (the model's context is the windows').
        listed = "block_size" in loader_state and loader_state["block_size"] != config.block_size
        shape = _shape_problem(source, saved_model, current_model, context_said=listed)
        optimizer = _other_optimizer(state, config)
        also = "".join(f". Also, {problem}" for problem in (shape, optimizer) if problem)
        # A new run from its weights needs its model's shape (init_from refuses another).
        new_run = "" if shape else f", or start a new run from its weights: --init_from={shlex.quote(str(source))} --out_dir=ANOTHER_FOLDER"
        raise ckpt.CheckpointError(
            f"cannot resume {source}: the run would not read the data it was reading "
            f"({'; '.join(mismatches)}){also}. Use the checkpoint's dataset and settings{new_run}"
        )
    return state


def _shape_problem(source: Path, saved_model: dict[str, Any], current_model: dict[str, Any] | None,
                   init_from: bool = False, context_said: bool = False) -> str | None:
    """What ckpt.check_model_config says of this run's model against the checkpoint's, or None.
    `context_said`: block_size aside, its difference named by the caller already."""
    if current_model is None or not saved_model:
        return None
    if context_said and "block_size" in saved_model:
        current_model = dict(current_model, block_size=saved_model["block_size"])
    try:
        ckpt.check_model_config(source, saved_model, current_model, init_from=init_from)
    except ckpt.CheckpointError as e:
        return str(e)
    return None


def check_resumed_model(resume_from: Path, saved: dict[str, Any], current: dict[str, Any],
                        config: TrainConfig) -> None:
    """`ckpt.check_model_config` for a resume, saying so when the run took its shape from a
    Hugging Face folder that this command no longer names (its shape comes from init_from); and
    the optimizer it was trained with. Both in one error: a run from before an upgrade that
    changed both defaults (Muon, vocab_multiple) was refused twice, one setting at a time."""
    optimizer = _other_optimizer(saved, config)
    try:
        ckpt.check_model_config(resume_from, saved["model_config"], current)
    except ckpt.CheckpointError as e:
        message = str(e)
        started = (saved.get("train_config") or {}).get("init_from") or ""
        if not config.init_from and started.startswith(hf.HF_PREFIX):  # (the folder may be gone since)
            # Not the differences init_from settles: named again, it gives the run the
            # checkpoint's architecture and context whatever the config says ("block_size:
            # checkpoint 64 vs config 32" read as advice to change the windows' length, which the
            # resume refuses). Those it does not settle (vocab_multiple) are said with it: one try.
            message = (f"cannot resume {resume_from}: this run took its model's shape from init_from = "
                       f"{started!r}, which this command does not name: resume it with "
                       f"--init_from={shlex.quote(started)} as it started")
            settled = {k: saved["model_config"][k] for k in (*hf.ARCHITECTURE_KEYS, "block_size")
                       if k in saved["model_config"]}
            try:
                ckpt.check_model_config(resume_from, saved["model_config"], dict(current, **settled))
            except ckpt.CheckpointError as rest:
                message += f". Also, {rest}"
        if optimizer:
            message += f". Also, {optimizer}"
        raise ckpt.CheckpointError(message) from None
    if optimizer:
        raise ckpt.CheckpointError(f"cannot resume {resume_from}: {optimizer}, or start a new run from its "
                                   f"weights: --init_from={shlex.quote(str(resume_from))} --out_dir=ANOTHER_FOLDER")


def _other_optimizer(saved: dict[str, Any], config: TrainConfig) -> str | None:
    """What to say when the checkpoint was trained with another optimizer than this config's
    (their states differ). A checkpoint written by save_checkpoint from a caller's own loop may
    have no train_config: then loading its state is the check (Muon's does not fit AdamW's)."""
    train_config = saved.get("train_config")
    if not isinstance(train_config, dict):
        return None
    # The trainer recorded its optimizer from the day Muon came; before, every run was AdamW.
    trained = train_config.get("optimizer", "adamw")
    if trained == config.optimizer:
        return None
    return (f"it was trained with optimizer = {trained!r} and this config says {config.optimizer!r} "
            f"(their states differ): resume with --optimizer={trained}")


def note_changed_threads(saved: dict[str, Any], info: DistInfo) -> None:
    """Say so when a CPU run resumes on another number of torch threads: a matmul's sums are
    split over the threads, so the run goes on with other roundings (weights ~1e-6 apart after
    a few steps, val loss in the 6th decimal, measured at 2 x 64), not bit for bit."""
    threads = torch.get_num_threads()
    if info.device.type == "cpu" and isinstance(saved.get("cpu_threads"), int) and saved["cpu_threads"] != threads:
        log(info, f"note: the checkpoint was trained with {saved['cpu_threads']} CPU thread(s) per process, this "
                  f"run has {threads} (OMP_NUM_THREADS, or the cores it may use): it goes on at float "
                  f"rounding from where the uninterrupted run would be, not bit for bit")


def note_changed_batch(saved: dict[str, Any], config: TrainConfig, info: DistInfo) -> None:
    """Say so when the tokens per optimizer step differ from the checkpoint's. Without
    tokens_per_step they follow the number of processes (batch_size x block_size each): a run
    resumed on fewer GPUs would train on smaller batches with no setting changed."""
    saved_config = saved.get("train_config") or {}
    accum = (saved.get("log_interval") or {}).get("accum")
    factors = (saved_config.get("batch_size"), saved_config.get("block_size"), accum, saved.get("world_size"))
    if not all(isinstance(f, int) and not isinstance(f, bool) for f in factors):
        return  # a checkpoint from before these were recorded: nothing to compare
    before = factors[0] * factors[1] * factors[2] * factors[3]
    now = tokens_per_optimizer_step(config, info.world_size)
    if now != before:
        log(info, f"note: {now:,} tokens per optimizer step, the checkpoint's run took {before:,} "
                  f"({factors[3]} process(es) then, {info.world_size} now); the learning-rate schedule "
                  f"is unchanged. {keep_batch_advice(before, config, info.world_size)}")


def note_changed_val_set(saved: dict[str, Any], config: TrainConfig, info: DistInfo) -> None:
    """Say so when each eval will score other val windows than the checkpoint's run did. An eval
    reads the first eval_iters x batch_size x processes windows of the val loader's sequence
    (gpt/loader.py: the same ones at every eval), so a new batch_size or number of processes
    changes the set: val losses from then on compare with each other, not with those before, and
    keep_best would weigh checkpoints scored on different sets."""
    saved_config = saved.get("train_config") or {}
    factors = (saved_config.get("eval_iters"), saved_config.get("batch_size"), saved.get("world_size"))
    if config.eval_interval == 0 or not all(isinstance(f, int) and not isinstance(f, bool) for f in factors):
        return  # no evals, or a checkpoint from before these were recorded
    before = factors[0] * factors[1] * factors[2]
    per_batch = config.batch_size * info.world_size
    now = config.eval_iters * per_batch
    if now == before:
        return
    keep = (f"to score the same {before:,} windows, set eval_iters = {before // per_batch}" if before % per_batch == 0
            else f"no eval_iters scores the same windows with batch_size {config.batch_size} on "
                 f"{info.world_size} process(es)")
    log(info, f"note: each eval now scores {now:,} val windows (eval_iters {config.eval_iters} x batch_size "
              f"{config.batch_size} x {info.world_size} process(es)), the checkpoint's run {before:,}: val losses "
              f"from here compare with each other, not with those before"
              + (" (nor does keep_best's choice among them)" if config.keep_best else "") + f"; {keep}")


def keep_batch_advice(tokens: int, config: TrainConfig, world_size: int) -> str:
    """How to train on `tokens` per optimizer step on `world_size` processes. tokens_per_step
    alone can be refused (a multiple of batch_size x block_size x processes): 2,048 tokens on 2
    processes of 16 x 128 each is half a micro-batch, so a smaller batch_size must go with it."""
    per_row = config.block_size * world_size  # block_size cannot change on resume
    if tokens % (config.batch_size * per_row) == 0:
        return f"To keep its batch, set tokens_per_step = {tokens}"
    rows = tokens // per_row if tokens % per_row == 0 else 0
    fitting = [b for b in range(min(config.batch_size, rows), 0, -1) if rows % b == 0]
    if fitting:
        return f"To keep its batch, set tokens_per_step = {tokens} and batch_size = {fitting[0]}"
    return (f"No batch_size keeps its batch on {world_size} processes: {tokens:,} is not a multiple "
            f"of block_size x processes = {per_row:,}")


# Settings a resumed run may change without a note: where the run is, how it was started, and how a
# missing dataset would be made (they act before any data is read).
_QUIETLY_CHANGED = ("out_dir", "resume", "init_from", "prepare_source", "prepare_tokenizer", "prepare_vocab_size")
_SCHEDULE_KEYS = ("max_steps", "learning_rate", "min_lr", "warmup_steps", "lr_decay_steps", "muon_lr")


def _same_setting(saved: Any, value: Any) -> bool:
    """A checkpoint's setting against this config's. Older checkpoints saved some settings that
    are strings now as JSON bools (compile was true/false before "auto"): false is 'false'."""
    if isinstance(saved, bool) and isinstance(value, str):
        return value == str(saved).lower()
    return saved == value


def note_changed_settings(saved: dict[str, Any], config: TrainConfig, info: DistInfo,
                          step: int | None = None) -> None:
    """Say which settings differ from the checkpoint's: the resumed run trains with the new
    values (the ones that cannot change were refused before), so a run extended with a larger
    max_steps, say, visibly gets a new learning-rate schedule from the step it resumes at.

    With `step` (the checkpoint's), a changed schedule is also said in numbers: the learning
    rate the next step trains at, and the one the checkpoint's schedule gave it. Extending a
    finished run re-stretches the cosine, so the rate jumps from min_lr back up; the note says
    how to keep it at min_lr instead."""
    changes = [f"{key} {saved[key]!r} -> {value!r}" for key, value in config.to_dict().items()
               if key in saved and key not in _QUIETLY_CHANGED and not _same_setting(saved[key], value)]
    if not changes:
        return
    if step is not None and step >= config.max_steps:
        unused = [change for change in changes if not change.startswith("max_steps ")]  # said next
        if unused:
            log(info, f"note: settings differ from the checkpoint's ({', '.join(unused)}), but nothing is left "
                      f"to train: they are not used, and config.json keeps the settings the run trained with")
        return
    schedule = [key for key in _SCHEDULE_KEYS if key in saved and saved[key] != getattr(config, key)]
    if saved.get("lr_decay_steps") and config.lr_decay_steps:
        # The decay ends at lr_decay_steps, before and now: max_steps is not in the schedule.
        schedule = [key for key in schedule if key != "max_steps"]
    if config.optimizer != "muon":
        schedule = [key for key in schedule if key != "muon_lr"]  # validate refuses it set without Muon
    detail = ""
    if schedule and step is not None and step < config.max_steps:
        before = replace(config, **{key: saved[key] for key in _SCHEDULE_KEYS if key in saved})
        old, new = learning_rate_at(step, before), learning_rate_at(step, config)
        if not math.isclose(old, new, rel_tol=1e-9):
            detail = (f": step {step + 1} trains at lr {new:.2e}, where the checkpoint's schedule gave "
                      f"{old:.2e}")
            old_end = before.lr_decay_steps or before.max_steps
            if new > old and step >= old_end > before.warmup_steps and (config.lr_decay_steps or 0) != old_end:
                # The saved schedule had decayed to min_lr; ending the decay where it ended keeps it there
                # (with a warmup that ends before it: validate refuses lr_decay_steps <= warmup_steps).
                warmup = (f" and warmup_steps below it ({config.warmup_steps} now)"
                          if config.warmup_steps >= old_end else "")
                if config.min_lr > 0:
                    detail += (f"; that schedule had reached min_lr at step {old_end}: to stay at min_lr, set "
                               f"lr_decay_steps = {old_end}{warmup}")
                else:  # staying there would train at lr 0: steps that change nothing
                    detail += (f"; that schedule had reached min_lr at step {old_end}, and min_lr is 0 now: to go "
                               f"on at a low rate instead, set lr_decay_steps = {old_end}{warmup} and a min_lr "
                               f"above 0 (with min_lr = 0 the steps after it would train at lr 0 and change nothing)")
    log(info, f"note: resuming with settings changed since the checkpoint: {', '.join(changes)}; the run "
              f"goes on with the new values"
              + (f" (the learning-rate schedule, a function of the step, follows the new {', '.join(schedule)} "
                 f"from here{detail})" if schedule else ""))
