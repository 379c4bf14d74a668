"""Compressed KV: fp8, int8 and int4 codes for KV tensors, with their scales (pure torch, CPU or CUDA).

Precisions (`PRECISIONS`)
  bf16, fp16, fp32  stored as is (a cast). Not handled here: `kvcomm.core.message` writes them directly.
  fp8    float8_e4m3fn codes of x/s, s = amax/448 per group (448 = e4m3fn's largest finite value).
  int8   *symmetric*: q = round(x/s) in [-127, 127], s = amax/127 per group, no zero point. KV is
         roughly centred at 0 per group, so a zero point would buy little and cost bytes.
  int4   *asymmetric*: q = round((x - z)/s) in [0, 15], z = the group's min, s = (max - min)/15; two
         codes per uint8 along the channel axis (low nibble = even channel, high nibble = odd; an odd
         head_dim is padded with one zero code). At 16 levels a symmetric grid wastes about half its
         levels on a lopsided group, hence the zero point (KIVI's choice too).

Layout, the same for fp8, int8 and int4 (KIVI: Liu et al., "A Tuning-Free Asymmetric 2bit Quantization
for KV Cache", ICML 2024). For a tensor [..., T, D] (tokens, channels) and group size G:
  keys   (axis="token") per channel: for each (layer, head, channel) the token axis is cut into groups
         of G tokens, one scale (and zero point) per group: scale shape [..., ceil(T/G), D].
  values (axis="channel") per token: for each (layer, head, token) the channel axis is cut into
         groups of G channels: scale shape [..., T, ceil(D/G)].
Why (KIVI §3, from the element distributions of Llama, Falcon and Mistral caches): the key cache has
a few *outlier channels* whose magnitude is large for every token. A per-token scale would be set by
those channels and flatten every other channel of the token into a few levels; grouping keys per
channel gives each outlier channel its own scale. Values have no such channel structure, and the
attention output is a weighted sum of value *rows*, so a per-token scale keeps each token's error
relative to its own size and confines it to that token (attention is sparse, so errors on tokens that
get little weight barely reach the output). We use the same layout for fp8 and int8 so one validator
covers all three; for fp8 it is finer than the per-(layer, head) scale fp8 strictly needs (its codes
carry their own exponent, so for fp8 the grouping matters little; for int8 and int4 it matters:
`tests/core/test_quant.py::test_keys_per_channel_beat_per_token_on_outlier_channels`).

Scales and zero points are float16 (the byte budget of int4 needs 2-byte scales: see
docs/message-format.md) and are rounded so that the grid always covers its group: scales rounded up,
zero points rounded down, so no code clamps in practice. Scales are at least 2**-14 (float16's
smallest normal; a group of zeros then costs an absolute error of at most 2**-15). KV larger than
float16 holds (|x| > ~65,000) cannot be quantized: `quantize` raises ValueError (send bf16/fp32).

The default group size, 128, is one group per token per head for values when head_dim = 128 (KIVI's
per-token) and 128-token groups per channel for keys. Everything is vectorised: one call quantizes a
whole [layers, heads, T, D] block; no Python loop over tokens, heads or groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvcomm.core import quant_kernel

PRECISIONS = ("bf16", "fp16", "fp32", "fp8", "int8", "int4")
DENSE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZED = ("fp8", "int8", "int4")
CODE_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.uint8}
SCALE_DTYPE = torch.float16
DEFAULT_GROUP_SIZE = 128
MAX_GROUP_SIZE = 1 << 31
MIN_SCALE = 2.0**-14
_QMAX = {"fp8": 448.0, "int8": 127.0, "int4": 15.0}
_HALF_MAX = 65504.0
_INFLATE = 1 + 2.0**-10  # > float16's relative rounding error (2**-11), so a rounded value stays on its side
AXES = ("token", "channel")


def precision_of(dtype: torch.dtype) -> str:
    """'bf16', 'fp16' or 'fp32' for a floating dtype kvcomm stores as is."""
    for name, d in DENSE.items():
        if d == dtype:
            return name
    raise ValueError(f"KV dtype {dtype} has no message precision; use one of {sorted(DENSE.values(), key=str)}")


def num_groups(n: int, group_size: int) -> int:
    return math.ceil(n / group_size)


def part_shapes(precision: str, group_size: int, shape, axis: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the parts a quantized tensor of `shape` [..., T, D] travels as: codes, scale (, zero)."""
    *lead, t, d = (int(x) for x in shape)
    codes = (*lead, t, (d + 1) // 2) if precision == "int4" else (*lead, t, d)
    scale = (*lead, num_groups(t, group_size), d) if axis == "token" else (*lead, t, num_groups(d, group_size))
    parts = {"codes": codes, "scale": scale}
    if precision == "int4":
        parts["zero"] = scale
    return parts


@dataclass
class Quantized:
    """One tensor [..., T, D] in compressed form. `zero` is None except for int4."""

    precision: str
    group_size: int
    axis: str
    shape: tuple[int, ...]
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        parts = (self.codes, self.scale) + ((self.zero,) if self.zero is not None else ())
        return sum(t.numel() * t.element_size() for t in parts)

    def parts(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "scale": self.scale}
        if self.zero is not None:
            out["zero"] = self.zero
        return out

    def to(self, device) -> Quantized:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Quantized(self.precision, self.group_size, self.axis, self.shape, move(self.codes), move(self.scale),
                         move(self.zero))


def _check(precision: str, group_size: int, axis: str) -> None:
    if precision not in QUANTIZED:
        raise ValueError(f"precision {precision!r} is not a quantized one ({', '.join(QUANTIZED)})")
    if not isinstance(group_size, int) or not 1 <= group_size <= MAX_GROUP_SIZE:
        raise ValueError(f"group size must be an integer in [1, {MAX_GROUP_SIZE}], got {group_size!r}")
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")


def _span(shape, group_size: int, axis: str) -> tuple[int, int, int]:
    """(dim index, length n along it, effective group length g): groups are [i·g, (i+1)·g) ∩ [0, n)."""
    dim = -2 if axis == "token" else -1
    n = int(shape[dim])
    return dim, n, max(1, min(group_size, n))


def _grouped(x: torch.Tensor, group_size: int, axis: str) -> tuple[torch.Tensor, int]:
    """x [..., T, D] as groups: [..., nG, g, D] (token axis) or [..., T, nG, g] (channel axis), and the
    group dim. A partial last group is padded by repeating its last element (no effect on min/max)."""
    dim, n, g = _span(x.shape, group_size, axis)
    ng = num_groups(n, g)
    if ng * g != n:
        idx = torch.arange(ng * g, device=x.device).clamp_(max=n - 1)
        x = x.index_select(x.dim() + dim, idx)
    if axis == "token":
        return x.unflatten(-2, (ng, g)), -2
    return x.unflatten(-1, (ng, g)), -1


def _ungrouped(q: torch.Tensor, n: int, axis: str) -> torch.Tensor:
    if axis == "token":
        return q.flatten(-3, -2)[..., :n, :]
    return q.flatten(-2, -1)[..., :n]


def _expand(s: torch.Tensor, shape, group_size: int, axis: str) -> torch.Tensor:
    """A per-group tensor (scale layout) broadcast back to [..., T, D]."""
    dim, n, g = _span(shape, group_size, axis)
    return s.repeat_interleave(g, dim=s.dim() + dim).narrow(s.dim() + dim, 0, n)


def _half_up(x: torch.Tensor) -> torch.Tensor:
    """float16 of a positive float32 tensor, never below it (inf when it does not fit)."""
    return (x * _INFLATE).to(SCALE_DTYPE)


def _half_down(x: torch.Tensor) -> torch.Tensor:
    """float16 of a float32 tensor, never above it by more than float16's subnormal spacing."""
    return (x - x.abs() * (_INFLATE - 1)).to(SCALE_DTYPE)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], [..., D] -> [..., ceil(D/2)]: channel 2j in the low nibble, 2j+1 in the high."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, d: int) -> torch.Tensor:
    both = torch.stack((packed & 0x0F, packed >> 4), dim=-1)
    return both.flatten(-2)[..., :d]


