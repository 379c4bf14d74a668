"""Continuous-batched greedy decoding: many threads' decodes share one step of a fixed batch of B slots.

Why: a one-token step of a small model is launch-bound (Qwen2.5-Coder-0.5B on an H200: ~3.2 ms per token
at batch 1 with a CUDA graph, ~500 tiny kernels), and a step at batch 16 costs about the same. Threads
that decode one request each (`MultiAgentRunner.run_batch`) therefore gain ~B-fold in aggregate when
their tokens go through one batched step instead of taking turns on the batch-1 graph.

How: a `DecodeServer` per model owns a slot cache (`SlotCache`: per layer [B, kv_heads, L, head_dim]
keys and values, preallocated) and one server thread. `decode` (the contract of
`kvcomm.core.generation.greedy_continue`) queues the request and waits; the server thread copies the
request's prefix KV into a free row's slots [0, n), then steps every row together: one forward of
[B, 1] ids with per-row RoPE positions ([B, 1] position_ids), per-row KV write indices (the layers
scatter row b's new key into slot `lens[b]`) and a per-row additive mask [B, 1, 1, L] (0 on slots
<= lens[b], a large negative value elsewhere). The argmax is written back into the ids on the device;
the host reads the B ids once per step (its only sync) and applies stops and budgets per row exactly
as greedy_continue does. A finished row's new KV goes back to its caller, who appends it to its own
DynamicCache once, so callers see what the eager loop leaves there; the row is then free.

B is fixed whatever the occupancy: free rows run a dummy token at position 0 that sees only slot 0
(no NaNs) and are ignored. So every kernel has the same shape each step and a row's numerics do not
depend on which other rows are busy or what they hold (batch invariance: outputs do not depend on
thread timing). With `graphs` (the default on CUDA) the step is captured once as a CUDA graph; without
it the same step runs eagerly (CPU tests). Note that batch-B numerics can differ from the batch-1
paths in low precision (other GEMM kernels); in fp32 they agree to rounding.

What falls back to the single-request paths (the caller's `greedy_continue` then runs as before):
ragged caches (selective sharing), caches whose head layout differs from the first request's, and
requests whose prefix + budget exceed the row length L (fixed at start, `max_len`; it does not grow,
so a capture is never redone while rows are busy).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from contextlib import contextmanager, nullcontext

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvcomm.core import fast_decode, graph_capture


class BatchDecodeUnavailable(RuntimeError):
    """The server cannot take (or could not finish) this request; the caller decodes it alone."""


class SlotLayer(CacheLayerMixin):
    """One layer's preallocated [B, heads, L, dim] keys and values; `update` writes row b's one new
    token at slot `where[b]` (a [B] long device tensor shared by every layer and advanced by the server).

    Only the abstract methods of transformers' `CacheLayerMixin` are implemented, each accepting the
    argument lists of both recent and earlier 5.x releases; the model calls `update` (scatter, no host
    sync: capturable) and, at most, the length queries."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, where: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.where = keys, values, where
        self.max_cache_len = keys.shape[-2]
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states=None) -> None:
        """Nothing to do: the tensors are allocated by the server before the first step."""

    def update(self, key_states, value_states, *args, **kwargs):
        idx = self.where.view(-1, 1, 1, 1)
        self.keys.scatter_(2, idx.expand_as(key_states), key_states)
        self.values.scatter_(2, idx.expand_as(value_states), value_states)
        return self.keys, self.values

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        """Rows hold different lengths; callers always pass position_ids and a 4-D mask instead."""
        return 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_max_cache_shape(self) -> int:  # the name of get_max_length in earlier transformers releases
        return self.max_cache_len


class SlotCache(Cache):
    """A transformers Cache over `SlotLayer`s (the model only calls `update` and the length queries)."""

    def __init__(self, layers: list[SlotLayer]):
        super().__init__(layers=layers)


class _Request:
    def __init__(self, cache, first: int, length: int, max_new: int, stops, feed_last: bool):
        self.cache, self.tok, self.length, self.max_new = cache, first, length, max_new
        self.stops, self.feed_last = stops, feed_last
        self.n = cache.layers[0].keys.shape[-2]
        self.out: list[int] = []
        self.fed = 0
        self.new_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.error: BaseException | None = None
        self.done = threading.Event()


