"""The anchor pool of cross-context KV reuse (KVCOMM §3-4), thread-safe and bounded.

An *anchor* is one earlier content of a placeholder (e.g. one user question): its base KV (computed
without any agent's prefix, positions 0..n-1) and, per agent template, the deviations measured by a
dense prefill: Δφ = real KV of the placeholder tokens − base, and Δp = real KV of the template segment
right after it − that segment's template-only KV. All KV here is in the *origin frame*: keys are
re-rotated to start at position 0 before subtracting, so an offset learned at one position applies at
any other (rotation is linear, so rotate(base + Δ) = rotate(base) + rotate(Δ)).

Matching a new content φ (Eq. 5): candidates are the anchors that have deltas for this agent template
and are at least as long as φ. Distances are computed on value caches truncated to φ's length, as in
the reference code, and made scale-free: d_ψ = RMS(v_φ − v_ψ) / RMS(v_φ). (The paper leaves the
scale open; raw L2 norms over a whole model's values are in the tens to hundreds and would make every
softmax one-hot.) Weights w = softmax(−d/τ), entropy H = −Σ w log w; φ is *shareable* if H ≤ γ·log|A|,
else it becomes a new anchor (with `PoolConfig.max_distance`, not in the paper, its nearest anchor must also lie within
that d). τ = 0.003 by default: on SmolLM2-135M, relative distances between
different contents cluster within ~0.01–0.03 of each other, so τ = 0.05 made the weights near-uniform,
every call ambiguous (H > γ·log|A| as soon as two anchors exist) and reuse stopped. With bases encoded
after the chat head (`ReuseEngine.base_kv`) the 10-item math sweep gave 60% reuse at τ = 0.01 and 70%
at 0.003 or 0.001, with final answers equal to dense in 60% and 50% of items (`results/sink-head/`). τ sets the scale at which γ
acts, and is exposed (`--tau`) next to γ. Offsets (Eq. 6–7) use per-token weights for the placeholder and per
(layer, head, channel) weights for the following segment, as the reference code does.

Bounds: at most V anchors per placeholder (least-used of the 5 oldest evicted), and a byte budget over
the whole pool (same rule, pool-wide). Updates are staged per request and committed when the request
finishes, so concurrent requests see a consistent pool. A `listener` sees every committed delta and
every eviction, in order (the Ray backend ships them to the agents' read replicas, `kvcomm.agents.pool_replica`).

Compressed offsets (`PoolConfig(offset_precision="int8")`, also fp8, int4, or bf16/fp16 as a plain
cast): the deltas Δφ and Δp, which outnumber the bases (one per agent template per anchor), are stored
as `PackedBlock`s with the message format's quantizer (`kvcomm.core.quant`: keys per channel, values
per token, float16 scales, `offset_group_size` = G) and dequantized when matched. The byte budget counts
the compressed size (codes + scales), so the same budget holds more anchors. Bases stay as computed:
they are what matching measures distances on.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch.profiler import record_function

from kvcomm.core.kv import KVBlock
from kvcomm.core.quant import DEFAULT_GROUP_SIZE, DENSE, PRECISIONS, Quantized, dequantize, quantize
from kvcomm.reuse.templates import placeholder_names
from kvcomm.reuse.weighing import blend_pair, global_distances, weigh


def content_key(ids) -> str:
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()


class PackedBlock:
    """A KVBlock held quantized (keys per channel, values per token, as in KV messages). `nbytes` counts
    codes, scales and zero points; `unpack()` (or `.k`/`.v`) gives the dequantized tensors."""

    def __init__(self, block: KVBlock, precision: str, group_size: int = DEFAULT_GROUP_SIZE):
        self.qk: Quantized = quantize(block.k, precision, group_size, "token")
        self.qv: Quantized = quantize(block.v, precision, group_size, "channel")
        self.dtype = block.k.dtype

    @property
    def n(self) -> int:
        return self.qk.shape[2]

    @property
    def nbytes(self) -> int:
        return self.qk.nbytes + self.qv.nbytes

    @property
    def k(self) -> torch.Tensor:
        return dequantize(self.qk, self.dtype)

    @property
    def v(self) -> torch.Tensor:
        return dequantize(self.qv, self.dtype)

    def unpack(self, dtype: torch.dtype | None = None) -> KVBlock:
        return KVBlock(dequantize(self.qk, dtype or self.dtype), dequantize(self.qv, dtype or self.dtype))


def pack(block: KVBlock, precision: str | None, group_size: int = DEFAULT_GROUP_SIZE) -> KVBlock | PackedBlock:
    """`block` stored at `precision` (None: as is; bf16/fp16/fp32: a cast; fp8/int8/int4: a PackedBlock).
    KV a quantized precision cannot hold (beyond float16 scales) stays as is."""
    if precision is None:
        return block
    if precision in DENSE:
        return KVBlock(block.k.to(DENSE[precision]), block.v.to(DENSE[precision]))
    try:
        return PackedBlock(block, precision, group_size)
    except ValueError:
        return block


def unpacked(block: KVBlock | PackedBlock) -> KVBlock:
    """Float32 tensors of a stored block, whatever its storage."""
    if isinstance(block, PackedBlock):
        return block.unpack(torch.float32)
    return KVBlock(block.k.float(), block.v.float())


def _as_stored(block: KVBlock | PackedBlock) -> KVBlock:
    """A stored block's tensors for matching: a plain block as is (no copy), a packed one dequantized to float32."""
    return block.unpack(torch.float32) if isinstance(block, PackedBlock) else block


