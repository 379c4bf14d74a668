"""The `kvcomm` attention function's GQA folding against transformers' repeat-the-keys path."""

from __future__ import annotations

import pytest
import torch

from kvcomm.core.attention import causal_mask, folded_gqa_attention


def reference(query, key, value, mask, scale, n_rep):
    from transformers.integrations.sdpa_attention import repeat_kv

    out = torch.nn.functional.scaled_dot_product_attention(query, repeat_kv(key, n_rep), repeat_kv(value, n_rep),
                                                           attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("q", [1, 5, 32])
@pytest.mark.parametrize("n_rep", [2, 7])
def test_folded_gqa_equals_repeated_keys(q, n_rep):
    g = torch.Generator().manual_seed(q * 10 + n_rep)
    kv_heads, keys, d = 2, 40, 16
    query = torch.randn(1, kv_heads * n_rep, q, d, generator=g)
    key, value = (torch.randn(1, kv_heads, keys, d, generator=g) for _ in range(2))
    mask = causal_mask(keys - q, 0, q, torch.float32, "cpu")
    mask[..., :3] = torch.finfo(torch.float32).min  # some keys closed to every query (static-cache padding)
    got = folded_gqa_attention(query, key, value, mask, 0.3, n_rep)
    assert got.shape == (1, q, kv_heads * n_rep, d)
    torch.testing.assert_close(got, reference(query, key, value, mask, 0.3, n_rep), atol=1e-5, rtol=1e-5)
    one_row = mask[..., -1:, :]  # a mask row shared by every query broadcasts unchanged
    torch.testing.assert_close(folded_gqa_attention(query, key, value, one_row, 0.3, n_rep),
                               reference(query, key, value, one_row, 0.3, n_rep), atol=1e-5, rtol=1e-5)


def test_token_recorder_sums_the_last_queries_attention(tiny):
    """TokenImportanceRecorder's mass per key = the attention probabilities of the last `window` queries, summed
    over layers and heads, as transformers' eager attention returns them for a dense forward of the same tokens."""
    from kvcomm.core.attention import TokenImportanceRecorder
    from kvcomm.core.kv import cache_to_block, prefill

    ids = list(range(5, 29))
    _, cache, _ = prefill(tiny, ids[:15])
    rec = TokenImportanceRecorder(window=4)
    prefill(tiny, ids[15:], cache_to_block(cache), recorder=rec)
    model = tiny.model
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    finally:
        model.set_attn_implementation("kvcomm")
    want = sum(a[0, :, -4:, :].sum(dim=(0, 1)) for a in out.attentions)
    assert rec.mass.shape == (len(ids),)
    torch.testing.assert_close(rec.mass, want, atol=1e-4, rtol=1e-4)
    assert float(rec.mass.sum()) == pytest.approx(4 * len(out.attentions) * out.attentions[0].shape[1], rel=1e-5)