class DecodeServer:
    """Greedy decoding of up to `slots` requests at once for one model (see the module docstring).

    `max_len`: slots per row (rounded up to a power of two by `fast_decode.bucket`); longer requests
    fall back. `graphs`: capture the step as a CUDA graph (default: on CUDA)."""

    def __init__(self, lm, slots: int = 16, max_len: int = 4096, graphs: bool | None = None):
        if slots < 1:
            raise ValueError("slots must be at least 1")
        graphs = lm.device.type == "cuda" if graphs is None else graphs
        if graphs and lm.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; use graphs=False")
        self.lm, self.slots, self.max_len, self.graphs = lm, slots, fast_decode.bucket(max_len), graphs
        self.device, self.dtype = lm.device, lm.dtype
        self.cond = threading.Condition()
        self.pending: deque[_Request] = deque()
        self.rows: list[_Request | None] = [None] * slots
        self.layout: tuple | None = None  # per-layer (kv heads, key dim, value dim), from the first request
        self.cache = self.graph = None
        self.stopping = False
        self.broken: str | None = None
        self.steps = self.tokens = self.captures = self.busiest = 0
        self.thread = threading.Thread(target=self._serve, name=f"kvcomm-decode-{lm.name}", daemon=True)
        self.thread.start()

    # -- callers' side ----------------------------------------------------------------------------

    def accepts(self, cache, length: int, max_new_tokens: int) -> bool:
        """Whether `decode` would take this request (uniform cache, known layout, fits in a row)."""
        if self.broken or self.stopping or max_new_tokens < 1 or fast_decode.unsupported(self.lm, cache):
            return False
        lens = {layer.keys.shape[-2] for layer in cache.layers}
        if len(lens) != 1 or next(iter(lens)) + max_new_tokens > self.max_len:
            return False
        layout = _layout(cache)
        return self.layout is None or layout == self.layout

    def decode(self, cache, next_logits: torch.Tensor, length: int, max_new_tokens: int, stops,
               feed_last: bool = False) -> list[int]:
        """`greedy_continue`'s contract: the tokens; `cache` then holds past + every fed token's KV.

        Raises `BatchDecodeUnavailable` (cache untouched) when the server cannot take or finish it."""
        if not self.accepts(cache, length, max_new_tokens):
            raise BatchDecodeUnavailable("request not accepted (ragged cache, other layout, too long, or stopped)")
        req = _Request(cache, int(next_logits.reshape(-1).argmax()), length, max_new_tokens, set(stops), feed_last)
        with self.cond:
            if self.stopping or self.broken:
                raise BatchDecodeUnavailable(self.broken or "server stopped")
            self.pending.append(req)
            self.cond.notify_all()
        req.done.wait()
        if req.error is not None:
            raise BatchDecodeUnavailable(f"batched decode failed: {req.error}") from req.error
        for i, (k, v) in enumerate(req.new_kv):  # on the caller's thread, once per layer
            cache.update(k, v, i)
        return req.out

    def stop(self) -> None:
        """Finish the queued and running requests, then end the server thread and free its memory."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if threading.current_thread() is not self.thread:
            self.thread.join()
        self.cache = self.graph = None

    # -- the server thread ------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            with torch.no_grad(), torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
                while self._admit_or_exit():
                    if any(r is not None for r in self.rows):
                        self._step_and_collect()
        except BaseException as e:  # fail every waiting caller (they fall back) rather than hang them
            with self.cond:
                self.broken = f"{type(e).__name__}: {e}"
                waiting = [r for r in self.rows if r is not None] + list(self.pending)
                self.rows, self.pending = [None] * self.slots, deque()
            for r in waiting:
                r.error = e
                r.done.set()

    def _admit_or_exit(self) -> bool:
        """Wait for work (no spinning); move queued requests into free rows. False when stopped and idle."""
        with self.cond:
            while not self.pending and all(r is None for r in self.rows):
                if self.stopping:
                    return False
                self.cond.wait()
            admitted = []
            for b in range(self.slots):
                if self.rows[b] is None and self.pending:
                    self.rows[b] = self.pending.popleft()
                    admitted.append(b)
        for b in admitted:
            self._admit(b, self.rows[b])
        self.busiest = max(self.busiest, sum(r is not None for r in self.rows))
        return True

    def _admit(self, b: int, req: _Request) -> None:
        if self.cache is None:
            self._allocate(req.cache)
        if _layout(req.cache) != self.layout:  # another layout arrived before the first was allocated
            return self._finish(b, error=BatchDecodeUnavailable("cache layout differs from the server's"))
        n = req.n
        for layer, src in zip(self.cache.layers, req.cache.layers):
            layer.keys[b, :, :n].copy_(src.keys[0])
            layer.values[b, :, :n].copy_(src.values[0])
        self.lens[b], self.pos[b, 0], self.live[b] = n, req.length, 1
        self.ids[b, 0] = req.tok
        self._decide(b, req)

    def _decide(self, b: int, req: _Request) -> None:
        """greedy_continue's loop body for row b's current token: stop, or keep it and feed it next step."""
        if req.tok in req.stops:
            return self._finish(b)
        req.out.append(req.tok)
        if len(req.out) == req.max_new and not req.feed_last:
            return self._finish(b)

    def _step_and_collect(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        self.steps += 1
        toks = self.ids.view(-1).tolist()  # the one host sync per step
        for b, req in enumerate(self.rows):
            if req is None:
                continue
            req.fed += 1
            self.tokens += 1
            if len(req.out) == req.max_new:  # feed_last: the last token is in the cache now
                self._finish(b)
            else:
                req.tok = toks[b]
                self._decide(b, req)

    def _finish(self, b: int, error: BaseException | None = None) -> None:
        """Hand row b's new KV (slots [n, n + fed)) to its caller and free the row."""
        req = self.rows[b]
        if error is None and req.fed:
            n, m = req.n, req.n + req.fed
            req.new_kv = [(layer.keys[b : b + 1, :, n:m].clone(), layer.values[b : b + 1, :, n:m].clone())
                          for layer in self.cache.layers]
        if self.cache is not None:
            self.lens[b], self.pos[b, 0], self.live[b] = 0, 0, 0  # a free row: dummy token at position 0
        with self.cond:
            self.rows[b] = None
        req.error = error
        req.done.set()

    def _allocate(self, cache) -> None:
        """Slot tensors shaped after the first request's cache; then the capture (with `graphs`)."""
        B, L, dev = self.slots, self.max_len, self.device
        self.layout = _layout(cache)
        with torch.inference_mode(False):  # plain tensors: in-place updates work in and out of inference mode
            self.lens = torch.zeros(B, dtype=torch.long, device=dev)  # filled slots = where the next key goes
            self.pos = torch.zeros(B, 1, dtype=torch.long, device=dev)
            self.live = torch.zeros(B, dtype=torch.long, device=dev)  # 1 on busy rows: only they advance
            self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
            self.cols = torch.arange(L, device=dev)
            self.mask = torch.zeros(B, 1, 1, L, dtype=self.dtype, device=dev)  # L is a multiple of 16: aligned rows
            layers = [SlotLayer(torch.zeros(B, h, L, dk, dtype=src.keys.dtype, device=dev),
                                torch.zeros(B, h, L, dv, dtype=src.values.dtype, device=dev), self.lens)
                      for (h, dk, dv), src in zip(self.layout, cache.layers)]
        self.neg = torch.finfo(self.dtype).min
        self.cache = SlotCache(layers)
        if self.graphs:
            self._capture()

    def _step(self) -> None:
        """One token for every row: masks from lens, forward, argmax into ids, advance busy rows.
        Device work only (no host sync, no data-dependent branch), so it can be captured."""
        self.mask.fill_(self.neg)
        self.mask.masked_fill_(self.cols <= self.lens.view(-1, 1, 1, 1), 0.0)
        out = self.lm.model(input_ids=self.ids, position_ids=self.pos, attention_mask=self.mask,
                            past_key_values=self.cache, use_cache=True)
        self.ids.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.pos.add_(self.live.view(-1, 1))
        self.lens.add_(self.live)

    def _capture(self) -> None:
        """Capture one step (all rows free; admission sets the state)."""
        self.graph = graph_capture.capture_graph(self._step)
        self.captures += 1


