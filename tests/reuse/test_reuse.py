"""Cross-context KV reuse: exactness against dense, pool rules, templates, runner, sandbox."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, rand_ids

from kvcomm.agents.runner import MultiAgentRunner, reuse_rate, visible
from kvcomm.agents.workloads import Item, Workload, grade_math, math_items
from kvcomm.core.errors import DataError
from kvcomm.core.kv import KVBlock, cache_to_block, move, prefill
from kvcomm.reuse.anchors import AgentDelta, AnchorPool
from kvcomm.reuse.config import ReuseConfig
from kvcomm.reuse.engine import Content, ReuseEngine
from kvcomm.reuse.templates import AgentTemplate, Template


def small_workload(n=4, seed=0):
    items = math_items(n, seed)
    return Workload("math", ["you are one", "you are two", "you are three"], "answer", "judge", items)


def test_template_parse_and_errors():
    t = Template.parse("a {user_question} b {agent_1_current} c {condition_web_history_2} d")
    assert t.names == ("user_question", "agent_1_current", "condition_web_history_2")
    assert t.texts == ("a ", " b ", " c ", " d")
    with pytest.raises(DataError, match="unknown placeholder"):
        Template.parse("{question}")
    with pytest.raises(DataError, match="twice"):
        Template.parse("{user_question} {user_question} x")


def test_layout_spans_cover_prompt():
    lm = make_tiny()
    agent = AgentTemplate.build(lm.tokenizer, "a", "you are one", "what {user_question} and {agent_0_current} is")
    ids, spans = agent.layout({"user_question": [5, 6, 7], "agent_0_current": [8, 9]})
    assert spans[0][1] == 0 and spans[-1][2] == len(ids)
    assert [s[0] for s in spans] == ["p0", "user_question", "p1", "agent_0_current", "p2"]
    assert ids[spans[1][1] : spans[1][2]] == [5, 6, 7]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_forced_new_anchors_equal_dense(arch):
    """Every placeholder forced to be a new anchor: reuse mode's outputs are identical to dense mode's."""
    lm = make_tiny(arch)
    wl = small_workload(3)
    outs = {}
    for mode, force in (("dense", False), ("reuse", True)):
        runner = MultiAgentRunner(ReuseEngine(lm, mode, config=ReuseConfig(max_new_tokens=6), force_new_anchors=force), wl, 3, "fully_connected")
        outs[mode] = [runner.run_item(it) for it in wl.items]
    for a, b in zip(outs["dense"], outs["reuse"]):
        assert [c["reply_ids"] for c in a.calls] == [c["reply_ids"] for c in b.calls]
        assert all(c["path"] == "dense" for c in b.calls)


@pytest.mark.parametrize("arch,refresh_tail", [("llama", False), ("qwen2", False), ("llama", True)])
def test_replayed_request_reuses_and_matches_dense(arch, refresh_tail):
    """Same request twice: every call reuses, with offsets = the real deltas; first logits equal dense.
    With refresh_tail the last template segment is prefilled instead (and the replies still match)."""
    lm = make_tiny(arch)
    wl = small_workload(1)
    engine = ReuseEngine(lm, "reuse", config=ReuseConfig(max_new_tokens=6, refresh_tail=refresh_tail))
    runner = MultiAgentRunner(engine, wl, 3, "fully_connected")
    first = runner.run_item(wl.items[0])
    second = runner.run_item(wl.items[0])
    assert [c["path"] for c in first.calls] == ["dense"] * 4
    assert [c["path"] for c in second.calls] == ["reuse"] * 4
    assert [c["reply_ids"] for c in first.calls] == [c["reply_ids"] for c in second.calls]
    tails = [len(t.segment_ids[-1]) for t in [*(runner.templates[(0, k)] for k in range(3)), runner.decider]]
    expected = tails if refresh_tail else [1] * 4  # the question's base KV was computed in call 1
    assert [c["prefilled_tokens"] for c in second.calls[1:]] == expected[1:]


def test_reused_cache_equals_dense_cache_on_replay():
    """Numerics, not just tokens: the assembled cache equals the dense prefill to tolerance."""
    lm = make_tiny()
    agent = AgentTemplate.build(lm.tokenizer, "a", "you are one", "what {user_question} is the answer")
    q = rand_ids(7, 3)
    reuse = ReuseEngine(lm, "reuse", config=ReuseConfig(max_new_tokens=1))
    reuse.call(agent, {"user_question": Content(q)}, request=1)
    reuse.pool.commit(1)
    captured = {}
    orig = reuse._reuse_call

    def spy(*a, **k):
        out = orig(*a, **k)
        captured["logits"] = out[0]
        return out

    reuse._reuse_call = spy
    res = reuse.call(agent, {"user_question": Content(q)}, request=2)
    assert res.path == "reuse"
    ids, _ = agent.layout({"user_question": q})
    ref = prefill(lm, ids)[0][0, -1]
    torch.testing.assert_close(captured["logits"], ref, atol=1e-4, rtol=1e-4)


def test_defer_base_runs_the_first_agent_on_its_cached_prefix_and_encodes_the_base_after():
    """With defer_base the agent that meets a content first takes the prefix path (exact: dense's
    reply), prefills only what follows its first segment before its first token, and leaves the
    content's base KV (the same as `base_kv` gives) for the agents after it, which then reuse."""
    from kvcomm.reuse.config import parse_setting

    lm = make_tiny()
    wl = small_workload(1)
    mode, config = parse_setting("reuse+defer", ReuseConfig(max_new_tokens=6))
    assert mode == "reuse" and config.defer_base and parse_setting("blend@0.15:first+defer")[1].defer_base
    with pytest.raises(ValueError, match="unknown setting"):
        parse_setting("dense+defer")
    outs = {}
    for name, engine in (("dense", ReuseEngine(lm, "dense", config=ReuseConfig(max_new_tokens=6))),
                         ("defer", ReuseEngine(lm, mode, config=config))):
        runner = MultiAgentRunner(engine, wl, 3, "fully_connected")
        outs[name] = [runner.run_item(wl.items[0]), runner.run_item(wl.items[0])]
    first, second = outs["defer"]
    assert [c["path"] for c in first.calls] == ["prefix"] + ["dense"] * 3  # later agents: new anchors
    assert [c["path"] for c in second.calls] == ["prefix"] + ["reuse"] * 3  # the question is new to agent 0 each time
    assert [c["reply_ids"] for c in first.calls] == [c["reply_ids"] for c in outs["dense"][0].calls]
    assert [c["reply_ids"] for c in second.calls] == [c["reply_ids"] for c in outs["dense"][1].calls]
    agent = AgentTemplate.build(lm.tokenizer, "a", "you are one", "what {user_question} is the answer")
    engine = ReuseEngine(lm, "reuse", config=config)
    q = Content(rand_ids(7, 5))
    res = engine.call(agent, {"user_question": q})
    want, n_base = ReuseEngine(lm, "reuse").base_kv(Content(list(q.ids)))
    torch.testing.assert_close(q.base.k, want.k)
    torch.testing.assert_close(q.base.v, want.v)
    p0 = engine.template_kv(agent).p0.n
    assert res.path == "prefix" and res.prefilled_tokens == res.prompt_tokens - p0 + n_base


