"""Selective recompute over reused KV: exactness against dense, the pickers, the settings."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, rand_ids

from kvcomm.agents.runner import MultiAgentRunner, make_engine
from kvcomm.agents.workloads import Workload, math_items
from kvcomm.core.kv import KVBlock, cache_to_block, prefill
from kvcomm.reuse.blend import budget, choose, masked_recompute, pick_first, recompute, recompute_mask
from kvcomm.reuse.config import ReuseConfig, parse_setting

TOL = dict(atol=1e-4, rtol=1e-4)


def _dense(lm, ids):
    logits, cache, _ = prefill(lm, ids)
    return logits[0, -1], cache_to_block(cache)


def _noisy(block: KVBlock, start: int, seed: int = 0) -> KVBlock:
    """`block` with every token from `start` on replaced by noise (what a bad reuse could give)."""
    g = torch.Generator().manual_seed(seed)
    k, v = block.k.clone(), block.v.clone()
    k[:, :, start:] = torch.randn(k[:, :, start:].shape, generator=g)
    v[:, :, start:] = torch.randn(v[:, :, start:].shape, generator=g)
    return KVBlock(k, v)


@pytest.mark.parametrize("run", [recompute, masked_recompute])  # the prefill shortcut and the masked forward
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_recomputing_every_reused_token_equals_dense_whatever_the_reused_kv(arch, run):
    """r = 100%: the reused KV does not matter any more; logits and cache equal a dense prefill."""
    lm = make_tiny(arch)
    ids = rand_ids(24, 1)
    ref_logits, ref = _dense(lm, ids)
    t, p0 = 23, 5
    logits, cache = run(lm, ids, _noisy(ref.slice(0, t), p0), list(range(p0, t)))
    torch.testing.assert_close(logits, ref_logits, **TOL)
    got = cache_to_block(cache)
    torch.testing.assert_close(got.k, ref.k, **TOL)
    torch.testing.assert_close(got.v, ref.v, **TOL)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_recomputed_tokens_get_dense_kv_when_nothing_else_deviates(arch):
    """Assembled KV = dense KV: recomputing any subset (here scattered tokens and a tail of 3) changes nothing."""
    lm = make_tiny(arch)
    ids = rand_ids(30, 2)
    ref_logits, ref = _dense(lm, ids)
    picked = [4, 5, 11, 17, 25]
    logits, cache = recompute(lm, ids, ref.slice(0, 27), picked)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    got = cache_to_block(cache)
    assert got.n == len(ids)
    torch.testing.assert_close(got.k, ref.k, **TOL)
    torch.testing.assert_close(got.v, ref.v, **TOL)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_picks_up_to_the_tail_are_a_prefill_with_the_masked_forwards_result(arch):
    """A failing newest placeholder and its segment (`+partial`) are picked up to the tail: `recompute`
    prefills them over the KV before them, and gets what the masked forward gets over noisy reused KV."""
    lm = make_tiny(arch)
    ids = rand_ids(30, 4)
    _, ref = _dense(lm, ids)
    assembled = _noisy(ref.slice(0, 29), 8)  # reused (noisy) KV before the picks, stale KV under them
    picked = list(range(20, 29))
    logits, cache = recompute(lm, ids, assembled, picked)
    want_logits, want = masked_recompute(lm, ids, assembled, picked)
    torch.testing.assert_close(logits, want_logits, **TOL)
    got, want = cache_to_block(cache), cache_to_block(want)
    torch.testing.assert_close(got.k, want.k, **TOL)
    torch.testing.assert_close(got.v, want.v, **TOL)
    assert not torch.allclose(logits, _dense(lm, ids)[0], atol=1e-3)  # the noisy reused KV did matter


def test_no_pick_is_a_plain_tail_prefill():
    lm = make_tiny()
    ids = rand_ids(20, 3)
    _, ref = _dense(lm, ids)
    noisy = _noisy(ref.slice(0, 19), 6)
    logits, _ = recompute(lm, ids, noisy, [])
    torch.testing.assert_close(logits, prefill(lm, ids[19:], noisy)[0][0, -1])


def test_partial_recompute_moves_toward_dense():
    """Recomputing half of the noisy tokens brings the last logits closer to dense than none does."""
    lm = make_tiny()
    ids = rand_ids(30, 4)
    ref_logits, ref = _dense(lm, ids)
    noisy = _noisy(ref.slice(0, 29), 5, seed=1)
    err = {}
    for name, picked in (("none", []), ("half", list(range(5, 29, 2))), ("all", list(range(5, 29)))):
        logits, _ = recompute(lm, ids, noisy, picked)
        err[name] = (logits - ref_logits).norm().item()
    assert err["all"] < 1e-3 < err["half"] < err["none"]


def test_recompute_mask_hides_stale_entries_and_future_tokens():
    m = recompute_mask([1, 3], t=5, tail=1, dtype=torch.float32, device="cpu")[0, 0] == 0  # True = visible
    # rows: fresh 1, fresh 3, tail at 5; columns: cache 0..4, then the three new tokens
    assert m[0].tolist() == [True, False, False, False, False, True, False, False]
    assert m[1].tolist() == [True, False, True, False, False, True, True, False]
    assert m[2].tolist() == [True, False, True, False, True, True, True, True]


def test_pickers_and_budget():
    spans = [(5, 9), (9, 10), (10, 20)]
    assert budget(0.0, spans) == 0 and budget(1.0, spans) == 15 and budget(0.15, spans) == 3
    assert pick_first(spans, 3) == [5, 9, 10]
    assert pick_first(spans, 6) == [5, 6, 7, 9, 10, 11]
    assert pick_first(spans, 100) == list(range(5, 20))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_deviation_picker_finds_the_perturbed_tokens(arch):
    """CacheBlend's rule: the tokens whose layer-1 values were perturbed are the ones picked."""
    lm = make_tiny(arch)
    ids = rand_ids(26, 5)
    _, ref = _dense(lm, ids)
    assembled = ref.slice(0, 25)
    v = assembled.v.clone()
    for p in (7, 12, 20):
        v[1, :, p] += 3.0
    spans = [("p0", 0, 4), ("user_question", 4, 22), ("p1", 22, 26)]
    picked, cost, over = choose(lm, "deviation", 3 / 21, ids, spans, KVBlock(assembled.k, v), None)
    assert picked == [7, 12, 20]
    assert cost == pytest.approx(25 / lm.model.config.num_hidden_layers) and over.n == 25


