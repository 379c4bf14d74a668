"""Property-based fuzzing of message loading: malformed, truncated, oversized and mutated bytes.

Every input either decodes to a message consistent with its header (e.g. a flipped bit inside a
float is still a valid float) or is refused with a `MessageError` subclass: never another exception,
never a hang. 10,000+ generated inputs per run across the tests below.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny, rand_ids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcomm.core.errors import IncompatibleModelError, MessageError
from kvcomm.core.fingerprint import fingerprint
from kvcomm.core.message import KVMessage, decode, encode
from kvcomm.sharing.send_receive import send

FUZZ = settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

_lm = make_tiny("llama", seed=0)
_GOOD = encode(send(_lm, rand_ids(6, 41), layers=[0, 2]))
_FP = fingerprint(_lm.model, _lm.tokenizer)
_HLEN = int.from_bytes(_GOOD[:8], "little")
_HEADER = json.loads(_GOOD[8 : 8 + _HLEN])


def check(data: bytes, **kw) -> None:
    try:
        msg = decode(data, _FP, **kw)
    except MessageError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert isinstance(msg, KVMessage)
    for k, v in zip(msg.keys, msg.values):
        assert k.shape == (1, _FP.num_kv_heads, msg.seq_len, _FP.head_dim) and v.shape == k.shape
        assert torch.isfinite(k).all() and torch.isfinite(v).all()


@FUZZ
@given(st.data())
def test_byte_mutations(data):
    raw = bytearray(_GOOD)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    check(bytes(raw))


@FUZZ
@given(st.integers(0, len(_GOOD)), st.binary(max_size=64))
def test_truncation_and_trailing_garbage(cut, tail):
    check(_GOOD[:cut])
    check(_GOOD[:cut] + tail)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(blob):
    check(blob)
    check(len(blob).to_bytes(8, "little") + blob)


_json = st.recursive(st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                     max_leaves=8)


@FUZZ
@given(st.data())
def test_header_mutations(data):
    header = json.loads(json.dumps(_HEADER))
    target = data.draw(st.sampled_from(sorted(header)))
    if target == "__metadata__":
        key = data.draw(st.sampled_from(sorted(header[target])))
        header[target][key] = data.draw(st.one_of(st.text(max_size=40), _json.map(json.dumps)))
    else:
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[target][field] = data.draw(_json)
    body = json.dumps(header).encode()
    check(len(body).to_bytes(8, "little") + body + _GOOD[8 + _HLEN :])


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(1, len(_GOOD) - 1))
def test_oversize_always_refused(limit):
    with pytest.raises(MessageError):
        decode(_GOOD, _FP, max_bytes=limit)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.integers(1, 2**31 - 1), st.integers(1, 10))
def test_foreign_model_always_refused(seed, n):
    torch.manual_seed(seed)
    other = make_tiny("llama", seed=seed % 1000 + 1)
    data = encode(send(other, rand_ids(n, seed % 97), layers=[1]))
    with pytest.raises(IncompatibleModelError):
        decode(data, _FP)
