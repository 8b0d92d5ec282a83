"""Run configuration: one dataclass, filled from defaults <- a TOML file <- command-line overrides.

Every field of `TrainConfig` is a key of the TOML files in `configs/` and a `--key=value`
option of `train.py`. Unknown keys and ill-typed values are errors that name the key, so a
typo can never silently fall back to a default.

Also here: the batch arithmetic (grad_accum_steps, tokens_per_optimizer_step: what one optimizer
step trains on), and add_option, with which every script takes both spellings of an option
('-' and '_').
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import shlex
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key and what is allowed."""


def _opt(default: Any, help: str, choices: Sequence[str] | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


WANDB_PROJECT_FORBIDDEN = "/\\#?%:"  # as wandb.init's check of a project name
WANDB_TAG_MAX = 64  # characters in one wandb tag


def _of_type(value: Any, kind: type) -> bool:
    """Whether a key whose default is of `kind` may hold `value`: an int for a float key, never a
    bool for a number (True is an int to Python, and would pass as n_layer = 1)."""
    if kind in (int, float):
        return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    return isinstance(value, kind)


@dataclass
class TrainConfig:
    # --- where things live ---
    out_dir: str = _opt("out/default", "run folder: checkpoints/, metrics.jsonl, config.json")
    data_dir: str = _opt("data/stdlib", "dataset folder with train_*.bin / val_*.bin shards and meta.json")
    prepare_source: str = _opt(
        "stdlib",
        "what to prepare into data_dir when it holds no dataset: 'stdlib' (the embedded Python "
        "standard library corpus) or 'none' (never prepare; a missing dataset is an error)",
        ("stdlib", "none"),
    )
    prepare_tokenizer: str = _opt("bpe", "tokenizer to build when preparing data_dir (and the one the error for a "
                                        "missing dataset says to make)", ("bpe", "char"))
    prepare_vocab_size: int = _opt(4096, "BPE vocabulary size when preparing data_dir (prepare_tokenizer = bpe "
                                         "only: a char vocabulary has one id per distinct character)")
    init_from: str = _opt("", "start from these weights to fine-tune: a run folder, a checkpoint folder, or hf:DIR (a Hugging Face GPT-2 folder, whose architecture the model then takes); a smaller block_size than the checkpoint's fine-tunes at that context (the position table is cropped)")
    resume: str = _opt(
        "auto",
        "'auto' resumes from out_dir's latest checkpoint if there is one (step, optimizer, data "
        "position; changed settings are listed, those that cannot change are refused) and starts "
        "fresh if there is none; 'never' always starts fresh, and refuses an out_dir that already "
        "holds checkpoints",
        ("auto", "never"),
    )

    # --- hardware and precision ---
    device: str = _opt("auto", "device to train on", ("auto", "cpu", "cuda", "mps"))
    dtype: str = _opt(
        "auto",
        "compute precision; 'auto' is bfloat16 on CUDA GPUs that support it, float32 elsewhere (CPUs, Apple MPS)",
        ("auto", "float32", "bfloat16", "float16"),
    )
    compile: str = _opt(
        "auto",
        "torch.compile the model; 'auto' is on for CUDA GPUs and off elsewhere (on 2 CPU cores it "
        "cost 37 s to compile a 4 x 128 model and made its steps no faster)",
        ("auto", "true", "false"),
    )
    loss: str = _opt(
        "auto",
        "how the training loss is computed: 'chunked' a slice of rows at a time without the "
        "[batch, time, vocab] logits (gpt/loss.py; less memory traffic in eager mode), 'plain' one "
        "cross-entropy over the whole logits (which torch.compile fuses); 'auto' is plain where the "
        "whole model is compiled on a CUDA GPU (as fast there, and less peak memory: 9.1 vs 10.2 GB "
        "for GPT-2 124M at batch 16), chunked elsewhere",
        ("auto", "chunked", "plain"),
    )
    parallel: str = _opt(
        "auto", "multi-process strategy; 'auto' is ddp when launched on more than one process",
        ("auto", "none", "ddp", "fsdp"),
    )
    fsdp_reshard_after_forward: str = _opt(
        "auto",
        "parallel=fsdp: free each block's gathered weights after its forward and gather them again "
        "in backward; 'always' uses the least memory, 'never' the least communication, 'auto' "
        "frees all blocks but the last (backward needs it first)",
        ("auto", "always", "never"),
    )
    fsdp_cpu_offload: bool = _opt(
        False, "parallel=fsdp: keep sharded weights, gradients and optimizer state in CPU memory "
        "(the optimizer step runs on the CPU); for models that do not fit otherwise"
    )
    fsdp_reduce_dtype: str = _opt(
        "float32", "parallel=fsdp: precision of the gradient reduce-scatter", ("float32", "bfloat16"),
    )
    activation_checkpointing: bool = _opt(
        False, "recompute each block's activations in backward instead of storing them "
        "(about 1/3 more compute, much less activation memory)"
    )
    seed: int = _opt(1337, "seed for weights, dropout and data order")

    # --- model ---
    n_layer: int = _opt(4, "number of transformer blocks")
    n_head: int = _opt(4, "attention heads per block")
    n_embd: int = _opt(128, "embedding width")
    block_size: int = _opt(128, "context length in tokens")
    dropout: float = _opt(0.0, "dropout probability")
    bias: bool = _opt(True, "biases in Linear and LayerNorm layers")
    tie_weights: bool = _opt(True, "tie the output projection to the token embedding")
    attention: str = _opt("sdpa", "attention implementation; 'explicit' is the reference formula", ("sdpa", "explicit"))
    vocab_multiple: int = _opt(
        64, "round the model's vocabulary tables up to a multiple of this (GPT-2's 50257 -> 50304): "
        "matmul shapes GPUs run faster; the extra ids are never predicted; 1 = no padding")

    # --- data and batch ---
    batch_size: int = _opt(16, "micro-batch size per process (sequences)")
    tokens_per_step: int = _opt(
        0,
        "tokens per optimizer step across all processes; gradient accumulation makes up the "
        "difference (0: one micro-batch per process per step)",
    )
    data_order: str = _opt("random", "how training windows are drawn", ("random", "sequential"))

    # --- optimization ---
    max_steps: int = _opt(1000, "optimizer steps to train for")
    learning_rate: float = _opt(1e-3, "peak learning rate")
    min_lr: float = _opt(1e-4, "learning rate floor at the end of cosine decay")
    warmup_steps: int = _opt(100, "linear warmup steps")
    lr_decay_steps: int = _opt(0, "step at which cosine decay reaches min_lr (0: max_steps; else > warmup_steps)")
    weight_decay: float = _opt(0.1, "AdamW weight decay, applied to matrices only")
    optimizer: str = _opt(
        "adamw",
        "adamw: AdamW for every parameter; muon: Muon for the blocks' weight matrices (not "
        "decayed) and AdamW for embeddings, gains and biases (gpt/muon.py)",
        ("adamw", "muon"),
    )
    muon_lr: float = _opt(0.02, "optimizer=muon: peak step size of the Muon matrices (scheduled like learning_rate)")
    muon_momentum: float = _opt(0.95, "optimizer=muon: Nesterov momentum of the Muon matrices")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0: off)")
    nan_policy: str = _opt(
        "stop",
        "when a step's loss or gradient norm is not finite (NaN/Inf): 'stop' ends the run with an "
        "error naming the step and keeps the last checkpoint (none is saved after the bad step); "
        "'skip' drops that optimizer step (weights and AdamW state unchanged, the batch is "
        "consumed), counts it and logs it. Checked on the device every step, read at log steps",
        ("stop", "skip"),
    )
    max_skipped_steps: int = _opt(
        10, "nan_policy=skip: end the run with an error once more than this many steps were "
        "skipped in total (checked at log steps)"
    )

    # --- eval, logging, checkpoints ---
    eval_interval: int = _opt(250, "evaluate and checkpoint every this many steps (0: only at the end)")
    eval_iters: int = _opt(20, "validation batches per evaluation")
    log_interval: int = _opt(10, "print and record metrics every this many steps")
    keep_last: int = _opt(2, "checkpoints to keep (older ones are deleted after a new one is complete)")
    keep_best: bool = _opt(False, "also keep the checkpoint with the lowest val loss, beyond keep_last "
                                  "(`python -m gpt.checkpoint list RUN` shows which)")
    checkpoint_format: str = _opt(
        "auto",
        "how model and optimizer state are saved: 'full' gathers them to rank 0, which writes "
        "model.safetensors + optimizer.pt; 'sharded' has every rank write its own shard with "
        "torch.distributed.checkpoint (dcp/), needing no gather; 'auto' is sharded under "
        "parallel=fsdp and full otherwise. Either resumes on any number of processes "
        "(docs/checkpoints.md)",
        ("auto", "full", "sharded"),
    )
    async_checkpoint: bool = _opt(
        False,
        "copy the state to CPU memory at the step boundary and write the checkpoint in a "
        "background thread while training goes on (needs CPU memory for one more copy of the "
        "state; at most one save in flight)",
    )
    peak_tflops: float = _opt(
        0.0, "device peak TFLOP/s for MFU (0: look up the GPU, or measure a matmul on CPU)"
    )
    wandb_mode: str = _opt("disabled", "Weights & Biases logging", ("disabled", "offline", "online"))
    wandb_project: str = _opt("gpt", "Weights & Biases project")
    wandb_run_name: str = _opt("", "Weights & Biases run name ('': out_dir's name)")
    wandb_tags: str = _opt("", "Weights & Biases tags, comma-separated")

    def _only_with(self, key: str, value: str, names: tuple[str, ...]) -> None:
        """Refuse `names` set away from their defaults unless `key` is `value` (they do nothing else)."""
        if getattr(self, key) == value:
            return
        for name in names:
            if getattr(self, name) != _default(name):
                raise ConfigError(f"{name} = {getattr(self, name)!r} applies only with {key} = {value!r} "
                                  f"({key} is {getattr(self, key)!r})")

    def validate(self) -> "TrainConfig":
        """Reject impossible values with a message that names the key."""
        for f in fields(self):
            # Of the default's type (an int for a float key is fine): a TrainConfig built in Python
            # with max_steps="5" failed later with a TypeError far from the key.
            value, kind = getattr(self, f.name), type(f.default)
            if not _of_type(value, kind):
                raise ConfigError(f"{f.name} must be {'a' if kind is not int else 'an'} {kind.__name__}, "
                                  f"got {value!r} ({type(value).__name__})")
        for f in fields(self):
            _check_choice(f.name, getattr(self, f.name))
        for f in fields(self):
            value = getattr(self, f.name)
            # nan passes every comparison below (nan <= 0 is False), so refuse it first.
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
            # Python ints are unbounded; torch, numpy and the loader's arithmetic are int64.
            if isinstance(value, int) and abs(value) >= 1 << 63:
                raise ConfigError(f"{f.name} = {value} is too large (at most {(1 << 63) - 1})")
        for name in ("out_dir", "data_dir"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} must name a folder, got an empty string")
        if self.wandb_mode != "disabled":
            # wandb refuses these only in wandb.init, after the model is built; "team/gpt" (an
            # entity before the project, as wandb's URLs show it) is the usual mistake.
            bad = sorted({c for c in self.wandb_project if c in WANDB_PROJECT_FORBIDDEN})
            if bad:
                raise ConfigError(
                    f"wandb_project = {self.wandb_project!r}: a wandb project name cannot hold "
                    f"{', '.join(repr(c) for c in bad)}"
                    + (" (the team goes in WANDB_ENTITY, not before the project's name)" if "/" in bad else ""))
            check_wandb_tags(wandb_tags(self.wandb_tags))
        if os.path.realpath(os.path.expanduser(self.out_dir)) == os.path.realpath(os.path.expanduser(self.data_dir)):
            # The run's checkpoints beside the shards: the folder is then neither (data prep
            # refuses it as a run, and every listing of runs shows the dataset).
            raise ConfigError(f"out_dir and data_dir are the same folder ({self.out_dir}): the run would write "
                              f"its checkpoints and logs among the dataset's files; give the run a folder of its "
                              f"own (out_dir = out/NAME)")
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_steps",
                    "log_interval", "eval_iters", "keep_last", "prepare_vocab_size", "vocab_multiple")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        non_negative = ("tokens_per_step", "warmup_steps", "lr_decay_steps", "eval_interval",
                        "weight_decay", "grad_clip", "min_lr", "peak_tflops", "seed",
                        "max_skipped_steps")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.prepare_source != "none" and self.prepare_tokenizer == "bpe":
            # Token shards store ids as uint16; byte-level BPE needs the 256 bytes + end-of-text.
            if not 257 <= self.prepare_vocab_size <= 65536:
                raise ConfigError(
                    f"prepare_vocab_size must be between 257 and 65536 for the "
                    f"bpe tokenizer (uint16 token shards), got {self.prepare_vocab_size}"
                )
        # Keys that would be silently ignored otherwise: say so instead. (A char vocabulary is
        # one id per distinct character of the corpus: no size to choose.)
        self._only_with("prepare_tokenizer", "bpe", ("prepare_vocab_size",))
        self._only_with("nan_policy", "skip", ("max_skipped_steps",))
        self._only_with("parallel", "fsdp", ("fsdp_reshard_after_forward", "fsdp_cpu_offload", "fsdp_reduce_dtype"))
        self._only_with("optimizer", "muon", ("muon_lr", "muon_momentum"))
        if self.optimizer == "muon":
            if self.muon_lr <= 0:
                raise ConfigError(f"muon_lr must be positive, got {self.muon_lr}")
            if not 0.0 <= self.muon_momentum < 1.0:
                raise ConfigError(f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if 0 < self.lr_decay_steps <= self.warmup_steps:
            # learning_rate_at would jump from the peak at the end of warmup straight to min_lr.
            raise ConfigError(
                f"lr_decay_steps ({self.lr_decay_steps}) must be greater than warmup_steps "
                f"({self.warmup_steps}): the cosine decay runs from the end of warmup to lr_decay_steps "
                f"(0: to max_steps)"
            )
        if self.min_lr > self.learning_rate:
            raise ConfigError(f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------
# The batch: what one optimizer step trains on


def wandb_tags(text: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c'] (the config keeps tags as one comma-separated string)."""
    return [t.strip() for t in text.split(",") if t.strip()]


def check_wandb_tags(tags: Sequence[str]) -> None:
    """wandb refuses a tag over 64 characters only in wandb.init, after the model is built, and
    that was reported as a failed start with a hint to log in."""
    for tag in tags:
        if not 1 <= len(tag) <= WANDB_TAG_MAX:
            raise ConfigError(f"wandb_tags: the tag {tag[:70]!r} is {len(tag)} characters; wandb takes "
                              f"tags of 1 to {WANDB_TAG_MAX} characters")


def grad_accum_steps(config: TrainConfig, world_size: int) -> int:
    """How many micro-batches each process runs per optimizer step.

    micro_batch x block x accum x world = tokens_per_step, so one recipe trains the same model
    on 1 or 8 GPUs; only the split of the work changes.
    """
    per_micro_step = config.batch_size * config.block_size * world_size
    if config.tokens_per_step == 0:
        return 1
    if config.tokens_per_step % per_micro_step:
        lower = max(1, config.tokens_per_step // per_micro_step) * per_micro_step
        raise ConfigError(
            f"tokens_per_step ({config.tokens_per_step}) must be a multiple of batch_size x "
            f"block_size x processes = {config.batch_size} x {config.block_size} x {world_size} "
            f"= {per_micro_step}; for example {lower} or {lower + per_micro_step}"
        )
    return config.tokens_per_step // per_micro_step


def tokens_per_optimizer_step(config: TrainConfig, world_size: int) -> int:
    """Tokens in one optimizer step: all processes' micro-batches (tokens_per_step when set)."""
    return config.batch_size * config.block_size * grad_accum_steps(config, world_size) * world_size


# ----------------------------------------------------------------------------------------
# Parsing: TOML file and command line


TRUE_WORDS = ("true", "1", "yes", "on")  # how the command line may spell a bool
FALSE_WORDS = ("false", "0", "no", "off")


def _coerce(name: str, value: Any, typ: str, where: str, typed: bool = False) -> Any:
    """Check/convert one value to the field's type; `where` says where the value came from.

    `typed`: the value comes from a TOML file, which has real types, so it must already have the
    field's type (an integer also serves a float key, a boolean a tri-state string key such as
    `compile`); a quoted `n_layer = "2"` is a mistake, not a spelling of 2. Without it (the
    command line, where every value arrives as a string) strings are converted.
    """
    if typ == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and not typed and value.lower() in TRUE_WORDS:
            return True
        if isinstance(value, str) and not typed and value.lower() in FALSE_WORDS:
            return False
    elif typ == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and not typed:
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif typ == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # a TOML integer of hundreds of digits
                raise ConfigError(f"{where}: {name} must be a finite number, got an integer of "
                                  f"{len(str(abs(value))):,} digits") from None
        if isinstance(value, str) and not typed:
            try:
                return float(value)
            except ValueError:
                pass
    elif typ == "str":
        tri_state = {"true", "false"} <= set(TrainConfig.__dataclass_fields__[name].metadata.get("choices") or ())
        if isinstance(value, str):
            # --compile=True or =1 as a bool key would take them (a TOML string stays as written).
            if tri_state and not typed and value.lower() in TRUE_WORDS + FALSE_WORDS:
                return "true" if value.lower() in TRUE_WORDS else "false"
            return value
        if tri_state and isinstance(value, bool):  # `compile = true` in TOML: a tri-state key given a bool
            return "true" if value else "false"
    kind = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}[typ]
    hint = ""
    if typed and isinstance(value, str) and typ != "str":
        # What the command line would have made of it, written as a TOML value.
        try:
            meant = _coerce(name, value, typ, where)
        except ConfigError:
            hint = " (a string)"
        else:
            literal = str(meant).lower() if typ == "bool" else repr(meant)
            hint = f" (a string; write {name} = {literal} without quotes)"
    raise ConfigError(f"{where}: {name} must be {kind}, got {value!r}{hint}")


def _default(name: str) -> Any:
    return TrainConfig.__dataclass_fields__[name].default


def _field_types() -> dict[str, str]:
    # `from __future__ import annotations` makes f.type a string such as "int".
    return {f.name: str(f.type) for f in fields(TrainConfig)}


def _unknown_key(name: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(name, _field_types().keys(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"{where}: unknown key {name!r}{hint}; `python train.py --help` lists every key")


def _check_choice(key: str, value: Any, where: str = "") -> None:
    choices = TrainConfig.__dataclass_fields__[key].metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}{key} = {value!r} is not allowed; choose one of {', '.join(choices)}")


def apply_overrides(config: TrainConfig, values: dict[str, Any], where: str, *,
                    typed: bool = False) -> TrainConfig:
    """Set `values` on `config`. `where` names their source in errors; `typed`: they come from a
    TOML file and must already have each key's type (strings are not converted, see `_coerce`)."""
    types = _field_types()
    updates, spelled = {}, {}
    for name, value in values.items():
        key = name.replace("-", "_")
        if key not in types:
            raise _unknown_key(name, where)
        if key in spelled:
            # TOML sees `n_layer` and `n-layer` as two keys; one would silently win over the other.
            raise ConfigError(f"{where}: {key} is given twice, as {spelled[key]!r} and {name!r}; keep one")
        spelled[key] = name
        updates[key] = _coerce(key, value, types[key], where, typed)
        # Checked here as well as in validate(), which no longer knows which file a value came from.
        _check_choice(key, updates[key], f"{where}: ")
    return dataclasses.replace(config, **updates)


def load_toml(path: str | Path) -> dict[str, Any]:
    # '~' too: no shell expands it after '=' (--config=~/x.toml), as path_arg says for the others.
    path = Path(os.path.expanduser(path))
    try:
        with open(path, "rb") as f:
            # utf-8-sig: a byte-order mark (Windows Notepad writes one) is not TOML, and tomllib
            # refused it as "Invalid statement (at line 1, column 1)", naming nothing to fix.
            data = tomllib.loads(f.read().decode("utf-8-sig"))
    except FileNotFoundError:
        configs = sorted(p.name for p in Path("configs").glob("*.toml")) if Path("configs").is_dir() else []
        hint = f" (available in configs/: {', '.join(configs)})" if configs else ""
        raise ConfigError(f"config file {path} does not exist{hint}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:  # a folder, no permission, ...
        raise ConfigError(f"cannot read config file {path} ({e.strerror or e})") from None
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"{path}: tables are not used; put keys at the top level (found [{nested[0]}])")
    return data


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, naming the option meant for a mistyped one (`--temp`: did you mean
    --temperature?), as train.py does for its keys. sample.py, the tools and data prep use it.

    A command line it cannot parse (an option without its value, a missing argument) gets one
    line, `PROG: error: WHAT (PROG --help lists every option)`, exit 2: argparse printed its
    usage line first, 4 to 14 lines of every option, with the error under them."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists every option)\n")

    def parse_args(self, args=None, namespace=None):
        args = self._join_negative_numbers(list(sys.argv[1:] if args is None else args))
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            mine, theirs = self._long_options()
            hints = [_hint(e.split("=")[0], mine, theirs) for e in extras if e.startswith("--") and e != "--"]
            hint = "; ".join(dict.fromkeys(h for h in hints if h))
            self.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({hint})" if hint else ""))
        return parsed

    def _join_negative_numbers(self, args: list[str]) -> list[str]:
        """`--temperature -1e-3` as `--temperature=-1e-3` (see `join_negative_numbers`), for the
        options that take one value."""
        def takes_one(option: str) -> bool:
            action = self._option_string_actions.get(option)
            return isinstance(action, argparse._StoreAction) and action.nargs is None

        return join_negative_numbers(args, takes_one)

    def _long_options(self) -> tuple[dict[str, str], dict[str, str]]:
        """This parser's --options and its subcommands' (`consolidate ...`), each spelling mapped
        to the one its help shows first; --help left out."""
        def spellings(parser) -> dict[str, str]:
            return {o: next(s for s in action.option_strings if s.startswith("--"))
                    for o, action in parser._option_string_actions.items() if o.startswith("--") and o != "--help"}
        theirs: dict[str, str] = {}
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    theirs.update(spellings(sub))
        return spellings(self), theirs


def _hint(typed: str, mine: dict[str, str], theirs: dict[str, str]) -> str:
    """What `typed` is likely meant as: the options it is short for (`--temp`: --temperature,
    '-' and '_' alike), else the one it is a typo of; a subcommand's option given before it."""
    if typed in theirs and typed not in mine:
        return f"{typed} is an option of the subcommand: give it after the subcommand's name"
    options = {**theirs, **mine}
    flat = typed.replace("_", "-")
    meant = list(dict.fromkeys(primary for o, primary in options.items() if o.replace("_", "-").startswith(flat)))
    if not meant:
        meant = [options[m] for m in difflib.get_close_matches(typed, list(options), n=1)]
    if not meant:
        return ""
    shown = ", ".join(meant[:5]) + (", ..." if len(meant) > 5 else "")
    return f"did you mean {shown}?"


def path_arg(value: str) -> str:
    """The argparse type of the tools' file and folder options: '~' expanded, as train.py does for
    out_dir and data_dir. A shell leaves `--out=~/x` (and a quoted "~/x") alone: the tools made
    a folder named '~' in the current one, or said the path did not exist. An empty value
    (`--out=$UNSET_VARIABLE`) is refused: data prep wrote its dataset into the current folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must name a file or folder, got an empty string")
    return os.path.expanduser(value)


def path_or_default_arg(value: str) -> str:
    """`path_arg` for an option whose empty value means its default (sample.py --prompt_file:
    --prompt; gpt.plot --out: beside the metrics), as a wrapper passing an unset variable gives."""
    return os.path.expanduser(value) if value.strip() else ""


def add_option(parser, name: str, **kwargs) -> None:
    """Add option `name` to `parser` (or an argument group) under both spellings, '-' and '_'
    (--val-fraction and --val_fraction), the one given first; its `dest` is spelled with '_'.
    train.py, sample.py, data_prep/ and the python -m gpt.* commands take both (users of nanoGPT
    type '_', of most tools '-'); the benchmark scripts take '-' alone."""
    name = name.removeprefix("--")
    other = name.replace("-", "_") if "-" in name else name.replace("_", "-")
    spellings = [f"--{name}"] + ([f"--{other}"] if other != name else [])
    parser.add_argument(*spellings, dest=name.replace("-", "_"), **kwargs)


class _TrainParser(argparse.ArgumentParser):
    """train.py's: a command line argparse cannot parse (`--max_steps` without its value) is a
    ConfigError, one `error: command line: ...` line as for every other key, not argparse's
    usage of every key (22 lines) above the error."""

    def error(self, message: str):
        raise ConfigError(f"command line: {message} (python train.py --help lists every key)")


def _as_run_takes(f, value: Any, path: str) -> Any:
    """A config file's value as a run takes it (`compile = true` runs as 'true'), for the help;
    as written where the run would refuse it (it says why then)."""
    try:
        return _coerce(f.name, value, str(f.type), str(path), typed=True)
    except ConfigError:
        return value


def build_parser(default_config: str | None = None, shown_config: str | None = None) -> argparse.ArgumentParser:
    """train.py's parser. Each key's help gives the value a run would start from: the config
    file's (`shown_config`, the --config given with --help, else `default_config`) where it sets
    the key, and the built-in default."""
    parser = _TrainParser(
        prog="train.py",
        description=(
            "Train a GPT. Settings come from dataclass defaults, then --config FILE, then "
            "--key=value overrides (keys may be spelled with '_' or '-'; a key given twice takes the "
            "last value, so a script's settings can be overridden by appending to its command)."
        ),
        allow_abbrev=False,
    )
    # What a plain run uses: the default config file's value where it sets the key. A file that
    # cannot be read is reported by the run that uses it (parse_args); here it only loses its
    # values in the help, so that `--config other.toml` runs, which never read it, still start.
    from_file: dict[str, Any] = {}
    problem = None  # why the shown file's values cannot be shown
    shown = default_config if shown_config is None else shown_config
    shown = shown and os.path.expanduser(shown)  # as load_toml reads it
    if shown and Path(shown).is_file():
        try:
            # Keys spelled with '-' are the same keys, as apply_overrides reads them.
            from_file = {key.replace("-", "_"): value for key, value in load_toml(shown).items()}
        except ConfigError as e:
            problem = f"cannot be used now: {e}"
    elif shown:
        problem = "is a folder, not a file" if Path(shown).is_dir() else "does not exist"
    unreadable = given = ""
    if shown_config:  # `--config X --help`: the values below are X's, or, X being unusable, the built-in ones
        given = (f"; {shown_config} {problem}: the defaults below are the built-in ones" if problem
                 else f"; the defaults below are {shown_config}'s")
    elif problem and Path(shown).is_file():  # the default file (one that is missing goes unsaid)
        unreadable = f"; it {problem}"
    parser.add_argument(
        "--config", default=default_config,
        help=("TOML file of settings (see configs/)" + (f" (default: {default_config}; --config= for none{unreadable})"
                                                          if default_config else "") + given).replace("%", "%%"),
    )
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        choices = f.metadata.get("choices")
        help_text = f.metadata["help"]
        if choices:
            help_text += f" {{{', '.join(choices)}}}"
        # A bool alone (`--activation_checkpointing`) means true, as flags do elsewhere; so does
        # a tri-state key whose choices include true (`--compile`, as `--compile=true`).
        tri_state = {"true", "false"} <= set(choices or ())
        flag = {"nargs": "?", "const": "true"} if str(f.type) == "bool" or tri_state else {}
        add_option(
            parser, f.name, default=None, metavar=str(f.type).upper(), **flag,
            # argparse %-formats help texts: a '%' in a value of the default config file
            # (wandb_run_name = "lr 50%") made --help fail with a ValueError traceback.
            help=(f"{help_text} (default: " + (
                f"{_as_run_takes(f, from_file[f.name], shown)!r} from {Path(shown).name}, "
                f"built in {getattr(defaults, f.name)!r})"
                if f.name in from_file else f"{getattr(defaults, f.name)!r})")).replace("%", "%%"),
        )
    return parser


def parse_args(argv: Sequence[str] | None = None, default_config: str | None = None) -> TrainConfig:
    """defaults <- --config TOML <- --key=value; then '~' expanded (expand_home) and validate."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--config X --help` shows X's values (argparse answers --help before it has read --config).
    asked_help = any(a in ("-h", "--help") for a in argv)
    parser = build_parser(default_config, _config_given(argv) if asked_help else None)
    args, unknown = parser.parse_known_args(join_negative_numbers(argv, _train_key_takes_value))
    if unknown:
        name = unknown[0].lstrip("-").split("=")[0]
        if not unknown[0].startswith("--") and name.replace("-", "_") in TrainConfig.__dataclass_fields__:
            # `n_layer=2` or `-n_layer=2`: said to be an unknown key 'n_layer' (did you mean n_layer?).
            raise ConfigError(f"command line: {unknown[0]!r} needs two dashes: --{unknown[0].lstrip('-')}")
        if not unknown[0].startswith("-") and unknown[0].endswith(".toml"):
            # `train.py configs/x.toml`: a config file is named with --config.
            raise ConfigError(f"command line: {unknown[0]!r} is not an option; to read a config file, "
                              f"name it with --config: python train.py --config {shlex.quote(unknown[0])}")
        raise _unknown_key(name, "command line")
    given = [a for a in argv if a == "--config" or a.startswith("--config=")]
    if len(given) > 1:
        # argparse kept the last file and silently dropped every setting of the others.
        raise ConfigError(f"command line: --config is given {len(given)} times; settings come from one file "
                          f"(the others would be ignored): merge them into one, or override single keys "
                          f"with --key=value")
    config = TrainConfig()
    from_file: dict[str, Any] = {}
    if args.config:
        from_file = load_toml(args.config)
        config = apply_overrides(config, from_file, str(args.config), typed=True)
    cli = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    config = apply_overrides(config, cli, "command line")
    try:
        config = expand_home(config).validate()
    except ConfigError as e:
        # validate() sees only the merged settings; an error about keys that the file set (and
        # the command line left alone) names the file, as a wrong type or choice there does.
        # One naming a key given on the command line too (n_embd from the file, n_head from
        # --n_head) does not: the file was not what changed.
        named = set(re.findall(r"[a-z_0-9]+", str(e))) & set(_field_types())
        in_file = {name.replace("-", "_") for name in from_file}
        if named & in_file and not named & set(cli):
            raise ConfigError(f"{args.config}: {e}") from None
        raise
    check_launch_environment(os.environ)
    # tokens_per_step against the processes torchrun starts, before data prep and loading rather
    # than after them (the trainer checks it again against its process group).
    grad_accum_steps(config, int(os.environ.get("WORLD_SIZE", "1")))
    return config


def _config_given(argv: Sequence[str]) -> str | None:
    """The value of the last --config in `argv` ("" for --config= alone), or None without one."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            value = arg[len("--config="):]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def join_negative_numbers(argv: Sequence[str], takes_value: Callable[[str], bool]) -> list[str]:
    """`--key -1e-3` as `--key=-1e-3` where `takes_value("--key")`: argparse takes a value that
    starts with '-' for an option unless it looks like a plain negative number (-1, -0.5), and
    answered `--learning_rate -1e-3` with "expected one argument" instead of the key's own error."""
    out: list[str | None] = list(argv)
    for i in range(len(out) - 1):
        if out[i] is None:  # the value joined to the key before it
            continue
        if out[i].startswith("--") and "=" not in out[i] and takes_value(out[i]) and out[i + 1].startswith("-"):
            try:
                float(out[i + 1].replace("_", ""))
            except ValueError:
                continue
            out[i], out[i + 1] = f"{out[i]}={out[i + 1]}", None
    return [a for a in out if a is not None]


def _train_key_takes_value(option: str) -> bool:
    """train.py's keys that take a value after a space: all but the bool ones (a flag alone)."""
    types = _field_types()
    key = option[2:].replace("-", "_")
    return key in types and types[key] != "bool"


LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")  # integers that torchrun sets
RENDEZVOUS_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what env:// needs


def check_launch_environment(environ: Any) -> None:
    """Refuse torchrun's variables set in a way gpt/distributed.py cannot use, naming the variable:
    a non-integer WORLD_SIZE or RANK failed with a ValueError traceback, and a WORLD_SIZE > 1 (or
    RANK with MASTER_ADDR) left over in a shell without torchrun's other variables failed in
    torch.distributed's rendezvous with one."""
    for name in LAUNCH_VARIABLES:
        value = environ.get(name)
        try:
            valid = value is None or int(value) >= 0
        except ValueError:
            valid = False
        if not valid:
            raise ConfigError(f"environment variable {name}={value!r} is not a non-negative integer; torchrun "
                              f"sets it: unset it to train in one process")
    world_size = int(environ.get("WORLD_SIZE", "1"))
    if world_size == 0:
        raise ConfigError("environment variable WORLD_SIZE=0: the number of processes must be at least 1; "
                          "unset it to train in one process")
    launched = "RANK" in environ and "MASTER_ADDR" in environ  # as gpt/distributed.py decides
    missing = [name for name in RENDEZVOUS_VARIABLES if name not in environ]
    if (world_size > 1 or launched) and missing:
        raise ConfigError(
            f"environment variables WORLD_SIZE={environ.get('WORLD_SIZE', '(unset)')}, RANK="
            f"{environ.get('RANK', '(unset)')} ask for a multi-process run, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: launch with `torchrun --nproc_per_node=N "
            f"train.py ...`, or unset WORLD_SIZE and RANK to train in one process")
    if "RANK" in environ and int(environ["RANK"]) >= world_size:  # a RANK left over from another job, too
        raise ConfigError(f"environment variable RANK={environ['RANK']} must be less than WORLD_SIZE="
                          f"{environ.get('WORLD_SIZE', '(unset: 1)')}; torchrun sets both: unset RANK to "
                          f"train in one process")


def expand_home(config: TrainConfig) -> TrainConfig:
    """'~' in the folders, as a shell would have expanded it: it does not in `--out_dir=~/x`
    (after '=') nor in a TOML file, where it made a folder named '~' in the working directory."""
    folders = (config.out_dir, config.data_dir, config.init_from)
    if not all(isinstance(v, (str, os.PathLike)) for v in folders):
        return config  # a TrainConfig built in Python with another type: validate() names it
    out_dir, data_dir, init_from = (os.fspath(v) for v in folders)  # a Path from Python: its str
    prefix = "hf:" if init_from.startswith("hf:") else ""  # gpt/hf.py HF_PREFIX (no torch here)
    return replace(config, out_dir=os.path.expanduser(out_dir), data_dir=os.path.expanduser(data_dir),
                   init_from=prefix + os.path.expanduser(init_from[len(prefix):]))


def early_config_error(argv: list[str], default_config: str | os.PathLike) -> int | None:
    """train.py's first parse, before torch imports (this module imports none): `--help` and a
    typo in a key are answered at once, not after the seconds torch takes to import (gpt.cli
    imports it). Returns the exit status for a bad configuration in a single process, else None:
    under torchrun the error is left to run_train, which prints it once per job (gpt/cli.py
    say_error), and a good configuration is parsed again there. --help exits here (SystemExit)."""
    try:
        parse_args(argv, default_config=str(default_config))
    except ConfigError as e:
        try:
            world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        except ValueError:  # what the error itself is about (check_launch_environment)
            world_size = 1
        if world_size > 1:
            return None
        print(f"error: {e}", file=sys.stderr, flush=True)  # as gpt/cli.py report_errors prints it
        return 2
    return None