def test_prefix_mode_reuses_exact_prefix_and_matches_dense():
    lm = make_tiny()
    wl = small_workload(2)
    outs = {}
    for mode in ("dense", "prefix"):
        runner = MultiAgentRunner(ReuseEngine(lm, mode, config=ReuseConfig(max_new_tokens=5)), wl, 3, "chain")
        outs[mode] = [runner.run_item(it) for it in wl.items]
    for a, b in zip(outs["dense"], outs["prefix"]):
        assert [c["reply_ids"] for c in a.calls] == [c["reply_ids"] for c in b.calls]
    later = outs["prefix"][1].calls
    assert all(c["prefilled_tokens"] < c["prompt_tokens"] for c in later)  # the agent's template head was reused


def _block(n, value, layers=2):
    t = torch.full((layers, 1, n, 4), float(value))
    return KVBlock(t.clone(), t.clone())


def _delta(n, m=2, value=0.0):
    return AgentDelta(_block(n, value), _block(m, value))


def test_pool_entropy_rule_and_weights():
    pool = AnchorPool(gamma=0.3, tau=0.01)
    for i, v in enumerate((1.0, 2.0)):
        pool.stage(0, "user_question", f"k{i}", _block(3, v), "agent", _delta(3, value=v * 10))
    pool.commit(0)
    near = pool.match("user_question", "agent", _block(3, 1.01))  # close to anchor k0 only
    assert near is not None and near.weights[0] > 0.99
    torch.testing.assert_close(near.placeholder_offset.k, torch.full((2, 1, 3, 4), 10.0), atol=1e-3, rtol=0)
    assert pool.match("user_question", "agent", _block(3, 1.5)) is None  # equidistant: H = log 2 > γ log 2
    assert pool.match("user_question", "other-agent", _block(3, 1.0)) is None  # no deltas for this agent
    assert pool.match("user_question", "agent", _block(4, 1.0)) is None  # longer than every anchor


