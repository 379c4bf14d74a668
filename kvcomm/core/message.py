"""KV messages: the selected layers' keys and values, and everything needed to trust them.

Wire format (version 1) is a plain safetensors file, never pickle:
  tensors   ``k.<layer>`` and ``v.<layer>``, each ``[1, kv_heads, seq_len, head_dim]``, one dtype;
  metadata  ``format="kvcomm.kv"``, ``version="1"``, ``fingerprint`` (JSON, see `kvcomm.fingerprint`),
            ``layers`` (JSON list), ``seq_len``, ``position_start`` (keys are rotated for positions
            position_start .. position_start+seq_len-1), ``dtype`` and ``meta`` (free JSON).

`decode` checks the raw bytes *before* handing them to safetensors: size cap, header length and JSON,
format and version, every tensor's name, dtype, shape and byte range (a truncated file is caught by its
offsets), then the fingerprint against the receiver, then NaN/Inf. Each failure raises its own
`MessageError` subclass with a one-line reason.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvcomm.core.errors import (
    CorruptMessageError,
    NonFiniteError,
    OversizeMessageError,
    ShapeMismatchError,
    UnsupportedVersionError,
)
from kvcomm.core.fingerprint import Fingerprint

FORMAT = "kvcomm.kv"
VERSION = "1"
DEFAULT_MAX_BYTES = 4 << 30  # 4 GiB: a 16K-token context, all 32 layers of Llama-3.1-8B in bf16 is 2 GiB
MAX_HEADER_BYTES = 1 << 20
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}


@dataclass
class KVMessage:
    """KV of some layers of one prefilled context. `keys[i]`/`values[i]` belong to `layers[i]`."""

    layers: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    fingerprint: Fingerprint
    position_start: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return self.keys[0].shape[-2] if self.keys else 0

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def payload_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def bytes_per_token_per_layer(self) -> int:
        """2 · kv_heads · head_dim · bytes (4 KiB for Llama-3.1-8B in bf16)."""
        k = self.keys[0]
        return 2 * k.shape[1] * k.shape[3] * k.element_size()

    def select(self, layers) -> KVMessage:
        """The same message restricted to `layers` (which must all be present)."""
        layers = sorted(set(int(x) for x in layers))
        index = {layer: i for i, layer in enumerate(self.layers)}
        missing = [x for x in layers if x not in index]
        if missing:
            raise ValueError(f"layers {missing} are not in this message (it holds {self.layers})")
        return KVMessage(
            layers, [self.keys[index[x]] for x in layers], [self.values[index[x]] for x in layers],
            self.fingerprint, self.position_start, dict(self.meta),
        )

    def to(self, device=None, dtype=None) -> KVMessage:
        conv = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return KVMessage(self.layers, [conv(t) for t in self.keys], [conv(t) for t in self.values],
                         self.fingerprint, self.position_start, dict(self.meta))

    def layer_kv(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {layer: (k, v) for layer, k, v in zip(self.layers, self.keys, self.values)}


def encode(msg: KVMessage) -> bytes:
    """Serialise to safetensors bytes."""
    from safetensors.torch import save

    if not msg.layers:
        raise ValueError("a KV message needs at least one layer")
    tensors = {}
    for layer, k, v in zip(msg.layers, msg.keys, msg.values):
        tensors[f"k.{layer}"] = k.detach().to("cpu").contiguous()
        tensors[f"v.{layer}"] = v.detach().to("cpu").contiguous()
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": msg.fingerprint.to_json(),
        "layers": json.dumps(list(msg.layers)),
        "seq_len": str(msg.seq_len),
        "position_start": str(msg.position_start),
        "dtype": _DTYPE_NAMES[msg.dtype],
        "meta": json.dumps(msg.meta, default=str),
    }
    return save(tensors, metadata=metadata)


def _int_field(meta: dict, name: str, lo: int = 0) -> int:
    try:
        value = int(meta[name])
    except (KeyError, ValueError, TypeError):
        raise CorruptMessageError(f"message metadata field {name!r} is missing or not an integer; re-send the message") from None
    if value < lo:
        raise CorruptMessageError(f"message metadata field {name!r} is {value}, below {lo}; re-send the message")
    return value


def decode(
    data: bytes,
    receiver: Fingerprint | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    allow_finetune: bool = False,
) -> KVMessage:
    """Validate and parse message bytes. `receiver=None` skips only the model check."""
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
    except (UnicodeDecodeError, ValueError):
        raise CorruptMessageError("message header is not valid JSON (corrupt file, or not a kvcomm message)") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise CorruptMessageError("message has no kvcomm metadata (not a kvcomm message)")
    meta = header.pop("__metadata__")
    if meta.get("format") != FORMAT:
        raise CorruptMessageError(f"file format is {meta.get('format')!r}, not {FORMAT!r} (not a kvcomm message)")
    if meta.get("version") != VERSION:
        raise UnsupportedVersionError(
            f"message format version {meta.get('version')!r} is not supported (this kvcomm reads version {VERSION}); "
            "upgrade kvcomm or re-send with a matching version"
        )
    fp = Fingerprint.from_json(str(meta.get("fingerprint")))
    if receiver is not None:
        receiver.check_compatible(fp, allow_finetune=allow_finetune)

    try:
        layers = json.loads(meta.get("layers", ""))
    except ValueError:
        raise CorruptMessageError("message metadata 'layers' is not a JSON list; re-send the message") from None
    if (not isinstance(layers, list) or not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
            or len(set(layers)) != len(layers)):
        raise CorruptMessageError("message metadata 'layers' must be a non-empty list of distinct integers")
    if min(layers) < 0 or max(layers) >= fp.num_layers:
        raise ShapeMismatchError(f"message names layers {layers} but its model has {fp.num_layers} layers")
    seq_len = _int_field(meta, "seq_len", lo=1)
    position_start = _int_field(meta, "position_start")
    dtype_name = meta.get("dtype")
    if dtype_name not in _DTYPES:
        raise ShapeMismatchError(f"message dtype {dtype_name!r} is not one of {sorted(_DTYPES)}")

    expected = {f"{kind}.{layer}" for layer in layers for kind in "kv"}
    if set(header) != expected:
        extra, missing = sorted(set(header) - expected), sorted(expected - set(header))
        raise ShapeMismatchError(f"message tensors do not match its layer list (missing {missing[:4]}, unexpected {extra[:4]})")
    shape = [1, fp.num_kv_heads, seq_len, fp.head_dim]
    body = len(data) - 8 - header_len
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") != dtype_name or info.get("shape") != shape:
            got = (info.get("dtype"), info.get("shape")) if isinstance(info, dict) else info
            raise ShapeMismatchError(f"tensor {name} is {got}, expected ({dtype_name}, {shape}) from the message's model and length")
        offs = info.get("data_offsets")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise CorruptMessageError(f"tensor {name} has malformed data offsets")
        if offs[1] - offs[0] != math.prod(shape) * _ITEMSIZE[dtype_name] or offs[0] < 0:
            raise CorruptMessageError(f"tensor {name}'s byte range does not match its shape (corrupt file)")
        if offs[1] > body:
            raise CorruptMessageError(f"tensor {name} ends at byte {offs[1]:,} but the data section has {body:,} (truncated file)")
        spans.append(tuple(offs))
    spans.sort()
    if spans[0][0] != 0 or spans[-1][1] != body or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise CorruptMessageError("message data section has gaps, overlaps or trailing bytes (corrupt file)")

    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error types; any failure here is corruption
        raise CorruptMessageError(f"safetensors could not read the message: {str(e).splitlines()[0]}") from None
    keys, values = [], []
    for layer in layers:
        k, v = tensors[f"k.{layer}"], tensors[f"v.{layer}"]
        if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
            raise NonFiniteError(f"layer {layer} of the message holds NaN or Inf values; the sender's model or file is broken")
        keys.append(k)
        values.append(v)
    try:
        extra = json.loads(meta.get("meta", "{}"))
    except ValueError:
        extra = {}
    order = sorted(range(len(layers)), key=lambda i: layers[i])
    return KVMessage([layers[i] for i in order], [keys[i] for i in order], [values[i] for i in order],
                     fp, position_start, extra if isinstance(extra, dict) else {})


def save_message(msg: KVMessage, path: str | Path) -> int:
    """Write to `path` ('-' = stdout) atomically; return the bytes written."""
    data = encode(msg)
    if str(path) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return len(data)
    from kvcomm.core.files import write_atomic

    write_atomic(path, data)
    return len(data)


def read_message_bytes(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read raw bytes from `path` ('-' = stdin) without ever reading more than max_bytes + 1."""
    if str(path) == "-":
        data = sys.stdin.buffer.read(max_bytes + 1)
    else:
        path = Path(path)
        if not path.is_file():
            raise CorruptMessageError(f"message file {path} does not exist; check the path")
        size = path.stat().st_size
        if size > max_bytes:
            raise OversizeMessageError(
                f"message file is {size:,} bytes, over the {max_bytes:,}-byte limit; raise --max-bytes if you trust it"
            )
        data = path.read_bytes()
    return data


def load_message(path: str | Path, receiver: Fingerprint | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 allow_finetune: bool = False) -> KVMessage:
    return decode(read_message_bytes(path, max_bytes), receiver, max_bytes, allow_finetune)
