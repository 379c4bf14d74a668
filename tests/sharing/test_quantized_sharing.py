"""A receiver given a compressed message answers (nearly) as with the full-precision one, on tiny models.

Tolerances. The reference is the fp32 message (bit-exact KV). A bf16 message, which is how KV is held
on a GPU anyway, moves the receiver's logits by ~0.05% (relative Frobenius norm over all positions).
int8's KV round-trip error is ~3x bf16's per tensor (0.5% vs 0.17%, test_message_v2.py), and the
network does not amplify it here: measured 0.10-0.15% on logits (Llama and Qwen2, 3 contexts each).
We allow 0.5% (about 3x headroom, and 10x the bf16 deviation) and require the same greedy argmax at
every position of the receiver's prompt and the same 12 generated tokens. fp8 and int4 are bounded
more loosely (measured ≤ 0.7% and ≤ 2.2%; allowed 1.5% and 5%).
"""

from __future__ import annotations

import pytest
import torch
from conftest import rand_ids

from kvcomm.core.fingerprint import fingerprint
from kvcomm.core.message import decode, encode
from kvcomm.sharing.send_receive import generate, receive_prefill, send

LOGITS_TOL = {"bf16": 0.002, "int8": 0.005, "fp8": 0.015, "int4": 0.05}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def received(lm, msg, precision):
    """What the receiver decodes from the message sent at `precision` (fingerprint checked, model dtype)."""
    return decode(encode(msg, precision), fingerprint(lm.model, lm.tokenizer), dtype=lm.dtype, device=lm.device)


@pytest.mark.parametrize("seed", [0, 1])
def test_int8_message_of_all_layers_gives_the_fp32_messages_logits(tiny, seed):
    ctx, q = rand_ids(60, 10 + seed), rand_ids(9, 20 + seed)
    msg = send(tiny, ctx)
    ref, _, _ = receive_prefill(tiny, q, [received(tiny, msg, "fp32")], all_logits=True)
    for precision, tol in LOGITS_TOL.items():
        m = received(tiny, msg, precision)
        assert m.precision == precision and m.layers == list(range(tiny.num_layers))
        out, _, prefix = receive_prefill(tiny, q, [m], all_logits=True)
        assert prefix == len(ctx)
        assert rel(out[0], ref[0]) <= tol, (precision, rel(out[0], ref[0]))
        if precision in ("bf16", "int8"):
            assert torch.equal(out[0].argmax(-1), ref[0].argmax(-1)), precision
    full = generate(tiny, q, msg, max_new_tokens=12, stop_ids=[])
    int8 = generate(tiny, q, received(tiny, msg, "int8"), max_new_tokens=12, stop_ids=[])
    assert int8.token_ids == full.token_ids and len(full.token_ids) == 12


def test_selected_layers_and_two_senders_at_int4(tiny):
    """Compressed messages go through the same receiver paths: a layer subset, and two senders."""
    a, b, q = rand_ids(20, 3), rand_ids(15, 4), rand_ids(6, 5)
    ma, mb = send(tiny, a, layers=[1, 2]), send(tiny, b, layers=[0, 2])
    ref, cache_ref, _ = receive_prefill(tiny, q, [ma, mb], all_logits=True)
    out, cache, prefix = receive_prefill(tiny, q, [received(tiny, ma, "int4"), received(tiny, mb, "int8")],
                                         all_logits=True)
    assert prefix == len(a) + len(b)
    assert [x.keys.shape[-2] for x in cache.layers] == [x.keys.shape[-2] for x in cache_ref.layers]
    assert rel(out[0], ref[0]) <= LOGITS_TOL["int4"]
