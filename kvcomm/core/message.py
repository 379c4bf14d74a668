"""KV messages: the selected layers' keys and values, and everything needed to trust them.

Wire format (version 2) is a plain safetensors file, never pickle:
  tensors   ``k.<layer>`` and ``v.<layer>``, each ``[1, kv_heads, seq_len, head_dim]`` in the message's
            precision: bf16/fp16/fp32 as is; fp8 (F8_E4M3) or int8 (I8) codes of that shape; int4 as
            U8 ``[1, kv_heads, seq_len, ceil(head_dim/2)]`` (two codes a byte). Quantized messages add
            float16 ``k_scale.<layer>`` ``[1, kv_heads, ceil(seq_len/G), head_dim]`` (keys: per channel,
            groups of G tokens) and ``v_scale.<layer>`` ``[1, kv_heads, seq_len, ceil(head_dim/G)]``
            (values: per token, groups of G channels), and for int4 ``k_zero``/``v_zero`` of the same
            shapes. Layouts and the reasons for them: `kvcomm.core.quant`.
  metadata  ``format="kvcomm.kv"``, ``version="2"``, ``fingerprint`` (JSON, see `kvcomm.core.fingerprint`),
            ``layers`` (JSON list), ``seq_len``, ``position_start`` (keys are rotated for positions
            position_start .. position_start+seq_len-1), ``dtype`` (the sender's KV dtype, which a
            decoded message takes unless the receiver asks for another), ``precision`` (one of
            `kvcomm.core.quant.PRECISIONS`), ``group_size`` (G; 0 for bf16/fp16/fp32) and ``meta``.
Version 1 (kvcomm before compressed KV) is version 2 without ``precision``/``group_size``: tensors
stored as is in ``dtype``. Both are read; version 2 is written.

Choosing a precision: `encode(msg, precision="int8", group_size=128)` (`save_message` takes the same
arguments; the default, None, stores the message's own dtype as before). `KVMessage.quantized(...)`
gives the message a receiver would decode, for measuring the effect in-process.

`decode` checks the raw bytes *before* handing them to safetensors (`kvcomm.core.wire`): size cap,
header length and JSON, format and version, then the fingerprint against the receiver, then the
header fields (layers, length, dtype, precision, group size), every tensor's name, dtype, shape and
byte range (a truncated file is caught by its offsets); after parsing, that every scale is finite
and positive and every zero point finite, and after dequantizing, no NaN/Inf. Each failure raises
its own `MessageError` subclass with a one-line reason.
"""

from __future__ import annotations

import json
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
from kvcomm.core.quant import (
    CODE_DTYPES,
    DEFAULT_GROUP_SIZE,
    DENSE,
    MAX_GROUP_SIZE,
    PRECISIONS,
    QUANTIZED,
    Quantized,
    dequantize_checked,
    part_shapes,
    precision_of,
    quantize,
)
from kvcomm.core.wire import DTYPE_NAMES, DTYPES, check_tensors, load_tensors, read_header

FORMAT = "kvcomm.kv"
VERSION = "2"
READ_VERSIONS = ("1", "2")
DEFAULT_MAX_BYTES = 4 << 30  # 4 GiB: a 16K-token context, all 32 layers of Llama-3.1-8B in bf16 is 2 GiB
_SENDER_DTYPES = ("F32", "BF16", "F16")
_KV_AXIS = {"k": "token", "v": "channel"}  # keys per channel (groups along tokens), values per token


