"""A static KV cache whose layers share one storage; copying a caller's cache into it and new tokens out.

`kvcomm.core.fast_decode` copies a caller's cache into its static cache before every short forward or
decode, and the new tokens back out after. Per layer that is 2 x layers small copies (an 8B model: 64,
~1.3 ms of CPU-bound launches each way); when both sides are one storage, it is one copy each for keys
and values. Caller caches built from a `KVBlock` (`kvcomm.core.kv.block_to_cache`) and caches the
decoder appended to are such views.

Out, the caller's layers become views of one copy per run of consecutive layers with the same length,
not a concatenation per layer: a KVComm receiver's cache (half its layers 16K sender tokens long, half
empty, on an 8B model) took 3.4 ms of `cat` kernels per call on an H100 (`kvcomm bench --profile`).
Both ways the bytes move as 8-byte words (`words`): the slot ranges are strided views, which PyTorch
copies with its generic element-wise kernel at ~0.7 TB/s for 2-byte elements (same profile).
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


def words(t: torch.Tensor) -> torch.Tensor:
    """`t` seen as 8-byte integers when its layout allows (unit channel stride, every stride and offset a
    whole number of words), else `t`: a copy between such views moves the same bytes in a quarter of the
    elements (bf16)."""
    size = t.element_size()
    if size >= 8 or t.dim() == 0 or t.stride(-1) != 1 or (t.shape[-1] * size) % 8:
        return t
    if any((s * size) % 8 for s in t.stride()[:-1]) or (t.storage_offset() * size) % 8:
        return t
    return t.view(torch.int64)


def copy_words(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst.copy_(src)` for same-dtype tensors, as 8-byte words where both layouts allow."""
    a, b = words(dst), words(src)
    if a.dtype == b.dtype:
        a.copy_(b)
    else:
        dst.copy_(src)


def clone_words(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t`, moved as 8-byte words where its layout allows."""
    w = words(t)
    return w.clone(memory_format=torch.contiguous_format).view(t.dtype) if w is not t else t.clone(memory_format=torch.contiguous_format)


def copy_in(static, stacked, cache) -> None:
    """The caller's `cache` into the first slots of each layer of `static` (in place: graphs read fixed
    addresses); one copy for all layers when `stacked` (from `stack_layers`) and the caller's layers are
    evenly spaced slices of one tensor."""
    if stacked is not None:
        keys, values = as_stacked([layer.keys for layer in cache.layers]), as_stacked([layer.values for layer in cache.layers])
        if keys is not None and values is not None:
            n = keys.shape[2]
            copy_words(stacked[0][:, 0, :, :n], keys)
            copy_words(stacked[1][:, 0, :, :n], values)
            return
    for layer, src in zip(static.layers, cache.layers):
        n = src.keys.shape[-2]
        if n:
            copy_words(layer.keys[:, :, :n], src.keys)
            copy_words(layer.values[:, :, :n], src.values)


def append_from(static, stacked, cache, lens: list[int], k: int) -> None:
    """Slots lens[i]..lens[i]+k of each static layer appended to the caller's layer i.

    The static cache must hold the caller's first lens[i] slots (`copy_in` put them there, under the same
    lock). With `stacked` and plain dynamic layers, the caller's layers become views of one copy of slots
    0..lens+k per run of consecutive layers with equal lengths; otherwise each layer's `update` concatenates."""
    from transformers.cache_utils import DynamicLayer

    if stacked is not None and all(type(layer) is DynamicLayer for layer in cache.layers):
        start = 0
        while start < len(lens):
            end = start + 1
            while end < len(lens) and lens[end] == lens[start]:
                end += 1
            keys, values = (clone_words(t[start:end, 0, :, : lens[start] + k]) for t in stacked)
            for i in range(start, end):
                layer = cache.layers[i]
                layer.keys, layer.values = keys[i - start : i - start + 1], values[i - start : i - start + 1]
            start = end
        return
    for i, (layer, n) in enumerate(zip(static.layers, lens)):
        cache.update(layer.keys[:, :, n : n + k], layer.values[:, :, n : n + k], i)
