"""The split-key attention kernel of the static path (`kvcomm.core.decode_attention`) against SDPA with
the masks `fast_decode` would build: each layer's filled length, new token j seeing slots 0..len + j.
Runs on CUDA, or on CPU in Triton's interpreter where Triton is installed; skipped otherwise. The fast
path with this kernel against eager prefill and decoding: tests/core/test_fast_prefill.py and
test_fast_decode.py (on CUDA, and on CPU under the interpreter below)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, rand_ids
from test_fast_decode import assert_same_cache
from test_fast_prefill import clone

from kvcomm.core import decode_attention, fast_decode
from kvcomm.core.generation import greedy_continue
from kvcomm.core.kv import last_prefill_path, prefill


@pytest.fixture
def device(kernel_device):
    return kernel_device


def masked_sdpa(query, key, value, filled: int, scaling: float) -> torch.Tensor:
    """The reference: SDPA over all slots with keys repeated per query head and the static path's mask."""
    q_len, rep = query.shape[2], query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(rep, 1).float(), value.repeat_interleave(rep, 1).float()
    cols = torch.arange(key.shape[2], device=key.device)
    visible = cols[None, :] <= filled + torch.arange(q_len, device=key.device)[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(query.float(), k, v, attn_mask=visible, scale=scaling)
    return out.transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads,dim,slots,filled,q_len", [
    (4, 1, 16, 64, 0, 1),       # an empty layer: the token sees only itself
    (8, 2, 32, 256, 100, 1),    # a decode step
    (6, 3, 24, 512, 300, 7),    # head dim not a power of two, odd query length
    (4, 4, 64, 256, 250, 5),    # no grouping; the last rows reach the end of the cache
    (4, 1, 32, 256, 100, 6),    # 24 folded rows: one block of 32
    (8, 2, 16, 1024, 700, 40),  # folded rows over several row blocks, many key chunks
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_masked_sdpa(device, heads, kv_heads, dim, slots, filled, q_len, dtype):
    g = torch.Generator().manual_seed(slots + filled + q_len)
    query = torch.randn(1, heads, q_len, dim, generator=g).to(dtype).to(device)
    key = torch.randn(1, kv_heads, slots, dim, generator=g).to(dtype).to(device)
    value = torch.randn(1, kv_heads, slots, dim, generator=g).to(dtype).to(device)
    key[:, :, filled + q_len :] = 1e4  # slots nobody sees must not count, whatever they hold
    lens = torch.tensor([5, filled, 9], device=device)
    assert decode_attention.available(query)
    got = decode_attention.attend(query, key, value, lens, 1, dim**-0.5)
    want = masked_sdpa(query, key, value, filled, dim**-0.5)
    assert got.shape == (1, q_len, heads, dim) and got.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_chunks_fill_the_device_and_cover_every_slot():
    for slots in (64, 256, 4096, 32768):
        for per_split in (1, 8, 64, 4096):
            chunks, size = decode_attention.splits_for(slots, per_split)
            assert size % decode_attention.BLOCK_KEYS == 0 and chunks * size >= slots > (chunks - 1) * size
            assert chunks == 1 or chunks * per_split <= 2 * decode_attention.TARGET_PROGRAMS


@pytest.mark.parametrize("keep", [None, {0, 2}])
def test_static_path_with_the_kernel_matches_eager(device, keep):
    """The static cache with per-layer lengths handed to the kernel, against eager prefill and decoding:
    same logits, KV and tokens, for a uniform cache and a receiver's ragged one (layers without the
    sender's KV). On CPU under the interpreter (graphs=False); CUDA runs the fast-path tests with it."""
    if device == "cuda":
        pytest.skip("covered by tests/core/test_fast_prefill.py and test_fast_decode.py on CUDA")
    lm = make_tiny("llama", seed=4)
    _, sender, _ = prefill(lm, rand_ids(31, seed=5))
    runs = []
    for fast in (False, True):
        logits, cache, _ = prefill(lm, rand_ids(9, seed=6), clone(sender, keep), start=31, fast=fast)
        runs.append((logits, cache, last_prefill_path()))
    assert [r[2] for r in runs] == ["eager", "static"]
    assert fast_decode.decoder_for(lm, graphs=False).lens_attention
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=1e-4, rtol=1e-4)
    assert_same_cache(runs[1][1], runs[0][1])
    outs = [greedy_continue(lm, c, lg[0, -1], 40, 12, set(), fast=f) for (lg, c, _), f in zip(runs, (False, True))]
    assert outs[0] == outs[1]