@dataclass
class AgentDelta:
    placeholder: KVBlock | PackedBlock  # Δφ, same length as the anchor
    segment: KVBlock | PackedBlock  # Δp for the segment after the placeholder (may have length 0)


@dataclass
class Anchor:
    name: str
    key: str
    base: KVBlock
    deltas: dict[str, AgentDelta] = field(default_factory=dict)
    created: int = 0
    uses: int = 0

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + sum(d.placeholder.nbytes + d.segment.nbytes for d in self.deltas.values())


@dataclass
class Match:
    """Estimated offsets for one placeholder in one agent's prompt."""

    placeholder_offset: KVBlock
    segment_offset: KVBlock
    weights: torch.Tensor
    entropy: float
    anchors: list[str]
    distance: float | None = None  # the nearest anchor's d (pools with `max_distance` only)


@dataclass
class _Weighed:
    """One query's candidates and what `kvcomm.reuse.weighing.weigh` gave for them (on the device), between
    `AnchorPool._weigh` and `AnchorPool._offsets`: per-token [A, n] and per-channel [A, L, H, D] distances
    (the latter times `ch_norm`), and `row` = [entropy, scale, global weights]."""

    name: str
    base: KVBlock
    cands: list[tuple[Anchor, AgentDelta]]
    d_tok: torch.Tensor
    d_ch: torch.Tensor
    ch_norm: float
    row: torch.Tensor


@dataclass
class PoolStats:
    anchors: int
    bytes: int
    byte_budget: int
    matches: int
    new_anchors: int
    evictions: int
    per_placeholder: dict[str, int]


@dataclass(frozen=True)
class PoolConfig:
    """Anchor-pool settings (defaults as discussed above): V anchors per placeholder, a byte budget,
    the entropy threshold γ, the softmax temperature τ, the eviction window, how offsets are stored
    (`offset_precision`: None = as computed, or one of `kvcomm.core.quant.PRECISIONS`), and
    `max_distance` (None: off): a second test, not in the paper, that also requires the nearest anchor
    within that relative distance d = RMS(v − v_anchor) / RMS(v). The entropy test asks whether one
    anchor stands out, not whether it is close; measured on Qwen2.5-Coder in float32, the calls whose
    replies left dense's had barely higher entropy than those that stayed (docs/reuse.md). `inf` gates nothing
    and records each match's distance in the call results, to choose a threshold from. `never_share` (not in
    the paper): placeholder names that are never matched, so their KV is always recomputed (`+partial`) or
    sends the call to the dense fallback; an experiment's knob to find which placeholders' offsets cost
    agreement (docs/reuse.md)."""

    max_anchors: int = 20
    byte_budget: int = 2 << 30
    gamma: float = 0.3
    tau: float = 0.003
    oldest_window: int = 5
    offset_precision: str | None = None
    offset_group_size: int = DEFAULT_GROUP_SIZE
    max_distance: float | None = None
    never_share: tuple[str, ...] = ()

    def build(self) -> AnchorPool:
        return AnchorPool(**asdict(self))


class KVPool(Protocol):
    """What an engine needs of a pool: the local `AnchorPool` or a Ray agent's `ReplicaPool`."""

    def match(self, name: str, agent_key: str, base: KVBlock) -> Match | None: ...
    def match_many(self, queries: list[tuple[str, str, KVBlock]]) -> list[Match | None]: ...
    def stage(self, request, name: str, key: str, base: KVBlock, agent_key: str, delta: AgentDelta) -> None: ...
    def commit(self, request) -> None: ...
    def discard(self, request) -> None: ...
    def stats(self): ...


