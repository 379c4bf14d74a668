"""`PoolConfig.max_distance`: a second shareability test beside the paper's entropy rule (the nearest anchor
must lie within a relative value distance), and the distances it records."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny

from kvcomm.agents.runner import MultiAgentRunner
from kvcomm.agents.workloads import Workload, math_items
from kvcomm.core.kv import KVBlock
from kvcomm.reuse.anchors import AgentDelta, AnchorPool, PoolConfig
from kvcomm.reuse.config import ReuseConfig
from kvcomm.reuse.engine import ReuseEngine


def _block(n, value, layers=2):
    t = torch.full((layers, 1, n, 4), float(value))
    return KVBlock(t.clone(), t.clone())


def _pool(max_distance):
    pool = AnchorPool(gamma=0.3, tau=0.01, max_distance=max_distance)
    for i, v in enumerate((1.0, 2.0)):
        pool.stage(0, "user_question", f"k{i}", _block(3, v), "agent", AgentDelta(_block(3, v * 10), _block(2, v)))
    pool.commit(0)
    return pool


def test_the_gate_refuses_a_content_whose_nearest_anchor_is_far():
    # 1.2 is one-hot on anchor 1.0 at τ = 0.01 (the entropy rule passes it), but 0.2 / 1.2 = 0.167 away
    assert _pool(None).match("user_question", "agent", _block(3, 1.2)) is not None
    assert _pool(0.05).match("user_question", "agent", _block(3, 1.2)) is None
    near = _pool(0.05).match("user_question", "agent", _block(3, 1.01))
    assert near is not None and near.distance == pytest.approx(0.01 / 1.01, rel=1e-4)
    # the entropy rule still applies: equidistant anchors stay ambiguous however close
    assert _pool(10.0).match("user_question", "agent", _block(3, 1.5)) is None


def test_an_infinite_gate_changes_nothing_and_records_the_distance():
    plain = _pool(None).match("user_question", "agent", _block(3, 1.2))
    gated = _pool(math.inf).match("user_question", "agent", _block(3, 1.2))
    assert plain.distance is None and gated.distance == pytest.approx(0.2 / 1.2, rel=1e-4)
    torch.testing.assert_close(gated.placeholder_offset.k, plain.placeholder_offset.k)
    torch.testing.assert_close(gated.segment_offset.v, plain.segment_offset.v)
    torch.testing.assert_close(gated.weights, plain.weights)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_max_distance_must_be_positive(bad):
    with pytest.raises(ValueError, match="max_distance"):
        PoolConfig(max_distance=bad).build()


def test_agent_calls_record_distances_and_a_tight_gate_sends_new_content_to_dense():
    lm = make_tiny("llama")
    wl = Workload("math", ["you are one", "you are two"], "answer", "judge", math_items(2, 0))

    def run(max_distance):
        engine = ReuseEngine(lm, "reuse", pool=PoolConfig(max_distance=max_distance).build(),
                             config=ReuseConfig(max_new_tokens=4))
        runner = MultiAgentRunner(engine, wl, 2, "fully_connected")
        runner.run_item(wl.items[0])
        return runner.run_item(wl.items[0]), runner.run_item(wl.items[1])

    replay, other = run(math.inf)
    assert [c["path"] for c in replay.calls] == ["reuse"] * 3
    for c in replay.calls:  # the same contents again: their nearest anchors are themselves
        assert set(c["distances"]) == set(c["matched"]) and all(d < 1e-3 for d in c["distances"].values())
    assert other.calls[0]["path"] == "reuse" and other.calls[0]["distances"]["user_question"] > 1e-3
    _, other = run(1e-3)  # a new question is farther than that from every anchor
    assert other.calls[0]["path"] == "dense" and other.calls[0]["distances"] == {}
