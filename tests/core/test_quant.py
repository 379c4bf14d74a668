"""kvcomm.core.quant: layouts, packing, error bounds on random and real-model KV, refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, rand_ids

from kvcomm.core.kv import cache_to_block, prefill
from kvcomm.core.quant import (
    AXES,
    QUANTIZED,
    dequantize,
    pack_int4,
    part_shapes,
    quantize,
    relative_error,
    unpack_int4,
)

# Round-trip bounds on relative Frobenius error ‖x − x̂‖/‖x‖ at the default group size (128). Measured
# values (this file, seed 0) are in docs/message-format.md; the bounds leave ~1.5x headroom.
# int8: step amax/127 per group; fp8 e4m3: 3 mantissa bits (≤ 6.25% per element, ~2.5% typical);
# int4: 16 levels over the group's range.
BOUND = {"fp8": 0.04, "int8": 0.015, "int4": 0.15}


def kv_like(seed: int = 0, layers: int = 4, heads: int = 8, t: int = 300, d: int = 128):
    """Gaussian KV with KIVI's structure: keys with a few outlier channels (x20), values without."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(layers, heads, t, d, generator=g)
    k[..., [3, 77]] *= 20
    return k, torch.randn(layers, heads, t, d, generator=g)


@pytest.mark.parametrize("precision", QUANTIZED)
def test_roundtrip_error_on_random_kv(precision):
    k, v = kv_like()
    for x, axis in ((k, "token"), (v, "channel")):
        q = quantize(x, precision, 128, axis)
        y = dequantize(q)
        assert y.shape == x.shape and y.dtype == torch.float32
        assert relative_error(x, y) < BOUND[precision], (axis, relative_error(x, y))


def test_keys_per_channel_beat_per_token_on_outlier_channels():
    """KIVI's reason for the key layout: with outlier channels, per-token integer grids lose the other
    channels. (fp8 is left out: its codes carry their own exponent, so the grouping barely matters.)"""
    k, _ = kv_like()
    for precision in ("int8", "int4"):
        per_channel = relative_error(k, dequantize(quantize(k, precision, 128, "token")))
        per_token = relative_error(k, dequantize(quantize(k, precision, 128, "channel")))
        assert per_channel < per_token, precision


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_elementwise_error_is_at_most_half_a_step(precision):
    k, v = kv_like(1, t=77)
    for x, axis in ((k, "token"), (v, "channel")):
        for g in (1, 16, 128, 1000):
            q = quantize(x, precision, g, axis)
            ones = torch.full_like(q.codes, 0x11 if precision == "int4" else 1)  # code 1 everywhere
            step = dequantize(type(q)(precision, g, axis, q.shape, ones, q.scale,
                                      None if q.zero is None else torch.zeros_like(q.zero)))  # = each group's scale
            err = (dequantize(q) - x).abs()
            assert (err <= step * 0.5 * (1 + 1e-3) + 1e-6).all(), (precision, axis, g)


def test_real_model_kv_roundtrip():
    """KV from a tiny Llama's prefill: errors in the same ranges as on random data."""
    lm = make_tiny("llama", seed=0)
    _, cache, _ = prefill(lm, rand_ids(200, 5))
    block = cache_to_block(cache)  # [layers, kv_heads, n, head_dim]
    for precision in QUANTIZED:
        ek = relative_error(block.k, dequantize(quantize(block.k, precision, 128, "token")))
        ev = relative_error(block.v, dequantize(quantize(block.v, precision, 128, "channel")))
        assert max(ek, ev) < BOUND[precision], (precision, ek, ev)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("shape,g", [((2, 3, 5, 7), 2), ((1, 2, 9, 16), 4), ((3, 1, 1, 4), 128), ((2, 2, 0, 8), 4)])