def _layout(cache) -> tuple:
    return tuple((layer.keys.shape[1], layer.keys.shape[-1], layer.values.shape[-1]) for layer in cache.layers)


_servers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_servers_lock = threading.Lock()


def server_for(lm) -> DecodeServer | None:
    """The model's running server, if one was started (`greedy_continue` asks this on every call)."""
    server = _servers.get(lm.model)
    return server if server is not None and server.lm.device == lm.device else None


def start(lm, slots: int = 16, max_len: int = 4096, graphs: bool | None = None) -> DecodeServer:
    """Start a server for `lm`'s model; greedy_continue on this model then batches across threads."""
    with _servers_lock:
        if lm.model in _servers:
            raise RuntimeError(f"a decode server is already running for {lm.name}")
        server = _servers[lm.model] = DecodeServer(lm, slots, max_len, graphs)
    return server


def stop(lm) -> None:
    """Stop the model's server (running requests finish first); later decodes take the usual paths."""
    with _servers_lock:
        server = _servers.pop(lm.model, None)
    if server is not None:
        server.stop()


@contextmanager
def serve(lm, slots: int = 16, max_len: int = 4096, graphs: bool | None = None):
    """`with serve(lm, slots=16): ...`: a server for the block's duration."""
    server = start(lm, slots, max_len, graphs)
    try:
        yield server
    finally:
        stop(lm)