def test_pool_capacity_eviction_least_used_of_oldest():
    pool = AnchorPool(max_anchors=3, oldest_window=2)
    for i in range(3):
        pool.stage(i, "user_question", f"k{i}", _block(2, i), "a", _delta(2))
        pool.commit(i)
    pool._anchors["user_question"]["k0"].uses = 5  # oldest but popular; k1 is the least used of the 2 oldest
    pool.stage(9, "user_question", "k3", _block(2, 3), "a", _delta(2))
    pool.commit(9)
    assert set(pool._anchors["user_question"]) == {"k0", "k2", "k3"}
    assert pool.stats().evictions == 1


@pytest.mark.slow  # 1,000 agent calls
def test_pool_byte_budget_holds_over_1000_calls():
    """A 1,000-call reuse run on a tiny model: the pool never exceeds its byte budget."""
    lm = make_tiny()
    # question lengths cycle upwards, so the first pass makes new (longer) anchors and later ones reuse
    items = [Item(it.id, it.question + " one" * (i % 12), it.answer) for i, it in enumerate(math_items(170, seed=5))]
    wl = Workload("math", ["one", "two", "three", "four", "five"], "answer", "judge", items)
    budget = 1_000_000  # below what the run would otherwise keep, so eviction must work
    pool = AnchorPool(byte_budget=budget, max_anchors=20, gamma=0.7)
    runner = MultiAgentRunner(ReuseEngine(lm, "reuse", pool=pool, config=ReuseConfig(max_new_tokens=4)), wl, 5, "fully_connected")
    calls, peak = 0, 0
    results = []
    for item in items:
        results.append(runner.run_item(item))
        calls += len(results[-1].calls)
        peak = max(peak, pool.nbytes)
        if calls >= 1000:
            break
    assert calls >= 1000
    assert peak <= budget
    stats = pool.stats()
    assert stats.evictions > 0 and stats.anchors > 0
    assert 0 < reuse_rate(results) < 1
    assert pool.nbytes == sum(a.nbytes for g in pool._anchors.values() for a in g.values())


def test_pool_commit_is_per_request_and_discard_drops():
    pool = AnchorPool()
    pool.stage("r1", "user_question", "k", _block(2, 1.0), "a", _delta(2))
    assert pool.match("user_question", "a", _block(2, 1.0)) is None  # not visible before commit
    pool.discard("r1")
    pool.commit("r1")
    assert pool.stats().anchors == 0


