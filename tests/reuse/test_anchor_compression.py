"""Compressed offsets in the anchor pool: byte accounting, capacity under one budget, matching, reuse end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from kvcomm.agents.runner import MultiAgentRunner
from kvcomm.agents.workloads import Workload, math_items
from kvcomm.core.kv import KVBlock
from kvcomm.core.quant import part_shapes, relative_error
from kvcomm.reuse.anchors import AgentDelta, AnchorPool, PackedBlock, PoolConfig
from kvcomm.reuse.config import ReuseConfig
from kvcomm.reuse.engine import ReuseEngine

L, H, D = 4, 2, 16
AGENTS = ("a0", "a1", "a2", "a3")


def block(n: int, seed: int, scale: float = 1.0) -> KVBlock:
    g = torch.Generator().manual_seed(seed)
    return KVBlock(torch.randn(L, H, n, D, generator=g) * scale, torch.randn(L, H, n, D, generator=g) * scale)


def fill(pool: AnchorPool, anchors: int, n: int = 12, m: int = 5) -> None:
    """`anchors` contents, each with deltas for four agents (placeholder n tokens, segment m tokens)."""
    for i in range(anchors):
        for j, agent in enumerate(AGENTS):
            pool.stage(i, "user_question", f"c{i}", block(n, 1000 * i), agent,
                       AgentDelta(block(n, 1000 * i + 10 * j + 1, 0.1), block(m, 1000 * i + 10 * j + 2, 0.1)))
        pool.commit(i)


def stored_bytes(precision: str, n: int, g: int = 128) -> int:
    """Codes + scales (+ zero points) of one quantized [L, H, n, D] block, from the layout alone."""
    item = {"fp8": 1, "int8": 1, "int4": 1}[precision]
    total = 0
    for axis in ("token", "channel"):
        parts = part_shapes(precision, g, (L, H, n, D), axis)
        total += torch.Size(parts["codes"]).numel() * item
        total += sum(torch.Size(parts[p]).numel() * 2 for p in ("scale", "zero") if p in parts)
    return total


@pytest.mark.parametrize("precision", ["fp8", "int8", "int4"])
def test_byte_accounting_counts_the_compressed_size(precision):
    pool = PoolConfig(offset_precision=precision).build()
    fill(pool, 3)
    base = 2 * L * H * 12 * D * 4  # bases stay fp32
    per_anchor = base + len(AGENTS) * (stored_bytes(precision, 12) + stored_bytes(precision, 5))
    assert pool.nbytes == 3 * per_anchor
    assert pool.nbytes == sum(a.nbytes for g in pool._anchors.values() for a in g.values())
    a = pool.anchors("user_question")[0]
    assert all(isinstance(d.placeholder, PackedBlock) and isinstance(d.segment, PackedBlock) for d in a.deltas.values())


def test_dense_cast_offsets_and_default_unchanged():
    for precision, itemsize in ((None, 4), ("bf16", 2), ("fp16", 2)):
        pool = AnchorPool(offset_precision=precision)
        fill(pool, 1)
        assert pool.nbytes == 2 * L * H * 12 * D * 4 + len(AGENTS) * 2 * L * H * (12 + 5) * D * itemsize


def test_same_budget_holds_more_anchors():
    """With fp32 KV (a CPU model) and four agents' offsets per anchor, one 1 MB budget keeps 12 anchors
    as computed, 30 with int8 offsets (2.5x) and 36 with int4 (3.0x): bases stay fp32, and scales cost
    ~15-30% at this tiny head_dim of 16 (~5% at 128)."""
    budget = 1_000_000
    kept = {}
    for precision in (None, "int8", "int4"):
        pool = AnchorPool(max_anchors=100, byte_budget=budget, offset_precision=precision)
        fill(pool, 60)
        assert pool.nbytes <= budget and pool.stats().evictions > 0
        kept[precision] = pool.stats().anchors
    assert kept[None] == 12 and kept["int8"] >= 2.4 * kept[None] and kept["int4"] >= 2.9 * kept[None], kept


@pytest.mark.parametrize("precision,bound", [("int8", 0.015), ("fp8", 0.04), ("int4", 0.15)])
def test_matching_still_works(precision, bound):
    """Same weights and entropy as the uncompressed pool (bases are not compressed); offsets within the
    quantizer's round-trip error."""
    dense, packed = AnchorPool(gamma=0.3, tau=0.01), AnchorPool(gamma=0.3, tau=0.01, offset_precision=precision)
    for pool in (dense, packed):
        fill(pool, 3)
    query = KVBlock(block(12, 1000).k[:, :, :9] * 1.01, block(12, 1000).v[:, :, :9] * 1.01)  # near anchor c1
    for agent in AGENTS:
        a, b = dense.match("user_question", agent, query), packed.match("user_question", agent, query)
        assert a is not None and b is not None
        torch.testing.assert_close(a.weights, b.weights)
        assert a.entropy == pytest.approx(b.entropy) and a.anchors == b.anchors
        for x, y in ((a.placeholder_offset, b.placeholder_offset), (a.segment_offset, b.segment_offset)):
            assert y.k.shape == x.k.shape and y.k.dtype == x.k.dtype
            assert relative_error(x.k, y.k) < bound and relative_error(x.v, y.v) < bound


def test_bad_settings_refused():
    with pytest.raises(ValueError, match="offset_precision"):
        AnchorPool(offset_precision="int3")
    with pytest.raises(ValueError, match="offset_group_size"):
        PoolConfig(offset_precision="int8", offset_group_size=0).build()


def test_reuse_with_int8_offsets_end_to_end():
    """A replayed request reuses every call with int8 offsets, and replies equal the first (dense) pass."""
    lm = make_tiny("llama")
    wl = Workload("math", ["you are one", "you are two", "you are three"], "answer", "judge", math_items(1, 0))
    pool = AnchorPool(offset_precision="int8")
    runner = MultiAgentRunner(ReuseEngine(lm, "reuse", pool=pool, config=ReuseConfig(max_new_tokens=6)), wl, 3,
                              "fully_connected")
    first, second = runner.run_item(wl.items[0]), runner.run_item(wl.items[0])
    assert [c["path"] for c in first.calls] == ["dense"] * 4 and [c["path"] for c in second.calls] == ["reuse"] * 4
    assert [c["reply_ids"] for c in first.calls] == [c["reply_ids"] for c in second.calls]
    assert any(isinstance(d.placeholder, PackedBlock) for g in pool._anchors.values() for a in g.values()
               for d in a.deltas.values())
