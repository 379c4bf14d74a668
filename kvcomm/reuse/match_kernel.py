"""Anchor matching on the GPU in two Triton kernels: distances and weighted offsets, each input read once.

Matching a placeholder of n tokens against A anchors (`kvcomm.reuse.anchors.AnchorPool.match`) needs
  - squared value differences to each anchor, averaged per token (over layers, heads, channels) and
    per (layer, head, channel) (over tokens), and the new content's own mean square (its scale);
  - softmax-weighted sums of the anchors' offsets: per token for the placeholder, per (layer, head,
    channel) for the segment after it.
In PyTorch each of these is several elementwise passes with float32 temporaries of the placeholder's
whole size per anchor (an 8B model, 1,000 tokens: 131 MB each); on an H100 that memory traffic was
most of a reused call (results/bench-fast-h100/profile.txt). Here one program reads a tile of
[tokens x channels] of one (layer, head) from each input once, accumulates in float32 and writes only
the reductions (distances) or the result (offsets).

Inputs are [L, H, n, D] views with unit channel stride (other strides free, so an anchor's first n
tokens are read in place); up to `MAX_PARTS` anchors' offsets per launch, more in float32 rounds.
Reductions are deterministic (partial sums per tile, summed by `torch.sum`, no atomics); they add in
a different order than the eager path, so results agree to float32 rounding (tests compare them).

Used on CUDA when Triton imports (`available`), else `kvcomm.reuse.anchors` runs its eager path;
`KVCOMM_TRITON=0` turns it off, `TRITON_INTERPRET=1` runs it on CPU tensors (the tests do).
"""

from __future__ import annotations

import functools

import torch

from kvcomm.core import triton_support

