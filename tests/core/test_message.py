"""KV message format: round trip, and every refusal with its own error class (API level)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import join_message, make_tiny, rand_ids, split_message

from kvcomm.core.errors import (
    CorruptMessageError,
    IncompatibleModelError,
    MessageError,
    NonFiniteError,
    OversizeMessageError,
    ShapeMismatchError,
    UnsupportedVersionError,
)
from kvcomm.core.fingerprint import fingerprint
from kvcomm.core.message import decode, encode, load_message, save_message
from kvcomm.sharing.send_receive import send


@pytest.fixture(scope="module")
def lm():
    return make_tiny("llama", seed=0)


@pytest.fixture(scope="module")
def msg(lm):
    return send(lm, rand_ids(9, 31), layers=[1, 3], meta={"note": "hi"})




def test_roundtrip(lm, msg, tmp_path):
    fp = fingerprint(lm.model, lm.tokenizer)
    n = save_message(msg, tmp_path / "m.kv")
    assert n == (tmp_path / "m.kv").stat().st_size
    back = load_message(tmp_path / "m.kv", fp)
    assert back.layers == [1, 3] and back.seq_len == 9 and back.meta["note"] == "hi"
    for a, b in zip(msg.keys + msg.values, back.keys + back.values):
        assert torch.equal(a, b)
    assert msg.payload_bytes == 2 * 2 * 9 * 2 * 16 * 4


def test_wrong_model_weights_refused(msg):
    other = make_tiny("llama", seed=1)  # same shapes, different weights
    with pytest.raises(IncompatibleModelError, match="weights_digest"):
        decode(encode(msg), fingerprint(other.model, other.tokenizer))
    # explicit fine-tune opt-in accepts same-shape models
    decode(encode(msg), fingerprint(other.model, other.tokenizer), allow_finetune=True)


def test_wrong_architecture_refused_even_with_finetune_opt_in(msg):
    other = make_tiny("qwen2", seed=0)
    with pytest.raises(IncompatibleModelError, match="architecture"):
        decode(encode(msg), fingerprint(other.model, other.tokenizer), allow_finetune=True)
    deeper = make_tiny("llama", seed=0, layers=6)
    with pytest.raises(IncompatibleModelError, match="num_layers"):
        decode(encode(msg), fingerprint(deeper.model, deeper.tokenizer), allow_finetune=True)


def test_fingerprint_same_for_fp32_and_bf16_copies(lm):
    """A bf16 copy of the same weights has the same fingerprint. (A model *initialised* in bf16 is not a
    copy: transformers 5.17 draws its random init in the target dtype, 5.23 in float32.)"""
    import copy

    fp32 = fingerprint(lm.model, lm.tokenizer)
    bf = copy.deepcopy(lm.model).to(torch.bfloat16)
    assert fingerprint(bf, lm.tokenizer) == fp32


def test_nan_and_inf_refused(msg):
    for bad in (float("nan"), float("inf")):
        m = msg.to()
        m.keys[1] = m.keys[1].clone()
        m.keys[1][0, 0, 0, 0] = bad
        with pytest.raises(NonFiniteError, match="layer 3"):
            decode(encode(m))


def test_truncated_refused(msg):
    data = encode(msg)
    for cut in (0, 5, 8, 40, len(data) // 2, len(data) - 1):
        with pytest.raises(CorruptMessageError):
            decode(data[:cut])


def test_garbage_and_foreign_safetensors_refused():
    with pytest.raises(CorruptMessageError):
        decode(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    from safetensors.torch import save

    with pytest.raises(CorruptMessageError, match="not a kvcomm message"):
        decode(save({"x": torch.zeros(2)}))
    with pytest.raises(CorruptMessageError, match="not a kvcomm message"):
        decode(save({"x": torch.zeros(2)}, metadata={"format": "other"}))


def test_unknown_version_refused(msg):
    header, body = split_message(encode(msg))
    header["__metadata__"]["version"] = "99"
    with pytest.raises(UnsupportedVersionError, match="version '99'"):
        decode(join_message(header, body))


def test_oversize_refused(msg, tmp_path):
    data = encode(msg)
    with pytest.raises(OversizeMessageError, match="limit"):
        decode(data, max_bytes=len(data) - 1)
    (tmp_path / "big.kv").write_bytes(data)
    with pytest.raises(OversizeMessageError):
        load_message(tmp_path / "big.kv", max_bytes=100)


def test_shape_and_dtype_mismatch_refused(msg):
    header, body = split_message(encode(msg))
    h = json.loads(json.dumps(header))
    h["k.1"]["shape"] = [1, 2, 8, 16]
    with pytest.raises(ShapeMismatchError, match="k.1"):
        decode(join_message(h, body))
    h = json.loads(json.dumps(header))
    h["__metadata__"]["seq_len"] = "10"
    with pytest.raises(ShapeMismatchError):
        decode(join_message(h, body))
    h = json.loads(json.dumps(header))
    h["v.3"]["dtype"] = "F16"
    with pytest.raises(ShapeMismatchError, match="v.3"):
        decode(join_message(h, body))
    h = json.loads(json.dumps(header))
    h["__metadata__"]["layers"] = "[1, 3, 7]"
    with pytest.raises(ShapeMismatchError):
        decode(join_message(h, body))
    h = json.loads(json.dumps(header))
    h["__metadata__"]["layers"] = "[1, 2]"
    with pytest.raises(ShapeMismatchError, match="missing"):
        decode(join_message(h, body))


def test_overlapping_offsets_refused(msg):
    header, body = split_message(encode(msg))
    names = sorted(k for k in header if k != "__metadata__")
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
    with pytest.raises(CorruptMessageError):
        decode(join_message(header, body))


def test_error_messages_are_one_line(msg):
    data = encode(msg)
    for bad in (data[:20], data[:-3]):
        with pytest.raises(MessageError) as e:
            decode(bad)
        assert "\n" not in str(e.value)
