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
    assert parse_setting("relay@0.1") == ("relay", ReuseConfig(recompute=0.1, select="first"))
    assert parse_setting("relay@0.2:deviation") == ("relay", ReuseConfig(recompute=0.2, select="deviation"))
    assert parse_setting("relay@0.1:attention") == ("relay", ReuseConfig(recompute=0.1, select="attention"))
    assert parse_setting("relay@0.1:attention+replies") == ("relay", ReuseConfig(recompute=0.1, select="attention",
                                                                                  spare_question=True))
    assert parse_setting("relay+newest") == ("relay", ReuseConfig(relay_newest=True))
    assert parse_setting("relay@0.1:attention+decision") == ("relay", ReuseConfig(recompute=0.1, select="attention",
                                                                                   recompute_only="decision"))
    assert parse_setting("relay@0.3+newest") == ("relay", ReuseConfig(recompute=0.3, select="first", relay_newest=True))
    assert parse_setting("relay@1:attention+cap0.27") == ("relay", ReuseConfig(recompute=1.0, select="attention",
                                                                               prefill_cap=0.27))
    with pytest.raises(ValueError, match="attention picker"):
        ReuseEngine(make_tiny("llama"), "relay", config=parse_setting("relay@0.3:attention+newest")[1])
    for bad in ("relay+defer", "relay+partial", "relay@0.1+defer", "relay@0.1:offset", "relay@1.5", "relay@x",
                "blend@0.1:attention", "cacheblend@0.1:attention", "relay+replies", "relay@0+replies",
                "blend@0.1+replies", "reuse+replies", "relay@0.1+replies+replies", "reuse+newest", "blend@0.1+newest", "relay+decision", "blend@0.1+decision",
                "relay+cap0.3", "relay@0.5+cap0", "relay@0.5+cap1.5", "relay@0.5+capx", "relay@0.5+cap",
                "relay@0.5+cap0.2+cap0.3", "reuse+cap0.3", "blend@0.1+cap0.3"):
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


