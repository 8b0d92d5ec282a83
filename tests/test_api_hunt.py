"""The model, decoding and tokenizer called as a library, the way a notebook calls them, and
bugs that found: arguments of the wrong shape or kind either work or fail naming the argument
and what to do, never give a silently wrong answer."""

from __future__ import annotations

import array
import numpy as np
import pytest
import torch

from gpt.generate import generate, sample_next
from gpt.model import GPT, GPTConfig, KVCache
from gpt.static_decode import StaticDecoder
from gpt.tokenizer import build_char, train_bpe

CONFIG = GPTConfig(vocab_size=37, block_size=8, n_layer=2, n_head=2, n_embd=12)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


def tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# ---- forward's targets and ids ------------------------------------------------------------

@pytest.mark.parametrize("return_logits", [True, False])  # the plain and the chunked loss
def test_targets_of_another_shape_are_refused_not_flattened(model, return_logits):
    # Both losses flattened idx and targets alike, so targets laid out [time, batch] (or any
    # other shape with as many elements) were scored against the wrong positions, silently.
    idx = tokens(2, 5)
    with pytest.raises(ValueError, match=r"targets must have idx's shape \(2, 5\).*got \(5, 2\)"):
        model(idx, tokens(5, 2, seed=1), return_logits=return_logits)
    with pytest.raises(ValueError, match=r"targets must have idx's shape"):
        model(idx, tokens(10, seed=1), return_logits=return_logits)


@pytest.mark.parametrize("return_logits", [True, False])
def test_int32_targets_give_the_int64_loss_on_both_loss_paths(model, return_logits):
    # The plain loss refused int32 targets (the chunked one took them), and the chunked one
    # refused uint8 (the plain one took them): which worked depended on a training setting.
    idx, targets = tokens(2, 5), tokens(2, 5, seed=1)
    targets[0, 0] = -1
    _, expected = model(idx, targets, return_logits=return_logits)
    _, loss = model(idx, targets.int(), return_logits=return_logits)
    assert torch.equal(loss, expected)
    for bad in (targets.float(), targets.clamp(min=0).to(torch.uint8)):
        with pytest.raises(ValueError, match=r"targets must hold token ids .* got torch\.(float32|uint8): pass targets\.long\(\)"):
            model(idx, bad, return_logits=return_logits)


def test_ids_of_a_non_integer_dtype_are_refused_naming_idx(model):
    idx = tokens(2, 5)
    assert torch.equal(model(idx.int())[0], model(idx)[0])
    for bad in (idx.float(), idx.to(torch.uint8)):
        with pytest.raises(ValueError, match=r"idx must hold token ids as int64 or int32.*idx\.long\(\)"):
            model(bad)


# ---- KV caches and the static step --------------------------------------------------------

def test_a_kv_cache_with_fewer_positions_than_the_model_is_refused(model):
    # A cache made for a model of block_size 4 filled up, and the next token's keys went nowhere
    # (a slice past the end is empty, and a length-1 write broadcasts into it): the logits came
    # out without the token attending to itself, and no error.
    short = KVCache(GPTConfig(vocab_size=37, block_size=4, n_layer=2, n_head=2, n_embd=12), 1)
    idx = tokens(1, 5)
    model(idx[:, :4], kv_cache=short)
    with pytest.raises(ValueError, match=r"kv_cache has room for 4 positions, not cached 4 \+ new 1"):
        model(idx[:, 4:], kv_cache=short)
    # A cache with more room than the model is fine: the same logits as the full forward.
    roomy = KVCache(GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=12), 1)
    model(idx[:, :4], kv_cache=roomy)
    torch.testing.assert_close(model(idx[:, 4:], kv_cache=roomy)[0][:, -1], model(idx)[0][:, -1])


@pytest.mark.parametrize("other", [dict(n_layer=1), dict(n_head=3)])
def test_a_kv_cache_of_another_architecture_is_refused_naming_both(model, other):
    # Before: an IndexError (fewer layers) or a broadcast error about sizes the caller never wrote.
    config = GPTConfig(**{**dict(vocab_size=37, block_size=8, n_layer=2, n_head=2, n_embd=12), **other})
    with pytest.raises(ValueError, match=r"kv_cache holds .* the model has 2 x 2 of size 6: make it with KVCache"):
        model(tokens(1, 3), kv_cache=KVCache(config, 1))


def test_static_decoder_refuses_a_token_batch_it_would_broadcast(model):
    cache = KVCache(CONFIG, 3)
    model(tokens(3, 2), kv_cache=cache)
    step = StaticDecoder(model, cache)
    with pytest.raises(ValueError, match=r"token must have shape \(3, 1\).*got \(1, 1\)"):
        step.step(tokens(1, 1))  # copied into every row before, silently
    assert cache.length == 2
    other = KVCache(GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=12), 3)
    with pytest.raises(ValueError, match=r"cache has 16 positions, the model's block_size is 8"):
        StaticDecoder(model, other)


