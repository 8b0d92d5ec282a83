"""One decoding step with shapes that never change, so a GPU can replay it as a CUDA graph.

Why: at batch 1 a small model's decode step is ~80 small kernels, each launched from Python,
and the GPU waits on the launches (6 x 384 on an H200: 510 tokens/s with the KV cache, no
faster than without it). A CUDA graph records those launches once and replays them all with
one call per token (PyTorch docs, "CUDA Graphs").

A graph replays the very same kernels on the very same memory, so everything that changes
from token to token lives in tensors that stay put, and is copied into them before a replay:

- `token` [B, 1] (int64): the token fed at this step;
- `position` [1] (int64, on the device): where it sits, i.e. how many tokens the cache holds;
- the KV cache: a `KVCache` already allocated to block_size positions per layer. The step
  writes this token's k and v at `position` with `index_copy_` (a write whose place is read
  from a tensor, not from Python), then attends over all block_size cached positions with
  the mask `key position <= position` (the stale entries past it are masked out);
- the logits [B, V] it returns: on a GPU, the same tensor at every replay.

The step is the model's own forward for one token: the same modules and parameters (tok_emb,
pos_emb, every block's ln1 / qkv / proj / ln2 / mlp, ln_f, lm_head), no copy of a weight, in
eval mode (no dropout). Attention is SDPA with a mask whatever `config.attention` says (the
same formula). On a CPU it runs eagerly, which is how the tests check it against the ordinary
cached path; there `generate` does not use it unless asked (the ordinary path is as fast).

Prefill and the sliding window stay with the ordinary path (`gpt.generate`): the prompt is
run through the model with the same `KVCache`, and the step continues from `cache.length`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from gpt.model import GPT, CausalSelfAttention, KVCache


class StaticDecoder:
    """Decodes one token at a time into `cache`, at positions cache.length .. block_size-1.

    `step(token)` feeds token [B, 1] at position cache.length, advances the cache by one and
    returns the next token's logits [B, V]. With `graph=True` (CUDA only) the first step
    captures the step in a CUDA graph and every step replays it. The logits returned by a
    replay are overwritten by the next one: use (or copy) them before stepping again.
    """

    def __init__(self, model: GPT, cache: KVCache, *, graph: bool = False) -> None:
        device = cache.k[0].device
        if graph and device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model and its cache on a CUDA device, not {device}")
        cache.check_fits(model.config, 0)
        if cache.k[0].size(2) != model.config.block_size:
            # the mask below covers exactly block_size keys
            raise ValueError(f"cache has {cache.k[0].size(2)} positions, the model's block_size is "
                             f"{model.config.block_size}: make it with KVCache(model.config, batch_size)")
        self.model, self.cache = model, cache
        self.block_size = model.config.block_size
        self.token = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.key_positions = torch.arange(self.block_size, device=device)
        self.use_graph = graph
        self.graph: torch.cuda.CUDAGraph | None = None  # captured at the first step
        self.logits: torch.Tensor | None = None  # the graph's output tensor, once captured

    def step(self, token: torch.Tensor) -> torch.Tensor:
        if self.model.training:
            # the step leaves out the embedding's and attention's dropout: half a train-mode pass
            raise ValueError("the model is in training mode: call model.eval() before decoding with StaticDecoder")
        if self.cache.length >= self.block_size:
            raise ValueError(f"the cache is full ({self.block_size} positions): the window must slide "
                             f"(gpt.generate rebuilds the cache with the ordinary path)")
        if token.shape != self.token.shape:
            # copy_ would broadcast a [1, 1] token into every row without a word
            raise ValueError(f"token must have shape {tuple(self.token.shape)} (one per cached sequence), "
                             f"got {tuple(token.shape)}")
        self.token.copy_(token)
        self.position.fill_(self.cache.length)
        if not self.use_graph:
            logits = self.forward()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits
        self.cache.advance(1)
        return logits

    def forward(self) -> torch.Tensor:
        """The step itself on the static tensors: the model's forward for one token."""
        model = self.model
        x = model.tok_emb(self.token) + model.pos_emb(self.position)  # [B, 1, C]
        # [1, 1, 1, block_size] bool, True where a key may be seen; shared by every layer
        visible = (self.key_positions <= self.position).view(1, 1, 1, -1)
        for layer, block in enumerate(model.blocks):
            x = x + self._attention(block.attn, block.ln1(x), layer, visible)
            x = x + block.mlp(block.ln2(x))
        x = model.ln_f(x)
        return model.lm_head(x)[:, -1, : model.config.vocab_size]  # [B, V]

    def _attention(self, attn: CausalSelfAttention, x: torch.Tensor, layer: int,
                   visible: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # T = 1
        q, k, v = attn.heads(x)
        keys, values = self.cache.k[layer], self.cache.v[layer]  # [B, H, block_size, D]
        keys.index_copy_(2, self.position, k.to(keys.dtype))
        values.index_copy_(2, self.position, v.to(values.dtype))
        if keys.dtype != q.dtype:  # a cache kept wider than the activations (as KVCache.update)
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
        return attn.proj(y.transpose(1, 2).reshape(B, T, C))

    def _capture(self) -> None:
        """Warm up on a side stream (lazy initialisations, cuBLAS workspaces), then record the
        step into a graph. Both run on the real token and position: the step only rewrites the
        k/v entry at `position`, which the replay then writes again with the same values.

        Under autocast the weights' casts are recorded into the graph (replayed every token):
        autocast's cache of casts is disabled here, as torch.cuda.make_graphed_callables
        requires, because the cached casts are freed when the caller's autocast region ends
        while the graph would still read their memory. It also means a weight changed in place
        between tokens is seen by the next replay; a weight *replaced* by another tensor is not
        (the graph reads the memory it was captured with)."""
        # On the cache's GPU, not the current one (a model on cuda:1 while cuda:0 is current):
        # the streams below are made on the current device, and a capture there would not
        # record the step's kernels, which run on the other GPU's streams.
        with torch.cuda.device(self.token.device), self._no_autocast_cache():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.forward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self.forward()
        self.graph = graph
        # The graph reads these tensors' memory at every replay: held, so that a parameter
        # replaced meanwhile (load_state_dict(assign=True), `p.data = ...`) cannot hand its memory
        # to another tensor the replay would then read. The replaced weight itself is not seen.
        self._captured = [*self.model.parameters(), *self.model.buffers()]

    def _no_autocast_cache(self) -> contextlib.AbstractContextManager:
        if not torch.is_autocast_enabled("cuda"):
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
