"""Anchor matching's per-anchor reductions against the stacked definition (KVCOMM's distances and
softmax-weighted offsets, written as in the paper: one [A, L, H, n, D] tensor)."""

from __future__ import annotations

import torch

from kvcomm.reuse.weighing import blend as _blend
from kvcomm.reuse.weighing import square_distances as _square_distances


def test_distances_and_blends_equal_the_stacked_definition():
    g = torch.Generator().manual_seed(0)
    L, H, n, D, A = 3, 2, 17, 8, 4
    v = torch.randn(L, H, n, D, generator=g)
    anchors = [(v + 0.3 * (a + 1) * torch.randn(L, H, n, D, generator=g)).to(torch.bfloat16) for a in range(A)]
    sq = torch.stack([v - a.float() for a in anchors]).square()
    d_tok, d_ch, mean_sq = _square_distances(v, anchors)
    torch.testing.assert_close(mean_sq, v.pow(2).mean())
    torch.testing.assert_close(d_tok, sq.mean(dim=(1, 2, 4)), rtol=1e-6, atol=0)
    torch.testing.assert_close(d_ch, sq.mean(dim=3), rtol=1e-6, atol=0)
    torch.testing.assert_close(d_tok.mean(1), sq.mean(dim=(1, 2, 3, 4)), rtol=1e-6, atol=0)

    parts = [torch.randn(L, H, n, D, generator=g).to(torch.bfloat16) for _ in range(A)]
    for w in (torch.softmax(torch.randn(A, 1, 1, n, 1, generator=g), 0), torch.softmax(torch.randn(A, L, H, 1, D, generator=g), 0)):
        want = (w * torch.stack(parts)).sum(0)
        got = _blend(parts, w, torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert _blend(parts, w, torch.bfloat16).dtype == torch.bfloat16
