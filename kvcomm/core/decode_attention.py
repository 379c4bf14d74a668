"""Attention of a few new tokens over a long static cache, split over the keys (flash-decoding), in Triton.

Why: the static path (`kvcomm.core.fast_decode`) attends 1-128 new tokens to a preallocated cache of L
slots. SDPA with a mask runs that on a kernel tiled for long queries: one program per key head walks all
L keys (an 8B model, 8 key heads: 8 programs on 132 SMs). Profiled on an H100 (random-weight
Llama-3.1-8B, 4K slots, `benchmarks/decode_step.py --profile`): 83 us per layer, 2.6 of an 11 ms decode
step, where reading the layer's keys and values once takes ~6 us. Here the keys are split into chunks
that run in parallel (Dao et al.'s flash-decoding), each chunk keeps a running max and sum (the online
softmax), and a second kernel combines the chunks.

No mask: each layer's filled length comes from a device tensor `lens` (one entry per layer, the slots
filled before this forward's tokens), and new token j sees slots 0..lens[layer] + j, exactly the mask
`fast_decode` builds (its own KV sits at lens + j, written by the cache update before attention). Layers
of different lengths (selective sharing's receiver) take the same kernel. Slots past the last visible
one are skipped, not read, so a power-of-two bucket costs only what is filled. Grouped-query heads are
folded into the query rows (r query heads of a key head read its keys once), as `kvcomm.core.attention`
does for SDPA.

float32 scores and accumulation (float32 inputs multiply in full float32, not TF32); the result matches SDPA to bf16 rounding, not bit for bit (tests compare
them; tokens of a random-weight model can then differ after a few steps, as between SDPA's own kernels).
Runs where `kvcomm.core.triton_support` says kernels run (CUDA, or CPU under Triton's interpreter);
`available` is False otherwise and callers keep the masked SDPA path.
"""

from __future__ import annotations

import functools

import torch

from kvcomm.core import triton_support

