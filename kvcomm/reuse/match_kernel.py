"""Anchor matching on the GPU in Triton kernels: distances, weights and weighted offsets, each input read once.

Matching a placeholder of n tokens against A anchors (`kvcomm.reuse.weighing`, for `AnchorPool.match`) needs
  - squared value differences to each anchor, averaged per token (over layers, heads, channels) and
    per (layer, head, channel) (over tokens), and the new content's own mean square (its scale);
  - the global weights softmax(-d/tau) and their entropy (the shareability test);
  - softmax-weighted sums of the anchors' offsets: per token for the placeholder, per (layer, head,
    channel) for the segment after it.
In PyTorch each of these is several elementwise passes with float32 temporaries of the placeholder's
whole size per anchor (an 8B model, 1,000 tokens: 131 MB each); on an H100 that memory traffic was
most of a reused call (results/bench-fast-h100/profile.txt). Here one program reads a tile of
[tokens x channels] of one (layer, head) from each input once, accumulates in float32 and writes only
the reductions (`sq_dist`, one launch per anchor) or the result. `summarize` (one program) turns the
partial sums into per-token distances, scale, weights and entropy in a row on the device; `blend_kv`
computes the softmax weights itself and writes a placeholder's (or segment's) keys and values in one
launch. Once the eager torch ops between these launches were ~40 per placeholder and matching was bound by
host time (~5 ms for an 8B agent-5 call's five placeholders on an H100); now it is five launches.

Inputs are [L, H, n, D] views with unit channel stride (other strides free, so an anchor's first n
tokens are read in place); up to `MAX_PARTS` anchors' offsets per launch, more in float32 rounds.
Reductions are deterministic (partial sums per tile, no atomics); they add in a different order than
the eager path, so results agree to float32 rounding (tests compare them).

Used on CUDA when Triton imports (`available`), else `kvcomm.reuse.weighing` runs its eager path;
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

    @triton.jit
    def summarize(tok_part, own_part, d_tok, row, A, groups, n, cells, numel, tau, BA: tl.constexpr, BT: tl.constexpr):
        """One program: per-token mean squared distances [A, n] from the partial sums, the content's scale,
        the global weights softmax(-d/tau) and their entropy, into row = [entropy, scale, w_0 .. w_A-1]."""
        a = tl.arange(0, BA)
        am = a < A
        tot = tl.zeros([BA], dtype=tl.float32)
        own = tl.zeros([BT], dtype=tl.float32)
        zero = tl.program_id(0) * 0  # an int32 tensor: loop-carried counters must not start as constants
        start = zero
        while start < n:  # while loops: runtime-bounded `range` does not run in Triton's interpreter
            t = start + tl.arange(0, BT)
            tm = t < n
            m2 = am[:, None] & tm[None, :]
            acc = tl.zeros([BA, BT], dtype=tl.float32)
            g = zero
            while g < groups:
                acc += tl.load(tok_part + (a[:, None] * groups + g) * n + t[None, :], mask=m2, other=0.0)
                own += tl.load(own_part + g * n + t, mask=tm, other=0.0)
                g += 1
            d = acc / cells
            tl.store(d_tok + a[:, None] * n + t[None, :], d, mask=m2)
            tot += tl.sum(d, axis=1)
            start += BT
        scale = tl.maximum(tl.sqrt(tl.sum(own, axis=0) / numel), 1e-6)
        logit = tl.where(am, -(tl.sqrt(tot / n) / scale) / tau, float("-inf"))
        e = tl.exp(logit - tl.max(logit, axis=0))
        w = e / tl.sum(e, axis=0)
        h = -tl.sum(tl.where(am, w * tl.log(tl.maximum(w, 1e-30)), 0.0), axis=0)
        tl.store(row + 2 + a, w, mask=am)
        tl.store(row, h)
        tl.store(row + 1, scale)

    @triton.jit
    def blend_kv(out_k, out_v, k0, k1, k2, k3, v0, v1, v2, v3, d, row, a0, A, H, n, D, dA, norm, tau,
                 s0l, s0h, s0t, s1l, s1h, s1t, s2l, s2h, s2t, s3l, s3h, s3t, ol, oh, ot,
                 NP: tl.constexpr, ACC: tl.constexpr, PER_TOKEN: tl.constexpr, BA: tl.constexpr,
                 BT: tl.constexpr, BD: tl.constexpr):
        """Keys and values of sum_a w_a * part_a for parts a0..a0+NP-1, the weights softmax(-sqrt(d * norm) /
        scale / tau) over all A anchors computed here: per token (d [A, n]) or per (layer, head, channel)
        (d [A, L*H, D])."""
        lh = tl.program_id(1)
        layer, h = (lh // H).to(tl.int64), (lh % H).to(tl.int64)
        toks = tl.program_id(0) * BT + tl.arange(0, BT)
        cols = tl.arange(0, BD)
        t2, c2 = toks[:, None].to(tl.int64), cols[None, :]
        m = (toks[:, None] < n) & (c2 < D)
        a = tl.arange(0, BA)
        am = a < A
        if PER_TOKEN:
            dd = tl.load(d + a[:, None] * dA + toks[None, :], mask=am[:, None] & (toks[None, :] < n), other=0.0)
        else:
            dd = tl.load(d + a[:, None] * dA + lh * D + cols[None, :], mask=am[:, None] & (cols[None, :] < D), other=0.0)
        logit = tl.where(am[:, None], -(tl.sqrt(dd * norm) / tl.load(row + 1)) / tau, float("-inf"))
        e = tl.exp(logit - tl.max(logit, axis=0)[None, :])
        w = e / tl.sum(e, axis=0)[None, :]
        dst = layer * ol + h * oh + t2 * ot + c2
        if ACC:
            xk = tl.load(out_k + dst, mask=m, other=0.0)
            xv = tl.load(out_v + dst, mask=m, other=0.0)
        else:
            xk = tl.zeros([BT, BD], dtype=tl.float32)
            xv = tl.zeros([BT, BD], dtype=tl.float32)
        for i in tl.static_range(NP):  # part i: its weights (row a0 + i of w), keys and values
            wi = tl.sum(tl.where(a[:, None] == a0 + i, w, 0.0), axis=0)
            if PER_TOKEN:
                wt = wi[:, None]
            else:
                wt = wi[None, :]
            if i == 0:
                kp, vp, off = k0, v0, layer * s0l + h * s0h + t2 * s0t + c2
            elif i == 1:
                kp, vp, off = k1, v1, layer * s1l + h * s1h + t2 * s1t + c2
            elif i == 2:
                kp, vp, off = k2, v2, layer * s2l + h * s2h + t2 * s2t + c2
            else:
                kp, vp, off = k3, v3, layer * s3l + h * s3h + t2 * s3t + c2
            xk += wt * tl.load(kp + off, mask=m, other=0.0).to(tl.float32)
            xv += wt * tl.load(vp + off, mask=m, other=0.0).to(tl.float32)
        tl.store(out_k + dst, xk.to(out_k.dtype.element_ty), mask=m)
        tl.store(out_v + dst, xv.to(out_v.dtype.element_ty), mask=m)

    return sq_dist, weighted_sum, triton.next_power_of_2, triton.cdiv, summarize, blend_kv


def available(t: torch.Tensor) -> bool:
    """Whether the kernels run for tensors like `t` here (`kvcomm.core.triton_support`)."""
    return triton_support.wanted(t) and triton_support.builds(_kernels)


def _channels_last_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _partials(v: torch.Tensor, anchors: list[torch.Tensor]):
    """Partial sums of squared differences per (group of rows, token) [A, groups, n] and per (token tile,
    row, channel) [A, tiles, L*H, D], and of v's own squares [groups, n]; one launch per anchor."""
    sq_dist, _, next_pow2, cdiv, *_ = _kernels()
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
    return tok, ch, own