class AnchorPool:
    def __init__(self, max_anchors: int = 20, byte_budget: int = 2 << 30, gamma: float = 0.3, tau: float = 0.003,
                 oldest_window: int = 5, offset_precision: str | None = None, offset_group_size: int = DEFAULT_GROUP_SIZE,
                 max_distance: float | None = None, never_share: tuple[str, ...] = ()):
        if offset_precision is not None and offset_precision not in PRECISIONS:
            raise ValueError(f"offset_precision must be None or one of {', '.join(PRECISIONS)}, got {offset_precision!r}")
        if not isinstance(offset_group_size, int) or offset_group_size < 1:
            raise ValueError(f"offset_group_size must be a positive integer, got {offset_group_size!r}")
        if max_distance is not None and not max_distance > 0:
            raise ValueError(f"max_distance must be None or > 0, got {max_distance!r}")
        self.max_distance = max_distance
        try:
            self.never_share = frozenset(placeholder_names(never_share))
        except ValueError as e:
            raise ValueError(f"never_share: {e}") from None
        self.offset_precision = offset_precision
        self.offset_group_size = offset_group_size
        self.max_anchors = max_anchors
        self.byte_budget = byte_budget
        self.gamma = gamma
        self.tau = tau
        self.oldest_window = oldest_window
        self._anchors: dict[str, dict[str, Anchor]] = {}  # placeholder name -> content key -> anchor
        self._staged: dict[object, list[tuple[str, str, KVBlock, str, AgentDelta]]] = {}
        self._lock = threading.RLock()
        self._clock = 0
        self._bytes = 0
        self._matches = self._new = self._evictions = 0
        self.listener = None  # called as listener("delta", anchor, agent_key) / ("evict", anchor, None) on commit

    # ---- reading -------------------------------------------------------------------------------
    def match(self, name: str, agent_key: str, base: KVBlock) -> Match | None:
        """Offsets for content `base` of placeholder `name` in the agent's prompt, or None (new anchor)."""
        return self.match_many([(name, agent_key, base)])[0]

    def match_many(self, queries: list[tuple[str, str, KVBlock]]) -> list[Match | None]:
        """`match` for several (placeholder, agent key, base) at once, as one call's placeholders come:
        every distance, weight and entropy is queued on the device into one buffer and read back in one
        copy, then the shareable ones get their offsets (one host sync per call, not per placeholder)."""
        with self._lock:
            found = [[] if name in self.never_share else self._candidates(name, agent_key, base.n)
                     for name, agent_key, base in queries]
        live = [(q, c) for q, c in zip(queries, found) if c]
        if not live:
            return [None] * len(queries)
        gate = self.max_distance is not None
        # one row per query: [entropy, scale, w_0 .. w_A-1, (zeros), nearest anchor's distance (gate only)]
        rows = torch.zeros(len(live), 3 + max(len(c) for _, c in live), dtype=torch.float32, device=live[0][0][2].v.device)
        with record_function("kvcomm.match.weigh"):
            weighed = [self._weigh(q, c, row) for (q, c), row in zip(live, rows)]
            if gate:
                for p in weighed:
                    p.row[-1] = global_distances(p.d_tok, p.row[1]).min()
        with record_function("kvcomm.match.read_back"):
            host = iter(rows.tolist())
        pending = iter(weighed)
        out = []
        for c in found:
            if not c:
                out.append(None)
                continue
            p, values = next(pending), next(host)
            entropy, weights, distance = values[0], values[2 : 2 + len(c)], values[-1]
            if (len(c) > 1 and entropy > self.gamma * math.log(len(c))) or (gate and distance > self.max_distance):
                out.append(None)
            else:
                with record_function("kvcomm.match.offsets"):
                    out.append(self._offsets(p, entropy, weights, distance if gate else None))
        return out

    def _candidates(self, name: str, agent_key: str, n: int) -> list[tuple[Anchor, AgentDelta]]:
        """Anchors of placeholder `name` with deltas for this agent and at least n tokens (hold the lock)."""
        return [(a, a.deltas[agent_key]) for a in self._anchors.get(name, {}).values() if agent_key in a.deltas and a.base.n >= n]

    def _weigh(self, query: tuple[str, str, KVBlock], cands, row: torch.Tensor) -> _Weighed:
        """Distances, global weights and entropy (into `row`, on the device) of one query against its candidates."""
        name, _, base = query
        d_tok, d_ch, ch_norm = weigh(base.v, [a.base.v[:, :, : base.n] for a, _ in cands], self.tau, row)
        return _Weighed(name, base, cands, d_tok, d_ch, ch_norm, row)

    def _offsets(self, p: _Weighed, entropy: float, weights: list[float], distance: float | None = None) -> Match:
        """Offsets of the placeholder (per-token weights: distance over layers, heads, channels at each
        token) and of the segment after it (per (layer, head, channel) weights: distance over tokens)."""
        cands, n, dtype = p.cands, p.base.n, p.base.k.dtype
        dphi = [_as_stored(dl.placeholder) for _, dl in cands]
        placeholder = blend_pair([b.k[:, :, :n] for b in dphi], [b.v[:, :, :n] for b in dphi], p.d_tok, True, 1.0,
                                 p.row, self.tau, dtype)
        segs = [_as_stored(dl.segment) for _, dl in cands]
        segment = blend_pair([b.k for b in segs], [b.v for b in segs], p.d_ch, False, p.ch_norm, p.row, self.tau, dtype)
        self.record_use(p.name, [a.key for (a, _), weight in zip(cands, weights) if weight > 1.0 / (2 * len(cands))])
        return Match(KVBlock(*placeholder), KVBlock(*segment), p.row[2 : 2 + len(cands)], entropy, [a.key for a, _ in cands],
                     distance)

    def record_use(self, name: str, keys: list[str]) -> None:
        """Count one match of placeholder `name` that used the anchors `keys` (weight above half of uniform):
        the use counts that eviction reads."""
        with self._lock:
            self._matches += 1
            group = self._anchors.get(name, {})
            for key in keys:
                if key in group:
                    group[key].uses += 1

    def anchors(self, name: str) -> list[Anchor]:
        """The anchors held for placeholder `name`, oldest first (a snapshot; for analysis tools)."""
        with self._lock:
            return sorted(self._anchors.get(name, {}).values(), key=lambda a: a.created)

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(sum(len(x) for x in self._anchors.values()), self._bytes, self.byte_budget, self._matches,
                             self._new, self._evictions, {k: len(v) for k, v in self._anchors.items()})

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    # ---- writing -------------------------------------------------------------------------------
    def stage(self, request, name: str, key: str, base: KVBlock, agent_key: str, delta: AgentDelta) -> None:
        """Record a new anchor / new agent deltas; visible to matching after `commit(request)`. Offsets are
        compressed here (outside the lock) when the pool stores them compressed."""
        if self.offset_precision is not None:
            g = self.offset_group_size
            delta = AgentDelta(pack(delta.placeholder, self.offset_precision, g), pack(delta.segment, self.offset_precision, g))
        with self._lock:
            self._staged.setdefault(request, []).append((name, key, base, agent_key, delta))

    def discard(self, request) -> None:
        with self._lock:
            self._staged.pop(request, None)

    def commit(self, request) -> None:
        with self._lock:
            for name, key, base, agent_key, delta in self._staged.pop(request, []):
                group = self._anchors.setdefault(name, {})
                anchor = group.get(key)
                if anchor is None:
                    self._clock += 1
                    anchor = Anchor(name, key, base, created=self._clock)
                    if anchor.nbytes + delta.placeholder.nbytes + delta.segment.nbytes > self.byte_budget:
                        continue  # larger than the whole budget: never stored
                    while len(group) >= self.max_anchors:
                        self._evict(group)
                    group[key] = anchor
                    self._bytes += anchor.base.nbytes
                    self._new += 1
                if agent_key not in anchor.deltas:
                    anchor.deltas[agent_key] = delta
                    self._bytes += delta.placeholder.nbytes + delta.segment.nbytes
                    if self.listener is not None:
                        self.listener("delta", anchor, agent_key)
            while self._bytes > self.byte_budget:
                everyone = {f"{a.name}\x00{a.key}": a for g in self._anchors.values() for a in g.values()}
                if not everyone:
                    break
                self._evict(everyone)

    def _evict(self, group: dict[str, Anchor]) -> None:
        """Least-used of the `oldest_window` oldest anchors in `group` (a dict view over anchors)."""
        oldest = sorted(group.values(), key=lambda a: a.created)[: self.oldest_window]
        victim = min(oldest, key=lambda a: (a.uses, a.created))
        del self._anchors[victim.name][victim.key]
        self._bytes -= victim.nbytes
        self._evictions += 1
        if self.listener is not None:
            self.listener("evict", victim, None)
