"""Fast short forwards: a preallocated KV cache and CUDA-graph-captured steps for decoding and prefill.

Why: eager one-token forwards of a small model are launch-bound (0.5B Qwen2, 24 layers: ~19 ms per
token in eager transformers on a GPU; the profile in docs/benchmarks.md shows the same for an 8B model).
Replaying one captured graph per token removes the Python and launch overhead; the host then only
replays and reads one token id.

How: a `GraphDecoder` per model owns a transformers `StaticCache` of a bucketed length L (a power of
two, at least 256, grown only when a call needs more, so one capture serves many calls) and static
input buffers. A decode copies the caller's DynamicCache into the static tensors in place (the graph
reads fixed addresses), runs the step once per token, and appends the new tokens' KV to the caller's
cache once at the end, so callers see exactly what the eager loop leaves there.

The step computes its own inputs on the device: each layer's filled length (`lens`), which the `kvcomm`
attention function hands to a split-key kernel (`kvcomm.core.decode_attention`; where Triton cannot run,
per-layer additive masks over the L slots instead), and it writes the argmax back into the input-id
buffer and advances the position. Per-layer lengths also serve ragged caches from selective sharing; a
model with another attention function gets one shared mask and uniform caches only.

Short prefills over a long cache (a KVComm receiver's question, a reused agent's own last tokens) take
the same static cache (`kvcomm.core.fast_prefill` decides when): `GraphDecoder.prefill` pads the new tokens to a bucket of CHUNK_BUCKETS tokens and replays
one captured forward per bucket (padding sits after the real tokens, so causal masking keeps it out of
their attention; its KV lands in slots the next write overwrites), then appends the real tokens' KV to
the caller's cache, as the eager prefill leaves it.

`graphs=False` runs the same static-cache steps eagerly, which is how CPU tests check them.
`KVCOMM_FAST_DECODE` picks the path when callers do not: `0` eager everywhere, `static` the
static cache without graphs on any device, anything else (default) graphs on CUDA and eager elsewhere.
`KVCOMM_COMPILE=1` also compiles the forward before capture (`kvcomm.core.compiled`: fused element-wise kernels).
"""

from __future__ import annotations

import os
import threading
import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from kvcomm.core import compiled, decode_attention
from kvcomm.core.attention import NAME as KVCOMM_ATTENTION
from kvcomm.core.graph_capture import capture_graph
from kvcomm.core.static_layers import append_from, copy_in, stack_layers

MIN_BUCKET = 256
CHUNK_BUCKETS = (1, 16, 32, 64, 128)  # new-token counts with a captured prefill (1: a reused agent's last token); longer stay eager


class FastDecodeUnavailable(RuntimeError):
    """The static path cannot run for this model (capture failed); callers fall back to eager."""


class DecoderBusy(RuntimeError):
    """Another thread holds the static cache (decoding a whole reply); a short prefill runs eagerly rather
    than wait for it (measured: with 4 agent threads on one GPU a reused call's first token waited
    ~200 ms behind other threads' replies)."""


def bucket(n: int) -> int:
    """Static cache length for `n` slots: a power of two, at least MIN_BUCKET.

    Padding only costs attention over masked slots, small next to reading the weights per token."""
    return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


def chunk_bucket(n: int) -> int | None:
    """The captured prefill length for `n` new tokens (None: too many for a short forward)."""
    return next((b for b in CHUNK_BUCKETS if n <= b), None)


def choose_path(lm, cache, fast: bool | None = None) -> str:
    """'eager', 'static' (static cache, no graph) or 'graph' for this call.

    `fast`: None follows `KVCOMM_FAST_DECODE`; False forces eager; True asks for the static path
    (graphs on CUDA). Caches this module cannot hold fall back to eager (see `unsupported`)."""
    env = os.environ.get("KVCOMM_FAST_DECODE", "1").strip().lower()
    cuda = lm.device.type == "cuda"
    if fast is False or (fast is None and env in ("0", "off", "false", "eager")):
        return "eager"
    if fast is None and env == "static":
        path = "static"
    elif cuda:
        path = "graph"
    else:
        path = "static" if fast else "eager"
    return "eager" if path != "eager" and unsupported(lm, cache) else path