def test_static_decoder_refuses_a_model_in_training_mode():
    # The step has the MLP's dropout but not the embedding's or attention's: half a train pass.
    torch.manual_seed(0)
    dropout_model = GPT(GPTConfig(vocab_size=37, block_size=8, n_layer=2, n_head=2, n_embd=12, dropout=0.5))
    cache = KVCache(dropout_model.config, 1)
    step = StaticDecoder(dropout_model, cache)
    with pytest.raises(ValueError, match=r"training mode: call model\.eval\(\)"):
        step.step(tokens(1, 1))
    dropout_model.eval()
    assert torch.equal(step.step(tokens(1, 1)), dropout_model(tokens(1, 1))[0][:, -1])


# ---- generate's arguments -----------------------------------------------------------------

def test_generate_takes_integers_of_any_kind(model):
    # A sweep over np.arange, or eos_id taken from a tensor: "must be an integer, got
    # np.int64(1)" refused what is one.
    prompt = tokens(2, 3)
    greedy = torch.cat(list(generate(model, prompt, 4, temperature=0)), dim=1)
    top1 = torch.cat(list(generate(model, prompt, np.int64(4), top_k=np.int64(1))), dim=1)
    assert torch.equal(top1, greedy)
    eos = int(greedy[0, 0])
    stopped = torch.cat(list(generate(model, prompt[:1], 4, temperature=0, eos_id=torch.tensor(eos))), dim=1)
    assert stopped.tolist() == [[eos]]
    logits = torch.randn(2, 9, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample_next(logits, top_k=np.int32(1)), logits.argmax(dim=-1, keepdim=True))
    for bad in (1.0, True, np.float64(2.0)):
        with pytest.raises(ValueError, match="top_k must be an integer"):
            generate(model, prompt, 1, top_k=bad)


def test_generate_refuses_a_prompt_that_is_not_a_tensor(model):
    with pytest.raises(ValueError, match=r"idx must be a tensor of token ids \[batch, time\], got list"):
        generate(model, [[1, 2, 3]], 2)


# ---- the tokenizer ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizers_():
    text = "the quick brown fox jumps over the lazy dog, again and again.\n" * 20
    return train_bpe([text], 280), build_char([text])


def test_encode_takes_one_str_and_encode_batch_a_list(tokenizers_):
    bpe, char = tokenizers_
    # BPE read a list of two strs as a (sequence, pair) and encoded both as one text;
    # encode_batch("text") encoded each character as a text of its own.
    for tok in (bpe, char):
        with pytest.raises(TypeError, match="text must be a str, got list: for several texts use encode_batch"):
            tok.encode(["the", "dog"])
        with pytest.raises(TypeError, match=r"encode_batch takes a list of texts, got one str"):
            tok.encode_batch("the dog")
        with pytest.raises(TypeError, match="texts must be strs, got bytes at index 1: decode bytes first"):
            tok.encode_batch(["the", b"dog"])
        assert tok.encode_batch(["the", "dog"]) == [tok.encode("the"), tok.encode("dog")]


def test_decode_takes_one_sequence_of_integer_ids(tokenizers_):
    bpe, char = tokenizers_
    for tok in (bpe, char):
        ids = tok.encode("the dog")
        assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids, dtype=np.uint16)) == "the dog"
        assert tok.decode(torch.tensor(ids[0])) == tok.decode(ids[0]) == tok.decode(ids[:1])
        # A [1, T] batch from generate: a TypeError comparing a list with an int before.
        with pytest.raises(ValueError, match=r"ids must be one sequence, got shape \(1, \d+\): decode each row"):
            tok.decode(torch.tensor([ids]))
        # Float ids: the char tokenizer looked 5.0 up as 5, BPE refused them.
        with pytest.raises(ValueError, match="ids must be integer token ids, got 5.0"):
            tok.decode([5.0])
        with pytest.raises(ValueError, match=r"ids must be integers, got dtype torch\.float32"):
            tok.decode(torch.tensor(ids, dtype=torch.float32))
        # Still decoded as before: an array.array (tolist, no shape) and a row iterated into
        # 0-d tensors; a bool is no id.
        assert tok.decode(array.array("H", ids)) == tok.decode(list(torch.tensor(ids))) == "the dog"
        with pytest.raises(ValueError, match="got True"):
            tok.decode([True])
    assert bpe.decode(bpe.encode("a") + [bpe.eos_id]) == "a<|endoftext|>"


def test_all_ignored_targets_give_zero_gradients_on_both_loss_paths():
    """A micro-batch whose every target is -1: the chunked loss's backward divided by zero valid
    positions, 0 * inf, and NaN gradients spread into the whole accumulated step; the plain path
    gives zero gradients. Both report the loss as NaN (nothing to average)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 11, (2, 5))
    for chunked in (True, False):
        model.zero_grad(set_to_none=True)
        model.chunked_loss = chunked
        loss = model(x, torch.full((2, 5), -1), return_logits=False)[1]
        assert loss.isnan()
        loss.backward()
        assert all(p.grad is None or (torch.isfinite(p.grad).all() and not p.grad.any())
                   for p in model.parameters()), chunked