def test_offset_picker_ranks_by_offset_size():
    lm = make_tiny()
    ids = rand_ids(12, 6)
    _, ref = _dense(lm, ids)
    offsets = torch.zeros_like(ref.v[:, :, :11])
    offsets[2, :, 8] = 5.0
    offsets[3, :, 3] = 1.0
    spans = [("p0", 0, 2), ("user_question", 2, 12)]
    picked, cost, _ = choose(lm, "offset", 0.2, ids, spans, ref.slice(0, 11), offsets)
    assert picked == [3, 8] and cost == 0.0


def test_settings():
    assert parse_setting("dense") == ("dense", ReuseConfig())
    mode, cfg = parse_setting("blend@0.15")
    assert mode == "reuse" and cfg.recompute == 0.15 and cfg.offsets and cfg.select == "deviation"
    mode, cfg = parse_setting("cacheblend@0.3:first", ReuseConfig(max_new_tokens=7))
    assert (mode, cfg.recompute, cfg.offsets, cfg.select, cfg.max_new_tokens) == ("reuse", 0.3, False, "first", 7)
    for bad in ("blend", "blend@2", "blend@x", "reuse@0.1", "cacheblend@0.1:best", "fast"):
        with pytest.raises(ValueError):
            parse_setting(bad)


def _runs(lm, settings, items=2):
    wl = Workload("math", ["you are one", "you are two", "you are three"], "answer", "judge", math_items(items, 0))
    out = {}
    for s in settings:
        runner = MultiAgentRunner(make_engine(lm, s, ReuseConfig(max_new_tokens=5)), wl, 3, "fully_connected")
        out[s] = [runner.run_item(it) for it in [*wl.items, wl.items[0]]]  # the replay reuses every call
    return out


def test_blend_at_zero_is_the_papers_reuse_and_at_one_is_dense():
    lm = make_tiny("qwen2")
    out = _runs(lm, ["dense", "reuse", "blend@0", "blend@1", "cacheblend@1"])
    calls = {s: [c for r in res for c in r.calls] for s, res in out.items()}
    strip = ("ttft_ms", "total_ms")
    assert [{k: v for k, v in c.items() if k not in strip} for c in calls["reuse"]] == \
        [{k: v for k, v in c.items() if k not in strip} for c in calls["blend@0"]]
    assert any(c["path"] == "reuse" for c in calls["blend@1"])
    assert all(c["path"] == "reuse" for c in calls["cacheblend@1"])  # no anchors needed: never dense
    for s in ("blend@1", "cacheblend@1"):
        assert [c["reply_ids"] for c in calls[s]] == [c["reply_ids"] for c in calls["dense"]]
        reused = [c for c in calls[s] if c["path"] == "reuse"]
        assert all(c["prefilled_tokens"] > 1 for c in reused)