def square_distances(v: torch.Tensor, anchors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`kvcomm.reuse.weighing.square_distances` (mean squared differences per token [A, n] and per
    (layer, head, channel) [A, L, H, D]) plus `v`'s mean square, float32, each input read once."""
    L, H, n, D = v.shape
    tok, ch, own = _partials(v, anchors)
    return tok.sum(1) / (L * H * D), ch.sum(1).view(len(anchors), L, H, D) / n, own.sum() / v.numel()


def weigh(v: torch.Tensor, anchors: list[torch.Tensor], tau: float, row: torch.Tensor):
    """`kvcomm.reuse.weighing.weigh` in three launches plus one per anchor: the per-token mean distances
    [A, n], the per-channel distance sums [A, L, H, D] and their normaliser 1/n; `row` (float32, on the
    device) receives [entropy, scale, weights]."""
    _, _, next_pow2, _, summarize, _ = _kernels()
    L, H, n, D = v.shape
    A = len(anchors)
    tok, ch, own = _partials(v, anchors)
    d_tok = torch.empty(A, n, dtype=torch.float32, device=v.device)
    summarize[(1,)](tok, own, d_tok, row, A, tok.shape[1], n, float(L * H * D), float(v.numel()), float(tau),
                    BA=max(2, next_pow2(A)), BT=128)
    return d_tok, ch.sum(1).view(A, L, H, D), 1.0 / n


def blend_pair(keys: list[torch.Tensor], values: list[torch.Tensor], d: torch.Tensor, per_token: bool, norm: float,
               row: torch.Tensor, tau: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`kvcomm.reuse.weighing.blend_pair`: keys and values of the softmax-weighted sum of the anchors'
    offsets, the weights computed in the kernel from the distances `d` ([A, n] per token, or [A, L, H, D]
    per channel, times `norm`) and the scale in `row[1]`; one launch per `MAX_PARTS` anchors."""
    _, _, next_pow2, cdiv, _, kernel = _kernels()
    L, H, n, D = keys[0].shape
    A = len(keys)
    final_k = torch.empty(L, H, n, D, dtype=dtype, device=keys[0].device)
    final_v = torch.empty_like(final_k)
    if n == 0:
        return final_k, final_v
    pairs = [_shared_strides(k, v) for k, v in zip(keys, values)]
    rounds = [pairs[i : i + MAX_PARTS] for i in range(0, A, MAX_PARTS)]
    acc_k, acc_v = (final_k, final_v) if len(rounds) == 1 else (torch.empty_like(final_k, dtype=torch.float32),
                                                                 torch.empty_like(final_v, dtype=torch.float32))
    d = d.reshape(A, -1)
    for r, chunk in enumerate(rounds):
        chunk = chunk + [chunk[0]] * (MAX_PARTS - len(chunk))
        strides = [s for k, _ in chunk for s in k.stride()[:3]]
        kernel[(cdiv(n, BLOCK_TOKENS), L * H)](acc_k, acc_v, *[k for k, _ in chunk], *[v for _, v in chunk], d, row,
                                               r * MAX_PARTS, A, H, n, D, d.stride(0), float(norm), float(tau), *strides,
                                               acc_k.stride(0), acc_k.stride(1), acc_k.stride(2),
                                               NP=min(MAX_PARTS, A - r * MAX_PARTS), ACC=r > 0, PER_TOKEN=per_token,
                                               BA=max(2, next_pow2(A)), BT=BLOCK_TOKENS, BD=next_pow2(D))
    if acc_k is final_k:
        return final_k, final_v
    return acc_k.to(dtype), acc_v.to(dtype)


def _shared_strides(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An offset's keys and values with unit channel stride and the same strides (one set per part in the kernel)."""
    k, v = _channels_last_unit(k), _channels_last_unit(v)
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    return k, v


def weighted_sum(parts: list[torch.Tensor], weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_a weights[a] * parts[a] in `dtype`: parts [L, H, n, D] (any float dtypes, unit channel stride),
    weights [A, ...] broadcastable to [A, L, H, n, D] (float32), accumulated in float32."""
    _, kernel, next_pow2, cdiv, *_ = _kernels()
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