@torch.no_grad()
def quantize(x: torch.Tensor, precision: str, group_size: int = DEFAULT_GROUP_SIZE, axis: str = "token") -> Quantized:
    """Quantize x [..., T, D]: axis='token' (keys: per channel, groups of G tokens) or 'channel' (values:
    per token, groups of G channels). Raises ValueError for NaN/Inf or magnitudes float16 scales cannot hold."""
    _check(precision, group_size, axis)
    if x.dim() < 2:
        raise ValueError(f"quantize needs a tensor [..., tokens, channels], got shape {tuple(x.shape)}")
    xf = x.detach().float()
    dim, n, _ = _span(x.shape, group_size, axis)
    groups, gdim = _grouped(xf, group_size, axis)
    lo, hi = groups.aminmax(dim=gdim, keepdim=True) if groups.numel() else (groups.sum(gdim, True),) * 2
    zero = None
    if precision == "int4":
        zero = _half_down(lo)
        scale = _half_up(((hi - zero.float()) / 15).clamp_min(MIN_SCALE))
        q = groups.sub(zero.float()).div_(scale.float()).round_().clamp_(0, 15).to(torch.uint8)
    else:
        scale = _half_up((torch.maximum(-lo, hi) / _QMAX[precision]).clamp_min(MIN_SCALE))
        q = groups / scale.float()
        if precision == "int8":
            q = q.round_().clamp_(-127, 127).to(torch.int8)
        else:
            q = q.clamp_(-448, 448).to(torch.float8_e4m3fn)
    # NaN/Inf in x reach the scales (min/max propagate them), so checking the small scale tensors suffices
    if not torch.isfinite(scale).all() or (zero is not None and not torch.isfinite(zero).all()):
        if not torch.isfinite(xf).all():
            raise ValueError("cannot quantize KV that holds NaN or Inf")
        raise ValueError(f"KV magnitude {float(xf.abs().max()):.3g} is beyond what {precision} scales (float16) "
                         "hold; send as bf16 or fp32")
    codes = _ungrouped(q, n, axis)
    if precision == "int4":
        codes = pack_int4(codes)
    scale, zero = scale.squeeze(gdim), None if zero is None else zero.squeeze(gdim)
    return Quantized(precision, group_size, axis, tuple(x.shape), codes.contiguous(), scale.contiguous(),
                     None if zero is None else zero.contiguous())


