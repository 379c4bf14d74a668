"""A static KV cache whose layers share one storage, and per-layer tensors seen as one stacked view.

`kvcomm.core.fast_decode` copies a caller's cache into its static cache before every short forward or
decode, and the new tokens back out after. Per layer that is 2 x layers small copies (an 8B model: 64,
~1.3 ms of CPU-bound launches each way); when both sides are one storage, it is one copy each for keys
and values. Caller caches built from a `KVBlock` (`kvcomm.core.kv.block_to_cache`) and caches the
decoder appended to are such views.
"""

from __future__ import annotations

import torch


def stack_layers(static) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Give a static cache's layers views of one [layers, 1, heads, slots, dim] tensor each for keys and
    values (so all layers copy in and out in one op), when every layer has the same shape; else None."""
    layers = static.layers
    if len({(layer.keys.shape, layer.values.shape) for layer in layers}) != 1:
        return None
    k = torch.zeros((len(layers), *layers[0].keys.shape), dtype=layers[0].keys.dtype, device=layers[0].keys.device)
    v = torch.zeros((len(layers), *layers[0].values.shape), dtype=layers[0].values.dtype, device=layers[0].values.device)
    for i, layer in enumerate(layers):
        layer.keys, layer.values = k[i], v[i]
    return k, v


def as_stacked(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """Per-layer [1, heads, n, dim] tensors as one [layers, heads, n, dim] view, when they are evenly
    spaced slices of one storage with equal shapes and strides; else None."""
    if len(tensors) < 2 or any(t is None for t in tensors):
        return None
    first = tensors[0]
    if first.dim() != 4 or first.shape[0] != 1:
        return None
    size = first.element_size()
    step, storage = tensors[1].data_ptr() - first.data_ptr(), first.untyped_storage().data_ptr()
    if step <= 0 or step % size:
        return None
    for i, t in enumerate(tensors):
        if (t.shape != first.shape or t.stride() != first.stride()
                or t.untyped_storage().data_ptr() != storage or t.data_ptr() != first.data_ptr() + i * step):
            return None
    return first.as_strided((len(tensors), *first.shape[1:]), (step // size, *first.stride()[1:]))
