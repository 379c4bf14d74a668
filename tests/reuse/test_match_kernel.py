"""The Triton matching kernels (`kvcomm.reuse.match_kernel`) against the eager path of
`kvcomm.reuse.weighing`: same distances, scale, weights, entropy and weighted offsets to float32
rounding, for anchors longer than the placeholder (read in place), mixed dtypes and more anchors than
one launch sums; and a whole `AnchorPool.match` both ways.
Runs on CUDA, or on CPU in Triton's interpreter where Triton is installed; skipped otherwise."""

from __future__ import annotations

import pytest
import torch

from kvcomm.reuse import match_kernel, weighing


@pytest.fixture
def device(kernel_device):
    return kernel_device


def _eager(monkeypatch, fn, *args):
    monkeypatch.setenv("KVCOMM_TRITON", "0")
    try:
        return fn(*args)
    finally:
        monkeypatch.delenv("KVCOMM_TRITON")


@pytest.mark.parametrize("L,H,n,D,A", [(3, 2, 17, 8, 1), (2, 3, 40, 12, 3), (4, 2, 33, 16, 6)])
def test_distances_match_the_eager_path(device, monkeypatch, L, H, n, D, A):
    g = torch.Generator().manual_seed(L * 100 + n)
    v = torch.randn(L, H, n, D, generator=g).to(torch.bfloat16).to(device)
    longer = [(torch.randn(L, H, n + 5 * a, D, generator=g) * 0.5).to(torch.bfloat16).to(device) for a in range(A)]
    views = [x[:, :, :n] for x in longer]  # anchors at least as long as the content, read in place
    assert match_kernel.available(v)
    got = weighing.square_distances(v, views)
    want = _eager(monkeypatch, weighing.square_distances, v, views)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=1e-6)
    assert got[0].shape == (A, n) and got[1].shape == (A, L, H, D) and got[2].dim() == 0


@pytest.mark.parametrize("A", [1, 4, 5, 9])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weighted_offsets_match_the_eager_path(device, monkeypatch, A, dtype):
    g = torch.Generator().manual_seed(A)
    L, H, n, D = 3, 2, 37, 8
    parts = [torch.randn(L, H, n + 3 * a, D, generator=g).to(dtype).to(device)[:, :, :n] for a in range(A)]
    parts[0] = parts[0].float()  # a dequantized (float32) offset among stored ones
    per_token = torch.softmax(torch.randn(A, 1, 1, n, 1, generator=g), 0).to(device)
    per_channel = torch.softmax(torch.randn(A, L, H, 1, D, generator=g), 0).to(device)
    for w in (per_token, per_channel):
        got = weighing.blend(parts, w, dtype)
        want = _eager(monkeypatch, weighing.blend, parts, w, dtype)
        assert got.dtype == dtype and got.shape == (L, H, n, D)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
        torch.testing.assert_close(got, want, **tol)


def test_match_uses_the_kernels_with_the_same_result(device, monkeypatch):
    """A whole `AnchorPool.match` (bf16 KV, 3 anchors) gives the eager path's offsets and weights."""
    from kvcomm.core.kv import KVBlock
    from kvcomm.reuse.anchors import AgentDelta, AnchorPool

    g = torch.Generator().manual_seed(7)
    L, H, n, D = 3, 2, 21, 8
    bf = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16).to(device)  # noqa: E731
    pool = AnchorPool(gamma=1.0, tau=0.05)
    content = bf(L, H, n, D)
    for i in range(3):
        base = KVBlock(bf(L, H, n + i, D), (content.float().cpu() + 0.2 * (i + 1) * torch.randn(L, H, n, D, generator=g)).to(torch.bfloat16).to(device))
        base = KVBlock(base.k[:, :, :n], base.v)
        pool.stage("r", "q", f"k{i}", base, "agent", AgentDelta(KVBlock(bf(L, H, n, D), bf(L, H, n, D)), KVBlock(bf(L, H, 5, D), bf(L, H, 5, D))))
    pool.commit("r")
    query = KVBlock(bf(L, H, n, D), content)
    got = pool.match("q", "agent", query)
    want = _eager(monkeypatch, pool.match, "q", "agent", query)
    torch.testing.assert_close(got.weights, want.weights, rtol=1e-4, atol=1e-6)
    for x, y in ((got.placeholder_offset, want.placeholder_offset), (got.segment_offset, want.segment_offset)):
        torch.testing.assert_close(x.k.float(), y.k.float(), rtol=1.6e-2, atol=1e-2)
        torch.testing.assert_close(x.v.float(), y.v.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("A", [1, 3, 6])
def test_fused_weighing_and_offsets_match_the_eager_path(device, monkeypatch, A):
    """`weighing.weigh` (row = entropy, scale, weights) and `weighing.blend_pair` (softmax weights computed in
    the kernel, keys and values in one launch, more anchors than one launch sums) give the eager numbers."""
    from kvcomm.reuse import weighing

    g = torch.Generator().manual_seed(10 + A)
    L, H, n, D, m = 3, 2, 45, 12, 7
    bf = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16).to(device)  # noqa: E731
    v = bf(L, H, n, D)
    anchors = [(v.float().cpu() + 0.1 * (a + 1) * torch.randn(L, H, n + a, D, generator=g)[:, :, :n]).to(torch.bfloat16).to(device)
               for a in range(A)]
    offsets = [(bf(L, H, n + a, D)[:, :, :n], bf(L, H, n + a, D)[:, :, :n]) for a in range(A)]
    segments = [(bf(L, H, m, D), bf(L, H, m, D)) for _ in range(A)]

    def run():
        row = torch.zeros(2 + A, device=device)
        d_tok, d_ch, norm = weighing.weigh(v, anchors, 0.05, row)
        placeholder = weighing.blend_pair(*zip(*offsets), d_tok, True, 1.0, row, 0.05, torch.bfloat16)
        segment = weighing.blend_pair(*zip(*segments), d_ch, False, norm, row, 0.05, torch.bfloat16)
        return row, placeholder, segment

    got = run()
    want = _eager(monkeypatch, run)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-6)
    for x, y in zip((*got[1], *got[2]), (*want[1], *want[2])):
        assert x.dtype == torch.bfloat16 and x.shape == y.shape
        torch.testing.assert_close(x.float(), y.float(), rtol=1.6e-2, atol=1e-2)
