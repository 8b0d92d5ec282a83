"""Our GPT <-> Hugging Face GPT-2: the weight mapping, and reading a local GPT-2 folder.

The two models compute the same function; only names and one layout differ:

    ours                        Hugging Face GPT2LMHeadModel
    tok_emb.weight              transformer.wte.weight
    pos_emb.weight              transformer.wpe.weight
    blocks.i.ln1                transformer.h.i.ln_1
    blocks.i.attn.qkv           transformer.h.i.attn.c_attn     (transposed)
    blocks.i.attn.proj          transformer.h.i.attn.c_proj     (transposed)
    blocks.i.ln2                transformer.h.i.ln_2
    blocks.i.mlp.fc             transformer.h.i.mlp.c_fc        (transposed)
    blocks.i.mlp.proj           transformer.h.i.mlp.c_proj      (transposed)
    ln_f                        transformer.ln_f
    lm_head.weight              lm_head.weight                  (tied to wte: stored once)

"Transposed": GPT-2 was written with `Conv1D` layers that store a [in, out] matrix and compute
x @ W, where `nn.Linear` stores [out, in] and computes x @ W.T. The fused q, k, v order and the
head layout inside c_attn are the same as ours. GPT-2's MLP activation is "gelu_new" (the tanh
approximation); ours is the exact erf GELU, so an export says activation_function="gelu" and
the two models give equal logits. Importing a "gelu_new" model (e.g. OpenAI's released GPT-2)
works, with logits that differ slightly (the two GELUs differ by < 5e-4 per activation).

Reading a GPT-2 folder needs only safetensors and JSON, not the transformers library: both
the files transformers writes (keys "transformer.h.0...") and OpenAI's GPT-2 as uploaded to
the hub (keys "h.0...", plus causal-mask buffers "h.0.attn.bias" that are not weights) load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch

from .dataset import prepare_with_tokenizer_of
from .model import GPT, GPTConfig
from .run_layout import HF_WEIGHTS_FILES, is_checkpoint_folder, is_hf_model_folder, is_run_folder
from .tokenizer import same_vocab

HF_PREFIX = "hf:"
CONFIG_FILE = "config.json"
# model.safetensors; model.safetensors.index.json, a model saved in several shards;
# pytorch_model.bin, older uploads
WEIGHTS_FILE, WEIGHTS_INDEX_FILE, TORCH_WEIGHTS_FILE = HF_WEIGHTS_FILES
# Activations whose formula is GELU: "gelu" is ours exactly (so is "gelu_python", the same erf
# formula in Python); the others approximate it (each within 5e-4 of it).
EXACT_GELU = "gelu"
EXACT_GELUS = (EXACT_GELU, "gelu_python")
APPROXIMATE_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate")


class HFError(ValueError):
    """A Hugging Face folder or config does not fit this project's GPT; the message says why."""


# ----------------------------------------------------------------------------------------
# The name table, used in both directions


def weight_names(n_layer: int) -> list[tuple[str, str, bool]]:
    """(our name, HF name, transposed) for every weight of an n_layer GPT-2 (lm_head excluded)."""
    names = [("tok_emb.weight", "transformer.wte.weight", False),
             ("pos_emb.weight", "transformer.wpe.weight", False)]
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b, transposed in (("ln1", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
                                 ("attn.proj", "attn.c_proj", True), ("ln2", "ln_2", False),
                                 ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)):
            names.append((f"{ours}{a}.weight", f"{theirs}{b}.weight", transposed))
            names.append((f"{ours}{a}.bias", f"{theirs}{b}.bias", False))
    names += [("ln_f.weight", "transformer.ln_f.weight", False),
              ("ln_f.bias", "transformer.ln_f.bias", False)]
    return names


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's names and layout (contiguous fp32 copies, safe to save)."""
    check_gpt2_shape(model.config)
    ours = model.state_dict()
    # GPT-2's table has one row per id: padding rows (vocab_multiple) stay behind.
    ours["tok_emb.weight"] = ours["tok_emb.weight"][: model.config.vocab_size]
    out = {theirs: (ours[name].t() if transposed else ours[name]).float().contiguous().clone()
           for name, theirs, transposed in weight_names(model.config.n_layer)}
    # Tied: lm_head.weight is wte. HF reties it on load, so it is stored once, as HF does.
    # Untied (tie_word_embeddings false in config.json), it is a weight of its own.
    if not model.config.tie_weights:
        out["lm_head.weight"] = ours["lm_head.weight"][: model.config.vocab_size].float().contiguous().clone()
    return out