MAX_PARTS = 4  # anchors' offsets summed per launch
BLOCK_TOKENS = 32
ROWS_PER_PROGRAM = 16  # (layer, head) rows a distance program walks through


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def sq_dist(v, a, tok_part, ch_part, vsq_part, H, LH, n, D, vl, vh, vt, al, ah, at,
                VSQ: tl.constexpr, GROUP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
        tile = tl.program_id(0)
        grp = tl.program_id(1)
        toks = tile * BT + tl.arange(0, BT)
        cols = tl.arange(0, BD)
        t2, c2 = toks[:, None].to(tl.int64), cols[None, :]
        inside = (toks[:, None] < n) & (c2 < D)
        acc = tl.zeros([BT], dtype=tl.float32)
        own = tl.zeros([BT], dtype=tl.float32)
        for i in range(GROUP):
            lh = grp * GROUP + i
            ok = lh < LH
            layer, h = (lh // H).to(tl.int64), (lh % H).to(tl.int64)
            m = inside & ok
            x = tl.load(v + layer * vl + h * vh + t2 * vt + c2, mask=m, other=0.0).to(tl.float32)
            y = tl.load(a + layer * al + h * ah + t2 * at + c2, mask=m, other=0.0).to(tl.float32)
            d = x - y
            sq = d * d
            acc += tl.sum(sq, axis=1)
            tl.store(ch_part + (tile * LH + lh) * D + cols, tl.sum(sq, axis=0), mask=(cols < D) & ok)
            if VSQ:
                own += tl.sum(x * x, axis=1)
        tl.store(tok_part + grp * n + toks, acc, mask=toks < n)
        if VSQ:
            tl.store(vsq_part + grp * n + toks, own, mask=toks < n)

    @triton.jit
    def weighted_sum(out, acc, p0, p1, p2, p3, w, H, n, D,
                     s0l, s0h, s0t, s1l, s1h, s1t, s2l, s2h, s2t, s3l, s3h, s3t,
                     wa, wl, wh, wt, wd, ol, oh, ot,
                     NP: tl.constexpr, ACC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
        lh = tl.program_id(1)
        layer, h = (lh // H).to(tl.int64), (lh % H).to(tl.int64)
        toks = tl.program_id(0) * BT + tl.arange(0, BT)
        cols = tl.arange(0, BD)
        t2, c2 = toks[:, None].to(tl.int64), cols[None, :]
        m = (toks[:, None] < n) & (c2 < D)
        wix = layer * wl + h * wh + t2 * wt + c2 * wd
        dst = layer * ol + h * oh + t2 * ot + c2
        if ACC:
            x = tl.load(acc + dst, mask=m, other=0.0)
        else:
            x = tl.zeros([BT, BD], dtype=tl.float32)
        x += tl.load(w + wix, mask=m, other=0.0) * tl.load(p0 + layer * s0l + h * s0h + t2 * s0t + c2, mask=m, other=0.0).to(tl.float32)
        if NP > 1:
            x += tl.load(w + wa + wix, mask=m, other=0.0) * tl.load(p1 + layer * s1l + h * s1h + t2 * s1t + c2, mask=m, other=0.0).to(tl.float32)
        if NP > 2:
            x += tl.load(w + 2 * wa + wix, mask=m, other=0.0) * tl.load(p2 + layer * s2l + h * s2h + t2 * s2t + c2, mask=m, other=0.0).to(tl.float32)
        if NP > 3:
            x += tl.load(w + 3 * wa + wix, mask=m, other=0.0) * tl.load(p3 + layer * s3l + h * s3h + t2 * s3t + c2, mask=m, other=0.0).to(tl.float32)
        tl.store(out + dst, x.to(out.dtype.element_ty), mask=m)

    return sq_dist, weighted_sum, triton.next_power_of_2, triton.cdiv


def available(t: torch.Tensor) -> bool:
    """Whether the kernels run for tensors like `t` here (`kvcomm.core.triton_support`)."""
    return triton_support.wanted(t) and triton_support.builds(_kernels)


def _channels_last_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def square_distances(v: torch.Tensor, anchors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`kvcomm.reuse.anchors._square_distances` (mean squared differences per token [A, n] and per
    (layer, head, channel) [A, L, H, D]) plus `v`'s mean square, float32, each input read once."""
    sq_dist, _, next_pow2, cdiv = _kernels()
    L, H, n, D = v.shape
    A, LH = len(anchors), L * H
    tiles, groups = cdiv(n, BLOCK_TOKENS), cdiv(LH, ROWS_PER_PROGRAM)
    tok = torch.empty(A, groups, n, dtype=torch.float32, device=v.device)
    ch = torch.empty(A, tiles, LH, D, dtype=torch.float32, device=v.device)
    own = torch.empty(groups, n, dtype=torch.float32, device=v.device)
    v = _channels_last_unit(v)
    for i, a in enumerate(anchors):
        a = _channels_last_unit(a)
        sq_dist[(tiles, groups)](v, a, tok[i], ch[i], own, H, LH, n, D, v.stride(0), v.stride(1), v.stride(2),
                                 a.stride(0), a.stride(1), a.stride(2), VSQ=i == 0, GROUP=ROWS_PER_PROGRAM,
                                 BT=BLOCK_TOKENS, BD=next_pow2(D))
    d_tok = tok.sum(1) / (LH * D)
    d_ch = ch.sum(1).view(A, L, H, D) / n
    return d_tok, d_ch, own.sum() / v.numel()


def weighted_sum(parts: list[torch.Tensor], weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_a weights[a] * parts[a] in `dtype`: parts [L, H, n, D] (any float dtypes, unit channel stride),
    weights [A, ...] broadcastable to [A, L, H, n, D] (float32), accumulated in float32."""
    _, kernel, next_pow2, cdiv = _kernels()
    L, H, n, D = parts[0].shape
    parts = [_channels_last_unit(p) for p in parts]
    w = weights.float().expand(len(parts), L, H, n, D)
    wa, wl, wh, wt, wd = w.stride()
    rounds = [parts[i : i + MAX_PARTS] for i in range(0, len(parts), MAX_PARTS)]
    final = torch.empty(L, H, n, D, dtype=dtype, device=parts[0].device)
    acc = final if len(rounds) == 1 else torch.empty(L, H, n, D, dtype=torch.float32, device=final.device)
    grid = (cdiv(n, BLOCK_TOKENS), L * H)
    for r, chunk in enumerate(rounds):
        ptrs = chunk + [chunk[0]] * (MAX_PARTS - len(chunk))
        strides = [s for p in ptrs for s in p.stride()[:3]]
        kernel[grid](acc, acc, *ptrs, w[r * MAX_PARTS :], H, n, D, *strides, wa, wl, wh, wt, wd,
                     acc.stride(0), acc.stride(1), acc.stride(2), NP=len(chunk), ACC=r > 0,
                     BT=BLOCK_TOKENS, BD=next_pow2(D))
    return acc if acc is final else acc.to(dtype)
