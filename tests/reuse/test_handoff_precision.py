"""KV handed between agents at a chosen precision (ReuseConfig.kv_precision)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from kvcomm.agents.runner import MultiAgentRunner
from kvcomm.agents.workloads import Workload, math_items
from kvcomm.core.quant import relative_error
from kvcomm.reuse.config import ReuseConfig
from kvcomm.reuse.engine import Content, ReuseEngine


def _run(lm, precision, mode="reuse"):
    wl = Workload("math", ["you are one", "you are two"], "answer", "judge", math_items(2, 0))
    engine = ReuseEngine(lm, mode, config=ReuseConfig(max_new_tokens=4, kv_precision=precision))
    runner = MultiAgentRunner(engine, wl, 2, "fully_connected")
    return [c for it in [*wl.items, wl.items[0]] for c in runner.run_item(it).calls]


def test_handoff_quantizes_what_other_agents_receive():
    lm = make_tiny()
    engine = ReuseEngine(lm, "reuse", config=ReuseConfig(kv_precision="int8"))
    plain = ReuseEngine(lm, "reuse")
    a, b = Content([5, 6, 7, 8]), Content([5, 6, 7, 8])
    qa, _ = engine.base_kv(a)
    pb, _ = plain.base_kv(b)
    assert qa.k.dtype == pb.k.dtype
    assert not torch.equal(qa.v, pb.v)
    assert 0 < relative_error(pb.v, qa.v) < 0.02 and 0 < relative_error(pb.k, qa.k) < 0.02


def test_full_precision_handoff_changes_nothing():
    lm = make_tiny()
    assert [c["reply_ids"] for c in _run(lm, "fp32")] == [c["reply_ids"] for c in _run(lm, None)]


def test_int4_handoff_runs_every_path():
    calls = _run(make_tiny("qwen2"), "int4")
    assert {c["path"] for c in calls} == {"dense", "reuse"}


def test_bad_precision_is_refused():
    with pytest.raises(ValueError, match="kv_precision"):
        ReuseConfig(kv_precision="int3")


def test_relay_hands_its_transcripts_at_the_chosen_precision():
    """Relay reads the previous agent's conversation KV: at int8 that KV is what an int8 message delivers."""
    lm = make_tiny()
    q = Content([5, 6, 7, 8, 9])
    wl = Workload("math", ["you are one", "you are two"], "answer", "judge", math_items(1, 0))
    got = {}
    for precision in (None, "int8"):
        engine = ReuseEngine(lm, "relay", config=ReuseConfig(max_new_tokens=3, kv_precision=precision))
        agent = MultiAgentRunner(engine, wl, 2).templates[(0, 0)]
        got[precision] = engine.call(agent, {"user_question": q}).reply.transcript.kv
    assert 0 < relative_error(got[None].v, got["int8"].v) < 0.02 and 0 < relative_error(got[None].k, got["int8"].k) < 0.02
    assert [c["path"] for c in _run(lm, "int8", mode="relay")] == ["prefix", "relay", "relay"] * 3
