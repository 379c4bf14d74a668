"""Reuse assembly: the fused Triton path (`kvcomm.reuse.assembly`) against the eager one, and the eager
one against its definition (offset added, keys re-rotated to each span's start). The kernel runs on
CUDA, or on CPU in Triton's interpreter where Triton is installed; skipped otherwise."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import clear_kernel_caches, make_tiny

from kvcomm.core import triton_support
from kvcomm.core.kv import KVBlock, move
from kvcomm.reuse import assembly


def _case(lm, dtype, g):
    cfg = lm.model.config
    L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dev = lm.device
    blk = lambda n: KVBlock(torch.randn(L, H, n, D, generator=g).to(dtype).to(dev),  # noqa: E731
                            torch.randn(L, H, n, D, generator=g).to(dtype).to(dev))
    p0 = blk(5)
    lengths = [7, 3, 0, 4]
    spans, at = [("p0", 0, 5)], 5
    for i, n in enumerate(lengths):
        spans.append((f"x{i}", at, at + n))
        at += n
    pieces = [blk(n) for n in lengths]
    longer = blk(9)  # an offset longer than its piece: only the first tokens are added
    offsets = [longer, None, None, blk(4)]
    return p0, spans, pieces, offsets


def test_eager_assembly_is_offset_then_move():
    lm = make_tiny()
    g = torch.Generator().manual_seed(0)
    p0, spans, pieces, offsets = _case(lm, torch.float32, g)
    got = assembly.assemble(lm, p0, spans, pieces, offsets)
    want = [p0] + [move(lm, assembly.add_offset(p, o) if o is not None else p, a) for p, o, (_, a, _) in zip(pieces, offsets, spans[1:])]
    torch.testing.assert_close(got.k, torch.cat([w.k for w in want], 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.v, torch.cat([w.v for w in want], 2))


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("qwen2", torch.float32), ("llama", torch.bfloat16)])
def test_fused_assembly_matches_the_eager_path(monkeypatch, arch, dtype):
    if not torch.cuda.is_available():
        if importlib.util.find_spec("triton") is None:
            pytest.skip("no CUDA and no Triton for its interpreter")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    clear_kernel_caches()
    lm = make_tiny(arch)
    if torch.cuda.is_available():
        lm.model.to("cuda")
        lm = type(lm)(lm.model, lm.tokenizer, lm.name, torch.device("cuda"), lm.dtype)
    g = torch.Generator().manual_seed(1)
    p0, spans, pieces, offsets = _case(lm, dtype, g)
    assert triton_support.wanted(p0.k) and triton_support.builds(assembly._kernel)
    got = assembly.assemble(lm, p0, spans, pieces, offsets)
    monkeypatch.setenv("KVCOMM_TRITON", "0")
    want = assembly.assemble(lm, p0, spans, pieces, offsets)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.k.float(), want.k.float(), **tol)
    torch.testing.assert_close(got.v.float(), want.v.float(), **tol)
    clear_kernel_caches()
