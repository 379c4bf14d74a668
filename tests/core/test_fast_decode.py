"""The static-cache decode path (kvcomm.core.fast_decode) against the eager loop, on tiny models.

On CPU the static cache runs without graphs (the same step the graph captures); the CUDA test checks
the captured graph itself.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import make_tiny, rand_ids

from kvcomm.core import fast_decode
from kvcomm.core.generation import greedy_continue, last_path
from kvcomm.core.kv import prefill

CUDA = torch.cuda.is_available()


def decode(lm, ids, fast, max_new=12, stops=(), feed_last=False):
    """Prefill `ids`, decode; return (tokens, the caller's cache afterwards, path taken)."""
    logits, cache, _ = prefill(lm, ids)
    out = greedy_continue(lm, cache, logits[0, -1], len(ids), max_new, set(stops), feed_last=feed_last, fast=fast)
    return out, cache, last_path()


def assert_same_cache(a, b, atol=1e-5):
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers):
        assert la.keys.shape == lb.keys.shape
        torch.testing.assert_close(la.keys, lb.keys, atol=atol, rtol=1e-4)
        torch.testing.assert_close(la.values, lb.values, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("feed_last", [False, True])
def test_static_path_matches_eager(tiny, feed_last):
    ids = rand_ids(21, seed=3)
    eager, eager_cache, p0 = decode(tiny, ids, fast=False, feed_last=feed_last)
    static, static_cache, p1 = decode(tiny, ids, fast=True, feed_last=feed_last)
    assert (p0, p1) == ("eager", "static")
    assert static == eager and len(eager) == 12
    assert static_cache.layers[0].keys.shape[-2] == len(ids) + len(eager) - (0 if feed_last else 1)
    assert_same_cache(static_cache, eager_cache)


def test_step_logits_match_a_full_prefill(tiny):
    ids = rand_ids(17, seed=5)
    logits, cache, _ = prefill(tiny, ids)
    steps: list[torch.Tensor] = []
    out = fast_decode.decoder_for(tiny, graphs=False).decode(cache, logits[0, -1], len(ids), 10, set(),
                                                            feed_last=True, step_logits=steps)
    ref, _, _ = prefill(tiny, ids + out, all_logits=True)  # one pass over the whole sequence, no decode loop
    assert len(steps) == len(out) == 10
    torch.testing.assert_close(torch.stack(steps), ref[0, len(ids):], atol=1e-4, rtol=1e-4)
    assert [int(s.argmax()) for s in steps[:-1]] == out[1:]


@pytest.mark.parametrize("feed_last", [False, True])
def test_stops(tiny, feed_last):
    ids = rand_ids(19, seed=11)
    free, _, _ = decode(tiny, ids, fast=False, max_new=16)
    stop = next(t for t in free[3:] if t not in free[:3])  # a token first produced at step >= 3
    eager, eager_cache, _ = decode(tiny, ids, fast=False, max_new=16, stops=[stop], feed_last=feed_last)
    static, static_cache, _ = decode(tiny, ids, fast=True, max_new=16, stops=[stop], feed_last=feed_last)
    assert static == eager == free[: free.index(stop)]
    assert_same_cache(static_cache, eager_cache)


def test_stop_on_the_first_token_leaves_the_cache_alone(tiny):
    ids = rand_ids(9, seed=2)
    first, _, _ = decode(tiny, ids, fast=False, max_new=1)
    out, cache, path = decode(tiny, ids, fast=True, max_new=8, stops=first)
    assert out == [] and path == "static" and cache.layers[0].keys.shape[-2] == len(ids)


def test_ragged_cache_from_selective_sharing(tiny):
    """Selected layers hold a sender's context in front; the others only the receiver's tokens."""
    from transformers import DynamicCache

    ctx, q = rand_ids(13, seed=11), rand_ids(7, seed=12)
    _, ctx_cache, _ = prefill(tiny, ctx)
    selected = {1, 2}

    def run(fast):
        cache = DynamicCache(config=tiny.model.config)
        for i, layer in enumerate(ctx_cache.layers):
            k = layer.keys if i in selected else layer.keys[:, :, :0]
            cache.update(k.clone(), (layer.values if i in selected else layer.values[:, :, :0]).clone(), i)
        logits, cache, _ = prefill(tiny, q, cache, start=len(ctx))
        out = greedy_continue(tiny, cache, logits[0, -1], len(ctx) + len(q), 10, set(), feed_last=True, fast=fast)
        return out, cache, last_path()

    eager, eager_cache, _ = run(False)
    static, static_cache, path = run(True)
    assert path == "static" and static == eager
    assert {layer.keys.shape[-2] for layer in static_cache.layers} == {len(q) + 10, len(ctx) + len(q) + 10}
    assert_same_cache(static_cache, eager_cache)


def test_one_bucket_serves_many_calls_and_grows_when_needed(tiny):
    dec = fast_decode.decoder_for(tiny, graphs=False)
    assert fast_decode.decoder_for(tiny, graphs=False) is dec
    decode(tiny, rand_ids(10, seed=1), fast=True, max_new=5)
    assert dec.capacity == 256
    cache = dec.cache
    decode(tiny, rand_ids(40, seed=2), fast=True, max_new=5)
    assert dec.cache is cache  # same static tensors: a captured graph would be replayed, not recaptured
    eager, _, _ = decode(tiny, rand_ids(300, seed=3), fast=False, max_new=5)
    static, _, _ = decode(tiny, rand_ids(300, seed=3), fast=True, max_new=5)
    assert dec.capacity == 512 and static == eager
    assert [fast_decode.bucket(n) for n in (1, 256, 257, 3628)] == [256, 256, 512, 4096]
    fast_decode.release(tiny)
    assert fast_decode.decoder_for(tiny, graphs=False) is not dec


def test_path_choice(tiny, monkeypatch):
    _, cache, _ = prefill(tiny, rand_ids(5, seed=1))
    monkeypatch.delenv("KVCOMM_FAST_DECODE", raising=False)
    assert fast_decode.choose_path(tiny, cache) == ("graph" if tiny.device.type == "cuda" else "eager")
    assert fast_decode.choose_path(tiny, cache, fast=True) == "static"  # CPU: no graphs
    assert fast_decode.choose_path(tiny, cache, fast=False) == "eager"
    monkeypatch.setenv("KVCOMM_FAST_DECODE", "static")
    assert fast_decode.choose_path(tiny, cache) == "static"
    assert decode(tiny, rand_ids(5, seed=1), fast=None)[2] == "static"
    monkeypatch.setenv("KVCOMM_FAST_DECODE", "0")
    assert fast_decode.choose_path(tiny, cache) == "eager"
    assert fast_decode.choose_path(tiny, cache, fast=True) == "static"  # an explicit argument wins
    batched = type(cache)(config=tiny.model.config)
    for i, layer in enumerate(cache.layers):
        batched.update(layer.keys.expand(2, -1, -1, -1), layer.values.expand(2, -1, -1, -1), i)
    assert fast_decode.unsupported(tiny, batched) and fast_decode.choose_path(tiny, batched, fast=True) == "eager"


def test_threads_share_one_decoder():
    lm = make_tiny("qwen2", seed=4)
    prompts = [rand_ids(15 + 3 * k, seed=20 + k) for k in range(4)]
    expected = [decode(lm, p, fast=False)[0] for p in prompts]
    got: dict[int, list[int]] = {}

    def work(k):
        got[k] = decode(lm, prompts[k], fast=True)[0]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[k] for k in range(4)] == expected


