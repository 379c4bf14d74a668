"""Short prefills on the static path (kvcomm.core.fast_prefill.short_forward) against the eager prefill.

On CPU the static cache runs without graphs (the same step the graph captures); the CUDA tests check
the captured graphs. Covered: uniform caches (a reused agent's last tokens), ragged caches with empty
layers (a KVComm receiver), positions after several senders, every bucket, fall-backs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, rand_ids
from test_fast_decode import assert_same_cache, on_cuda

from kvcomm.core import fast_decode, fast_prefill
from kvcomm.core.generation import greedy_continue
from kvcomm.core.kv import last_prefill_path, prefill

CUDA = torch.cuda.is_available()


def clone(cache, keep=None):
    """A copy of a DynamicCache; layers not in `keep` (when given) left empty, as a receiver's are."""
    from transformers import DynamicCache

    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        n = layer.keys.shape[-2] if keep is None or i in keep else 0
        out.update(layer.keys[:, :, :n].clone(), layer.values[:, :, :n].clone(), i)
    return out


def both(lm, past, q, start=None, fast=True):
    """Eager and fast prefill of `q` after copies of `past`: (logits, cache, path) for each."""
    runs = []
    for f in (False, fast):
        cache = clone(past)
        logits, cache, p = prefill(lm, q, cache, start=start, fast=f)
        runs.append((logits, cache, last_prefill_path(), p))
    return runs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("n", [1, 5, 16, 17, 64, 100])
def test_uniform_cache_matches_eager(arch, n):
    lm = make_tiny(arch, seed=1)
    _, past, _ = prefill(lm, rand_ids(23, seed=2))
    (el, ec, ep, e0), (fl, fc, fp, f0) = both(lm, past, rand_ids(n, seed=3 + n))
    assert (ep, fp) == ("eager", "static") and e0 == f0 == 23
    assert fl.shape == el.shape == (1, 1, lm.model.config.vocab_size)
    torch.testing.assert_close(fl, el, atol=1e-4, rtol=1e-4)
    assert_same_cache(fc, ec)
    assert fc.layers[0].keys.shape[-2] == 23 + n


def test_receiver_layers_of_equal_length_come_back_as_views_of_one_copy():
    """A contiguous selection: layers 1-2 hold the sender's KV, 0 and 3 nothing; after the question the
    runs of equal length (0 | 1-2 | 3) are one copy each, and the cache equals the eager one."""
    lm = make_tiny("llama", seed=4)
    ctx, q = rand_ids(20, seed=7), rand_ids(5, seed=8)
    _, sender, _ = prefill(lm, ctx)
    (el, ec, _, _), (fl, fc, fp, _) = both(lm, clone(sender, keep={1, 2}), q, start=len(ctx))
    assert fp == "static"
    torch.testing.assert_close(fl, el, atol=1e-4, rtol=1e-4)
    assert_same_cache(fc, ec)
    storages = [layer.keys.untyped_storage().data_ptr() for layer in fc.layers]
    assert storages[1] == storages[2] and len(set(storages)) == 3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_receiver_with_empty_layers_matches_eager_and_decodes_the_same(arch):
    """Selective sharing: selected layers hold the sender's context, the others nothing at all."""
    lm = make_tiny(arch, seed=4)
    ctx, q = rand_ids(31, seed=5), rand_ids(9, seed=6)
    _, sender, _ = prefill(lm, ctx)
    past = clone(sender, keep={0, 2})
    (el, ec, ep, _), (fl, fc, fp, _) = both(lm, past, q, start=len(ctx))
    assert (ep, fp) == ("eager", "static")
    torch.testing.assert_close(fl, el, atol=1e-4, rtol=1e-4)
    assert_same_cache(fc, ec)
    assert [layer.keys.shape[-2] for layer in fc.layers] == [40, 9, 40, 9]
    storages = [layer.keys.untyped_storage().data_ptr() for layer in fc.layers]
    assert len(set(storages)) == 4  # one copy per run of equal lengths, here every layer its own run
    outs = [greedy_continue(lm, c, lg[0, -1], len(ctx) + len(q), 12, set(), fast=f)
            for lg, c, f in ((el, ec, False), (fl, fc, True))]
    assert outs[0] == outs[1]


def test_positions_after_several_senders(tiny):
    """`start` beyond every layer's length (senders placed one after another, layers overlapping nowhere)."""
    _, sender, _ = prefill(tiny, rand_ids(12, seed=7))
    (el, ec, _, e0), (fl, fc, fp, f0) = both(tiny, clone(sender, keep={1}), rand_ids(6, seed=8), start=30)
    assert fp == "static" and e0 == f0 == 30
    torch.testing.assert_close(fl, el, atol=1e-4, rtol=1e-4)
    assert_same_cache(fc, ec)