@dataclass
class KVMessage:
    """KV of some layers of one prefilled context. `keys[i]`/`values[i]` belong to `layers[i]`.

    A decoded message also records how it travelled: `precision` and `group_size` from its header and
    `wire_bytes`, the size of the bytes it was decoded from (None / 0 / 0 for one built in memory)."""

    layers: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    fingerprint: Fingerprint
    position_start: int = 0
    meta: dict = field(default_factory=dict)
    precision: str | None = None
    group_size: int = 0
    wire_bytes: int = 0

    @property
    def seq_len(self) -> int:
        return self.keys[0].shape[-2] if self.keys else 0

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def payload_bytes(self) -> int:
        """Bytes of the keys and values as held in memory (for a decoded message: after dequantizing)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def bytes_per_token_per_layer(self) -> int:
        """2 · kv_heads · head_dim · bytes (4 KiB for Llama-3.1-8B in bf16), as held in memory."""
        k = self.keys[0]
        return 2 * k.shape[1] * k.shape[3] * k.element_size()

    def bytes_per_context_token(self) -> float:
        """Wire bytes (header and scales included) per context token; 0 for a message never encoded."""
        return self.wire_bytes / self.seq_len if self.seq_len else 0.0

    def _with(self, layers, keys, values) -> KVMessage:
        return KVMessage(layers, keys, values, self.fingerprint, self.position_start, dict(self.meta),
                         self.precision, self.group_size, self.wire_bytes)

    def select(self, layers) -> KVMessage:
        """The same message restricted to `layers` (which must all be present)."""
        layers = sorted(set(int(x) for x in layers))
        index = {layer: i for i, layer in enumerate(self.layers)}
        missing = [x for x in layers if x not in index]
        if missing:
            raise ValueError(f"layers {missing} are not in this message (it holds {self.layers})")
        return self._with(layers, [self.keys[index[x]] for x in layers], [self.values[index[x]] for x in layers])

    def to(self, device=None, dtype=None) -> KVMessage:
        conv = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return self._with(self.layers, [conv(t) for t in self.keys], [conv(t) for t in self.values])

    def layer_kv(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {layer: (k, v) for layer, k, v in zip(self.layers, self.keys, self.values)}

    def quantized(self, precision: str, group_size: int | None = None) -> KVMessage:
        """What a receiver decodes when this message is sent at `precision`: encoded, then decoded
        (without a model check) back into this message's dtype and device. `wire_bytes` is the size sent."""
        device = self.keys[0].device if self.keys else None
        return decode(encode(self, precision, group_size), None, max_bytes=1 << 62, dtype=self.dtype, device=device)


def _group_size(precision: str, group_size: int | None) -> int:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision not in QUANTIZED:
        if group_size:
            raise ValueError(f"a group size applies to {'/'.join(QUANTIZED)} only, not {precision}")
        return 0
    g = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if not isinstance(g, int) or not 1 <= g <= MAX_GROUP_SIZE:
        raise ValueError(f"group size must be an integer in [1, {MAX_GROUP_SIZE}], got {g!r}")
    return g


def encode(msg: KVMessage, precision: str | None = None, group_size: int | None = None) -> bytes:
    """Serialise to safetensors bytes (format version 2) at `precision` (default: the KV's own dtype,
    stored as is). fp8/int8/int4 take a `group_size` (default 128). Raises ValueError for an unknown
    precision, and for NaN/Inf or float16-overflowing KV at a quantized precision."""
    from safetensors.torch import save

    if not msg.layers:
        raise ValueError("a KV message needs at least one layer")
    precision = precision or precision_of(msg.dtype)
    g = _group_size(precision, group_size)
    tensors = {}
    for layer, k, v in zip(msg.layers, msg.keys, msg.values):
        for kind, t in (("k", k), ("v", v)):
            t = t.detach()
            if precision in DENSE:
                tensors[f"{kind}.{layer}"] = t.to("cpu", DENSE[precision]).contiguous()
                continue
            names = {"codes": f"{kind}.{layer}", "scale": f"{kind}_scale.{layer}", "zero": f"{kind}_zero.{layer}"}
            for part, x in quantize(t, precision, g, _KV_AXIS[kind]).parts().items():
                tensors[names[part]] = x.to("cpu").contiguous()
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": msg.fingerprint.to_json(),
        "layers": json.dumps(list(msg.layers)),
        "seq_len": str(msg.seq_len),
        "position_start": str(msg.position_start),
        "dtype": DTYPE_NAMES[msg.dtype],
        "precision": precision,
        "group_size": str(g),
        "meta": json.dumps(msg.meta, default=str),
    }
    return save(tensors, metadata=metadata)