def test_shapes_partial_groups_and_empty(axis, shape, g):
    x = torch.randn(shape)
    for precision in QUANTIZED:
        q = quantize(x, precision, g, axis)
        parts = part_shapes(precision, g, shape, axis)
        assert {n: tuple(t.shape) for n, t in q.parts().items()} == parts
        assert q.scale.dtype == torch.float16 and (q.scale > 0).all()
        y = dequantize(q, torch.bfloat16)
        assert y.shape == x.shape and y.dtype == torch.bfloat16
        if x.numel():
            assert relative_error(x, y) < 0.2


@pytest.mark.parametrize("precision", QUANTIZED)
@pytest.mark.parametrize("axis", AXES)
def test_fused_dequantize_equals_the_reference_definition(precision, axis):
    """The one-pass dequantization (broadcast group scales, cast in the same kernel) gives bit for bit what
    expanding the scales to full size in float32 gives: full and partial groups, odd head_dim (int4 falls
    back), group sizes 1..128, float32 and bf16 outputs."""
    from kvcomm.core.quant import _dequantize_reference

    gen = torch.Generator().manual_seed(1)
    for t, d in ((37, 64), (128, 128), (5, 7), (130, 6), (1, 2)):
        x = torch.randn(2, 3, t, d, generator=gen) * 3
        for g in (1, 2, 3, 16, 128):
            q = quantize(x, precision, g, axis)
            for dtype in (torch.float32, torch.bfloat16):
                y = dequantize(q, dtype)
                assert y.is_contiguous() and y.dtype == dtype
                torch.testing.assert_close(y, _dequantize_reference(q, dtype), atol=0, rtol=0)


def test_int4_packing_roundtrip_and_nibble_order():
    codes = torch.randint(0, 16, (3, 4, 5, 9), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (3, 4, 5, 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, 9), codes)
    assert int(pack_int4(torch.tensor([[1, 2]], dtype=torch.uint8))[0, 0]) == 0x21


def test_constant_and_zero_groups():
    """Degenerate groups stay within half a step (int8: amax/254, fp8: 2**-4 relative, int4: the floor scale)."""
    rel = {"fp8": 2.0**-4, "int8": 1 / 254 * 1.01, "int4": 2.0**-10}
    for x in (torch.zeros(1, 2, 10, 8), torch.full((1, 2, 10, 8), 3.25), torch.full((1, 2, 10, 8), -1e-3)):
        for precision in QUANTIZED:
            for axis in AXES:
                y = dequantize(quantize(x, precision, 4, axis))
                assert ((y - x).abs() <= 2.0**-14 + x.abs() * rel[precision]).all(), (precision, axis)


def test_bad_input_refused():
    x = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.full_like(x, float("nan")), "int8")
    with pytest.raises(ValueError, match="float16"):
        quantize(x * 1e6, "int4")
    with pytest.raises(ValueError, match="float16"):
        quantize(x * 1e9, "int8")
    for bad in (("int3", 128, "token"), ("int8", 0, "token"), ("int8", 8, "head"), ("bf16", 8, "token")):
        with pytest.raises(ValueError):
            quantize(x, *bad)


def test_no_python_loop_over_tokens_or_heads():
    """Quantizing a whole Llama-3.1-8B-sized layer block is a handful of tensor ops (fast on 2 cores)."""
    import time

    x = torch.randn(4, 8, 1024, 128)
    start = time.perf_counter()
    for precision in QUANTIZED:
        dequantize(quantize(x, precision, 128, "token"))
        dequantize(quantize(x, precision, 128, "channel"))
    assert time.perf_counter() - start < 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_triton_kernel_matches_the_reference_definition():
    """The fused GPU kernel against the definition, every layout: float32 to 1e-5 relative, bf16 to one
    rounding (the compiler may fuse int4's multiply-add)."""
    from kvcomm.core import quant_kernel
    from kvcomm.core.quant import _dequantize_reference, _span

    x0 = torch.zeros(1, dtype=torch.int8, device="cuda")
    if not quant_kernel.available(x0, "int8"):
        pytest.skip("no Triton on this machine")
    gen = torch.Generator().manual_seed(3)
    for precision in QUANTIZED:
        if not quant_kernel.available(x0, precision):
            continue
        for axis in AXES:
            for t, d in ((37, 64), (5, 7), (130, 6), (300, 128)):
                for g in (1, 3, 16, 128):
                    q = quantize((torch.randn(2, 3, t, d, generator=gen) * 3).cuda(), precision, g, axis)
                    for dtype in (torch.float32, torch.bfloat16):
                        y = quant_kernel.dequantize(q, _span(q.shape, q.group_size, q.axis)[2], dtype)
                        ref = _dequantize_reference(q, dtype)
                        tol = 1e-5 if dtype == torch.float32 else 2**-7
                        assert ((y.float() - ref.float()).abs() <= tol * ref.float().abs() + 1e-6).all(), (precision, axis, t, d, g)


