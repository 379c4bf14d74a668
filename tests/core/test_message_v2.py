"""Message format version 2: precisions, version-1 messages still load, byte ratios, refusals of bad scales."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import join_message, make_tiny, rand_ids, split_message

from kvcomm.core.errors import (
    CorruptMessageError,
    NonFiniteError,
    ShapeMismatchError,
    UnsupportedVersionError,
)
from kvcomm.core.fingerprint import Fingerprint, fingerprint
from kvcomm.core.message import KVMessage, decode, encode, load_message, save_message
from kvcomm.core.quant import PRECISIONS, relative_error
from kvcomm.sharing.send_receive import send

# Round-trip bounds (relative Frobenius error per tensor) on the tiny model's KV; see test_quant.py.
BOUND = {"fp32": 0.0, "fp16": 1e-3, "bf16": 5e-3, "fp8": 0.04, "int8": 0.015, "int4": 0.15}


@pytest.fixture(scope="module")
def lm():
    return make_tiny("llama", seed=0)


@pytest.fixture(scope="module")
def msg(lm):
    return send(lm, rand_ids(37, 31), layers=[1, 3], meta={"note": "hi"})




def encode_v1(msg: KVMessage) -> bytes:
    """Exactly what kvcomm's version-1 encoder (before compressed KV) wrote."""
    from safetensors.torch import save

    tensors = {}
    for layer, k, v in zip(msg.layers, msg.keys, msg.values):
        tensors[f"k.{layer}"] = k.detach().to("cpu").contiguous()
        tensors[f"v.{layer}"] = v.detach().to("cpu").contiguous()
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    metadata = {"format": "kvcomm.kv", "version": "1", "fingerprint": msg.fingerprint.to_json(),
                "layers": json.dumps(list(msg.layers)), "seq_len": str(msg.seq_len),
                "position_start": str(msg.position_start), "dtype": names[msg.dtype],
                "meta": json.dumps(msg.meta, default=str)}
    return save(tensors, metadata=metadata)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_version_1_messages_still_load(lm, msg, dtype):
    old = msg.to(dtype=dtype)
    data = encode_v1(old)
    assert split_message(data)[0]["__metadata__"]["version"] == "1"
    back = decode(data, fingerprint(lm.model, lm.tokenizer))
    assert back.layers == [1, 3] and back.meta["note"] == "hi" and back.dtype == dtype
    assert back.precision == {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype] and back.group_size == 0
    for a, b in zip(old.keys + old.values, back.keys + back.values):
        assert torch.equal(a, b)
    # version-1 rules are unchanged: a scale tensor has no place in a version-1 message
    header, body = split_message(data)
    header["__metadata__"]["precision"] = "int8"  # ignored by version 1
    assert decode(join_message(header, body)).precision == back.precision


