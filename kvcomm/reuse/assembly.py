"""A reused prompt's KV from its pieces: exact first segment, then bases and template segments plus
their estimated offsets, each moved (keys re-rotated) to where it sits in the prompt.

On CUDA one Triton program per tile adds a piece's offset and re-rotates its keys while copying it
into the prompt's buffer (`_piece_kernel`): each input is read once and the result written once,
where the eager path writes the offset sum, a concatenation and four float32 temporaries of the
whole prompt's keys (an 8B model, 3.5K tokens: ~4.5 ms of an agent-5 call on an H100,
results/bench-match-h100). Both paths add in float32 and rotate in float32; the eager one rounds the
sum to the KV dtype before rotating (as kvcomm always did), the kernel does not, so they agree to one
rounding of the KV dtype.
"""

from __future__ import annotations

import functools

import torch

from kvcomm.core import triton_support
from kvcomm.core.kv import KVBlock
from kvcomm.core.rope import rerotate, rotation

BLOCK_TOKENS = 32


def add_offset(base: KVBlock, offset: KVBlock) -> KVBlock:
    """`base` plus the first `base.n` tokens of an estimated offset."""
    n = base.n
    return KVBlock(base.k + offset.k[:, :, :n], base.v + offset.v[:, :, :n])


def assemble(lm, p0: KVBlock, spans, pieces: list[KVBlock], offsets: list[KVBlock | None] | None = None) -> KVBlock:
    """The prompt's KV: exact `p0`, then one origin-frame piece per later span (plus its offset, when
    given), keys re-rotated to the spans' positions."""
    offsets = offsets or [None] * len(pieces)
    if triton_support.wanted(p0.k) and triton_support.builds(_kernel):
        return _assemble_fused(lm, p0, spans, pieces, offsets)
    pieces = [add_offset(p, o) if o is not None else p for p, o in zip(pieces, offsets)]
    shifts = [torch.zeros(p0.n, dtype=torch.long)] + [torch.full((b - a,), a, dtype=torch.long) for _, a, b in spans[1:]]
    full = KVBlock.cat([p0, *pieces])
    return KVBlock(rerotate(lm.model, full.k, torch.cat(shifts)), full.v)


def _assemble_fused(lm, p0: KVBlock, spans, pieces, offsets) -> KVBlock:
    kernel, next_pow2, cdiv = _kernel()
    L, H, _, D = p0.k.shape
    total = spans[-1][2]
    k = torch.empty(L, H, total, D, dtype=p0.k.dtype, device=p0.k.device)
    v = torch.empty_like(k)
    k[:, :, : p0.n].copy_(p0.k)
    v[:, :, : p0.n].copy_(p0.v)
    starts = torch.tensor([a for _, a, _ in spans[1:]], dtype=torch.long)
    cos, sin = rotation(lm.model, starts, k.device)  # [pieces, D]: every token of a piece moves by its start
    for i, ((_, a, b), piece, off) in enumerate(zip(spans[1:], pieces, offsets)):
        n = b - a
        if n == 0:
            continue
        parts = [piece.k, piece.v] + ([off.k, off.v] if off is not None else [piece.k, piece.v])
        parts = [x if x.stride(-1) == 1 else x.contiguous() for x in parts]
        strides = [s for x in parts for s in x.stride()[:3]]
        kernel[(cdiv(n, BLOCK_TOKENS), L * H)](k[:, :, a:b], v[:, :, a:b], *parts, cos[i], sin[i], H, n, D // 2,
                                               *strides, k.stride(0), k.stride(1), k.stride(2),
                                               OFFSET=off is not None, BT=BLOCK_TOKENS, BD=next_pow2(D // 2))
    return KVBlock(k, v)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def piece(k_out, v_out, bk, bv, ok, ov, cos, sin, H, n, HALF,
              bkl, bkh, bkt, bvl, bvh, bvt, okl, okh, okt, ovl, ovh, ovt, sl, sh, st,
              OFFSET: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
        lh = tl.program_id(1)
        layer, h = (lh // H).to(tl.int64), (lh % H).to(tl.int64)
        toks = tl.program_id(0) * BT + tl.arange(0, BT)
        cols = tl.arange(0, BD)
        t2, c2 = toks[:, None].to(tl.int64), cols[None, :]
        m = (toks[:, None] < n) & (c2 < HALF)
        kb = bk + layer * bkl + h * bkh + t2 * bkt + c2
        x1 = tl.load(kb, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(kb + HALF, mask=m, other=0.0).to(tl.float32)
        vb = bv + layer * bvl + h * bvh + t2 * bvt + c2
        y1 = tl.load(vb, mask=m, other=0.0).to(tl.float32)
        y2 = tl.load(vb + HALF, mask=m, other=0.0).to(tl.float32)
        if OFFSET:
            ko = ok + layer * okl + h * okh + t2 * okt + c2
            x1 += tl.load(ko, mask=m, other=0.0).to(tl.float32)
            x2 += tl.load(ko + HALF, mask=m, other=0.0).to(tl.float32)
            vo = ov + layer * ovl + h * ovh + t2 * ovt + c2
            y1 += tl.load(vo, mask=m, other=0.0).to(tl.float32)
            y2 += tl.load(vo + HALF, mask=m, other=0.0).to(tl.float32)
        c1 = tl.load(cos + cols, mask=cols < HALF, other=0.0)[None, :]
        c2_ = tl.load(cos + HALF + cols, mask=cols < HALF, other=0.0)[None, :]
        s1 = tl.load(sin + cols, mask=cols < HALF, other=0.0)[None, :]
        s2 = tl.load(sin + HALF + cols, mask=cols < HALF, other=0.0)[None, :]
        dst = layer * sl + h * sh + t2 * st + c2
        tl.store(k_out + dst, (x1 * c1 - x2 * s1).to(k_out.dtype.element_ty), mask=m)
        tl.store(k_out + dst + HALF, (x2 * c2_ + x1 * s2).to(k_out.dtype.element_ty), mask=m)
        tl.store(v_out + dst, y1.to(v_out.dtype.element_ty), mask=m)
        tl.store(v_out + dst + HALF, y2.to(v_out.dtype.element_ty), mask=m)

    return piece, triton.next_power_of_2, triton.cdiv