def test_one_chunk_per_bucket_and_eager_beyond_the_largest(tiny):
    _, past, _ = prefill(tiny, rand_ids(20, seed=9))
    dec = fast_decode.decoder_for(tiny, graphs=False)
    for n in (3, 16, 9, 33):
        both(tiny, past, rand_ids(n, seed=n))
    assert sorted(dec.chunks) == [16, 64]
    too_long = fast_decode.CHUNK_BUCKETS[-1] + 1
    assert both(tiny, past, rand_ids(too_long, seed=1))[1][2] == "eager"
    assert [fast_decode.chunk_bucket(n) for n in (1, 2, 16, 17, 128, 129)] == [1, 16, 16, 32, 128, None]


def test_eager_where_the_static_path_does_not_apply(tiny, monkeypatch):
    _, past, _ = prefill(tiny, rand_ids(20, seed=9))
    monkeypatch.delenv("KVCOMM_FAST_DECODE", raising=False)
    assert both(tiny, past, rand_ids(4, seed=1), fast=None)[1][2] == ("graph" if CUDA and tiny.device.type == "cuda" else "eager")
    monkeypatch.setenv("KVCOMM_FAST_DECODE", "static")
    assert both(tiny, past, rand_ids(4, seed=1), fast=None)[1][2] == "static"
    for kwargs in ({"all_logits": True}, {}):  # every query's logits, or no past at all
        prefill(tiny, rand_ids(4, seed=1), clone(past) if kwargs else None, fast=True, **kwargs)
        assert last_prefill_path() == "eager"


def test_eager_instead_of_waiting_while_another_thread_decodes(tiny):
    """The static cache is busy (another thread decoding a reply): the short prefill runs eagerly at once,
    same logits, and takes the static path again once the cache is free."""
    _, past, _ = prefill(tiny, rand_ids(23, seed=2))
    decoder = fast_decode.decoder_for(tiny, graphs=False)
    q = rand_ids(5, seed=9)
    want, _, _ = prefill(tiny, q, clone(past), fast=False)
    with decoder.lock:
        got, _, _ = prefill(tiny, q, clone(past), fast=True)
        assert last_prefill_path() == "eager"
    torch.testing.assert_close(got, want)
    prefill(tiny, q, clone(past), fast=True)
    assert last_prefill_path() == "static"


def test_eager_when_the_static_bucket_is_too_large(tiny, monkeypatch):
    """Above MAX_SHORT_FORWARD_BYTES of static KV (the bucket, every layer) the eager prefill is cheaper
    (masked SDPA reads every slot; with the split-key kernel the bound is MAX_STATIC_BYTES, set alike)."""
    _, past, _ = prefill(tiny, rand_ids(20, seed=9))
    need = fast_prefill.static_bytes(past, 16)
    assert need == 256 * 4 * 2 * (16 + 16) * 4  # 256 slots x 4 layers x 2 heads x (k + v dims) x fp32
    for name in ("MAX_SHORT_FORWARD_BYTES", "MAX_STATIC_BYTES"):
        monkeypatch.setattr(fast_prefill, name, need - 1)
    assert both(tiny, past, rand_ids(4, seed=1))[1][2] == "eager"
    for name in ("MAX_SHORT_FORWARD_BYTES", "MAX_STATIC_BYTES"):
        monkeypatch.setattr(fast_prefill, name, need)
    assert both(tiny, past, rand_ids(4, seed=1))[1][2] == "static"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_graph_prefill_matches_eager(arch):
    lm = on_cuda(arch, torch.float32)
    ctx, q = rand_ids(300, seed=5), rand_ids(20, seed=6)
    _, sender, _ = prefill(lm, ctx)
    for keep in (None, {1, 2}):
        (el, ec, _, _), (fl, fc, fp, _) = both(lm, clone(sender, keep), q, start=len(ctx), fast=None)
        assert fp == "graph"
        torch.testing.assert_close(fl, el, atol=1e-3, rtol=1e-3)
        assert_same_cache(fc, ec, atol=1e-4)
    dec = fast_decode.decoder_for(lm, graphs=True)
    captures = dec.captures
    both(lm, clone(sender), rand_ids(25, seed=1), fast=None)  # same bucket (32): replayed, not recaptured
    assert dec.captures == captures


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_threads_capture_and_time_at_once():
    """Worker threads that time their calls (device-wide syncs) while others capture graphs: no capture
    breaks (agents with 8 threads broke them before `capture_lock`), and each gets the eager result."""
    import threading

    from kvcomm.core.generation import sync

    lm = on_cuda("qwen2", torch.float32)
    _, sender, _ = prefill(lm, rand_ids(200, seed=3))
    queries = [rand_ids(n, seed=n) for n in (5, 20, 40, 90, 7, 33)]
    expected = [both(lm, sender, q, fast=False)[0][0] for q in queries]
    got, errors = {}, []

    def work(k):
        try:
            for _ in range(3):
                sync(lm.device)
                logits, _, _ = prefill(lm, queries[k], clone(sender), fast=None)
                sync(lm.device)
            got[k] = logits
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k, ref in enumerate(expected):
        torch.testing.assert_close(got[k], ref, atol=1e-3, rtol=1e-3)
