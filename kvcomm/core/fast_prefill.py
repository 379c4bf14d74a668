"""Short prefills over a long cache on the static, graph-captured path: the policy and the entry point.

A KVComm receiver's question and a reused agent's last tokens are a few tokens run after a long cache:
eagerly, launch-bound (an 8B model: ~25 ms for 32 tokens, however short the cache). `short_forward`
runs them on `kvcomm.core.fast_decode.GraphDecoder`'s static cache instead, with one captured forward
per bucket of new tokens (CHUNK_BUCKETS), where that is cheaper; `kvcomm.core.kv.prefill` calls it.
"""

from __future__ import annotations

import warnings

import torch

from kvcomm.core import decode_attention
from kvcomm.core.fast_decode import (
    DecoderBusy,
    FastDecodeUnavailable,
    bucket,
    choose_path,
    chunk_bucket,
    decoder_for,
)

# With masked SDPA (no Triton), a short forward on the static cache reads every slot of the bucket in every
# layer, where the eager prefill reads only what each layer holds (a receiver's unselected layers: its own
# few tokens). Measured on an H100 (random-weight Llama-3.1-8B, 32-token question, 0.3-0.7 of the layers):
# 1.1 GB of static KV (4K context, 8,192 slots) 18-21 ms against 26-44 ms eager; 4.3 GB (16K, 32,768
# slots) 40-48 ms against 29-49 ms. Above MAX_SHORT_FORWARD_BYTES such short prefills stay eager. The
# split-key kernel (`kvcomm.core.decode_attention`) reads only filled slots, so with it the bound is the
# static cache's memory alone (MAX_STATIC_BYTES).
MAX_SHORT_FORWARD_BYTES = 2 << 30
MAX_STATIC_BYTES = 16 << 30


def static_bytes(cache, extra: int) -> int:
    """Bytes of the static KV a short forward of `extra` tokens after `cache` would read (its bucket, all layers)."""
    layers = [layer for layer in getattr(cache, "layers", []) if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4]
    if not layers:
        return 0
    slots = bucket(max(layer.keys.shape[-2] for layer in layers) + extra)
    return slots * sum(layer.keys.shape[1] * (layer.keys.shape[-1] + layer.values.shape[-1]) * layer.keys.element_size()
                       for layer in layers)


def short_forward(lm, cache, ids: torch.Tensor, start: int, fast: bool | None = None) -> tuple[torch.Tensor, str] | None:
    """The last position's logits of `ids` [1, n] run after `cache` on the static path, and the path
    ('static' or 'graph'); None where the eager prefill must run (CPU by default, too many tokens, a
    bucket over MAX_SHORT_FORWARD_BYTES, a cache or model the static path cannot hold, a failed
    capture, the static cache busy with another thread's decode). `cache` gains the new tokens' KV."""
    q = chunk_bucket(ids.shape[1])
    limit = MAX_STATIC_BYTES if decode_attention.serves(lm.model, ids) else MAX_SHORT_FORWARD_BYTES
    if q is None or static_bytes(cache, q) > limit:
        return None
    path = choose_path(lm, cache, fast)
    if path == "eager":
        return None
    decoder = decoder_for(lm, graphs=path == "graph")
    if decoder.broken is not None:
        return None
    try:
        return decoder.prefill(cache, ids, start), path
    except DecoderBusy:  # another thread is decoding on the static cache: do not wait for its reply
        return None
    except FastDecodeUnavailable as e:
        warnings.warn(f"kvcomm: fast prefill off for this model ({e}); prefilling eagerly", stacklevel=2)
        return None