def _nan_fp8(layers: int, bad: set[int], device="cpu"):
    """fp8 codes of `layers` leading slices; slices in `bad` get one NaN code (S.1111.111) somewhere."""
    x = torch.randn(layers, 2, 70, 24, generator=torch.Generator().manual_seed(4))
    q = quantize(x.to(device), "fp8", 16, "channel")
    raw = q.codes.view(torch.uint8)
    for i, layer in enumerate(sorted(bad)):
        raw[layer, i % 2, (13 * (i + 1)) % 70, 5 + i] = 0x7F | (0x80 * (i % 2))
    return q


def test_nan_codes_are_flagged_per_leading_slice():
    from kvcomm.core.quant import dequantize_checked, nan_codes

    q = _nan_fp8(5, {1, 4})
    x, nan = dequantize_checked(q, torch.bfloat16)
    assert nan.tolist() == nan_codes(q).tolist() == [False, True, False, False, True]
    assert torch.isnan(x[1]).any() and torch.isfinite(x[0]).all()
    assert not dequantize_checked(quantize(torch.randn(3, 8, 16), "int8", 16, "token"))[1].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_triton_kernel_flags_nan_codes():
    from kvcomm.core import quant_kernel
    from kvcomm.core.quant import dequantize_checked, nan_codes

    if not quant_kernel.available(torch.zeros(1, device="cuda"), "fp8"):
        pytest.skip("no Triton fp8 on this machine")
    for bad in (set(), {0}, {2, 5}, {0, 1, 2, 3, 4, 5}):
        q = _nan_fp8(6, bad, "cuda")
        assert dequantize_checked(q, torch.bfloat16)[1].cpu().tolist() == nan_codes(q).cpu().tolist() == [i in bad for i in range(6)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    """Dequantization of the same codes agrees on both devices (the GPU may take the Triton kernel, whose
    fused multiply-add can differ by one float32 rounding); quantization agrees up to a rare one-ulp
    scale or one-step code difference where a value lands on a rounding tie (measured on an H100: 4 of
    16,384 scales, 68 of 409,600 values)."""
    k, v = kv_like(2, t=100)
    for precision in QUANTIZED:
        for x, axis in ((k, "token"), (v, "channel")):
            a = quantize(x, precision, 32, axis)
            torch.testing.assert_close(dequantize(a.to("cuda")).cpu(), dequantize(a), atol=1e-5, rtol=1e-5)
            b = quantize(x.cuda(), precision, 32, axis)
            # scales: float32 arithmetic may round differently by one ulp, and so their float16 by one ulp
            torch.testing.assert_close(b.scale.cpu().float(), a.scale.float(), atol=0, rtol=2**-10)
            da, db = dequantize(a), dequantize(b).cpu()
            differ = (da - db).abs() > 1e-5
            assert differ.float().mean() < 1e-3, precision
            step = _expand_scale(a) * (32 if precision == "fp8" else 1)  # an fp8 step is at most s·2^5
            assert ((da - db).abs() <= step * 1.01 + 1e-5).all(), precision


def _expand_scale(q):
    from kvcomm.core.quant import _expand

    return _expand(q.scale.float(), q.shape, q.group_size, q.axis)