def unsupported(lm, cache) -> str | None:
    """Why `cache` cannot take the static path for `lm` (None when it can)."""
    layers = getattr(cache, "layers", None)
    if not layers or len(layers) != lm.num_layers:
        return "not a transformers cache with one layer per model layer"
    if any(layer.keys is None or layer.keys.dim() != 4 or layer.keys.shape[0] != 1 for layer in layers):
        return "a layer is uninitialised or batched"
    if len({layer.keys.shape[-2] for layer in layers}) > 1 and lm.model.config._attn_implementation != KVCOMM_ATTENTION:
        return "ragged cache without the kvcomm attention function"
    return _config_reason(lm.model)


_config_reasons: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _config_reason(model) -> str | None:
    """Sliding-window or other non-plain layers make the static layout differ: eager for those."""
    if model not in _config_reasons:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        try:
            layers = StaticCache(config=model.config, max_cache_len=MIN_BUCKET).layers  # lazy: allocates nothing
            plain = all(type(layer) is StaticLayer for layer in layers)
        except (KeyError, ValueError, TypeError):
            plain = False
        _config_reasons[model] = None if plain else "model has sliding-window or non-attention cache layers"
    return _config_reasons[model]


@dataclass
class _Chunk:
    """Static inputs, masks and output of one captured prefill length."""

    ids: torch.Tensor  # [1, q]
    pos: torch.Tensor  # [1, q]
    rows: torch.Tensor  # [1, 1, 1, q, 1]: 0..q-1
    masks: torch.Tensor  # [layers, 1, 1, q, L]; [1, ...] and unused under decode_attention (32 layers: 268 MB at q=128, L=32K)
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


