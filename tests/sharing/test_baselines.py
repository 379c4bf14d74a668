"""NLD / CIPHER / AC baselines, checked against dense references on tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import rand_ids

from kvcomm.sharing import baselines
from kvcomm.sharing.send_receive import generate


def test_generation_from_embeddings_equals_generation_from_ids(tiny):
    ids = rand_ids(12, 1)
    a = generate(tiny, ids, max_new_tokens=6)
    b = baselines.generate_from_embeds(tiny, baselines._embed(tiny, ids), max_new_tokens=6)
    assert a.token_ids == b.token_ids
    torch.testing.assert_close(a.first_logits, b.first_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["replace", "mean"])
def test_ac_with_the_receivers_own_state_changes_nothing(tiny, mode):
    """replace/mean with the receiver's own hidden state are identities, so the output is plain generation."""
    ids, layer = rand_ids(10, 2), 2
    own, _ = baselines.sender_activation(tiny, ids, layer)
    plain = generate(tiny, ids, max_new_tokens=5)
    got = baselines.ac_generate(tiny, ids, own, layer, mode, max_new_tokens=5)
    assert got.token_ids == plain.token_ids
    torch.testing.assert_close(got.first_logits, plain.first_logits, atol=1e-4, rtol=1e-4)


def test_ac_sum_and_a_foreign_state_do_change_the_answer(tiny):
    ids, other, layer = rand_ids(10, 2), rand_ids(10, 3), 2
    plain = generate(tiny, ids, max_new_tokens=1).first_logits
    own, _ = baselines.sender_activation(tiny, ids, layer)
    foreign, _ = baselines.sender_activation(tiny, other, layer)
    for h, mode in ((own, "sum"), (foreign, "replace")):
        got = baselines.ac_generate(tiny, ids, h, layer, mode, max_new_tokens=1).first_logits
        assert (got - plain).abs().max() > 1e-3, mode


def test_ac_layer_scales_26_of_32():
    assert baselines.ac_layer(32) == 26 and baselines.ac_layer(30) == 24 and baselines.ac_layer(4) == 3


def test_cipher_at_zero_temperature_sends_the_nld_summary_embeddings(tiny):
    """As T → 0 the expected embedding is the argmax token's: CIPHER degenerates to NLD's greedy summary."""
    context = "uma is at the house in paris"
    _, _, toks, _ = baselines.summarise(tiny, context, summary_tokens=6)
    vectors, _, _ = baselines.cipher_vectors(tiny, context, steps=6, temperature=1e-6)
    assert len(toks) == len(vectors) > 0
    torch.testing.assert_close(vectors, baselines._embed(tiny, toks)[0], atol=1e-5, rtol=1e-5)


def test_each_baseline_returns_an_answer_and_its_costs(tiny):
    ctx, q = "uma is at the house in paris", "which country is uma in"
    for fn, kw in ((baselines.nld, {}), (baselines.cipher, {}), (baselines.ac, {"mode": "sum"})):
        gen, cost = fn(tiny, ctx, q, max_new_tokens=3, **kw)
        assert len(gen.token_ids) <= 3
        assert cost["bytes"] >= 0 and cost["sender_flops"] > 0 and cost["receiver_flops"] > 0
    _, cost = baselines.ac(tiny, ctx, q, "replace", max_new_tokens=1)
    assert cost["bytes"] == tiny.config.hidden_size * 4  # one fp32 vector
    with pytest.raises(ValueError, match="AC mode"):
        baselines.ac(tiny, ctx, q, "blend", max_new_tokens=1)