def test_default_encoding_is_version_2_of_the_messages_own_dtype(msg):
    meta = split_message(encode(msg))[0]["__metadata__"]
    assert (meta["version"], meta["precision"], meta["group_size"], meta["dtype"]) == ("2", "fp32", "0", "F32")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_roundtrips_within_its_bound(lm, msg, precision, tmp_path):
    fp = fingerprint(lm.model, lm.tokenizer)
    n = save_message(msg, tmp_path / "m.kv", precision=precision)
    back = load_message(tmp_path / "m.kv", fp)
    assert back.precision == precision and back.wire_bytes == n and back.dtype == torch.float32
    assert back.group_size == (128 if precision in ("fp8", "int8", "int4") else 0)
    for a, b in zip(msg.keys + msg.values, back.keys + back.values):
        assert b.shape == a.shape and relative_error(a, b) <= BOUND[precision]
    # the receiver picks the dtype it dequantizes into
    assert load_message(tmp_path / "m.kv", fp, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_quantized_message_is_what_the_receiver_decodes(msg):
    q = msg.quantized("int4", group_size=16)
    data = encode(msg, "int4", 16)
    back = decode(data)
    assert q.wire_bytes == len(data) and q.precision == "int4" and q.group_size == 16 and q.dtype == msg.dtype
    for a, b in zip(q.keys + q.values, back.keys + back.values):
        assert torch.equal(a, b)
    assert q.bytes_per_context_token() == pytest.approx(len(data) / msg.seq_len)


def test_encoder_refuses_bad_arguments(msg):
    with pytest.raises(ValueError, match="precision"):
        encode(msg, "int2")
    with pytest.raises(ValueError, match="group size"):
        encode(msg, "bf16", group_size=32)
    with pytest.raises(ValueError, match="group size"):
        encode(msg, "int8", group_size=0)
    bad = msg.to()
    bad.keys[0] = bad.keys[0].clone()
    bad.keys[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        encode(bad, "int8")


def test_bytes_per_context_token_ratios_llama_8b():
    """Llama-3.1-8B shapes (8 KV heads, head_dim 128), 16 of 32 layers, 1,024 tokens: int8 ≤ 0.52x and
    int4 ≤ 0.28x the bf16 message, counted by the real encoder (header and scales included)."""
    fp = Fingerprint("llama", 32, 8, 128, "{}", "t", "w")
    g = torch.Generator().manual_seed(0)
    layers = list(range(8, 24))
    keys = [torch.randn(1, 8, 1024, 128, generator=g).to(torch.bfloat16) for _ in layers]
    values = [torch.randn(1, 8, 1024, 128, generator=g).to(torch.bfloat16) for _ in layers]
    m = KVMessage(layers, keys, values, fp)
    size = {p: len(encode(m, p)) for p in ("bf16", "int8", "int4")}
    assert size["bf16"] == pytest.approx(16 * 1024 * 4096, rel=1e-3)  # 4 KiB per token per layer
    ratio = {p: size[p] / size["bf16"] for p in size}
    assert ratio["int8"] <= 0.52 and ratio["int4"] <= 0.28, ratio


# ---- refusals of version-2 specifics (each with its own error class) ------------------------------

def test_unknown_precision_and_bad_group_size_refused(msg):
    header, body = split_message(encode(msg, "int8"))
    for value, err in (("int2", UnsupportedVersionError), ("", UnsupportedVersionError), ("fp32", CorruptMessageError),
                       ("int4", ShapeMismatchError), ("fp8", ShapeMismatchError)):
        h = json.loads(json.dumps(header))
        h["__metadata__"]["precision"] = value
        with pytest.raises(err):
            decode(join_message(h, body))
    for value in ("0", "-1", "x", "", str(2**40), "1e3"):
        h = json.loads(json.dumps(header))
        h["__metadata__"]["group_size"] = value
        with pytest.raises(CorruptMessageError, match="group_size"):
            decode(join_message(h, body))
    h = json.loads(json.dumps(header))
    del h["__metadata__"]["precision"]
    with pytest.raises(UnsupportedVersionError):
        decode(join_message(h, body))
    h, b = split_message(encode(msg))
    h["__metadata__"]["group_size"] = "128"  # dense messages have no groups
    with pytest.raises(CorruptMessageError, match="group_size"):
        decode(join_message(h, b))


def test_scale_tensor_shape_dtype_and_presence_checked(msg):
    header, body = split_message(encode(msg, "int4", 16))
    for name, field, value in (("k_scale.1", "shape", [1, 2, 2, 16]), ("v_scale.3", "shape", [1, 2, 37, 2]),
                               ("k_scale.1", "dtype", "F32"), ("v_zero.1", "dtype", "BF16"), ("k.3", "dtype", "I8")):
        h = json.loads(json.dumps(header))
        h[name][field] = value
        with pytest.raises(ShapeMismatchError, match=name.replace(".", r"\.")):
            decode(join_message(h, body))
    h = json.loads(json.dumps(header))
    del h["k_zero.3"]
    with pytest.raises(ShapeMismatchError, match="missing"):
        decode(join_message(h, body))
    h, b = split_message(encode(msg, "int8"))
    h["k_zero.1"] = dict(h["k_scale.1"])  # int8 has no zero points
    with pytest.raises(ShapeMismatchError, match="unexpected"):
        decode(join_message(h, b))


def _patch_tensor(data: bytes, name: str, fn) -> bytes:
    """Rewrite one tensor's bytes in place (same size) with fn(tensor) -> tensor."""
    header, body = split_message(data)
    a, b = header[name]["data_offsets"]
    dtype = {"F16": torch.float16, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn}[header[name]["dtype"]]
    t = torch.frombuffer(bytearray(body[a:b]), dtype=dtype).clone()
    new = fn(t)
    new = (new if new.dtype == torch.uint8 else new.to(dtype).view(torch.uint8)).numpy().tobytes()  # uint8: raw bytes
    return data[: len(data) - len(body) + a] + new + body[b:]


@pytest.mark.parametrize("precision", ["fp8", "int8", "int4"])
def test_bad_scales_refused(msg, precision):
    data = encode(msg, precision)
    for value, err in ((0.0, CorruptMessageError), (-1.0, CorruptMessageError), (float("nan"), NonFiniteError),
                       (float("inf"), NonFiniteError)):
        def poke(t, value=value):
            t[3] = value
            return t

        with pytest.raises(err, match="v_scale.3"):
            decode(_patch_tensor(data, "v_scale.3", poke))
    if precision == "int4":
        with pytest.raises(NonFiniteError, match="k_zero.1"):
            decode(_patch_tensor(data, "k_zero.1", lambda t: torch.full_like(t, float("-inf"))))


def test_nan_codes_and_overflow_on_dequantize_refused(msg):
    nan_fp8 = _patch_tensor(encode(msg, "fp8"), "k.3", lambda t: t.view(torch.uint8).fill_(0x7F))
    with pytest.raises(NonFiniteError, match="layer 3"):
        decode(nan_fp8)
    # finite scales that overflow the receiver's dtype once multiplied out
    huge = _patch_tensor(encode(msg, "int8"), "k_scale.1", lambda t: torch.full_like(t, 60000.0))
    assert decode(huge).dtype == torch.float32  # 127 · 60000 fits float32
    with pytest.raises(NonFiniteError, match="layer 1"):
        decode(huge, dtype=torch.float16)