def _int_field(meta: dict, name: str, lo: int = 0, hi: int | None = None) -> int:
    raw = meta.get(name)
    try:
        value = int(raw) if isinstance(raw, str) and len(raw) <= 32 else None
    except ValueError:
        value = None
    if value is None:
        raise CorruptMessageError(f"message metadata field {name!r} is missing or not an integer; re-send the message")
    if value < lo or (hi is not None and value > hi):
        raise CorruptMessageError(f"message metadata field {name!r} is {value}, outside [{lo}, {hi if hi is not None else 'inf'}]; re-send the message")
    return value


def _expected_tensors(layers, precision: str, g: int, shape: list[int]) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape) of every tensor a message of this kind must hold, and nothing else."""
    expected = {}
    for layer in layers:
        for kind, axis in _KV_AXIS.items():
            if precision in DENSE:
                expected[f"{kind}.{layer}"] = (DTYPE_NAMES[DENSE[precision]], shape)
                continue
            parts = part_shapes(precision, g, shape, axis)
            expected[f"{kind}.{layer}"] = (DTYPE_NAMES[CODE_DTYPES[precision]], list(parts["codes"]))
            expected[f"{kind}_scale.{layer}"] = ("F16", list(parts["scale"]))
            if "zero" in parts:
                expected[f"{kind}_zero.{layer}"] = ("F16", list(parts["zero"]))
    return expected


def _raise_first(checks: list[tuple[torch.Tensor, type, str]], layers: list[int]) -> None:
    """Raise the first failed check, in list order: each is (bad, error class, message with {layer}), `bad`
    one bool per layer on the device. All checks reach the host in one sync."""
    if not checks:
        return
    bad = torch.stack([b for b, _, _ in checks]).cpu()
    for row, (_, error, text) in zip(bad, checks):
        if row.any():
            raise error(text.format(layer=layers[int(row.nonzero()[0])]))


def layer_tensors(tensors, kind: str, layers: list[int], precision: str, g: int, shape, dtype, device) -> list[torch.Tensor]:
    """All layers' key (or value) tensors: moved to `device`, dequantized into `dtype` in one batched
    pass over the stacked layers (one fused kernel on a GPU), scales and values checked. Every check
    runs over all layers at once, on the device, and all of them reach the host in one sync, which
    names the first layer that fails; nothing is returned before that."""
    def stack(fmt: str) -> torch.Tensor:
        return torch.stack([tensors[fmt.format(kind=kind, layer=layer)].to(device) for layer in layers])

    checks = []
    if precision in DENSE:
        x = stack("{kind}.{layer}").to(dtype)
    else:
        scale = stack("{kind}_scale.{layer}")
        zero = stack("{kind}_zero.{layer}") if f"{kind}_zero.{layers[0]}" in tensors else None
        per_layer = scale.flatten(1)
        checks += [(~torch.isfinite(per_layer).all(1), NonFiniteError,
                    f"scale tensor {kind}_scale.{{layer}} holds NaN or Inf; the sender's file is broken"),
                   (~(per_layer > 0).all(1), CorruptMessageError,
                    f"scale tensor {kind}_scale.{{layer}} holds zero or negative scales (corrupt file)")]
        if zero is not None:
            checks.append((~torch.isfinite(zero.flatten(1)).all(1), NonFiniteError,
                           f"zero-point tensor {kind}_zero.{{layer}} holds NaN or Inf; the sender's file is broken"))
        codes = stack("{kind}.{layer}")
        # fp8 codes can encode NaN; the fused kernel flags those layers while it reads them
        x, nan = dequantize_checked(Quantized(precision, g, _KV_AXIS[kind], (len(layers), *shape), codes, scale, zero), dtype)
        if precision == "fp8":
            checks.append((nan, NonFiniteError, "layer {layer} of the message holds NaN values; the sender's model or file is broken"))
    # Quantized codes are finite and bounded (|q| <= 448) and the scales and zero points are checked
    # finite, so their products (<= 449 * 65504) are finite in bf16/fp32 and this full pass is skipped;
    # fp16 can overflow, so it (and dense tensors) is checked
    if not (precision in QUANTIZED and dtype in (torch.bfloat16, torch.float32)):
        checks.append((~torch.isfinite(x.flatten(1)).all(1), NonFiniteError,
                       "layer {layer} of the message holds NaN or Inf values; the sender's model or file is broken"))
    _raise_first(checks, layers)
    return list(x.unbind(0))


def decode(
    data: bytes,
    receiver: Fingerprint | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    allow_finetune: bool = False,
    dtype: torch.dtype | None = None,
    device=None,
) -> KVMessage:
    """Validate and parse message bytes (version 1 or 2). `receiver=None` skips only the model check.
    Tensors come back in `dtype` (default: the sender's dtype from the header) on `device` (default
    CPU); a quantized message is dequantized there, so a GPU receiver ships the compact codes only."""
    header, meta, body = read_header(data, max_bytes)
    if meta.get("format") != FORMAT:
        raise CorruptMessageError(f"file format is {_show(meta.get('format'))}, not {FORMAT!r} (not a kvcomm message)")
    version = meta.get("version")
    if version not in READ_VERSIONS:
        raise UnsupportedVersionError(
            f"message format version {_show(version)} is not supported (this kvcomm reads versions {', '.join(READ_VERSIONS)}); "
            "upgrade kvcomm or re-send with a matching version"
        )
    fp = Fingerprint.from_json(str(meta.get("fingerprint")))
    if receiver is not None:
        receiver.check_compatible(fp, allow_finetune=allow_finetune)

    try:
        layers = json.loads(meta.get("layers", ""))
    except (ValueError, TypeError, RecursionError):
        raise CorruptMessageError("message metadata 'layers' is not a JSON list; re-send the message") from None
    if (not isinstance(layers, list) or not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
            or len(set(layers)) != len(layers)):
        raise CorruptMessageError("message metadata 'layers' must be a non-empty list of distinct integers")
    if min(layers) < 0 or max(layers) >= fp.num_layers:
        raise ShapeMismatchError(f"message names layers {_show(layers)} but its model has {fp.num_layers} layers")
    seq_len = _int_field(meta, "seq_len", lo=1)
    position_start = _int_field(meta, "position_start")
    dtype_name = meta.get("dtype")
    if dtype_name not in _SENDER_DTYPES:
        raise ShapeMismatchError(f"message dtype {_show(dtype_name)} is not one of {sorted(_SENDER_DTYPES)}")
    if version == "1":
        precision, g = precision_of(DTYPES[dtype_name]), 0
    else:
        precision = meta.get("precision")
        if precision not in PRECISIONS:
            raise UnsupportedVersionError(f"message precision {_show(precision)} is not one this kvcomm reads "
                                          f"({', '.join(PRECISIONS)}); upgrade kvcomm or re-send at one of those")
        dense = precision in DENSE
        g = _int_field(meta, "group_size", lo=0 if dense else 1, hi=0 if dense else MAX_GROUP_SIZE)

    shape = [1, fp.num_kv_heads, seq_len, fp.head_dim]
    check_tensors(header, _expected_tensors(layers, precision, g, shape), body)
    tensors = load_tensors(data)
    out_dtype = dtype or DTYPES[dtype_name]
    keys = layer_tensors(tensors, "k", layers, precision, g, shape, out_dtype, device)
    values = layer_tensors(tensors, "v", layers, precision, g, shape, out_dtype, device)
    try:
        extra = json.loads(meta.get("meta", "{}"))
    except (ValueError, TypeError, RecursionError):
        extra = {}
    order = sorted(range(len(layers)), key=lambda i: layers[i])
    return KVMessage([layers[i] for i in order], [keys[i] for i in order], [values[i] for i in order],
                     fp, position_start, extra if isinstance(extra, dict) else {}, precision, g, len(data))


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def save_message(msg: KVMessage, path: str | Path, precision: str | None = None, group_size: int | None = None) -> int:
    """Write to `path` ('-' = stdout) atomically, at `precision` (see `encode`); return the bytes written."""
    data = encode(msg, precision, group_size)
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
                 allow_finetune: bool = False, dtype: torch.dtype | None = None, device=None) -> KVMessage:
    return decode(read_message_bytes(path, max_bytes), receiver, max_bytes, allow_finetune, dtype, device)
