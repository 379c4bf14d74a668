"""Relay (`kvcomm.reuse.relay`): an agent reuses the previous agent's KV of the conversation past the role line."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from kvcomm.agents.runner import MultiAgentRunner
from kvcomm.agents.workloads import Workload, math_items
from kvcomm.core.kv import cache_to_block, move, prefill
from kvcomm.reuse.config import ReuseConfig, parse_setting
from kvcomm.reuse.engine import Content, ReuseEngine
from kvcomm.reuse.relay import common_prefix

TOL = dict(atol=1e-4, rtol=1e-4)


def _runs(lm, wl, settings, agents=3, decision=True):
    out = {}
    for setting in settings:
        mode, config = parse_setting(setting, ReuseConfig(max_new_tokens=6))
        runner = MultiAgentRunner(ReuseEngine(lm, mode, config=config), wl, agents, "fully_connected", decision=decision)
        out[setting] = [c for it in wl.items for c in runner.run_item(it).calls]
    return out


def test_settings():
    assert parse_setting("relay") == ("relay", ReuseConfig())
    for bad in ("relay+defer", "relay+partial", "relay@0.1"):
        with pytest.raises(ValueError, match="unknown setting"):
            parse_setting(bad)
    assert common_prefix([1, 2, 3, 4], [1, 2, 3, 5], 9) == 3
    assert common_prefix([1, 2, 3], [1, 2, 3], 2) == 2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_same_role_everywhere_gives_dense(arch):
    """When every agent has the same first segment (on the tiny tokenizer "You are agent k." reads the same for
    every k; no judge, whose first segment differs), the previous agent's conversation KV is exactly what a
    dense prefill computes: relay gives dense's replies, reusing all but the newest reply and the closing segment."""
    lm = make_tiny(arch)
    wl = Workload("math", ["you are one"], "answer", "judge", math_items(2, 0))
    out = _runs(lm, wl, ("dense", "relay"), decision=False)
    dense, relay = out["dense"], out["relay"]
    assert [c["reply_ids"] for c in relay] == [c["reply_ids"] for c in dense]
    assert [c["path"] for c in relay] == ["prefix", "relay", "relay"] * 2
    for d, r in zip(dense, relay):
        assert r["prefilled_tokens"] < d["prefilled_tokens"]
    # from agent 2 on, the newest reply and the segments around it are all that runs
    assert relay[2]["prefilled_tokens"] < dense[2]["prefilled_tokens"] - len(relay[0]["reply_ids"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reused_span_is_the_previous_agents_kv_moved(arch):
    """Roles of different lengths: agent 1's KV of the tokens it shares with agent 0's prompt past p0 is agent
    0's, keys re-rotated by the difference of the p0 lengths (values as they were, so not dense's); the rest
    is prefilled over it, so agent 1 prefills only its prompt's tokens after that run."""
    lm = make_tiny(arch)
    wl = Workload("math", ["you are one", "you are the two of us"], "answer", "judge", math_items(1, 0))
    engine = ReuseEngine(lm, "relay", config=ReuseConfig(max_new_tokens=5))
    runner = MultiAgentRunner(engine, wl, 2)
    a0, a1 = runner.templates[(0, 0)], runner.templates[(0, 1)]
    q = Content(engine.tokenizer(wl.items[0].question, add_special_tokens=False)["input_ids"])
    r0 = engine.call(a0, {"user_question": q})
    assert r0.path == "prefix" and r0.reply.transcript is not None
    r1 = engine.call(a1, {"user_question": q, "agent_0_current": r0.reply})
    t0, t1 = r0.reply.transcript, r1.reply.transcript
    ids1, _ = a1.layout({"user_question": q.ids, "agent_0_current": r0.reply.ids})
    shared = common_prefix(t0.ids, ids1[t1.start :], 10**9)
    assert shared >= len(q.ids) and t1.start > t0.start
    assert r1.path == "relay" and r1.prefilled_tokens == len(ids1) - t1.start - shared
    reused, theirs = t1.kv.slice(0, shared), move(lm, t0.kv.slice(0, shared), t1.start - t0.start)
    torch.testing.assert_close(reused.v, theirs.v, atol=0, rtol=0)
    torch.testing.assert_close(reused.k, theirs.k, **TOL)
    _, cache, _ = prefill(lm, ids1)
    dense = cache_to_block(cache, t1.start, t1.start + shared)
    assert (reused.v[1:] - dense.v[1:]).abs().max() > 1e-3  # another role line before it: not dense's KV
    torch.testing.assert_close(reused.v[0], dense.v[0], **TOL)  # layer 0 depends on token and position only


def test_ray_backend_refuses_relay():
    from kvcomm.agents.remote import RayEngine

    with pytest.raises(ValueError, match="one process"):
        RayEngine("embedded", "relay")


def test_cli_reports_relay_beside_dense(tiny_dir, tmp_path):
    """`kvcomm agents --mode relay`: its reused calls count in the reuse rate and it prefills less than dense."""
    import json

    from kvcomm.cli.main import main

    assert main(["agents", "--model", str(tiny_dir), "--agents", "3", "--limit", "2", "--max-new-tokens", "3",
                 "--mode", "dense", "--mode", "relay", "--out", str(tmp_path)]) == 0
    relay = json.loads((tmp_path / "agents.json").read_text())["modes"]["relay"]
    assert relay["reuse_rate"] == 0.75  # every call but the first agent's (3 agents and the judge)
    assert 0 < relay["prefill_fraction"] < 0.8
