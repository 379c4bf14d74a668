"""One fused GPU kernel (Triton) for dequantizing a KV message: codes in, model-dtype KV out.

The eager path in `kvcomm.core.quant.dequantize` is correct everywhere but, on a GPU, each of its
mixed-dtype elementwise ops (int8 codes x float32 scales -> bf16) runs on PyTorch's slow generic
path: ~1 ms for the int8 keys and values of 16 layers at 4K tokens on an H100 against ~0.15 ms of
memory traffic. This kernel reads each code once (int4: each byte once per nibble, from cache),
gathers its group's scale (and zero point) and writes the output once.

Layout (the same as `quant`): a tensor [..., T, D] seen as R = (...)*T rows of D channels. Keys
(axis "token") have a scale per (lead, token group, channel); values (axis "channel") one per
(row, channel group). A program handles BR rows x all channels, so the only integer divisions are
per row. fp8 codes can encode NaN (S.1111.111): the kernel flags the layers that hold one while it
reads them, so the decoder needs no separate pass over the codes. Computed in float32 as the eager path (x = q*s, + z for int4), rounded once to the output
dtype; the compiler may fuse the int4 multiply-add, so results may differ from the eager path by
one rounding of the output dtype (tests allow that).

Used only on CUDA with Triton importable (fp8 codes need compute capability >= 8.9); anything else
takes the eager path. `KVCOMM_TRITON=0` turns it off.
"""

from __future__ import annotations

import functools
import math

import torch

from kvcomm.core import triton_support

BLOCK_ROWS = 16


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dequant(codes, scale, zero, out, flags, code_bytes, R, T, D, DP, NG, RF,
                G: tl.constexpr, AXIS_TOKEN: tl.constexpr, INT4: tl.constexpr, NAN_FLAGS: tl.constexpr,
                BR: tl.constexpr, BD: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        cols = tl.arange(0, BD)
        r2, c2 = rows[:, None], cols[None, :]
        mask = (r2 < R) & (c2 < D)
        if INT4:
            byte = tl.load(codes + r2 * DP + c2 // 2, mask=mask, other=0).to(tl.int32)
            q = ((byte >> ((c2 % 2) * 4)) & 15).to(tl.float32)
        else:
            q = tl.load(codes + r2 * D + c2, mask=mask).to(tl.float32)
            if NAN_FLAGS:  # fp8: flag the lead slice (layer) of each row holding a NaN code (bits S.1111.111,
                # read again as bytes from cache); atomics only where one is
                raw = tl.load(code_bytes + r2 * D + c2, mask=mask, other=0).to(tl.int32)
                nan_row = tl.max(((raw & 127) == 127).to(tl.int32), axis=1)
                tl.atomic_or(flags + rows // RF, nan_row, mask=(rows < R) & (nan_row > 0))
        if AXIS_TOKEN:
            sidx = ((rows // T) * NG + (rows % T) // G)[:, None] * D + c2
        else:
            sidx = r2 * NG + c2 // G
        x = q * tl.load(scale + sidx, mask=mask, other=1.0).to(tl.float32)
        if INT4:
            x = x + tl.load(zero + sidx, mask=mask, other=0.0).to(tl.float32)
        tl.store(out + r2 * D + c2, x.to(out.dtype.element_ty), mask=mask)

    return dequant, triton.next_power_of_2, triton.cdiv


def available(codes: torch.Tensor, precision: str) -> bool:
    """Whether the kernel can dequantize `codes` here (`kvcomm.core.triton_support`; fp8 on sm_89+)."""
    if not triton_support.wanted(codes) or not triton_support.builds(_kernel):
        return False
    return precision != "fp8" or not codes.is_cuda or torch.cuda.get_device_capability(codes.device) >= (8, 9)


def dequantize(q, group: int, dtype: torch.dtype, nan_flags: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor `q` (a `quant.Quantized`, effective group length `group`) encodes, in `dtype`.

    `nan_flags` (fp8 only: int32, one per index of q's first dimension, zeroed by the caller) gets a
    non-zero entry for each leading slice whose codes hold a NaN, found while dequantizing (no extra pass)."""
    kernel, next_pow2, cdiv = _kernel()
    t, d = q.shape[-2:]
    rows = math.prod(q.shape[:-1])
    out = torch.empty(q.shape, dtype=dtype, device=q.codes.device)
    if out.numel() == 0:
        return out
    check = nan_flags is not None and q.precision == "fp8"
    token = q.axis == "token"
    ng = q.scale.shape[-2] if token else q.scale.shape[-1]
    codes, scale = q.codes.contiguous(), q.scale.contiguous()
    zero = q.zero.contiguous() if q.zero is not None else scale
    flags = nan_flags if check else scale
    per_flag = max(rows // q.shape[0], 1) if check else 1
    raw = codes.view(torch.uint8) if check else codes
    kernel[(cdiv(rows, BLOCK_ROWS),)](codes, scale, zero, out, flags, raw, rows, t, d, codes.shape[-1], ng, per_flag,
                                      G=group, AXIS_TOKEN=token, INT4=q.precision == "int4", NAN_FLAGS=check,
                                      BR=BLOCK_ROWS, BD=next_pow2(d))
    return out
