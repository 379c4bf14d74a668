"""One storage for the static cache's layers: caller caches built from a KVBlock are recognised as one
stacked view, copied in and out in one op each, and the results equal the eager path's."""

from __future__ import annotations

import torch
from conftest import make_tiny, rand_ids
from test_fast_decode import assert_same_cache

from kvcomm.core.generation import greedy_continue
from kvcomm.core.kv import KVBlock, block_to_cache, cache_to_block, last_prefill_path, prefill
from kvcomm.core.static_layers import as_stacked


def test_block_views_are_seen_as_one_stacked_tensor_and_other_caches_are_not():
    lm = make_tiny()
    _, cache, _ = prefill(lm, rand_ids(12, seed=1))
    block = cache_to_block(cache)
    views = block_to_cache(lm, block.slice(0, 9))
    got = as_stacked([layer.keys for layer in views.layers])
    torch.testing.assert_close(got, block.k[:, :, :9], rtol=0, atol=0)
    assert as_stacked([layer.keys for layer in cache.layers]) is None  # separate tensors per layer
    ragged = KVBlock(block.k, block.v)
    layers = [ragged.k[i : i + 1, :, : 9 - i] for i in range(ragged.k.shape[0])]
    assert as_stacked(layers) is None and as_stacked(layers[:1]) is None and as_stacked([None, None]) is None


def test_prefill_over_a_block_and_decode_after_match_eager():
    lm = make_tiny("qwen2", seed=3)
    _, cache, _ = prefill(lm, rand_ids(30, seed=4))
    block = cache_to_block(cache)
    q = rand_ids(3, seed=5)
    outs = {}
    for fast in (False, True):
        logits, c, _ = prefill(lm, q, block, fast=fast)
        outs[fast] = (logits, c, last_prefill_path())
    (el, ec, ep), (fl, fc, fp) = outs[False], outs[True]
    assert (ep, fp) == ("eager", "static")
    torch.testing.assert_close(fl, el, atol=1e-4, rtol=1e-4)
    assert_same_cache(fc, ec)
    assert as_stacked([layer.keys for layer in fc.layers]) is not None  # appended as views of one copy
    tokens = [greedy_continue(lm, c, lg[0, -1], 33, 8, set(), fast=f) for lg, c, f in ((el, ec, False), (fl, fc, True))]
    assert tokens[0] == tokens[1]
    assert_same_cache(fc, ec)


def test_copies_move_whole_words_where_the_layout_allows_and_elements_elsewhere():
    from kvcomm.core.static_layers import clone_words, copy_words, words

    x = torch.randn(3, 1, 2, 40, 16).to(torch.bfloat16)
    part = x[:, 0, :, :13]  # a static cache's filled slots: strided, 32-byte rows
    assert words(part).dtype == torch.int64 and words(part).shape == (3, 2, 13, 4)
    got = clone_words(part)
    assert got.dtype == torch.bfloat16 and got.is_contiguous() and torch.equal(got, part)
    dst = torch.zeros_like(x)
    copy_words(dst[:, 0, :, :13], part)
    assert torch.equal(dst[:, 0, :, :13], part) and not dst[:, 0, :, 13:].any()
    odd = torch.randn(2, 3, 7, 6).to(torch.bfloat16)  # 12-byte rows: copied element by element
    assert words(odd) is odd and torch.equal(clone_words(odd), odd)
    shifted = x.flatten()[1:1 + 2 * 16].view(2, 16)  # storage offset of one element: not word-aligned
    assert words(shifted) is shifted