def _grouped_view(t: torch.Tensor, g: int, axis: str) -> torch.Tensor:
    """[..., T, D] -> [..., T/g, g, D] (token axis) or [..., T, D/g, g] (channel axis), a view; the axis
    length must be a multiple of g."""
    return t.unflatten(-2, (-1, g)) if axis == "token" else t.unflatten(-1, (-1, g))


def _group_scale(s: torch.Tensor, axis: str) -> torch.Tensor:
    """A per-group tensor in the scale layout as a view that broadcasts against `_grouped_view`."""
    return s.unsqueeze(-2) if axis == "token" else s.unsqueeze(-1)


def _affine_into(out: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
    """out = codes·scale (+ zero), one fused elementwise kernel: computed in float32 (scale is float32),
    written in out's dtype, scales broadcast from their group views (never expanded in memory)."""
    if zero is None:
        torch.mul(codes, scale, out=out)
    else:
        torch.addcmul(zero, codes, scale, out=out)


def _dequantize_into(out: torch.Tensor, q: Quantized, codes: torch.Tensor, lo: int, hi: int) -> None:
    """Dequantize groups [lo, hi) along q's grouped axis into out (all groups equally long inside)."""
    axis, g = q.axis, _span(q.shape, q.group_size, q.axis)[2]
    dim = -2 if axis == "token" else -1
    sl = lambda t, a, b: t.narrow(t.dim() + dim, a, b - a)  # noqa: E731
    n = int(q.shape[dim])
    a, b = lo * g, min(hi * g, n)
    g_eff = min(g, b - a)
    scale = sl(q.scale, lo, hi).float()
    zero = None if q.zero is None else sl(q.zero, lo, hi).float()
    if q.precision != "int4":
        o, c = _grouped_view(sl(out, a, b), g_eff, axis), _grouped_view(sl(codes, a, b), g_eff, axis)
        _affine_into(o, c, _group_scale(scale, axis), None if zero is None else _group_scale(zero, axis))
        return
    # int4: nibble pairs (2j, 2j+1) share a group (even g on the channel axis; any g on the token axis)
    packed = sl(codes, a // 2, (b + 1) // 2) if axis == "channel" else sl(codes, a, b)
    halves = sl(out, a, b).unflatten(-1, (-1, 2))  # [..., T, D/2, 2]: channel 2j at [..., j, 0]
    gv = g_eff // 2 if axis == "channel" else g_eff
    packed = _grouped_view(packed, gv, axis)
    for half, nibbles in ((0, packed & 0x0F), (1, packed >> 4)):
        s, z = (scale, zero) if axis == "channel" else (scale[..., half::2], zero[..., half::2])
        _affine_into(_grouped_view(halves[..., half], gv, axis), nibbles, _group_scale(s, axis), _group_scale(z, axis))


@torch.no_grad()
def dequantize(q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor [..., T, D] that `q` encodes, computed in float32 and returned in `dtype` (on q's device).
    Scales are not checked here (the message decoder checks them before calling).

    Each code is read once and each output element written once: the scale (and zero point) of its group
    is broadcast from a view and the float32 product is cast to `dtype` in the same kernel, so the
    receiver's cost is about the bytes moved (two kernels for int4's two nibbles, one cast more for fp8,
    whose codes do not promote). A partial last group takes a second pass. On a GPU with Triton, one
    fused kernel does it all (`kvcomm.core.quant_kernel`). An odd head_dim with int4, or
    an odd channel-axis group, takes the reference path (`_dequantize_reference`)."""
    g = _span(q.shape, q.group_size, q.axis)[2]
    if quant_kernel.available(q.codes, q.precision):  # one fused Triton kernel on a GPU
        return quant_kernel.dequantize(q, g, dtype)
    return _dequantize_eager(q, dtype, q.shape[-1], g)


def nan_codes(q: Quantized) -> torch.Tensor:
    """Per index of q's first dimension, whether its codes hold a NaN (fp8 e4m3fn: S.1111.111; integer
    codes never do). A device tensor: no host sync."""
    if q.precision != "fp8" or q.codes.numel() == 0:
        return torch.zeros(q.shape[0], dtype=torch.bool, device=q.codes.device)
    return ((q.codes.view(torch.uint8) & 0x7F) == 0x7F).flatten(1).any(1)


@torch.no_grad()
def dequantize_checked(q: Quantized, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """`dequantize`, and `nan_codes(q)` beside it: the fused kernel finds NaN codes while it reads them,
    other paths take one pass over the codes. Neither syncs with the host."""
    d = q.shape[-1]
    g = _span(q.shape, q.group_size, q.axis)[2]
    if quant_kernel.available(q.codes, q.precision):  # one fused Triton kernel on a GPU
        if q.precision != "fp8" or not q.shape[0]:
            return quant_kernel.dequantize(q, g, dtype), nan_codes(q)
        flags = torch.zeros(q.shape[0], dtype=torch.int32, device=q.codes.device)
        return quant_kernel.dequantize(q, g, dtype, nan_flags=flags), flags != 0
    return _dequantize_eager(q, dtype, d, g), nan_codes(q)


def _dequantize_eager(q: Quantized, dtype: torch.dtype, d: int, g: int) -> torch.Tensor:
    """`dequantize` without Triton (CPU, or no kernel for this case); `g` the effective group length."""
    if q.precision == "int4" and (d % 2 or (q.axis == "channel" and g % 2)):
        return _dequantize_reference(q, dtype)
    codes = q.codes.to(dtype) if q.precision == "fp8" else q.codes
    out = torch.empty(q.shape, dtype=dtype, device=q.codes.device)
    n = int(q.shape[-2 if q.axis == "token" else -1])
    full, groups = n // g, num_groups(n, g)
    if full:
        _dequantize_into(out, q, codes, 0, full)
    if groups > full:
        _dequantize_into(out, q, codes, full, groups)
    return out


def _dequantize_reference(q: Quantized, dtype: torch.dtype) -> torch.Tensor:
    """Straightforward dequantization (scales expanded to full size, float32 intermediates): the
    definition `dequantize` is tested against, and its path for layouts the fused one does not cover."""
    codes = unpack_int4(q.codes, q.shape[-1]) if q.precision == "int4" else q.codes
    x = codes.float()
    if q.zero is not None:
        x = x.mul_(_expand(q.scale.float(), q.shape, q.group_size, q.axis)).add_(
            _expand(q.zero.float(), q.shape, q.group_size, q.axis))
    else:
        x = x.mul_(_expand(q.scale.float(), q.shape, q.group_size, q.axis))
    return x.to(dtype)


def relative_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """‖x − y‖ / ‖x‖ over the whole tensor (Frobenius), in float32."""
    x, y = x.float(), y.float()
    return float((x - y).norm() / x.norm().clamp_min(1e-30))
