"""Partial reuse (`+partial`): shareable placeholders reused, the others recomputed over the assembled cache."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, rand_ids

from kvcomm.agents.runner import MultiAgentRunner
from kvcomm.agents.workloads import Workload, math_items
from kvcomm.core.kv import move, prefill
from kvcomm.reuse.anchors import AnchorPool
from kvcomm.reuse.config import ReuseConfig, parse_setting
from kvcomm.reuse.engine import Content, ReuseEngine
from kvcomm.reuse.templates import AgentTemplate

TOL = dict(atol=1e-4, rtol=1e-4)


class ForgetfulPool(AnchorPool):
    """An anchor pool whose matches for the placeholders in `forget` fail the entropy test."""

    forget: tuple[str, ...] = ()

    def match_many(self, queries):
        found = super().match_many(queries)
        return [None if q[0] in self.forget else m for q, m in zip(queries, found)]


def _workload(n=2):
    return Workload("math", ["you are one", "you are two", "you are three"], "answer", "judge", math_items(n, 0))


def test_settings():
    mode, cfg = parse_setting("reuse+partial")
    assert mode == "reuse" and cfg.partial and not cfg.defer_base
    for s in ("blend@0.15+partial+defer", "blend@0.15:first+defer+partial"):
        mode, cfg = parse_setting(s)
        assert (mode, cfg.partial, cfg.defer_base, cfg.recompute) == ("reuse", True, True, 0.15)
    for bad in ("cacheblend@0.1+partial", "reuse+partial+partial", "reuse+fast", "dense+partial", "+partial", "reuse+"):
        with pytest.raises(ValueError, match="unknown setting"):
            parse_setting(bad)
    with pytest.raises(ValueError, match="partial needs offsets"):
        ReuseConfig(partial=True, offsets=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_no_shareable_placeholder_recomputes_everything_after_p0_and_equals_dense(arch):
    """Every placeholder forced to be new: partial recomputes all of the prompt after p0, which is a dense
    prefill over the exact p0 (the same replies as dense), prefilling p0's tokens fewer, and records the
    same anchors as the paper's whole-prompt fallback."""
    lm = make_tiny(arch)
    wl = _workload()
    outs, pools = {}, {}
    for name, setting in (("dense", "dense"), ("fallback", "reuse"), ("partial", "reuse+partial")):
        mode, config = parse_setting(setting, ReuseConfig(max_new_tokens=6))
        engine = ReuseEngine(lm, mode, config=config, force_new_anchors=name != "dense")
        runner = MultiAgentRunner(engine, wl, 3, "fully_connected")
        outs[name] = [c for it in wl.items for c in runner.run_item(it).calls]
        pools[name] = engine.pool
    assert all(c["path"] == "partial" for c in outs["partial"])
    assert [c["reply_ids"] for c in outs["partial"]] == [c["reply_ids"] for c in outs["dense"]]
    assert all(p["prefilled_tokens"] < f["prefilled_tokens"] for p, f in zip(outs["partial"], outs["fallback"]))
    for name, group in pools["fallback"]._anchors.items():
        for key, anchor in group.items():
            other = pools["partial"]._anchors[name][key]
            assert anchor.deltas.keys() == other.deltas.keys()
            for agent_key, delta in anchor.deltas.items():
                for a, b in ((delta.placeholder, other.deltas[agent_key].placeholder),
                             (delta.segment, other.deltas[agent_key].segment)):
                    torch.testing.assert_close(a.k, b.k, **TOL)
                    torch.testing.assert_close(a.v, b.v, **TOL)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_only_the_failing_placeholder_and_its_segment_are_recomputed(arch, monkeypatch):
    """Two placeholders, both anchored by an earlier identical call (so their offsets are exact); the
    second fails its match. Partial reuse keeps the first as assembled, recomputes the second and the
    segment after it, and gives dense's logits; the anchor it records holds the true deltas."""
    lm = make_tiny(arch)
    agent = AgentTemplate.build(lm.tokenizer, "a", "you are one",
                                "question {user_question} and the other said {agent_0_current} so the answer is")
    q, other = rand_ids(7, 3), rand_ids(9, 4)
    pool = ForgetfulPool()
    engine = ReuseEngine(lm, "reuse", pool=pool, config=ReuseConfig(max_new_tokens=1, partial=True))
    contents = lambda: {"user_question": Content(list(q)), "agent_0_current": Content(list(other))}  # noqa: E731
    assert engine.call(agent, contents(), request=1).path == "partial"
    pool.commit(1)
    pool.forget = ("agent_0_current",)
    captured = {}
    orig = engine._reuse_call

    def spy(*a, **k):
        out = orig(*a, **k)
        captured["logits"], captured["cache"] = out[0], out[1]
        return out

    engine._reuse_call = spy
    import kvcomm.reuse.engine as engine_module

    picks = []
    real_recompute = engine_module.recompute
    monkeypatch.setattr(engine_module, "recompute", lambda lm, ids, full, picked: picks.append(picked) or real_recompute(lm, ids, full, picked))
    c = contents()
    res = engine.call(agent, c, request=2)
    ids, spans = agent.layout({"user_question": q, "agent_0_current": other})
    (_, a, b), (_, _, sb) = spans[3], spans[4]
    bases = sum(len(engine.head) + len(x) for x in (q, other))  # both stand-alone contents encoded here
    assert res.path == "partial" and list(res.matched) == ["user_question"]
    assert picks == [list(range(a, sb - 1))]  # the reply and the segment after it; the last token runs as the tail
    assert res.prefilled_tokens == bases + (sb - a)
    ref_logits, ref_cache, _ = prefill(lm, ids)
    torch.testing.assert_close(captured["logits"], ref_logits[0, -1], **TOL)
    n = len(ids)  # the engine's cache has since grown by the decoded token
    for layer, want in zip(captured["cache"].layers, ref_cache.layers):
        torch.testing.assert_close(layer.keys[:, :, :n], want.keys, **TOL)
        torch.testing.assert_close(layer.values[:, :, :n], want.values, **TOL)
    staged = pool._staged[2]
    assert [s[0] for s in staged] == ["agent_0_current"]
    real_k = ref_cache.layers[3].keys[:, :, a:b]
    delta = staged[0][4].placeholder
    recorded = move(lm, c["agent_0_current"].base + delta, a)  # base + Δφ, moved to its real positions
    torch.testing.assert_close(recorded.k[3], real_k[0], **TOL)