def on_cuda(arch, dtype):
    lm = make_tiny(arch, dtype=dtype)
    lm.model.to("cuda")
    lm.device = torch.device("cuda")
    return lm


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_graph_matches_eager(arch):
    """fp32: the replayed graph gives the eager loop's tokens, cache and per-step logits."""
    lm = on_cuda(arch, torch.float32)
    ids = rand_ids(40, seed=9)
    eager, eager_cache, p0 = decode(lm, ids, fast=False, max_new=24, feed_last=True)
    graph, graph_cache, p1 = decode(lm, ids, fast=None, max_new=24, feed_last=True)
    assert (p0, p1) == ("eager", "graph")
    assert graph == eager
    assert_same_cache(graph_cache, eager_cache, atol=1e-4)
    logits, cache, _ = prefill(lm, ids)
    steps: list[torch.Tensor] = []
    dec = fast_decode.decoder_for(lm, graphs=True)
    dec.decode(cache, logits[0, -1], len(ids), 24, set(), feed_last=True, step_logits=steps)
    ref, _, _ = prefill(lm, ids + graph, all_logits=True)
    torch.testing.assert_close(torch.stack(steps), ref[0, len(ids):], atol=1e-3, rtol=1e-3)
    again = decode(lm, rand_ids(70, seed=10), fast=None, max_new=24)[0]
    assert again == decode(lm, rand_ids(70, seed=10), fast=False, max_new=24)[0]
    assert dec.captures == 1  # one bucket: captured once, replayed by every call


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_graph_bf16_matches_the_uncaptured_static_step(arch, monkeypatch):
    """bf16: the graph replays exactly the static step (eager bf16 runs other SDPA kernels, so
    near-ties may differ there; the first token and the logits must still agree closely)."""
    lm = on_cuda(arch, torch.bfloat16)
    ids = rand_ids(40, seed=9)
    graph, graph_cache, p1 = decode(lm, ids, fast=True, max_new=24, feed_last=True)
    monkeypatch.setenv("KVCOMM_FAST_DECODE", "static")
    static, static_cache, p2 = decode(lm, ids, fast=None, max_new=24, feed_last=True)
    assert (p1, p2) == ("graph", "static")
    assert graph == static
    assert_same_cache(graph_cache, static_cache, atol=1e-2)
    eager, _, _ = decode(lm, ids, fast=False, max_new=24, feed_last=True)
    assert graph[0] == eager[0]
