"""Continuous-batched decoding (kvcomm.core.batch_decode) against the eager and static paths, on tiny models.

On CPU the server steps eagerly (graphs=False: the step the CUDA graph captures); the CUDA test checks
the captured graph.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import make_tiny, rand_ids
from test_fast_decode import assert_same_cache, decode

from kvcomm.core import batch_decode
from kvcomm.core.kv import prefill

CUDA = torch.cuda.is_available()

# (prefix length, budget, feed_last, stop at the k-th free token or None)
REQUESTS = [(9, 12, False, None), (31, 5, True, None), (17, 20, True, 4), (50, 8, False, 2), (5, 1, False, None),
            (12, 1, True, None), (26, 15, False, 0), (40, 16, True, None)]


def stops_for(lm, ids, budget, stop_at):
    """A stop token first produced at step `stop_at` of the free-running decode (none when None)."""
    if stop_at is None:
        return []
    free, _, _ = decode(lm, ids, fast=False, max_new=budget + 4)
    tok = free[stop_at]
    return [tok] if tok not in free[:stop_at] else []


def concurrently(fn, args: list) -> list:
    """fn(*a) for every a, each on its own thread; results in order."""
    got: dict[int, object] = {}
    threads = [threading.Thread(target=lambda k=k, a=a: got.__setitem__(k, fn(*a))) for k, a in enumerate(args)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [got[k] for k in range(len(args))]


def test_batched_matches_eager_and_static(tiny):
    args = []
    for k, (n, budget, feed_last, stop_at) in enumerate(REQUESTS):
        ids = rand_ids(n, seed=40 + k)
        args.append((tiny, ids, None, budget, stops_for(tiny, ids, budget, stop_at), feed_last))
    eager = [decode(lm, ids, False, m, s, f) for lm, ids, _, m, s, f in args]
    static = [decode(lm, ids, True, m, s, f) for lm, ids, _, m, s, f in args]
    for _ in range(5):  # threads start at the OS's pace: on a loaded machine they may not overlap; retry
        with batch_decode.serve(tiny, slots=4, graphs=False) as server:
            batched = concurrently(decode, args)
        if server.busiest > 1:
            break
    assert server.busiest > 1 and server.steps < sum(len(e[0]) for e in eager)  # rows really shared steps
    assert sum(bool(a[4]) for a in args) >= 2  # some requests stop early
    for (e, e_cache, _), (s, s_cache, _), (b, b_cache, path) in zip(eager, static, batched):
        assert path == "batched"
        assert b == e == s
        assert_same_cache(b_cache, e_cache)
        assert_same_cache(b_cache, s_cache)
    assert batch_decode.server_for(tiny) is None  # stopped with the block


def test_stop_on_the_first_token_leaves_the_cache_alone(tiny):
    ids = rand_ids(9, seed=2)
    first, _, _ = decode(tiny, ids, fast=False, max_new=1)
    with batch_decode.serve(tiny, slots=2, graphs=False):
        out, cache, path = decode(tiny, ids, fast=None, max_new=8, stops=first)
    assert out == [] and path == "batched" and cache.layers[0].keys.shape[-2] == len(ids)


def alone_and_with_neighbours(lm, graphs: bool):
    """One request decoded alone (row 0), then again in row 5 while rows 0-4 are busy: (tokens, cache) twice."""
    target = rand_ids(23, seed=99)

    def go(server, ids, budget):
        logits, cache, _ = prefill(lm, ids)
        return server.decode(cache, logits[0, -1], len(ids), budget, set(), True), cache

    with batch_decode.serve(lm, slots=8, graphs=graphs) as server:
        alone = go(server, target, 20)
    budget = 1000 if graphs else 60  # graph steps take microseconds: neighbours must still be busy when the target comes
    with batch_decode.serve(lm, slots=8, graphs=graphs) as server:
        result: dict = {}
        threads = [threading.Thread(target=lambda k=k: result.__setitem__(k, go(server, rand_ids(5 + 9 * k, seed=k), budget)))
                   for k in range(5)]
        for t in threads:
            t.start()
        while server.busiest < 5 and any(t.is_alive() for t in threads):  # the neighbours hold rows 0-4
            time.sleep(0.001)
        together = go(server, target, 20)
        assert server.busiest == 6  # the target really ran next to them
        for t in threads:
            t.join()
    return alone, together


def assert_identical(a, b):
    assert a[0] == b[0]
    for x, y in zip(a[1].layers, b[1].layers):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)


def test_batch_invariance_alone_or_with_neighbours():
    """The same request alone and in another row next to busy rows: identical tokens and KV, bit for bit."""
    assert_identical(*alone_and_with_neighbours(make_tiny("qwen2", seed=3), graphs=False))


def test_slot_reuse_and_a_queue_longer_than_the_slots():
    lm = make_tiny("llama", seed=5)
    args = [(lm, rand_ids(7 + 5 * k, seed=60 + k), None, 3 + 2 * k, (), k % 2 == 0) for k in range(7)]
    expected = [decode(*a[:2], False, *a[3:])[0] for a in args]
    with batch_decode.serve(lm, slots=2, graphs=False) as server:
        sequential = [decode(*a)[0] for a in args]  # one at a time: rows are freed and reused
        assert server.busiest == 1
        queued = concurrently(decode, args)  # 7 requests, 2 rows: the rest wait their turn
        assert server.busiest == 2 and all(r is None for r in server.rows) and not server.pending
    assert sequential == expected
    assert [q[0] for q in queued] == expected and {q[2] for q in queued} == {"batched"}


def test_what_falls_back(tiny):
    """Too long for a row, ragged (selective sharing), or fast=False: the single-request paths, unchanged."""
    from transformers import DynamicCache

    with batch_decode.serve(tiny, slots=2, max_len=64, graphs=False) as server:
        assert server.max_len == 256  # rounded up to fast_decode's bucket
        long_ids = rand_ids(250, seed=1)
        assert decode(tiny, long_ids, True, max_new=10)[2] == "static"
        assert decode(tiny, long_ids, None, max_new=6)[2] == "batched"
        assert decode(tiny, rand_ids(8, seed=2), False)[2] == "eager"
        _, cache, _ = prefill(tiny, rand_ids(8, seed=3))
        ragged = DynamicCache(config=tiny.model.config)
        for i, layer in enumerate(cache.layers):
            n = 8 if i % 2 else 5
            ragged.update(layer.keys[:, :, -n:].clone(), layer.values[:, :, -n:].clone(), i)
        assert not server.accepts(ragged, 8, 4) and server.accepts(cache, 8, 4)
        with pytest.raises(batch_decode.BatchDecodeUnavailable):
            server.decode(ragged, torch.zeros(64), 8, 4, set())
        with pytest.raises(RuntimeError, match="already running"):
            batch_decode.start(tiny)
    assert not server.thread.is_alive()
    assert decode(tiny, rand_ids(8, seed=2), True)[2] == "static"


def test_runner_replies_are_the_same_with_the_server():
    from kvcomm.agents.runner import MultiAgentRunner
    from kvcomm.agents.workloads import Workload, math_items
    from kvcomm.reuse.anchors import AnchorPool
    from kvcomm.reuse.config import ReuseConfig
    from kvcomm.reuse.engine import ReuseEngine

    lm = make_tiny("llama", seed=1)
    items = math_items(8, seed=7)
    wl = Workload("math", ["one", "two", "three"], "answer", "judge", items)

    def run(mode, slots):
        pool = AnchorPool(byte_budget=1 << 24, max_anchors=12, gamma=0.7)
        runner = MultiAgentRunner(ReuseEngine(lm, mode, pool=pool, config=ReuseConfig(max_new_tokens=6)), wl, 3)
        if not slots:
            return runner.run_batch(items[:4], 4) + runner.run_batch(items[4:], 4), 0
        with batch_decode.serve(lm, slots=slots, graphs=False) as server:
            out = runner.run_batch(items[:4], 4) + runner.run_batch(items[4:], 4)
        return out, server.tokens

    for mode in ("dense", "reuse"):
        plain, _ = run(mode, 0)
        batched, tokens = run(mode, 4)
        assert tokens > 0
        assert [[c["reply_ids"] for c in r.calls] for r in batched] == [[c["reply_ids"] for c in r.calls] for r in plain]
        assert [r.final for r in batched] == [r.final for r in plain]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_graph_server_matches_eager(arch):
    """fp32 on CUDA: the captured batched step gives the eager loop's tokens and caches; captured once."""
    from test_fast_decode import on_cuda

    lm = on_cuda(arch, torch.float32)
    args = [(lm, rand_ids(n, seed=80 + n), None, budget, (), feed) for n, budget, feed, _ in REQUESTS]
    eager = [decode(lm, ids, False, m, s, f) for lm, ids, _, m, s, f in args]
    with batch_decode.serve(lm, slots=4) as server:
        assert server.graphs
        batched = concurrently(decode, args)
        again = concurrently(decode, args)
    assert server.captures == 1
    for (e, e_cache, _), (b, b_cache, path), (a, _, _) in zip(eager, batched, again):
        assert path == "batched" and b == e == a
        assert_same_cache(b_cache, e_cache, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_server_is_batch_invariant_in_bf16():
    """bf16 under the graph: a request's tokens and KV do not depend on its row or its neighbours."""
    from test_fast_decode import on_cuda

    assert_identical(*alone_and_with_neighbours(on_cuda("qwen2", torch.bfloat16), graphs=True))
