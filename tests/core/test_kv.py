"""The one prefill: every way of calling it gives what a dense forward of the whole sequence gives."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, rand_ids

from kvcomm.core.kv import KVBlock, block_to_cache, cache_length, cache_to_block, move, prefill, prefill_flops

TOL = 1e-4


def dense(lm, ids):
    return lm.model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("new", [1, 7])
def test_prefill_after_a_block_equals_the_dense_forward(arch, new):
    lm = make_tiny(arch)
    past, ids = rand_ids(11, 1), rand_ids(new, 2)
    _, cache, p = prefill(lm, past)
    assert p == 0 and cache_length(cache) == (11, False)
    logits, cache2, p2 = prefill(lm, ids, cache_to_block(cache), all_logits=True)
    assert p2 == 11 and cache_length(cache2) == (11 + new, False)
    torch.testing.assert_close(logits[0], dense(lm, past + ids)[11:], atol=TOL, rtol=TOL)


def test_last_logits_only_unless_asked():
    lm = make_tiny()
    ids = rand_ids(9, 3)
    last, _, _ = prefill(lm, ids)
    every, _, _ = prefill(lm, ids, all_logits=True)
    assert last.shape[1] == 1 and every.shape[1] == 9
    torch.testing.assert_close(last[0, -1], every[0, -1], atol=TOL, rtol=TOL)


def test_embeddings_give_what_their_ids_give():
    lm = make_tiny("qwen2")
    ids = rand_ids(8, 4)
    embeds = lm.model.get_input_embeddings()(torch.tensor([ids]))
    a, _, _ = prefill(lm, ids)
    b, _, _ = prefill(lm, embeds=embeds)
    torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


def test_block_round_trip_and_move():
    lm = make_tiny()
    _, cache, _ = prefill(lm, rand_ids(6, 5))
    block = cache_to_block(cache)
    again = cache_to_block(block_to_cache(lm, block))
    assert torch.equal(block.k, again.k) and torch.equal(block.v, again.v) and block.n == 6
    moved = move(lm, move(lm, block, 5), -5)
    torch.testing.assert_close(moved.k, block.k, atol=1e-5, rtol=1e-5)
    assert torch.equal(moved.v, block.v)
    assert (block - block).k.abs().max() == 0 and (block + block).nbytes == block.nbytes
    assert isinstance(block.slice(1, 3), KVBlock) and block.slice(1, 3).n == 2


def test_prefill_flops_counts_weights_and_attention():
    lm = make_tiny()
    assert prefill_flops(lm, 10, past=5) > prefill_flops(lm, 10) > prefill_flops(lm, 9) > 0


def test_hold_leaves_a_layer_as_transformers_initialises_it_and_does_not_copy():
    """`hold` sets a dynamic layer's state by hand (no empty tensors, no `cat`): the same attributes and
    values as transformers' own first `update`, and the caller's tensors themselves as keys and values."""
    from transformers import DynamicCache

    from kvcomm.core.kv import hold

    lm = make_tiny()
    k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    ours, theirs = DynamicCache(config=lm.model.config), DynamicCache(config=lm.model.config)
    hold(ours, 0, k, v)
    theirs.update(k, v, 0)
    a, b = ours.layers[0], theirs.layers[0]
    assert set(vars(a)) == set(vars(b))
    assert (a.dtype, a.device, a.is_initialized) == (b.dtype, b.device, b.is_initialized)
    assert a.keys is k and a.values is v
    assert ours.get_seq_length(0) == theirs.get_seq_length(0) == 5
