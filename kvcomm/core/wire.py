"""The safetensors container of a KV message, checked byte by byte before any tensor is built.

`read_header` checks the size cap, the header length and JSON and that kvcomm metadata is present;
`check_tensors` checks that the header names exactly the expected tensors, each with its expected
dtype and shape, and that their byte ranges tile the data section exactly (no gap, overlap, trailing
byte or range past the end: a truncated file shows up here). Only then does `kvcomm.core.message`
hand the bytes to safetensors. Every failure is a `MessageError` subclass with a one-line reason.
"""

from __future__ import annotations

import json
import math

import torch

from kvcomm.core.errors import CorruptMessageError, OversizeMessageError, ShapeMismatchError

MAX_HEADER_BYTES = 1 << 20
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I8": torch.int8, "U8": torch.uint8,
          "F8_E4M3": torch.float8_e4m3fn}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1}


def read_header(data: bytes, max_bytes: int) -> tuple[dict, dict, int]:
    """(tensor entries, kvcomm metadata, data-section length) of message bytes."""
    if len(data) > max_bytes:
        raise OversizeMessageError(
            f"message is {len(data):,} bytes, over the {max_bytes:,}-byte limit; raise max_bytes (--max-bytes) if you trust it"
        )
    if len(data) < 8:
        raise CorruptMessageError(f"message is {len(data)} bytes, too short to be a safetensors file (truncated?)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise CorruptMessageError(
            f"message header claims {header_len:,} bytes but the file has {len(data) - 8:,} after it (truncated or not a kvcomm message)"
        )
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CorruptMessageError("message header is not valid JSON (corrupt file, or not a kvcomm message)") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise CorruptMessageError("message has no kvcomm metadata (not a kvcomm message)")
    meta = header.pop("__metadata__")
    return header, meta, len(data) - 8 - header_len


def check_tensors(header: dict, expected: dict[str, tuple[str, list[int]]], body: int) -> None:
    """Every entry of `header` is in `expected` (name -> (dtype name, shape)) and vice versa, with that
    dtype and shape and a byte range of exactly its size; the ranges tile [0, body)."""
    if set(header) != set(expected):
        extra, missing = sorted(set(header) - set(expected)), sorted(set(expected) - set(header))
        raise ShapeMismatchError(f"message tensors do not match its layer list and precision (missing {missing[:4]}, unexpected {extra[:4]})")
    spans = []
    for name, info in header.items():
        dtype_name, shape = expected[name]
        if not isinstance(info, dict) or info.get("dtype") != dtype_name or info.get("shape") != shape:
            got = (info.get("dtype"), info.get("shape")) if isinstance(info, dict) else info
            raise ShapeMismatchError(f"tensor {name} is {_short(got)}, expected ({dtype_name}, {shape}) from the message's model, length and precision")
        offs = info.get("data_offsets")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise CorruptMessageError(f"tensor {name} has malformed data offsets")
        if offs[1] - offs[0] != math.prod(shape) * ITEMSIZE[dtype_name] or offs[0] < 0:
            raise CorruptMessageError(f"tensor {name}'s byte range does not match its shape (corrupt file)")
        if offs[1] > body:
            raise CorruptMessageError(f"tensor {name} ends at byte {offs[1]:,} but the data section has {body:,} (truncated file)")
        spans.append(tuple(offs))
    spans.sort()
    if not spans or spans[0][0] != 0 or spans[-1][1] != body or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise CorruptMessageError("message data section has gaps, overlaps or trailing bytes (corrupt file)")


def load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """safetensors' own parse, after `check_tensors` passed; any failure here is corruption."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:  # safetensors raises its own error types
        raise CorruptMessageError(f"safetensors could not read the message: {str(e).splitlines()[0]}") from None


def _short(v) -> str:
    s = str(v)
    return s if len(s) <= 80 else s[:77] + "..."
