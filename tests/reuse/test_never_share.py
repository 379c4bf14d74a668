"""`PoolConfig.never_share`: placeholders that are never matched, so their KV is recomputed (`+partial`) or the
call is prefilled densely, while the other placeholders still reuse."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from kvcomm.agents.runner import MultiAgentRunner, make_engine
from kvcomm.agents.workloads import Workload, math_items
from kvcomm.core.kv import KVBlock
from kvcomm.reuse.anchors import AgentDelta, AnchorPool, PoolConfig
from kvcomm.reuse.config import ReuseConfig


def _block(n, value):
    t = torch.full((2, 1, n, 4), float(value))
    return KVBlock(t.clone(), t.clone())


def test_a_named_placeholder_is_never_matched_and_the_others_are():
    pool = AnchorPool(tau=0.01, never_share=("user_question",))
    for name in ("user_question", "agent_0_current"):
        pool.stage(0, name, "k", _block(3, 1.0), "agent", AgentDelta(_block(3, 10.0), _block(2, 1.0)))
    pool.commit(0)
    assert pool.match("user_question", "agent", _block(3, 1.0)) is None
    assert pool.match("agent_0_current", "agent", _block(3, 1.0)) is not None


def test_names_are_checked():
    with pytest.raises(ValueError, match="never_share"):
        PoolConfig(never_share=("question",)).build()


def test_partial_reuse_recomputes_the_named_placeholder_only():
    lm = make_tiny("llama")
    wl = Workload("math", ["you are one", "you are two"], "answer", "judge", math_items(2, 0))

    def replay(never_share):
        engine = make_engine(lm, "reuse+partial", ReuseConfig(max_new_tokens=4), PoolConfig(never_share=never_share))
        runner = MultiAgentRunner(engine, wl, 2, "fully_connected")
        runner.run_item(wl.items[0])
        return runner.run_item(wl.items[0])  # the same contents again: every placeholder matches itself

    plain, gated = replay(()), replay(("user_question",))
    assert [c["path"] for c in plain.calls] == ["reuse"] * 3
    assert [c["path"] for c in gated.calls] == ["partial"] * 3
    for p, g in zip(plain.calls, gated.calls):
        assert "user_question" in p["matched"] and "user_question" not in g["matched"]
        assert set(g["matched"]) == set(p["matched"]) - {"user_question"}
        assert g["prefilled_tokens"] > p["prefilled_tokens"]
