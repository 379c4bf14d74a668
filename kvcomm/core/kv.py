"""KV as data, and the one prefill every method runs.

  KVBlock        keys and values of n tokens for all layers, ``[layers, kv_heads, n, head_dim]``
                 (reuse's unit: anchors, offsets, template segments, reply KV)
  prefill        new tokens (ids or embeddings) run after an optional cache; positions continue from
                 the cache's longest layer. Sharing's receiver and sender, reuse's dense / prefix /
                 reuse paths, the text baselines and the benchmarks all call it.
  prefill_flops  analytic FLOPs of one prefill (the evaluation's and benchmark's cost column)

Short prefills over a cache (at most `fast_decode.CHUNK_BUCKETS[-1]` new tokens: a receiver's question,
a reused agent's last tokens) run on the static, graph-captured path of `kvcomm.core.fast_prefill` where
it applies (CUDA by default; `KVCOMM_FAST_DECODE` and `fast=` as for decoding) and give the same logits
and cache; `last_prefill_path()` says which path the calling thread's last prefill took.

Masking rule (eager path), in one place: from position 0, or one new token over a cache whose layers all hold
the same length, plain causal attention is right, so no mask is passed and SDPA may take its flash
kernel. Otherwise (several new tokens after a past, or a ragged cache as selective sharing builds)
an explicit 4-D mask sized for the longest layer; the `kvcomm` attention function right-aligns it
per layer (`kvcomm.core.attention`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from kvcomm.core import fast_prefill
from kvcomm.core.attention import ImportanceRecorder, TokenImportanceRecorder, causal_mask
from kvcomm.core.rope import rerotate


@dataclass
class KVBlock:
    """KV of n tokens for all layers: k, v are [layers, kv_heads, n, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def n(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return (self.k.numel() + self.v.numel()) * self.k.element_size()

    def slice(self, a: int, b: int) -> KVBlock:
        return KVBlock(self.k[:, :, a:b], self.v[:, :, a:b])

    def __sub__(self, other: KVBlock) -> KVBlock:
        return KVBlock(self.k - other.k, self.v - other.v)

    def __add__(self, other: KVBlock) -> KVBlock:
        return KVBlock(self.k + other.k, self.v + other.v)

    def to_dtype(self, dtype: torch.dtype) -> KVBlock:
        return KVBlock(self.k.to(dtype), self.v.to(dtype))

    @staticmethod
    def cat(blocks: list[KVBlock]) -> KVBlock:
        """The blocks one after another along the token axis."""
        return KVBlock(torch.cat([b.k for b in blocks], 2), torch.cat([b.v for b in blocks], 2))


def ids_tensor(ids, device) -> torch.Tensor:
    """Token ids (a list or a 1-D/2-D tensor) as a [1, n] long tensor on `device`."""
    t = torch.as_tensor(ids, dtype=torch.long, device=device)
    return t.unsqueeze(0) if t.dim() == 1 else t


def cache_to_block(cache, a: int = 0, b: int | None = None) -> KVBlock:
    """Tokens a..b of every layer of a transformers cache (all layers must hold them)."""
    return KVBlock(torch.cat([layer.keys[:, :, a:b] for layer in cache.layers], 0),
                   torch.cat([layer.values[:, :, a:b] for layer in cache.layers], 0))


def hold(cache, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Put `k`, `v` [1, kv_heads, n, head_dim] into layer `i` of a fresh transformers cache.

    A plain dynamic layer holds them as they are, not copies: `DynamicLayer.update` only ever
    concatenates (a new tensor), so nothing writes into them, and on an 8B model a 3.5K-token reused
    prompt no longer costs a copy of its 460 MB of KV per call. Other layer types take `update`."""
    from transformers.cache_utils import DynamicLayer

    layer = cache.layers[i]
    if type(layer) is DynamicLayer:
        # what DynamicLayer.lazy_initialization sets (transformers 5.17-5.23; tests/core/test_kv.py checks it),
        # without its two empty tensors and the two `cat`s of `update`: 32 layers of an 8B model made ~130 ops
        layer.dtype, layer.device, layer.is_initialized = k.dtype, k.device, True
        layer.keys, layer.values = k, v
    else:
        cache.update(k, v, i)


def block_to_cache(lm, block: KVBlock | None = None):
    """A DynamicCache holding `block` (empty when None), without copying it (`hold`)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.model.config)
    if block is not None and block.n:
        for i in range(block.k.shape[0]):
            hold(cache, i, block.k[i : i + 1], block.v[i : i + 1])
    return cache


def move(lm, block: KVBlock, delta: int) -> KVBlock:
    """Re-rotate a block's keys by `delta` positions (values carry no position)."""
    if delta == 0 or block.n == 0:
        return block
    return KVBlock(rerotate(lm.model, block.k, delta), block.v)


def cache_length(cache) -> tuple[int, bool]:
    """(longest layer's length, whether layers differ in length) of a transformers cache."""
    if cache is None or not cache.layers:
        return 0, False
    lengths = {layer.keys.shape[-2] if layer.keys is not None and layer.keys.dim() == 4 else 0 for layer in cache.layers}
    return max(lengths), len(lengths) > 1


_last = threading.local()


def last_prefill_path() -> str | None:
    """Which path this thread's last `prefill` took: 'eager', 'static' or 'graph'."""
    return getattr(_last, "path", None)


@torch.no_grad()
def prefill(lm, ids=None, past=None, *, embeds: torch.Tensor | None = None,
            start: int | None = None, recorder: ImportanceRecorder | TokenImportanceRecorder | None = None,
            all_logits: bool = False, fast: bool | None = None):
    """Run new tokens after `past` and return (logits, cache, past_len).

    `ids` are token ids, or pass `embeds` [1, n, d] instead (CIPHER, AC). `past` is a KVBlock, a
    transformers cache (its layers may hold different lengths) or None; the new tokens take positions
    past_len.. where past_len is the longest layer's length, or `start` when given (several senders
    whose layers overlap nowhere still place the receiver after all of them). `logits` are [1, n, vocab] with
    `all_logits`, else [1, 1, vocab]: the last position only (a `recorder` sees every query's attention
    either way). The returned cache holds past + new tokens (it is `past` itself when a cache was given).
    `fast`: None follows `KVCOMM_FAST_DECODE` for short prefills after a past, False forces eager, True
    asks for the static path (graphs on CUDA).
    """
    cache = block_to_cache(lm, past) if past is None or isinstance(past, KVBlock) else past
    p, ragged = cache_length(cache)
    if start is not None:
        ragged, p = ragged or start != p, start
    if embeds is None:
        ids = ids_tensor(ids, lm.device)
        n = ids.shape[1]
    else:
        n = embeds.shape[1]
    if p > 0 and embeds is None and recorder is None and not all_logits and fast is not False:
        short = fast_prefill.short_forward(lm, cache, ids, p, fast)
        if short is not None:
            _last.path = short[1]
            return short[0], cache, p
    _last.path = "eager"
    mask = None if p == 0 or (n == 1 and not ragged) else causal_mask(p, 0, n, lm.dtype, lm.device)
    kwargs = {"kvcomm_recorder": recorder} if recorder is not None else {}
    out = lm.model(input_ids=ids if embeds is None else None, inputs_embeds=embeds, past_key_values=cache,
                   attention_mask=mask, position_ids=torch.arange(p, p + n, device=lm.device).unsqueeze(0),
                   use_cache=True, logits_to_keep=0 if all_logits else 1, **kwargs)
    return out.logits, out.past_key_values, p


def prefill_flops(lm, tokens: int, past: int = 0) -> float:
    """2·params·T + attention (QKᵀ and AV; causal over the new tokens, full over `past`)."""
    cfg = lm.config
    params = sum(p.numel() for n, p in lm.model.named_parameters() if "embed" not in n and "lm_head" not in n)
    d_q = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    attn = 2 * cfg.num_hidden_layers * d_q * (tokens * past * 2 + tokens * tokens)  # QK^T and AV, causal
    return 2 * params * tokens + attn
