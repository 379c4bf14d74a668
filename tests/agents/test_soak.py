"""Soak: 2,000 agent calls in reuse mode, 8 concurrent requests; bounded pool, flat memory, same outputs.

Concurrent requests in a batch see the pool as it was when the batch began and commit in item order
(`MultiAgentRunner.run_batch`), so a run on 8 threads must equal the same run on 1 thread exactly.
"""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch
from conftest import make_tiny

from kvcomm.agents.runner import MultiAgentRunner, reuse_rate
from kvcomm.agents.workloads import Item, Workload, math_items
from kvcomm.reuse.anchors import AnchorPool
from kvcomm.reuse.config import ReuseConfig
from kvcomm.reuse.engine import ReuseEngine

pytestmark = pytest.mark.slow  # 2,000 agent calls
CALLS, WORKERS, BUDGET = 2000, 8, 600_000


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some lazily imported modules warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def soak(lm, workers: int):
    # 3 agents + decision = 4 calls per request; question lengths cycle so anchors keep being made and evicted
    items = [Item(it.id, it.question + " one" * (i % 9), it.answer) for i, it in enumerate(math_items(CALLS // 4, seed=7))]
    wl = Workload("math", ["one", "two", "three"], "answer", "judge", items)
    pool = AnchorPool(byte_budget=BUDGET, max_anchors=12, gamma=0.7)
    runner = MultiAgentRunner(ReuseEngine(lm, "reuse", pool=pool, config=ReuseConfig(max_new_tokens=3)), wl, 3, "fully_connected")
    results, peak_pool, rss, tensors = [], 0, [], []
    for start in range(0, len(items), WORKERS):
        results += runner.run_batch(items[start : start + WORKERS], workers=workers)
        peak_pool = max(peak_pool, pool.nbytes)
        if workers > 1 and (start // WORKERS) % 8 == 7:
            rss.append(rss_bytes())
            tensors.append(live_tensors())
    return results, pool, peak_pool, rss, tensors


def test_soak_2000_calls_8_concurrent_requests():
    lm = make_tiny()
    torch.set_num_threads(1)  # 8 request threads on a 2-core CI machine
    try:
        concurrent, pool, peak, rss, tensors = soak(lm, WORKERS)
        sequential, _, _, _, _ = soak(lm, 1)
    finally:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    calls = sum(len(r.calls) for r in concurrent)
    assert calls >= CALLS
    # the pool stayed within its byte budget the whole time, and had to evict to do so
    assert peak <= BUDGET and pool.stats().evictions > 0
    assert 0.2 < reuse_rate(concurrent) < 1.0
    # same outputs (every call's path and reply tokens) as the same requests run one at a time
    assert [[(c["path"], c["reply_ids"]) for c in r.calls] for r in concurrent] == \
           [[(c["path"], c["reply_ids"]) for c in r.calls] for r in sequential]
    # memory does not grow after warm-up (the first quarter): live tensors and resident set stay flat
    warm = len(rss) // 4
    assert max(tensors[warm:]) <= max(tensors[: warm + 1]) * 1.05 + 50, tensors
    assert max(rss[warm:]) - rss[warm] < 48 << 20, [r >> 20 for r in rss]