def _relay_and_dense(arch, settings):
    """Agent 1's call under each relay setting, with the dense prefill's KV of the same prompt."""
    lm = make_tiny(arch)
    wl = Workload("math", ["you are one", "you are the two of us"], "answer", "judge", math_items(1, 0))
    out = {}
    for setting in settings:
        mode, config = parse_setting(setting, ReuseConfig(max_new_tokens=5))
        engine = ReuseEngine(lm, mode, config=config)
        runner = MultiAgentRunner(engine, wl, 2)
        a0, a1 = runner.templates[(0, 0)], runner.templates[(0, 1)]
        q = Content(engine.tokenizer(wl.items[0].question, add_special_tokens=False)["input_ids"])
        r0 = engine.call(a0, {"user_question": q})
        out[setting] = engine.call(a1, {"user_question": q, "agent_0_current": r0.reply})
    ids, _ = a1.layout({"user_question": q.ids, "agent_0_current": r0.reply.ids})
    _, cache, _ = prefill(lm, ids)
    return lm, ids, out, cache_to_block(cache)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_relay_recompute_all_is_dense_and_none_is_relay(arch):
    """relay@1 recomputes every relayed token over the exact p0: dense's KV and reply at the cost of a prefill
    past p0; relay@0 is relay, token for token."""
    lm, ids, out, dense = _relay_and_dense(arch, ("relay", "relay@0", "relay@1"))
    start = out["relay"].reply.transcript.start
    all_kv = out["relay@1"].reply.transcript.kv.slice(0, len(ids) - start)
    torch.testing.assert_close(all_kv.k, dense.slice(start, len(ids)).k, **TOL)
    torch.testing.assert_close(all_kv.v, dense.slice(start, len(ids)).v, **TOL)
    assert out["relay@1"].prefilled_tokens == len(ids) - start
    assert out["relay@0"].reply_ids == out["relay"].reply_ids
    assert out["relay@0"].prefilled_tokens == out["relay"].prefilled_tokens < len(ids) - start
    torch.testing.assert_close(out["relay@0"].reply.transcript.kv.v, out["relay"].reply.transcript.kv.v, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_relay_recompute_prefills_its_picks_and_moves_toward_dense(arch):
    """relay@0.5:first recomputes the first tokens of each relayed segment: it prefills that many more tokens
    than relay, the recomputed span's KV is closer to dense's, and the first relayed token (which sees only the
    exact p0 and itself once recomputed) gets exactly dense's KV."""
    lm, ids, out, dense = _relay_and_dense(arch, ("relay", "relay@0.5"))
    relay, half = out["relay"], out["relay@0.5"]
    start = relay.reply.transcript.start
    shared = len(ids) - start - relay.prefilled_tokens
    assert half.prefilled_tokens == relay.prefilled_tokens + -(-shared // 2)

    def err(res):
        got = res.reply.transcript.kv.slice(0, shared).v[1:]
        return float((got - dense.slice(start, start + shared).v[1:]).norm())

    assert err(half) < err(relay)
    first = half.reply.transcript.kv.slice(0, 1)
    torch.testing.assert_close(first.v, dense.slice(start, start + 1).v, **TOL)
    torch.testing.assert_close(first.k, dense.slice(start, start + 1).k, **TOL)


def test_relay_recompute_by_deviation_pays_one_layer_of_the_prompt():
    """relay@0.5:deviation picks by CacheBlend's layer-1 rule: as many picks as `first`, plus one layer of a full
    prefill over p0 and the relayed span (their length / L token-equivalents) to rank them."""
    lm, ids, out, _ = _relay_and_dense("llama", ("relay", "relay@0.5", "relay@0.5:deviation"))
    relayed_end = len(ids) - out["relay"].prefilled_tokens  # p0 and the relayed tokens
    layers = lm.model.config.num_hidden_layers
    assert out["relay@0.5:deviation"].path == "relay"
    assert out["relay@0.5:deviation"].prefilled_tokens == out["relay@0.5"].prefilled_tokens + round(relayed_end / layers)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_relay_recompute_by_attention(arch):
    """relay@R:attention runs the prompt's rest over the relayed KV once, picks the relayed tokens its closing
    segment reads most, then reruns the picks and the last prompt token: relay's prefill + picks + 1 token. At
    R = 1 every relayed token is recomputed over the exact p0: dense's KV there (the rest, computed over the
    stale KV, is not)."""
    lm, ids, out, dense = _relay_and_dense(arch, ("relay", "relay@0.5:attention", "relay@1:attention"))
    relay = out["relay"]
    start = relay.reply.transcript.start
    shared = len(ids) - start - relay.prefilled_tokens
    assert out["relay@0.5:attention"].prefilled_tokens == relay.prefilled_tokens + -(-shared // 2) + 1
    assert out["relay@1:attention"].prefilled_tokens == relay.prefilled_tokens + shared + 1
    every = out["relay@1:attention"].reply.transcript.kv.slice(0, shared)
    torch.testing.assert_close(every.v, dense.slice(start, start + shared).v, **TOL)
    torch.testing.assert_close(every.k, dense.slice(start, start + shared).k, **TOL)
    with pytest.raises(ValueError, match="attention picker"):
        ReuseEngine(lm, "reuse", config=ReuseConfig(recompute=0.1, select="attention"))


def _third_agent(arch, settings):
    """The model, and the third agent's prompt, spans and call (it relays the question and agent 0's reply)
    under each setting."""
    lm = make_tiny(arch)
    wl = Workload("math", ["you are one", "you are the two of us", "three"], "answer", "judge", math_items(1, 0))
    out = {}
    for setting in settings:
        mode, config = parse_setting(setting, ReuseConfig(max_new_tokens=5))
        engine = ReuseEngine(lm, mode, config=config)
        runner = MultiAgentRunner(engine, wl, 3)
        contents = {"user_question": Content(engine.tokenizer(wl.items[0].question, add_special_tokens=False)["input_ids"])}
        for k in range(3):
            res = engine.call(runner.templates[(0, k)], dict(contents))
            contents[f"agent_{k}_current"] = res.reply
        out[setting] = res
    ids, spans = runner.templates[(0, 2)].layout({name: c.ids for name, c in contents.items()})
    return lm, ids, spans, out


@pytest.mark.parametrize("select", ["first", "attention"])
def test_relay_replies_spares_the_question(select):
    """`+replies` leaves the question's relayed KV as the first agent computed it: R counts and picks only the
    relayed tokens after it, so the question's KV is relay's bit for bit, and the prefill is relay's + R of the
    rest (+1 for the attention picker's rerun token)."""
    plain, spared = f"relay@0.5:{select}", f"relay@0.5:{select}+replies"
    _, ids, spans, out = _third_agent("qwen2", ("relay", plain, spared))
    relay = out["relay"]
    start = relay.reply.transcript.start
    covered = len(ids) - start - relay.prefilled_tokens
    _, qa, qb = spans[1]
    assert qa == start and covered > qb - qa > 0  # the question is relayed, and so is something after it
    rerun = 1 if select == "attention" else 0
    assert out[plain].prefilled_tokens == relay.prefilled_tokens + -(-covered // 2) + rerun
    assert out[spared].prefilled_tokens == relay.prefilled_tokens + -(-(covered - (qb - qa)) // 2) + rerun
    question = slice(0, qb - qa)
    kv = {s: out[s].reply.transcript.kv for s in out}
    torch.testing.assert_close(kv[spared].v[:, :, question], kv["relay"].v[:, :, question], atol=0, rtol=0)
    assert (kv[spared].v[1:, :, qb - qa : covered] - kv["relay"].v[1:, :, qb - qa : covered]).abs().max() > 0
    if select == "first":  # the question's first token is among plain first's picks: recomputed, off relay's KV
        assert (kv[plain].v[1:, :, 0] - kv["relay"].v[1:, :, 0]).abs().max() > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_relay_newest_reuses_the_producers_reply(arch):
    """`+newest` relays the newest reply as its producer computed it: the third agent prefills only the reply's
    header and the closing segment, and the reply's KV is the producer's, moved. relay@1+newest recomputes all of
    it over the exact p0: dense's KV and reply, at the cost of a prefill past p0."""
    lm, ids, spans, out = _third_agent(arch, ("relay", "relay+newest", "relay@1+newest"))
    relay, newest, every = out["relay"], out["relay+newest"], out["relay@1+newest"]
    start = relay.reply.transcript.start
    _, a, b = next(sp for sp in spans if sp[0] == "agent_1_current")
    covered = len(ids) - start - relay.prefilled_tokens  # relay's prefix; then the header, the reply, the rest
    assert newest.path == "relay" and newest.prefilled_tokens == relay.prefilled_tokens - (b - a)
    assert a > start + covered  # a header runs between the relayed prefix and the reply
    _, cache, _ = prefill(lm, ids)
    dense = cache_to_block(cache)
    torch.testing.assert_close(every.reply.transcript.kv.slice(0, len(ids) - start).v, dense.slice(start, len(ids)).v, **TOL)
    assert every.prefilled_tokens == len(ids) - start
    got = newest.reply.transcript.kv.slice(a - start, b - start)
    assert (got.v[1:] - dense.slice(a, b).v[1:]).abs().max() > 1e-3  # computed in another context: not dense's


def test_with_newest_reply_moves_the_producers_kv():
    """`with_newest_reply` appends zeros for the header and the producer's reply KV moved to this prompt's
    positions, and names the header positions; a prompt whose next placeholder is no transcript's reply is left."""
    from kvcomm.core.kv import KVBlock
    from kvcomm.reuse.relay import Transcript, with_newest_reply

    lm = make_tiny("llama")
    _, cache, _ = prefill(lm, list(range(3, 23)))
    producer = Transcript(list(range(5, 23)), cache_to_block(cache, 2, 20), 2)  # its last 6 tokens: the reply
    ids = [1, 2, 3, 4, 5, 6, 90, 91] + list(range(17, 23)) + [95, 96]
    spans = [("p0", 0, 2), ("user_question", 2, 6), ("p1", 6, 8), ("agent_0_current", 8, 14), ("p2", 14, 16)]
    _, pcache, _ = prefill(lm, ids[:6])
    past = cache_to_block(pcache)
    out, header = with_newest_reply(lm, ids, spans, past, [producer])
    assert header == [6, 7] and out.n == 14
    torch.testing.assert_close(out.v[:, :, 8:], producer.kv.slice(12, 18).v, atol=0, rtol=0)
    torch.testing.assert_close(out.k[:, :, 8:], move(lm, producer.kv.slice(12, 18), 8 - 14).k, atol=0, rtol=0)
    assert not out.k[:, :, 6:8].any()
    other = ids[:8] + [40, 41, 42, 43, 44, 45] + ids[14:]
    assert with_newest_reply(lm, other, spans, past, [producer])[1] == []
    assert isinstance(out, KVBlock)


def test_relay_decision_recomputes_only_at_the_decision_agent():
    """`+decision` recomputes only in the decision agent's calls: the agents' calls are relay's token for token
    (replies and prefill), the decision agent's prefills its picks on top."""
    lm = make_tiny("qwen2")
    wl = Workload("math", ["you are one", "you are the two of us"], "answer", "judge", math_items(2, 0))
    out = _runs(lm, wl, ("relay", "relay@0.5", "relay@0.5+decision"), agents=2)
    relay, every, decision = out["relay"], out["relay@0.5"], out["relay@0.5+decision"]
    agents = [i for i, c in enumerate(relay) if c["agent"] != "decision"]
    assert len(agents) == 4 and len(relay) == 6
    for i in agents:
        assert decision[i]["reply_ids"] == relay[i]["reply_ids"]
        assert decision[i]["prefilled_tokens"] == relay[i]["prefilled_tokens"]
    for i in set(range(len(relay))) - set(agents):
        assert decision[i]["prefilled_tokens"] > relay[i]["prefilled_tokens"]
    assert any(every[i]["prefilled_tokens"] > relay[i]["prefilled_tokens"] for i in agents if relay[i]["path"] == "relay")


@pytest.mark.parametrize("select", ["first", "attention"])
def test_relay_cap_limits_each_calls_prefill(select):
    """`+capB` caps a call's prefill at B x its prompt: the picks (and the attention picker's rerun token) take what
    relay's own prefill leaves, up to R's count. A cap above relay@R's prefill is relay@R; one that leaves m tokens
    prefills m more than relay (+1 under attention); one below relay's own prefill is relay, bit for bit."""
    setting = f"relay@1:{select}"
    lm, ids, base, _ = _relay_and_dense("qwen2", ("relay", setting))
    relay, full, n, m = base["relay"], base[setting], len(ids), 3
    rerun = 1 if select == "attention" else 0
    caps = (1.0, (relay.prefilled_tokens + m + rerun + 0.5) / n, (relay.prefilled_tokens - 0.5) / n)
    _, _, out, _ = _relay_and_dense("qwen2", [f"{setting}+cap{c!r}" for c in caps])
    above, some, below = (out[f"{setting}+cap{c!r}"] for c in caps)
    assert above.prefilled_tokens == full.prefilled_tokens and above.reply_ids == full.reply_ids
    assert relay.prefilled_tokens + m + rerun == some.prefilled_tokens <= caps[1] * n < full.prefilled_tokens
    assert below.prefilled_tokens == relay.prefilled_tokens and below.reply_ids == relay.reply_ids
    torch.testing.assert_close(below.reply.transcript.kv.v, relay.reply.transcript.kv.v, atol=0, rtol=0)
    with pytest.raises(ValueError, match="relay's options"):
        ReuseEngine(lm, "reuse", config=ReuseConfig(prefill_cap=0.3))


def test_attention_pick_takes_the_most_read_tokens():
    """attention_pick's picks are the top-k relayable positions by the closing window's attention mass, and the
    KV it returns is the run's KV of every prompt token but the last (the one `recompute` reruns)."""
    from kvcomm.core.attention import TokenImportanceRecorder
    from kvcomm.reuse.blend import attention_pick, pick_top

    lm = make_tiny("llama")
    ids = list(range(5, 35))
    _, cache, _ = prefill(lm, ids[:20])
    past = cache_to_block(cache)
    reusable = [(4, 12), (14, 20)]
    picked, over = attention_pick(lm, ids, past, reusable, 5, window=6)
    rec = TokenImportanceRecorder(6)
    _, full, _ = prefill(lm, ids[20:], past, recorder=rec)
    assert picked == pick_top(rec.mass, reusable, 5) and len(picked) == 5
    assert all(any(a <= p < b for a, b in reusable) for p in picked)
    assert over.n == len(ids) - 1
    torch.testing.assert_close(over.v, cache_to_block(full, 0, len(ids) - 1).v, atol=0, rtol=0)


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
