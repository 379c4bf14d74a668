"""The benchmark's peer row: kvcomm and transformers' generate time the same appended segment and
produce the same greedy tokens (so the row compares like with like)."""

from __future__ import annotations

import torch
from conftest import make_tiny, rand_ids

from kvcomm.core.generation import greedy_continue
from kvcomm.core.kv import cache_to_block, prefill
from kvcomm.experiments.bench_peer import bench_peer


def test_peer_row_times_both_and_reports_ratios():
    lm = make_tiny()
    report = bench_peer(lm, contexts=(24,), question=5, tokens=3, repeats=1)
    (row,) = report["rows"]
    for side in ("kvcomm", "transformers"):
        assert row[side]["ttft_ms"] > 0 and row[side]["decode_ms_per_token"] == row[side]["decode_ms_per_token"]
    assert row["kvcomm"]["path"] == "eager"  # CPU
    assert row["ttft_ratio"] > 0 and lm.model.config._attn_implementation == "kvcomm"  # restored


def test_generate_on_a_static_cache_gives_kvcomms_tokens():
    from transformers import StaticCache

    lm = make_tiny()
    ctx, q = rand_ids(20, 1), rand_ids(5, 2)
    _, cache, _ = prefill(lm, ctx)
    logits, c, _ = prefill(lm, q, cache_to_block(cache))
    ours = [int(logits[0, -1].argmax())] + greedy_continue(lm, c, logits[0, -1], 25, 4, stops=set())[1:]
    static = StaticCache(config=lm.model.config, max_cache_len=40)
    with torch.no_grad():
        lm.model(input_ids=torch.tensor([ctx]), past_key_values=static, use_cache=True)
        out = lm.model.generate(input_ids=torch.tensor([ctx + q]), attention_mask=torch.ones(1, 25, dtype=torch.long),
                                past_key_values=static, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out[0, 25:].tolist() == ours