BLOCK_KEYS = 64
MIN_BLOCK_ROWS, MAX_BLOCK_ROWS = 16, 64  # folded query rows per program: tl.dot's smallest tile (a decode
# step's 4 rows are padded to it) up to 64, so a 32-token question (128 rows) reads each key chunk twice, not 8 times
TARGET_PROGRAMS = 512  # key chunks x heads x row blocks: enough to fill an H100's 132 SMs a few times


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def chunk(q, k, v, lens, layer, acc_out, m_out, l_out, scale, q_len, rows, n_slots,
              qh, qt, kh, kt, vh, vt, D: tl.constexpr, BD: tl.constexpr, REP: tl.constexpr,
              BR: tl.constexpr, BN: tl.constexpr, TILES: tl.constexpr, F32: tl.constexpr, PREC: tl.constexpr):
        split = tl.program_id(0)
        kv_head = tl.program_id(1)
        rblock = tl.program_id(2)
        r = rblock * BR + tl.arange(0, BR)  # folded rows: row = rep * q_len + token
        row_ok = r < rows
        tok = r % q_len
        head = kv_head * REP + r // q_len
        d = tl.arange(0, BD)
        d_ok = d < D
        qv = tl.load(q + head[:, None].to(tl.int64) * qh + tok[:, None] * qt + d[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if F32:  # the interpreter multiplies bfloat16 tiles wrongly: float32 there
            qv = qv.to(tl.float32)
        filled = tl.load(lens + layer)
        last = tl.minimum(filled + q_len, n_slots)  # one past the last slot any row sees
        lo = split * (TILES * BN)
        hi = tl.minimum(lo + TILES * BN, last)
        m = tl.full([BR], -1e30, tl.float32)
        s_sum = tl.zeros([BR], dtype=tl.float32)
        acc = tl.zeros([BR, BD], dtype=tl.float32)
        k_base = k + kv_head.to(tl.int64) * kh
        v_base = v + kv_head.to(tl.int64) * vh
        for i in range(TILES):  # a fixed count (per cache size): tiles past the last visible slot are skipped
            start = lo + i * BN
            if start < hi:
                cols = start + tl.arange(0, BN)
                col_ok = cols < hi
                kt_tile = tl.load(k_base + cols[None, :].to(tl.int64) * kt + d[:, None],
                                  mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                if F32:
                    kt_tile = kt_tile.to(tl.float32)
                s = tl.dot(qv, kt_tile, input_precision=PREC) * scale
                visible = (cols[None, :] <= filled + tok[:, None]) & col_ok[None, :]
                s = tl.where(visible, s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                p = tl.exp(s - m_new[:, None])
                alpha = tl.exp(m - m_new)
                s_sum = s_sum * alpha + tl.sum(p, axis=1)
                v_tile = tl.load(v_base + cols[:, None].to(tl.int64) * vt + d[None, :],
                                 mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                if F32:
                    v_tile = v_tile.to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=PREC)
                m = m_new
        base = (split * tl.num_programs(1) + kv_head) * rows + r
        tl.store(m_out + base, m, mask=row_ok)
        tl.store(l_out + base, s_sum, mask=row_ok)
        tl.store(acc_out + base[:, None].to(tl.int64) * BD + d[None, :], acc, mask=row_ok[:, None])

    @triton.jit
    def combine(acc_in, m_in, l_in, out, splits, rows, q_len, n_heads_kv, ot, oh,
                D: tl.constexpr, BD: tl.constexpr, REP: tl.constexpr, BS: tl.constexpr):
        kv_head = tl.program_id(0)
        row = tl.program_id(1)
        s = tl.arange(0, BS)
        s_ok = s < splits
        idx = (s * n_heads_kv + kv_head) * rows + row
        m = tl.load(m_in + idx, mask=s_ok, other=-1e30)
        l_ = tl.load(l_in + idx, mask=s_ok, other=0.0)
        w = tl.exp(m - tl.max(m, axis=0))
        d = tl.arange(0, BD)
        acc = tl.load(acc_in + idx[:, None].to(tl.int64) * BD + d[None, :], mask=s_ok[:, None], other=0.0)
        o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_ * w, axis=0)
        tok = row % q_len
        head = kv_head * REP + row // q_len
        tl.store(out + tok * ot + head * oh + d, o.to(out.dtype.element_ty), mask=d < D)

    return chunk, combine


def available(t: torch.Tensor) -> bool:
    """Whether the kernels run for tensors like `t` (see `kvcomm.core.triton_support`)."""
    return triton_support.wanted(t) and triton_support.builds(_kernels)


def serves(model, t: torch.Tensor) -> bool:
    """Whether `model`'s static path hands per-layer lengths to these kernels: its attention is kvcomm's
    (which passes them on) and the kernels run for tensors like `t`."""
    from kvcomm.core.attention import NAME

    return model.config._attn_implementation == NAME and available(t)


def splits_for(n_slots: int, programs_per_split: int) -> tuple[int, int]:
    """(chunks, keys per chunk): about TARGET_PROGRAMS programs, chunks a multiple of BLOCK_KEYS long.

    Fixed by the cache size, not its fill, so one captured graph serves every length."""
    chunks = max(1, min(TARGET_PROGRAMS // max(programs_per_split, 1), -(-n_slots // BLOCK_KEYS)))
    size = -(-n_slots // chunks)
    size = -(-size // BLOCK_KEYS) * BLOCK_KEYS
    return -(-n_slots // size), size


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lens: torch.Tensor, layer: int,
           scaling: float) -> torch.Tensor:
    """Attention of `query` [1, H, q, d] over a static layer `key`/`value` [1, Hkv, L, d], new token j
    seeing slots 0..lens[layer] + j. Returns [1, q, H, d] (transformers' attention output layout).

    A registered custom op (`kvcomm::static_attention`), so `torch.compile` keeps the whole forward in
    one graph around it instead of breaking at every layer (a break per layer recompiled each layer
    for each of its indices and ran past dynamo's recompile limit at the third cache size)."""
    return _static_attention(query, key, value, lens, layer, scaling)


@torch.library.custom_op("kvcomm::static_attention", mutates_args=())
def _static_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lens: torch.Tensor, layer: int,
                      scaling: float) -> torch.Tensor:
    chunk, combine = _kernels()
    _, n_heads, q_len, dim = query.shape
    n_kv, n_slots = key.shape[1], key.shape[2]
    rep = n_heads // n_kv
    rows = rep * q_len
    bd = max(16, 1 << (dim - 1).bit_length())
    block_rows = min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, 1 << (rows - 1).bit_length()))
    row_blocks = -(-rows // block_rows)
    splits, split_len = splits_for(n_slots, n_kv * row_blocks)
    f32 = dict(dtype=torch.float32, device=query.device)
    acc = torch.empty(splits, n_kv, rows, bd, **f32)
    m = torch.empty(splits, n_kv, rows, **f32)
    s = torch.empty(splits, n_kv, rows, **f32)
    q = query[0] if query.stride(-1) == 1 else query[0].contiguous()
    k, v = key[0], value[0]
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("decode_attention needs keys and values with unit channel stride")
    chunk[(splits, n_kv, row_blocks)](
        q, k, v, lens, layer, acc, m, s, scaling, q_len, rows, n_slots,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        D=dim, BD=bd, REP=rep, BR=block_rows, BN=BLOCK_KEYS, TILES=split_len // BLOCK_KEYS,
        F32=triton_support.interpreting(), PREC="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=4 if block_rows <= 32 else 8)
    out = torch.empty(1, q_len, n_heads, value.shape[-1], dtype=query.dtype, device=query.device)
    combine[(n_kv, rows)](acc, m, s, out, splits, rows, q_len, n_kv, out.stride(1), out.stride(2),
                          D=dim, BD=bd, REP=rep, BS=max(2, 1 << (splits - 1).bit_length()))
    return out


@_static_attention.register_fake
def _(query, key, value, lens, layer, scaling):
    return query.new_empty(1, query.shape[2], query.shape[1], value.shape[-1])
