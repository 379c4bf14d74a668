"""Fuzzing of format version 2 (compressed messages): >10,000 mutated messages per run, in seconds.

Mutations are made on the bytes and the header directly (no model runs in the loop): header fields
(precision, group size, version, dtype, length, layers), tensor entries (scale and code shapes,
dtypes, offsets, names, missing or extra entries), special values written into scale and zero-point
tensors, byte flips anywhere, truncations and trailing bytes, and one message's header on another's
body. Every input must either be refused with a documented `MessageError` subclass and a one-line
reason, or be accepted *and* pass an independent check written here from the format description
alone (docs/message-format.md): header consistent with precision and group size, byte ranges tiling
the data, every scale finite and positive, every zero point finite, and the decoded tensors equal to
a numpy dequantization of the raw bytes. So nothing that should be refused is accepted, and nothing
accepted is decoded wrongly.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import join_message, make_tiny, rand_ids, split_message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcomm.core.errors import (
    CorruptMessageError,
    IncompatibleModelError,
    NonFiniteError,
    OversizeMessageError,
    ShapeMismatchError,
    UnsupportedVersionError,
)
from kvcomm.core.fingerprint import fingerprint
from kvcomm.core.message import decode, encode
from kvcomm.sharing.send_receive import send

DOCUMENTED = (CorruptMessageError, UnsupportedVersionError, IncompatibleModelError, ShapeMismatchError, NonFiniteError,
              OversizeMessageError)
N = {"header_fields": 3000, "tensor_entries": 2500, "scale_values": 1500, "byte_flips": 2500, "truncation": 700,
     "splice": 300, "hypothesis": 1000}  # 11,500 mutated messages per run

_lm = make_tiny("llama", seed=0)
_FP = fingerprint(_lm.model, _lm.tokenizer)
_MSG = send(_lm, rand_ids(6, 41), layers=[0, 2])
_BASES = {"int8/4": encode(_MSG, "int8", 4), "int4/4": encode(_MSG, "int4", 4), "fp8/8": encode(_MSG, "fp8", 8),
          "int4/128": encode(_MSG, "int4"), "bf16": encode(_MSG, "bf16")}
_PRECISIONS = ("bf16", "fp16", "fp32", "fp8", "int8", "int4")
_CODE = {"fp8": "F8_E4M3", "int8": "I8", "int4": "U8", "bf16": "BF16", "fp16": "F16", "fp32": "F32"}
_NP = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8, "F8_E4M3": np.uint8, "BF16": np.uint16}
_FP8 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()  # code -> value table




# ---- the independent check of an accepted message ------------------------------------------------

def raw(header, body, name):
    a, b = header[name]["data_offsets"]
    arr = np.frombuffer(body[a:b], dtype=_NP[header[name]["dtype"]]).reshape(header[name]["shape"])
    if header[name]["dtype"] == "BF16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32) if header[name]["dtype"] in ("F16", "F32", "BF16") else arr


def expand(s, g, axis, t, d):
    return np.repeat(s, g, axis=2)[:, :, :t, :] if axis == 2 else np.repeat(s, g, axis=3)[:, :, :, :d]


def verify_accepted(data: bytes, msg, receiver) -> None:
    header, body = split_message(data)
    meta = header.pop("__metadata__")
    fp = json.loads(meta["fingerprint"])
    if receiver is not None:
        assert fp == json.loads(receiver.to_json())
    h, d = fp["num_kv_heads"], fp["head_dim"]
    t, layers = int(meta["seq_len"]), json.loads(meta["layers"])
    assert meta["version"] in ("1", "2") and meta["format"] == "kvcomm.kv"
    p = meta.get("precision") if meta["version"] == "2" else {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}[meta["dtype"]]
    g = int(meta["group_size"]) if meta["version"] == "2" else 0
    assert p in _PRECISIONS and ((g == 0) if p in ("bf16", "fp16", "fp32") else (g >= 1))
    spans = sorted(tuple(e["data_offsets"]) for e in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(body) and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert sorted(msg.layers) == sorted(layers) and msg.seq_len == t and msg.precision == p and msg.group_size == g
    for layer, k, v in zip(msg.layers, msg.keys, msg.values):
        for kind, x, axis in (("k", k, 2), ("v", v, 3)):
            assert tuple(x.shape) == (1, h, t, d) and torch.isfinite(x).all()
            codes = raw(header, body, f"{kind}.{layer}")
            assert header[f"{kind}.{layer}"]["dtype"] == _CODE[p]
            if p in ("bf16", "fp16", "fp32"):
                ref = codes
            else:
                ng = (math.ceil(t / g), d) if axis == 2 else (t, math.ceil(d / g))
                scale = raw(header, body, f"{kind}_scale.{layer}")
                assert scale.shape == (1, h, *ng) and np.isfinite(scale).all() and (scale > 0).all()
                gg = max(1, min(g, t if axis == 2 else d))
                s = expand(scale, gg, axis, t, d)
                if p == "int4":
                    assert codes.shape == (1, h, t, (d + 1) // 2)
                    q = np.stack([codes & 15, codes >> 4], -1).reshape(1, h, t, -1)[..., :d].astype(np.float32)
                    zero = raw(header, body, f"{kind}_zero.{layer}")
                    assert zero.shape == scale.shape and np.isfinite(zero).all()
                    ref = q * s + expand(zero, gg, axis, t, d)
                elif p == "int8":
                    ref = codes.astype(np.float32) * s
                else:
                    ref = _FP8[codes] * s
            np.testing.assert_allclose(x.float().numpy(), ref, rtol=1e-6, atol=1e-6)


def check(data: bytes, receiver=_FP) -> bool:
    """Decode; a refusal must be documented and one line, an acceptance must pass `verify_accepted`."""
    try:
        msg = decode(data, receiver, dtype=torch.float32)
    except DOCUMENTED as e:
        assert str(e) and "\n" not in str(e), repr(e)
        return False
    verify_accepted(data, msg, receiver)
    return True


def test_the_bases_are_accepted():
    for data in _BASES.values():
        assert check(data) and check(data, None)


# ---- mutation families ---------------------------------------------------------------------------

_JUNK = ["", "0", "-1", "1", "2", "3", "4", "5", "7", "8", "9", "16", "128", "129", str(2**31), str(2**31 + 1), str(2**64),
         "1e3", "4.0", " 4", "0x4", "nan", "null", "[]", "{}", "int8", "int4", "fp8", "bf16", "fp32", "fp16", "INT8",
         "int 8", "F32", "BF16", "F16", "I8", "U8", "[0, 2]", "[0]", "[2, 0]", "[0, 2, 2]", "[0, 9]", "[-1, 2]",
         "[0.0, 2]", "[true, 2]", "\u00e9", "\n", "6", "5", "99"]


def _bases(rng):
    name = rng.choice(sorted(_BASES))
    return name, _BASES[name]


def test_header_fields():
    rng, accepted = random.Random(1), 0
    for _ in range(N["header_fields"]):
        _, data = _bases(rng)
        header, body = split_message(data)
        meta = header["__metadata__"]
        for _ in range(rng.choice((1, 1, 2))):
            key = rng.choice(["precision", "group_size", "version", "dtype", "seq_len", "layers", "position_start",
                              "format", "meta", "fingerprint"] + ["precision", "group_size"] * 3)
            choice = rng.random()
            if choice < 0.1:
                meta.pop(key, None)
            elif choice < 0.2:
                meta[key] = rng.choice([1, None, [], {"a": 1}, 4.5])  # not even a string
            elif key == "fingerprint":
                if not isinstance(meta.get(key), str):
                    continue
                fp = json.loads(meta[key])
                fp[rng.choice(sorted(fp))] = rng.choice([0, -1, 3, "16", None, 2**40, True])
                meta[key] = json.dumps(fp)
            else:
                meta[key] = rng.choice(_JUNK)
        accepted += check(join_message(header, body), rng.choice((_FP, None)))
    assert accepted > 0  # some mutations are harmless (e.g. an equivalent group size, position_start)


def test_tensor_entries():
    rng = random.Random(2)
    for _ in range(N["tensor_entries"]):
        _, data = _bases(rng)
        header, body = split_message(data)
        names = sorted(k for k in header if k != "__metadata__")
        name = rng.choice([n for n in names if "_" in n] * 3 + names)
        op = rng.randrange(7)
        entry = header[name]
        if op == 0:  # scale / code shape off by one somewhere, or a dimension added or removed
            shape = list(entry["shape"])
            i = rng.randrange(len(shape))
            r = rng.random()
            shape = shape[:i] + shape[i + 1 :] if r < 0.2 else shape + [1] if r < 0.4 else \
                shape[:i] + [shape[i] + rng.choice((-1, 1, 2, 7))] + shape[i + 1 :]
            entry["shape"] = shape
        elif op == 1:
            entry["dtype"] = rng.choice(["F16", "F32", "BF16", "I8", "U8", "F8_E4M3", "F8_E5M2", "I16", "BOOL", ""])
        elif op == 2:
            a, b = entry["data_offsets"]
            da, db = rng.choice([(0, 1), (1, 0), (-1, -1), (1, 1), (2, 0), (0, -2)])
            entry["data_offsets"] = [a + da, b + db]
        elif op == 3:
            del header[name]
        elif op == 4:  # rename: a scale becomes a zero point, a layer number changes, ...
            new = rng.choice([name.replace("scale", "zero"), name.replace("zero", "scale"), name.replace(".0", ".1"),
                              name.replace(".2", ".3"), name.replace("k", "v", 1), name + "x"])
            header[new] = header.pop(name)
        elif op == 5:  # swap two entries' offsets (same-size tensors decode to each other's bytes)
            other = header[rng.choice(names)]
            entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
        else:
            header[f"{name.split('.')[0]}_zero.{name.split('.')[-1]}"] = dict(entry)
        check(join_message(header, body))


def test_scale_values():
    rng = random.Random(3)
    special = [0.0, -0.0, -1.0, -6e-5, float("nan"), float("inf"), float("-inf"), 6e-8, 6.1e-5, 1e-3, 65504.0, 1.0, 300.0]
    quantized = sorted(k for k in _BASES if k != "bf16")
    for _ in range(N["scale_values"]):
        data = _BASES[rng.choice(quantized)]
        header, body = split_message(data)
        names = sorted(k for k in header if "_scale." in k or "_zero." in k)
        body = bytearray(body)
        for _ in range(rng.choice((1, 1, 2, 3))):
            name = rng.choice(names)
            a, b = header[name]["data_offsets"]
            i = a + 2 * rng.randrange((b - a) // 2)
            body[i : i + 2] = np.float16(rng.choice(special)).tobytes()
        check(join_message(header, bytes(body)), rng.choice((_FP, None)))


def test_byte_flips():
    rng = random.Random(4)
    for _ in range(N["byte_flips"]):
        _, data = _bases(rng)
        raw_ = bytearray(data)
        n8 = 8 + int.from_bytes(data[:8], "little")
        for _ in range(rng.choice((1, 1, 2, 4, 8))):
            i = rng.randrange(n8, len(raw_)) if rng.random() < 0.7 else rng.randrange(len(raw_))
            raw_[i] = rng.randrange(256) if rng.random() < 0.5 else raw_[i] ^ (1 << rng.randrange(8))
        check(bytes(raw_), rng.choice((_FP, None)))


def test_truncation_and_trailing_bytes():
    rng = random.Random(5)
    for _ in range(N["truncation"]):
        _, data = _bases(rng)
        cut = rng.randrange(len(data))
        assert not check(data[:cut])
        tail = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        assert not check(data + tail)


def test_splice_header_of_one_message_on_the_body_of_another():
    rng = random.Random(6)
    for _ in range(N["splice"]):
        (na, a), (nb, b) = _bases(rng), _bases(rng)
        header, _ = split_message(a)
        _, body = split_message(b)
        # the bases differ in precision or group size, so their data sections differ in layout and size
        assert not check(join_message(header, body)) or na == nb


_json = st.recursive(st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                     max_leaves=8)


@settings(max_examples=N["hypothesis"], deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.data())
def test_hypothesis_header_values(data):
    """Any JSON value in any field of a quantized message's header (the style of test_fuzz_message.py)."""
    header, body = split_message(_BASES[data.draw(st.sampled_from(["int8/4", "int4/4", "fp8/8"]))])
    target = data.draw(st.sampled_from(sorted(header)))
    if target == "__metadata__":
        key = data.draw(st.sampled_from(sorted(header[target])))
        header[target][key] = data.draw(st.one_of(st.text(max_size=40), _json.map(json.dumps), _json))
    else:
        header[target][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = data.draw(_json)
    check(join_message(header, body), data.draw(st.sampled_from([_FP, None])))


@pytest.mark.parametrize("limit", [1, 100, 1000])
def test_oversize_refused(limit):
    for data in _BASES.values():
        with pytest.raises(OversizeMessageError):
            decode(data, _FP, max_bytes=min(limit, len(data) - 1))


def test_run_size():
    assert sum(N.values()) >= 10_000