def test_pool_is_safe_under_concurrent_requests():
    from concurrent.futures import ThreadPoolExecutor

    pool = AnchorPool(max_anchors=5, byte_budget=10_000)

    def work(i):
        pool.stage(i, "user_question", f"k{i}", _block(2, i % 7), "a", _delta(2))
        pool.match("user_question", "a", _block(2, 1.0))
        pool.commit(i)

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(work, range(200)))
    assert pool.stats().anchors <= 5 and pool.nbytes <= 10_000
    assert pool.nbytes == sum(a.nbytes for g in pool._anchors.values() for a in g.values())


def test_topologies():
    assert visible("fully_connected", 2, 4, 0) == [(0, "current"), (1, "current")]
    assert visible("fully_connected", 2, 4, 1)[-2:] == [(2, "history_1"), (3, "history_1")]
    assert visible("chain", 2, 4, 0) == [(1, "current")]
    assert visible("star", 0, 4, 1) == [(1, "history_1"), (2, "history_1"), (3, "history_1")]
    assert visible("star", 3, 4, 0) == [(0, "current")]


@pytest.mark.parametrize("topology", ["chain", "star"])
def test_runner_other_topologies_two_rounds(topology):
    lm = make_tiny()
    runner = MultiAgentRunner(ReuseEngine(lm, "reuse", config=ReuseConfig(max_new_tokens=3)), small_workload(2), 3, topology, rounds=2)
    res = [runner.run_item(it) for it in small_workload(2).items]
    assert all(len(r.calls) == 3 * 2 + 1 for r in res)


def test_math_grading_and_generation_are_deterministic():
    assert math_items(5, 1) == math_items(5, 1) and math_items(5, 1) != math_items(5, 2)
    item = Item("x", "q", "12")
    assert grade_math(item, "so the answer is 12.") and not grade_math(item, "12 then 13")
    for it in math_items(50, 3):
        assert int(it.answer) >= 0


def test_sandbox_runs_code_isolated():
    from kvcomm.agents.sandbox import run_humaneval, run_python

    prompt = "def add(a, b):\n    \"\"\"Add.\"\"\"\n"
    test = "def check(f):\n    assert f(2, 3) == 5\n"
    assert run_humaneval(prompt, "    return a + b\n", test, "add").passed
    assert not run_humaneval(prompt, "    return a - b\n", test, "add").passed
    assert run_humaneval(prompt, "```python\ndef add(a, b):\n    return b + a\n```", test, "add").passed
    slow = run_python("while True:\n    pass\n", timeout=2)
    assert slow.timed_out and not slow.passed
    hog = run_python("x = bytearray(4 << 30)\n", timeout=10)
    assert not hog.passed and "MemoryError" in hog.output


def test_shared_head_is_the_chat_templates_agent_independent_opening():
    from kvcomm.core.models import load_tokenizer
    from kvcomm.reuse.templates import shared_head_ids

    tok = load_tokenizer("embedded")
    head = shared_head_ids(tok)
    assert tok.decode(head) == "<|im_start|>system\n"
    roles = ["Solve it.", "you check", "42 is the answer", "(critic)"]
    assert all(AgentTemplate.build(tok, "a", r, "{user_question}\nx").segment_ids[0][: len(head)] == head for r in roles)
    assert shared_head_ids(make_tiny().tokenizer) == []  # no chat template: no head


def test_base_kv_is_encoded_after_the_head_and_moved_to_zero():
    lm = make_tiny()
    q, head = rand_ids(6, 4), rand_ids(3, 5)
    engine = ReuseEngine(lm, "reuse")
    engine.head = head
    base, prefilled = engine.base_kv(Content(q))
    assert prefilled == len(head) + len(q) and base.n == len(q)
    _, cache, _ = prefill(lm, head + q)
    real = cache_to_block(cache, len(head))
    torch.testing.assert_close(move(lm, base, len(head)).k, real.k, atol=1e-5, rtol=1e-5)
    assert torch.equal(base.v, real.v)
    alone, n = ReuseEngine(lm, "reuse", config=ReuseConfig(sink_head=False)).base_kv(Content(q))  # the paper's choice
    _, cache0, _ = prefill(lm, q)
    assert n == len(q) and torch.equal(alone.k, cache_to_block(cache0).k)
