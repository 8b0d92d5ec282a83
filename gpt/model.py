"""A GPT-2 style decoder-only transformer, read top to bottom like the classic diagram:

    tokens -> token embedding + position embedding -> dropout
           -> N x [ x = x + attn(ln1(x));  x = x + mlp(ln2(x)) ]      (pre-LayerNorm blocks)
           -> final LayerNorm -> lm_head (weight tied to the token embedding) -> logits

The model is a plain `nn.Module`: no device, dtype, rank or distribution is baked in. DDP/FSDP2,
activation checkpointing and torch.compile are applied from outside; the blocks live in an
`nn.ModuleList` named `blocks` so FSDP2 can `fully_shard` each one. Its linear layers are
`Linear` (gpt/linear.py): nn.Linear with CPU speed paths for decoding (same parameters, the same
product summed in another order).

Shapes: B batch, T sequence length, C = n_embd, H = n_head, D = C // H (head size), V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.cpu_attention import causal_attention, use_cpu_attention
from gpt.linear import Linear
from gpt.loss import linear_cross_entropy

ATTENTION_KINDS = ("sdpa", "explicit")
TOKEN_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding looks up


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int  # the longest context the model sees (rows of the position embedding)
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers (GPT-2 has them)
    tie_weights: bool = True  # lm_head.weight is the token embedding (GPT-2, Press & Wolf 2017)
    # "sdpa": F.scaled_dot_product_attention (fused kernels), except training and prefill in
    # bf16 on a CPU with native bf16, up to 512 positions, where
    # gpt/cpu_attention.py is faster (`attend`) | "explicit": the formula.
    attention: str = "sdpa"
    # The embedding and output tables get rows up to a multiple of this (GPT-2's 50257 -> 50304
    # at 64): matmul shapes GPU kernels tile well. The extra ids are never predicted (their
    # logits are cut off), so the model computes the same function as without them.
    vocab_multiple: int = 1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must lie in [0, 1), got {self.dropout!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(
                f"GPTConfig.attention must be one of {ATTENTION_KINDS}, got {self.attention!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output tables: vocab_size rounded up to vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


# --------------------------------------------------------------------------------------------
# The transformer


def causal_mask(T: int, S: int, q_start: int, device: torch.device) -> torch.Tensor:
    """[T, S] bool, True where query i (at position q_start + i) may see key j: j <= q_start + i."""
    return torch.arange(S, device=device) <= (q_start + torch.arange(T, device=device))[:, None]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_start: int,
    dropout_p: float,
    explicit: bool,
) -> torch.Tensor:
    """Causal attention of queries q [B, H, T, D] over keys/values k, v [B, H, S, D].

    The queries sit at absolute positions q_start .. q_start+T-1 and the keys at 0 .. S-1, with
    S = q_start + T (the keys include the queries' own positions). Query i may see key j iff
    j <= q_start + i. Without a cache q_start = 0 and this is the ordinary causal mask.
    """
    T, S = q.size(-2), k.size(-2)
    if explicit:
        # Reference path, the formula of "Attention Is All You Need":
        #   softmax(Q K^T / sqrt(D) + M) V,  M = 0 where allowed and -inf where masked.
        # Q is scaled before the product, as SDPA does: in fp16 the raw dot products can overflow.
        # Softmax in fp32 at least, so that it stays exact under bf16 autocast (float64 stays).
        scores = (q * (1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1)  # [B, H, T, S]
        allowed = causal_mask(T, S, q_start, q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
        weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
        return weights @ v  # [B, H, T, D]

    # bf16 on a CPU, training or prefill: the formula with a hand-written backward, whose
    # batched matmuls beat SDPA's CPU flash kernel (gpt/cpu_attention.py: 3x at 256 positions).
    if use_cpu_attention(q, q_start, S):
        return causal_attention(q, k, v, dropout_p)
    # Fused path: the same formula in one kernel (flash / memory-efficient attention).
    if q_start == 0:
        # Prefill or training: square causal mask, which SDPA builds itself.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if T == 1:
        # One new token: it is the newest position, so every cached key is in its past.
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    # Several new tokens after a non-empty cache: SDPA's is_causal aligns the mask to the top
    # left corner, which is wrong when S > T, so give the bottom-right-aligned mask explicitly.
    allowed = causal_mask(T, S, q_start, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.attn_dropout_p = config.dropout
        self.explicit = config.attention == "explicit"
        self.qkv = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused q, k, v
        self.proj = Linear(config.n_embd, config.n_embd, bias=config.bias)  # residual output
        self.resid_dropout = nn.Dropout(config.dropout)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> q, k, v, each [B, H, T, D]: heads become a batch dimension for the matmuls."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # [B, T, 3C] -> three [B, T, C]
        return tuple(t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.heads(x)
        q_start = 0
        if kv_cache is not None:
            q_start = kv_cache.length
            k, v = kv_cache.update(layer, k, v)  # [B, H, S, D], S = q_start + T: the cached keys, then these
        y = attend(
            q, k, v,
            q_start=q_start,
            dropout_p=self.attn_dropout_p if self.training else 0.0,
            explicit=self.explicit,
        )
        # Re-join the heads: [B, H, T, D] -> [B, T, H, D] -> [B, T, C].
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)  # residual output
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.gelu(self.fc(x))))  # [B, T, C] -> [B, T, 4C] -> [B, T, C]


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2): normalise the input of each sublayer and keep
    the residual stream itself un-normalised, which makes deep stacks train stably."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), kv_cache, layer)
        x = x + self.mlp(self.ln2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)  # learned, absolute
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # How forward(..., return_logits=False) computes the loss: chunk by chunk without the
        # [B, T, V] logits (gpt/loss.py), or from the whole logits in one cross-entropy, which
        # torch.compile fuses into a few kernels on a GPU (config.loss, resolved by gpt/parallel.py
        # `chunked_loss_enabled` when the model is wrapped).
        self.chunked_loss = True
        if config.tie_weights:
            # One matrix both reads tokens in and scores them out (Press & Wolf 2017).
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: weights N(0, 0.02), biases 0, LayerNorm gain 1 / shift 0, and
        the two projections that write into the residual stream N(0, 0.02 / sqrt(2 n_layer)):
        each block adds two such terms, so this keeps the residual variance from growing with
        depth (GPT-2 paper, section 2.3). Padding rows of the vocabulary tables (vocab_multiple)
        start at 0, and stay there: no id looks them up and no logit of theirs is used."""
        V = self.config.vocab_size
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                weight = module.weight
                if module is self.tok_emb or module is self.lm_head:
                    nn.init.zeros_(weight[V:])
                    weight = weight[:V]
                nn.init.normal_(weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    def crop_block_size(self, block_size: int) -> None:
        """Shorten the context to `block_size`, keeping the first rows of the position table:
        fine-tuning a trained model at a shorter context (as nanoGPT does), where the positions
        past it would never be seen. No other weight has a row per position (attention builds
        its mask per call). Call it before building the optimizer: the table is a new Parameter."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"block_size {block_size} must be in 1..{self.config.block_size} to crop to")
        self.pos_emb.weight = nn.Parameter(self.pos_emb.weight.detach()[:block_size].clone())
        self.pos_emb.num_embeddings = block_size
        self.config.block_size = block_size

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        *,
        last_only: bool = False,
        return_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx [B, T] token ids -> (logits [B, T, V], loss or None), V = config.vocab_size.

        idx and targets (idx's shape) hold int64 or int32 ids. loss is the mean cross-entropy
        over all positions, in fp32, skipping targets equal to -1. Their values are not checked
        here (that would cost a host-device sync per step): ids must lie in 0..vocab_size-1 and
        targets there or at -1 (not Hugging Face's -100); the loader checks the shards' ids.
        With a kv_cache, idx holds only the tokens not yet in the cache; they are placed at
        positions kv_cache.length onwards and written into the cache. last_only=True returns
        the logits of the last position alone ([B, 1, V]): sampling needs nothing else, and a
        prompt of T tokens then skips T-1 rows of the largest matmul (C x V per row).
        return_logits=False (with targets; what the trainer's steps and evals use) returns
        (None, loss), computing the loss chunk by chunk without the [B, T, V] logits
        (gpt/loss.py; unless chunked_loss is False): the same value, less memory traffic.
        """
        targets, start = self._check_inputs(idx, targets, kv_cache, last_only)
        T = idx.size(1)

        # Positions start .. start+T-1 are consecutive rows of the table: a slice, not a lookup
        # (no index tensor to build, and its gradient is a plain slice copy, not a scatter-add).
        x = self.drop(self.tok_emb(idx) + self.pos_emb.weight[start : start + T])  # [B, T, C]
        # (gpt/static_decode.py repeats this forward for one token with fixed shapes, for CUDA
        # graphs: a change here goes there too; its tests compare the two.)
        for layer, block in enumerate(self.blocks):
            x = block(x, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.advance(T)
        if last_only:
            x = x[:, -1:, :]  # [B, 1, C]; ln_f and lm_head act on each position alone, so slicing first is exact
        x = self.ln_f(x)
        V = self.config.vocab_size
        if targets is not None and not return_logits and self.chunked_loss:
            return None, linear_cross_entropy(x, self.lm_head.weight, targets, n_classes=V)
        # The matmul runs over every row of the (padded) table; the padding's logits are cut off.
        logits = self.lm_head(x)[..., :V]  # [B, T, V]

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=-1)
        # return_logits=False drops them only where a loss replaces them (without targets the
        # logits are the result).
        return (None if targets is not None and not return_logits else logits), loss

    def _check_inputs(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None,
        kv_cache: KVCache | None,
        last_only: bool,
    ) -> tuple[torch.Tensor | None, int]:
        """Refuse bad arguments; return (targets as int64 or None, the first position)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape [batch, time], got {tuple(idx.shape)}")
        if idx.dtype not in TOKEN_DTYPES:
            raise ValueError(f"idx must hold token ids as int64 or int32, got {idx.dtype}: pass idx.long()")
        if last_only and targets is not None:
            raise ValueError("last_only=True computes one position's logits; the loss needs all of them")
        if targets is not None:
            targets = _checked_targets(targets, idx)
        B, T = idx.shape
        start = 0
        if kv_cache is not None:
            if kv_cache.batch_size != B:
                raise ValueError(f"kv_cache holds batch size {kv_cache.batch_size}, idx has {B}")
            start = kv_cache.length
        if start + T > self.config.block_size:
            what = f"sequence length {T}" if start == 0 else f"cached {start} + new {T} tokens"
            raise ValueError(f"{what} exceeds the model's block_size {self.config.block_size}")
        if kv_cache is not None:
            kv_cache.check_fits(self.config, T)
        return targets, start

    def num_params(self, exclude_position_embedding: bool = False) -> int:
        """Number of parameters, counting the tied token-embedding / lm_head matrix once."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_position_embedding:
            n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, context: int | None = None) -> int:
        """Training FLOPs per token at full context (forward + backward), as in the PaLM paper's
        appendix B and nanoGPT's estimate_mfu:

            6 * N  +  12 * L * H * D * T

        N counts the parameters that take part in a matmul: all of them except the position
        table (a lookup) and, when untied, the token table (also a lookup; the separate lm_head
        matrix is counted). LayerNorm gains and biases are included, as nanoGPT does; they are
        negligible. 6 = 2 FLOPs per multiply-add x (1 forward + 2 backward). The second term is
        attention's QK^T and (attention)V: 2 matmuls of T x D per head per layer, x 2 FLOPs x 3
        for backward = 12, with T = `context`, the length of the windows trained on (default
        block_size; a model started from a Hugging Face folder keeps that folder's, longer, table
        of positions); the causal half is not subtracted, by convention. H * D = n_embd.
        """
        cfg = self.config
        T = cfg.block_size if context is None else context
        n = self.num_params(exclude_position_embedding=True)
        if not cfg.tie_weights:
            n -= self.tok_emb.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T


# --------------------------------------------------------------------------------------------
# Helpers


def _checked_targets(targets: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """targets as the loss takes them: idx's shape (both losses flatten them, so [T, B] or
    another batch's targets of the same size would be scored against the wrong positions
    without a word), int64 (the plain loss refuses int32, the chunked one uint8)."""
    if targets.shape != idx.shape:
        raise ValueError(f"targets must have idx's shape {tuple(idx.shape)} (one target per position), "
                         f"got {tuple(targets.shape)}")
    if targets.dtype not in TOKEN_DTYPES:
        raise ValueError(f"targets must hold token ids (or -1 to ignore) as int64 or int32, got "
                         f"{targets.dtype}: pass targets.long()")
    return targets.long()


def closed_form_num_params(config: GPTConfig) -> int:
    """The parameter count of `GPT(config)`, by arithmetic on the config alone."""
    d, V, L = config.n_embd, config.padded_vocab_size, config.n_layer
    b = 1 if config.bias else 0
    embeddings = V * d + config.block_size * d  # token table + position table
    layer_norm = d + b * d  # gain (+ shift)
    attention = (d * 3 * d + b * 3 * d) + (d * d + b * d)  # fused qkv + output projection
    mlp = (d * 4 * d + b * 4 * d) + (4 * d * d + b * d)  # up to 4d, back down to d
    block = 2 * layer_norm + attention + mlp
    head = 0 if config.tie_weights else V * d  # lm_head has no bias, as in GPT-2
    return embeddings + L * block + layer_norm + head


# --------------------------------------------------------------------------------------------
# Decoding: KV cache


class KVCache:
    """Keys and values of every layer for the tokens decoded so far, preallocated to block_size.

    Per layer: k and v of shape [B, H, block_size, D]. `length` counts the positions filled;
    a forward pass writes its T new positions at [length, length + T) in every layer, then
    advances `length` once (so all layers of one pass see the same start). Tokens in the cache
    occupy absolute positions 0 .. length-1 of the current window; the next token fed is at
    position `length`. The cache cannot grow past block_size: see `generate.py` for how decoding
    slides the window.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (batch_size, config.n_head, config.block_size, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.batch_size = batch_size
        self.length = 0

    def reset(self) -> None:
        # Stale entries past `length` are never read, so there is nothing to zero.
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's k, v [B, H, T, D] for `layer`; return all keys/values so far
        [B, H, length + T, D], in the dtype of the inputs (the cache may be kept wider)."""
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        k_all, v_all = self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        if k_all.dtype != k.dtype:  # under autocast: a wider cache, bf16 activations
            k_all, v_all = k_all.to(k.dtype), v_all.to(v.dtype)
        return k_all, v_all

    def advance(self, n: int) -> None:
        self.length += n

    def check_fits(self, config: GPTConfig, n_new: int) -> None:
        """Refuse a cache made for another model: with fewer positions than `length + n_new`, the
        keys past its end were dropped without an error (a slice past the end is empty, and a
        length-1 write broadcasts into it), so the newest token attended to all but itself."""
        layers, (_, heads, positions, head_dim) = len(self.k), self.k[0].shape
        if (layers, heads, head_dim) != (config.n_layer, config.n_head, config.head_dim):
            raise ValueError(f"kv_cache holds {layers} layers x {heads} heads of size {head_dim}, the model has "
                             f"{config.n_layer} x {config.n_head} of size {config.head_dim}: make it with "
                             f"KVCache(model.config, batch_size)")
        if self.length + n_new > positions:
            raise ValueError(f"kv_cache has room for {positions} positions, not cached {self.length} + new "
                             f"{n_new}: make it with KVCache(model.config, batch_size)")