class GraphDecoder:
    """Static KV cache, input buffers and (with `graphs`) the captured step of one model.

    One per (model, graphs, compile) via `decoder_for`; `decode` holds a lock, so threads that share a model
    take turns (the buffers are shared state)."""

    def __init__(self, lm, graphs: bool, compile: bool = False):
        if graphs and lm.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; use graphs=False")
        self._model = weakref.ref(lm.model)  # the registry is keyed by the model: no strong ref back
        self.device, self.dtype, self.graphs = lm.device, lm.dtype, graphs
        self.forward = compiled.forward() if compile else compiled.plain_forward
        self.per_layer = lm.model.config._attn_implementation == KVCOMM_ATTENTION
        self.lens_attention = False  # per-layer lengths to decode_attention instead of masks; set by _ensure
        self.lock = threading.Lock()
        self.capacity, self.captures = 0, 0
        self.cache = self.graph = self.logits = None
        self.chunks: dict[int, _Chunk] = {}  # captured prefills per bucket, valid for the current static cache
        self._layout: tuple | None = None
        self.stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # the static layers' common storage
        self.broken: str | None = None  # set when capture failed; callers then decode eagerly

    def _model_or_fail(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this decoder was garbage-collected")
        return model

    def _ensure(self, model, cache, need: int) -> None:
        """(Re)allocate and (re)capture when the call needs more slots, other head shapes or new weights."""
        layout = (tuple((layer.keys.shape[1], layer.keys.shape[-1], layer.values.shape[-1]) for layer in cache.layers),
                  next(model.parameters()).data_ptr())
        if need <= self.capacity and layout == self._layout:
            return
        from transformers import StaticCache

        if self.broken:
            raise FastDecodeUnavailable(self.broken)
        self.cache = self.graph = self.logits = self.stacked = None  # free the old bucket before allocating the new one
        self.chunks = {}
        self.capacity, self._layout = 0, None
        size = bucket(need)
        with torch.inference_mode(False):  # plain tensors: in-place updates work in and out of inference mode
            static = StaticCache(config=model.config, max_cache_len=size)
            for layer, src in zip(static.layers, cache.layers):
                layer.lazy_initialization(src.keys[:, :, :1], src.values[:, :, :1])
            self.stacked = stack_layers(static)
            n_layers, dev = len(static.layers), self.device
            self.ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
            self.pos = torch.zeros(1, 1, dtype=torch.long, device=dev)
            self.lens = torch.zeros(n_layers, dtype=torch.long, device=dev)  # filled slots per layer
            self.cols = torch.arange(size, device=dev)
            # [layers, 1, 1, 1, L]; L is a power of two >= 256, so every row starts 16-element aligned
            self.masks = torch.zeros(n_layers, 1, 1, 1, size, dtype=self.dtype, device=dev)
        self.neg = torch.finfo(self.dtype).min
        self.lens_attention = all(k == v for _, k, v in layout[0]) and decode_attention.serves(model, self.lens)
        self.cache = static
        if self.graphs:
            try:
                self._capture(model)
            except RuntimeError as e:  # an op that cannot be captured: eager from now on, said once
                raise self._capture_failed(e) from e
        self.capacity, self._layout = size, layout

    def _step(self, model) -> None:
        """One token: attention inputs from lens, forward, argmax into ids, advance. No host sync or data branch."""
        extra = self._attention_inputs(self.masks, 0)
        out = self.forward(model, input_ids=self.ids, position_ids=self.pos, attention_mask=self.masks[0],
                           past_key_values=self.cache, use_cache=True, **extra)
        self.logits = out.logits[0, -1]  # under a graph: a static output, rewritten by every replay
        self.ids.copy_(self.logits.argmax().view(1, 1))
        self.pos.add_(1)
        self.lens.add_(1)

    def _attention_inputs(self, masks: torch.Tensor, rows) -> dict:
        """What each layer's attention needs to see slots 0..lens + j for new token j: the lengths
        themselves (decode_attention), or masks filled from them (0 there, a large negative value after)."""
        if self.lens_attention:
            return {"kvcomm_layer_lens": self.lens}
        masks.fill_(self.neg)
        masks.masked_fill_(self.cols <= self.lens.view(-1, 1, 1, 1, 1) + rows, 0.0)
        return {"kvcomm_layer_masks": masks} if self.per_layer else {}

    def _capture_failed(self, e: RuntimeError) -> FastDecodeUnavailable:
        """Drop the static cache and mark this decoder broken: its callers run eagerly from now on."""
        self.cache, self.capacity, self.broken = None, 0, f"CUDA graph capture failed: {str(e).splitlines()[0]}"
        return FastDecodeUnavailable(self.broken)

    def _set_state(self, lens: list[int], position: int) -> None:
        for layer, n in zip(self.cache.layers, lens):
            layer.cumulative_length.fill_(n)  # where StaticLayer.update writes the next key
        self.lens.copy_(torch.tensor(lens, dtype=torch.long))
        self.pos.fill_(position)

    def _capture(self, model) -> None:
        """Capture one step from an empty cache (`decode` reloads the state before every replay)."""
        zeros = [0] * len(self.cache.layers)

        def reset() -> None:
            self._set_state(zeros, 0)
            self.ids.zero_()

        with torch.cuda.device(self.device):
            self.graph = capture_graph(lambda: self._step(model), reset)
        self.captures += 1

    def _chunk(self, model, q: int) -> _Chunk:
        """Buffers (and, with graphs, the captured forward) of a `q`-token prefill on the current cache."""
        c = self.chunks.get(q)
        if c is not None:
            return c
        n_layers, dev = len(self.cache.layers), self.device
        with torch.inference_mode(False):
            c = _Chunk(ids=torch.zeros(1, q, dtype=torch.long, device=dev),
                       pos=torch.arange(q, device=dev).view(1, q),
                       rows=torch.arange(q, device=dev).view(1, 1, 1, q, 1),
                       masks=torch.zeros(1 if self.lens_attention else n_layers, 1, 1, q, self.cols.numel(),
                                         dtype=self.dtype, device=dev))
        if self.graphs:
            def reset() -> None:
                self.lens.zero_()
                c.ids.zero_()

            try:
                with torch.cuda.device(self.device):
                    c.graph = capture_graph(lambda: self._chunk_step(model, c), reset)
            except RuntimeError as e:
                raise self._capture_failed(e) from e
            self.captures += 1
        self.chunks[q] = c
        return c

    def _chunk_step(self, model, c: _Chunk) -> None:
        """q new tokens after each layer's `lens` slots: row j sees slots < lens + j + 1. Idempotent (the
        write slots come from `lens`, not from the cache's running count), so warm-up runs can repeat it."""
        for layer, n in zip(self.cache.layers, self.lens):
            layer.cumulative_length.copy_(n)
        extra = self._attention_inputs(c.masks, c.rows)
        out = self.forward(model, input_ids=c.ids, position_ids=c.pos, attention_mask=c.masks[0],
                           past_key_values=self.cache, use_cache=True, logits_to_keep=0, **extra)
        c.logits = out.logits[0]  # [q, vocab]; under a graph a static output, rewritten by every replay

    @torch.no_grad()
    def prefill(self, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
        """`kvcomm.core.kv.prefill`'s contract for a short `ids` [1, n] after `cache` (positions from `start`):
        appends the new tokens' KV to `cache` and returns the last position's logits [1, 1, vocab]."""
        model = self._model_or_fail()
        n = ids.shape[1]
        q = chunk_bucket(n)
        if q is None:
            raise ValueError(f"{n} new tokens: short forwards take at most {CHUNK_BUCKETS[-1]}")
        lens = [layer.keys.shape[-2] for layer in cache.layers]
        if not self.lock.acquire(blocking=False):
            raise DecoderBusy("the static cache is in use by another thread")
        try:
            return self._prefill_locked(model, cache, ids, start, n, q, lens)
        finally:
            self.lock.release()

    def _prefill_locked(self, model, cache, ids, start: int, n: int, q: int, lens: list[int]) -> torch.Tensor:
        with torch.cuda.device(self.device) if self.graphs else nullcontext():
            self._ensure(model, cache, max(lens) + q)
            c = self._chunk(model, q)
            with record_function("kvcomm.static.copy_in"):
                copy_in(self.cache, self.stacked, cache)
            self.lens.copy_(torch.tensor(lens, dtype=torch.long))
            c.pos.copy_(torch.arange(start, start + q).view(1, q))
            c.ids[:, :n].copy_(ids)
            with record_function("kvcomm.static.forward"):
                if c.graph is not None:
                    c.graph.replay()
                else:
                    self._chunk_step(model, c)
            logits = c.logits[n - 1].clone().view(1, 1, -1)
            with record_function("kvcomm.static.append"):
                append_from(self.cache, self.stacked, cache, lens, n)
        return logits

    @torch.no_grad()
    def decode(self, cache, next_logits: torch.Tensor, length: int, max_new_tokens: int, stops,
               feed_last: bool = False, step_logits: list | None = None) -> list[int]:
        """`kvcomm.core.generation.greedy_continue`'s contract on the static cache.

        `step_logits`, when a list, receives a copy of each step's logits (tests compare them)."""
        model = self._model_or_fail()
        lens = [layer.keys.shape[-2] for layer in cache.layers]
        out: list[int] = []
        with self.lock, torch.cuda.device(self.device) if self.graphs else nullcontext():
            self._ensure(model, cache, max(lens) + max_new_tokens)
            copy_in(self.cache, self.stacked, cache)
            self._set_state(lens, length)
            self.ids.copy_(next_logits.reshape(-1).argmax().view(1, 1))
            fed = 0
            for _ in range(max_new_tokens):
                tok = int(self.ids)  # the one host sync per token
                if tok in stops:
                    break
                out.append(tok)
                if len(out) == max_new_tokens and not feed_last:
                    break
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self._step(model)
                fed += 1
                if step_logits is not None:
                    step_logits.append(self.logits.clone())
            if fed:  # once per layer: the caller's cache gets past + every fed token, as the eager loop leaves it
                append_from(self.cache, self.stacked, cache, lens, fed)
        return out


_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_decoders_lock = threading.Lock()


def decoder_for(lm, graphs: bool) -> GraphDecoder:
    """The model's decoder (one per model, graph and compile setting, kept while the model lives)."""
    key = (graphs, compiled.wanted())
    with _decoders_lock:
        per_model = _decoders.setdefault(lm.model, {})
        dec = per_model.get(key)
        if dec is None or dec.device != lm.device or dec.dtype != lm.dtype:
            dec = per_model[key] = GraphDecoder(lm, graphs, compile=key[1])
        return dec


def release(lm) -> None:
    """Drop the model's decoders (static cache and graphs) to give their GPU memory back."""
    with _decoders_lock:
        _decoders.pop(lm.model, None)