def _pad_vocab_rows(table: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """A [vocab_size, C] table with zero rows added up to the model's padded table size."""
    extra = config.padded_vocab_size - table.size(0)
    if table.size(0) != config.vocab_size or extra == 0:
        return table  # nothing to pad (or a size mismatch, which load_hf_weights reports)
    return torch.cat([table, table.new_zeros(extra, table.size(1))])


def from_hf_state_dict(tensors: dict[str, torch.Tensor], config: GPTConfig, where: str) -> dict[str, torch.Tensor]:
    """GPT-2 weights (either naming) -> our state_dict for `config`; names what is missing."""
    # OpenAI's upload has no "transformer." prefix; transformers' own saves have it.
    normalized = {}
    for key, value in tensors.items():
        if key.startswith("h.") or key.split(".")[0] in ("wte", "wpe", "ln_f"):
            key = "transformer." + key
        normalized[key] = value
    out: dict[str, torch.Tensor] = {}
    missing = []
    for name, theirs, transposed in weight_names(config.n_layer):
        if theirs not in normalized:
            missing.append(theirs)
            continue
        value = normalized[theirs]
        out[name] = value.t().contiguous() if transposed else value
    if "tok_emb.weight" in out:
        out["tok_emb.weight"] = _pad_vocab_rows(out["tok_emb.weight"], config)
    if config.tie_weights:
        head, embedding = normalized.get("lm_head.weight"), normalized.get("transformer.wte.weight")
        if head is not None and embedding is not None and not torch.equal(head, embedding):
            # transformers loads such a folder untied (with a warning): dropping the stored head
            # gave other logits than the peer's without a word.
            raise HFError(f"{where}: config.json ties the output layer to the token embedding "
                          f"(tie_word_embeddings true, or absent: its default), but the weights hold an "
                          f"lm_head.weight that differs from transformer.wte.weight; if the model is untied, "
                          f"set \"tie_word_embeddings\": false in config.json")
        out["lm_head.weight"] = out.get("tok_emb.weight")
    elif "lm_head.weight" in normalized:
        out["lm_head.weight"] = _pad_vocab_rows(normalized["lm_head.weight"], config)
    else:
        missing.append("lm_head.weight")
    if missing:
        raise HFError(f"{where}: weights missing for a {config.n_layer}-layer GPT-2: {missing[:5]}"
                      + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    used = {theirs for _, theirs, _ in weight_names(config.n_layer)} | {"lm_head.weight"}
    # Causal-mask buffers (attn.bias / attn.masked_bias) are constants, not weights.
    extra = [k for k in normalized if k not in used and not k.endswith(("attn.bias", "attn.masked_bias"))]
    if extra:
        raise HFError(f"{where}: weights that a GPT-2 of this shape does not have: {extra[:5]}")
    return out


# ----------------------------------------------------------------------------------------
# Export side: is our model something GPT2LMHeadModel can hold?


def check_gpt2_shape(config: GPTConfig) -> None:
    """Refuse models GPT2LMHeadModel cannot represent, naming each option that differs."""
    problems = []
    if not config.bias:
        problems.append("bias=False (GPT-2 has biases in every Linear and LayerNorm layer)")
    if problems:
        raise HFError("this model is not GPT-2-shaped, so it cannot be exported for Hugging Face "
                      "GPT2LMHeadModel: " + "; ".join(problems))


def hf_config_dict(config: GPTConfig, eos_id: int | None) -> dict[str, Any]:
    """The GPT2Config fields that describe our model (everything else keeps GPT-2's defaults)."""
    return {
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd, as ours
        "activation_function": EXACT_GELU,  # ours is nn.GELU() (erf); GPT-2's default is tanh
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "tie_word_embeddings": config.tie_weights,
        # A char vocabulary has no end-of-text token; GPT-2's default 50256 would be out of range.
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
    }


# ----------------------------------------------------------------------------------------
# Import side: a local GPT-2 folder -> our GPTConfig and weights


def parse_init_from(init_from: str) -> Path | None:
    """The folder of an `init_from = "hf:DIR"` setting, or None for any other value."""
    if not init_from.startswith(HF_PREFIX):
        return None
    if not init_from[len(HF_PREFIX):]:
        raise HFError(f"init_from = {init_from!r}: name a folder after '{HF_PREFIX}', e.g. {HF_PREFIX}models/gpt2")
    path = Path(init_from[len(HF_PREFIX):]).expanduser()
    if not path.is_dir():
        raise HFError(f"init_from = {init_from!r}: {path} is not a folder (expected a local "
                      f"Hugging Face GPT-2 folder with {CONFIG_FILE} and {WEIGHTS_FILE})")
    kind = project_folder_kind(path)
    if kind:
        # Its config.json is a training config, which would be misread as a GPT-2 config.
        raise HFError(f"init_from = {init_from!r}: {path} is {kind}, not a Hugging Face GPT-2 "
                      f"folder: name it without '{HF_PREFIX}'")
    return path


def project_folder_kind(path: str | os.PathLike) -> str | None:
    """'a run folder of this project' or 'a checkpoint folder of this project' when `path` is
    one (gpt/run_layout.py's rules: is_checkpoint_folder, is_run_folder), else None."""
    path = Path(path)
    if is_checkpoint_folder(path):
        return "a checkpoint folder of this project"
    if is_run_folder(path):
        return "a run folder of this project"
    return None


def hf_folder_hint(path: str | os.PathLike) -> str | None:
    """When `path`, given where a run or checkpoint of this project is expected, is a Hugging
    Face model folder instead (config.json and weights, no manifest.json or latest), what it is
    in words; else None. Without this the user reads only that it "holds no checkpoint"."""
    path = Path(path)
    if not path.is_dir() or (path / "manifest.json").exists() or (path / "latest").exists():
        return None
    if is_hf_model_folder(path):
        return f"{path} is a Hugging Face model folder, not a run or checkpoint of this project"
    return None


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(hf_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFError(f"{path} does not exist: not a Hugging Face model folder") from None
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise HFError(f"{path}: cannot read the model config ({e})") from e
    if not isinstance(config, dict):
        raise HFError(f"{path}: cannot read the model config (a JSON {type(config).__name__}, not an object)")
    return config


def gpt_config_from_hf(hf: dict[str, Any], where: str, *, dropout: float = 0.0,
                       attention: str = "sdpa") -> GPTConfig:
    """Our GPTConfig for a GPT-2 config.json; refuses what our model cannot compute.

    dropout and attention are training/implementation choices, not part of the weights, so
    they come from the caller.
    """
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise HFError(f"{where}: model_type is {model_type!r}; only GPT-2 ('gpt2') models can be loaded")
    n_embd = hf.get("n_embd", 768)
    if isinstance(n_embd, bool) or not isinstance(n_embd, int):  # null, "768": no TypeError below
        raise HFError(f"{where}: not a model this project can build: n_embd must be an integer, got {n_embd!r}")
    problems = []
    activation = hf.get("activation_function", "gelu_new")
    if activation not in EXACT_GELUS + APPROXIMATE_GELUS:
        # quick_gelu (up to 0.02 off) and clipped ones such as gelu_10 are not close enough.
        problems.append(f"activation_function={activation!r} (ours is exact GELU; loadable: "
                        f"{', '.join(EXACT_GELUS + APPROXIMATE_GELUS)})")
    if hf.get("n_inner") not in (None, 4 * n_embd):
        problems.append(f"n_inner={hf['n_inner']} (ours is 4 * n_embd = {4 * n_embd})")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if (isinstance(eps, bool) or not isinstance(eps, (int, float))  # null or "1e-5": no TypeError
            or not math.isclose(eps, 1e-5, rel_tol=1e-6)):
        problems.append(f"layer_norm_epsilon={eps!r} (ours is 1e-5)")
    if not hf.get("scale_attn_weights", True):
        problems.append("scale_attn_weights=false (ours scales by 1/sqrt(head size))")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=true")
    if hf.get("add_cross_attention", False):
        problems.append("add_cross_attention=true")
    if problems:
        raise HFError(f"{where}: this GPT-2 variant differs from our model: " + "; ".join(problems))
    try:
        return GPTConfig(
            vocab_size=hf.get("vocab_size", 50257),
            block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            n_embd=n_embd,
            dropout=dropout,
            bias=True,
            tie_weights=hf.get("tie_word_embeddings", True),
            attention=attention,
        )
    except (ValueError, TypeError) as e:  # e.g. n_embd not divisible by n_head: a broken config.json
        raise HFError(f"{where}: not a model this project can build: {e}") from None


def activation_note(hf: dict[str, Any]) -> str | None:
    """A one-line warning when the folder's GELU is an approximation of ours, else None."""
    activation = hf.get("activation_function", "gelu_new")
    if activation in EXACT_GELUS:
        return None
    return (f"note: the model was trained with activation_function={activation!r} (tanh "
            f"approximation of GELU); ours computes exact GELU, so logits differ slightly from the "
            f"original (fine for fine-tuning and sampling)")


def read_hf_weights(hf_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a GPT-2 folder: model.safetensors, a sharded index, or pytorch_model.bin."""
    hf_dir = Path(hf_dir)
    single, index, legacy = hf_dir / WEIGHTS_FILE, hf_dir / WEIGHTS_INDEX_FILE, hf_dir / TORCH_WEIGHTS_FILE
    if single.exists():
        return _load_safetensors(single)
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # ValueError: JSON, UTF-8
            raise HFError(f"{index}: cannot read the shard index ({e})") from e
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (hf_dir / shard).is_file():
                raise HFError(f"{hf_dir / shard}: missing; {index} lists it as one of the model's "
                              f"{len(shards)} shards (copy or download the folder again)")
            tensors.update(_load_safetensors(hf_dir / shard))
        return tensors
    if legacy.exists():
        try:
            # weights_only: a pickle that tries to build arbitrary objects (run code) is refused.
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            # torch's own message is long and advises unpickling anyway: the type name is enough.
            raise HFError(f"{legacy}: cannot load it as plain tensors ({type(e).__name__}): a "
                          f"damaged file, or a pickle "
                          f"holding more than tensors, which is never unpickled (it could run code); "
                          f"convert the folder to {WEIGHTS_FILE} where you trust it") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise HFError(f"{legacy}: expected a state dict (names -> tensors), found {type(tensors).__name__}")
        return tensors
    raise HFError(f"{hf_dir}: no weights ({WEIGHTS_FILE}, {WEIGHTS_INDEX_FILE} or {TORCH_WEIGHTS_FILE})")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as e:  # SafetensorError is no ValueError: without this, a traceback
        raise HFError(f"{path}: not a readable safetensors file ({e}); the file is damaged or "
                      f"incomplete (copy or download it again)") from None


def load_hf_weights(model: GPT, hf_dir: str | os.PathLike) -> None:
    """Copy a GPT-2 folder's weights into `model` (whose config must match the folder's)."""
    hf_dir = Path(hf_dir)
    state = from_hf_state_dict(read_hf_weights(hf_dir), model.config, str(hf_dir))
    expected = model.state_dict()
    for name, value in state.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise HFError(f"{hf_dir}: {name} has shape {tuple(value.shape)}, the model from "
                          f"{CONFIG_FILE} expects {tuple(expected[name].shape)}")
    with torch.no_grad():
        for name, value in state.items():
            expected[name].copy_(value)  # state_dict tensors share storage with the parameters


def load_hf_model(hf_dir: str | os.PathLike, *, dropout: float = 0.0, attention: str = "sdpa",
                  log: Callable[[str], None] | None = None) -> GPT:
    """Our GPT, built from a GPT-2 folder's config.json and filled with its weights."""
    hf = read_hf_config(hf_dir)
    model = GPT(gpt_config_from_hf(hf, str(Path(hf_dir) / CONFIG_FILE), dropout=dropout, attention=attention))
    load_hf_weights(model, hf_dir)
    note = activation_note(hf)
    if note and log is not None:
        log(note)
    return model


# The run-config keys a Hugging Face folder decides for `init_from = "hf:DIR"` (block_size is
# the run's training window, which may be shorter than the folder's context).
ARCHITECTURE_KEYS = ("n_layer", "n_head", "n_embd", "bias", "tie_weights")


def init_from_hf(hf_dir: Path, gpt_config: GPTConfig, data_vocab_size: int,
                 log: Callable[[str], None], *, data_tokenizer: Path) -> GPTConfig:
    """The model config of a run with `init_from = "hf:DIR"`: the architecture is the folder's.

    Prints which model keys of the run config were replaced by the folder's, and refuses a
    dataset whose vocabulary differs (token ids would mean different things to the model): in
    size, or, where the folder and the dataset (`data_tokenizer`) both have a tokenizer.json, in
    which ids stand for which tokens.
    """
    where = str(hf_dir / CONFIG_FILE)
    hf = read_hf_config(hf_dir)
    new = gpt_config_from_hf(hf, where, dropout=gpt_config.dropout, attention=gpt_config.attention)
    new = dataclasses.replace(new, vocab_multiple=gpt_config.vocab_multiple)  # the run's padding
    own = Path(hf_dir) / "tokenizer.json"

    def again() -> str:
        """The command that tokenizes the dataset's text with the folder's tokenizer, where it has one."""
        return f": {prepare_with_tokenizer_of(hf_dir, own, data_tokenizer.parent)}" if own.is_file() else ""

    if new.vocab_size != data_vocab_size:
        raise HFError(
            f"{where} has vocab_size {new.vocab_size}, but the dataset's vocabulary has "
            f"{data_vocab_size} ids. A model trained on one vocabulary needs data tokenized with "
            f"the same tokenizer (for OpenAI's GPT-2: GPT-2's tokenizer, e.g. llm.c FineWeb shards){again()}"
        )
    # Two vocabularies of one size (two BPEs of 512 ids, two char tables): the same ids, other
    # text. A run folder as init_from was refused so (gpt/resume.py); hf:DIR was not.
    if same_vocab(data_tokenizer, own) is False:
        raise HFError(f"{own} maps tokens to other ids than {data_tokenizer}, so token ids would mean "
                      f"other text to the model: use data prepared with the folder's tokenizer{again()}")
    if gpt_config.block_size > new.block_size:
        raise HFError(f"block_size = {gpt_config.block_size} is longer than the context of {where} "
                      f"(n_positions = {new.block_size}); use block_size <= {new.block_size}")
    taken = [f"{k} = {getattr(new, k)!r} (config: {getattr(gpt_config, k)!r})"
             for k in ARCHITECTURE_KEYS if getattr(new, k) != getattr(gpt_config, k)]
    if new.block_size != gpt_config.block_size:
        # The position table keeps all its rows; training windows stay block_size long.
        taken.append(f"context n_positions = {new.block_size} (training windows stay "
                     f"block_size = {gpt_config.block_size})")
    if taken:
        log(f"init_from {HF_PREFIX}{hf_dir}: model settings taken from {where}: " + "; ".join(taken))
    note = activation_note(hf)
    if note:
        log(note)
    return new
