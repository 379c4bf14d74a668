"""The Ray backend's anchor pool: one `PoolActor` that decides, and a read replica in every agent actor.

The `PoolActor` holds the authoritative `AnchorPool`: staging, commits, use counts, eviction and stats
all happen there. Every committed change (a new agent delta, with its anchor's base the first time;
an eviction) bumps its version and is logged in order. Each agent actor matches against a
`ReplicaPool`, an `AnchorPool` holding the same anchors (those with deltas for the agent templates the
actor serves) and running the same matching code, so a match costs no round trip. Per agent call:

  1. when the call arrives, the replica asks for the changes since its version (`PoolActor.changes`),
     one request, awaited at the call's first match (so its cost is inside the measured TTFT);
  2. matching runs locally; the anchors a match uses and the call's staged deltas are queued;
  3. after the reply, they go to the pool actor in one call (`PoolActor.report`) that the agent awaits
     before returning, so they are applied before the driver commits the request.

Commits happen only when a request (or, with `run_batch`, a whole batch) ends, so a replica synced
when the call arrives sees exactly the pool a local `AnchorPool` would: same anchors, same order
(creation order, which matching iterates), same tensors (the bytes that were staged, or the
dequantized offsets when the pool stores them compressed). Use counts and eviction are decided only
by the pool actor; the replica's own counters are not used.

Everything that crosses the boundary is KV in the message format (`kvcomm.agents.wire`), decoded with
full validation against the receiver's fingerprint. If the pool actor is lost, a replica turns every
match into a miss and drops updates (dense prefill: exact), as before.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict

from kvcomm.agents.wire import block_from_bytes, block_to_bytes, require_ray
from kvcomm.core.fingerprint import Fingerprint
from kvcomm.core.kv import KVBlock
from kvcomm.reuse.anchors import AgentDelta, Anchor, AnchorPool, Match, PoolConfig, unpacked

log = logging.getLogger(__name__)


class PoolActor:
    """Holds the one AnchorPool and the change log its replicas sync from; tensors travel as message bytes."""

    def __init__(self, config: PoolConfig):
        self.fp: Fingerprint | None = None
        self.config = config
        self.pool = config.build()
        self.pool.listener = self._changed
        self.version = 0
        self._log: list[tuple[str, tuple, str | None]] = []  # entry i is version i + 1: (kind, anchor id, agent key)
        self._wire: dict[tuple, tuple[bytes, dict]] = {}  # live anchor id -> (base, {agent key: (version, Δφ, Δp)})
        self._staged_wire: dict[tuple, tuple[bytes, bytes, bytes]] = {}  # (request, name, key, agent key) -> bytes
        self._committing = None
        self.calls: Counter = Counter()

    def register(self, fp_json: str) -> dict:
        """Each agent announces its model; the first fixes the pool's model, a different one is refused.
        Returns the pool's settings (the replica matches with the same γ and τ)."""
        fp = Fingerprint.from_json(fp_json)
        if self.fp is None:
            self.fp = fp
        else:
            self.fp.check_compatible(fp)
        return asdict(self.config)

    # ---- writing (from the agents, then the driver) ------------------------------------------------
    def stage(self, request: str, name: str, key: str, base: bytes, agent_key: str, dphi: bytes, dseg: bytes) -> None:
        delta = AgentDelta(block_from_bytes(dphi, self.fp), block_from_bytes(dseg, self.fp))
        self.pool.stage(request, name, key, block_from_bytes(base, self.fp), agent_key, delta)
        self._staged_wire[(request, name, key, agent_key)] = (base, dphi, dseg)

    def report(self, uses: list, stages: list) -> None:
        """One agent call's anchor uses [(name, keys)] and staged updates [stage's arguments]."""
        self.calls["report"] += 1
        for name, keys in uses:
            self.pool.record_use(name, keys)
        for args in stages:
            self.stage(*args)

    def commit(self, request: str) -> int:
        self._committing = request
        try:
            self.pool.commit(request)
        finally:
            self._committing = None
            self._drop_staged(request)
        return self.version

    def discard(self, request: str) -> None:
        self.pool.discard(request)
        self._drop_staged(request)

    def _drop_staged(self, request) -> None:
        for k in [k for k in self._staged_wire if k[0] == request]:
            del self._staged_wire[k]

    def _changed(self, kind: str, anchor: Anchor, agent_key: str | None) -> None:
        """The pool's listener: log the change, and keep the bytes a replica will need."""
        ident = (anchor.name, anchor.key, anchor.created)
        self.version += 1
        self._log.append((kind, ident, agent_key))
        if kind == "evict":
            self._wire.pop(ident, None)
            return
        staged = self._staged_wire.get((self._committing, anchor.name, anchor.key, agent_key))
        if ident not in self._wire:
            self._wire[ident] = (staged[0] if staged else block_to_bytes(anchor.base, self.fp, "base"), {})
        if staged is not None and self.config.offset_precision is None:
            dphi, dseg = staged[1], staged[2]  # exactly the tensors the pool holds
        else:  # stored compressed or cast: ship what matching reads (the dequantized float32 offsets)
            d = anchor.deltas[agent_key]
            dphi, dseg = (block_to_bytes(unpacked(b), self.fp, "offset") for b in (d.placeholder, d.segment))
        self._wire[ident][1][agent_key] = (self.version, dphi, dseg)

    # ---- reading ----------------------------------------------------------------------------------------
    def changes(self, since: int, agent_keys: list[str]):
        """What a replica at version `since` serving `agent_keys` needs to reach the current version:
        (version, evicted anchor ids, [(name, key, created, base bytes or None if the replica has it,
        [(agent key, Δφ bytes, Δp bytes)])]) over the anchors still alive, oldest change first."""
        self.calls["changes"] += 1
        keys, tail = set(agent_keys), self._log[since:]
        evicted = [ident for kind, ident, _ in tail if kind == "evict"]
        added: dict[tuple, list] = {}
        for kind, ident, agent_key in tail:
            if kind != "delta" or agent_key not in keys or ident not in self._wire:
                continue
            version, dphi, dseg = self._wire[ident][1][agent_key]
            added.setdefault(ident, []).append((agent_key, dphi, dseg))
        rows = []
        for ident, deltas in added.items():
            base, held = self._wire[ident]
            known = any(k in held and held[k][0] <= since for k in keys)  # the replica already holds this anchor
            rows.append((*ident, None if known else base, deltas))
        return self.version, evicted, rows

    def stats(self) -> dict:
        return self.pool.stats().__dict__

    def nbytes(self) -> int:
        return self.pool.nbytes

    def call_counts(self) -> dict:
        return dict(self.calls)


def _actor_errors():
    ray = require_ray()
    return ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError


class RemotePool:
    """The driver's handle on the PoolActor: commit, discard and stats (agents match on their replicas).
    If the actor is gone, updates are dropped and stats are None: losing the pool costs speed, never
    correctness."""

    def __init__(self, actor):
        self.actor = actor
        self.lost = False

    def _call(self, method: str, *args):
        if self.lost:
            return None
        try:
            return require_ray().get(getattr(self.actor, method).remote(*args))
        except _actor_errors() as e:
            self.lost = True
            log.warning("anchor pool actor lost (%s); falling back to dense prefill", type(e).__name__)
            return None

    def commit(self, request) -> None:
        self._call("commit", request)

    def discard(self, request) -> None:
        self._call("discard", request)

    def stats(self) -> dict | None:
        return self._call("stats")

    @property
    def nbytes(self) -> int:
        return self._call("nbytes") or 0


class ReplicaPool(AnchorPool):
    """An agent actor's read replica of the PoolActor's pool (see the module docstring). `begin(agent_key)`
    when a call arrives, `flush()` when it has replied; in between, `match` runs locally."""

    def __init__(self, actor, fp: Fingerprint, device=None):
        self.actor, self.fp, self.device = actor, fp, device
        self.lost = False
        self.version = 0
        self.agent_keys: set[str] = set()
        self.round_trips = 0  # awaited pool calls before the first token (at most one per call)
        self.wire_bytes = 0  # KV message bytes received from and sent to the pool actor
        self._pending = None  # (full resync?, ObjectRef of `changes`)
        self._synced = False
        self._uses: list[tuple[str, list[str]]] = []
        self._stages: list[tuple] = []
        settings = None
        try:
            settings = require_ray().get(actor.register.remote(fp.to_json()))
        except _actor_errors() as e:
            self._lose(e)
        settings = dict(settings or asdict(PoolConfig()), offset_precision=None)  # offsets arrive dequantized
        super().__init__(**settings)

    def _lose(self, e: Exception) -> None:
        self.lost = True
        self._anchors = {}
        log.warning("anchor pool actor lost (%s); falling back to dense prefill", type(e).__name__)

    # ---- sync ------------------------------------------------------------------------------------------
    def begin(self, agent_key: str) -> None:
        """A call for template `agent_key` arrived: ask for the pool's changes now, read them at the first match."""
        self._synced = False
        if not self.lost:
            self._request(agent_key)

    def _request(self, agent_key: str) -> None:
        full = agent_key not in self.agent_keys  # a new template: fetch its deltas from the start
        self.agent_keys.add(agent_key)
        self._pending = (full, self.actor.changes.remote(0 if full else self.version, sorted(self.agent_keys)))

    def _sync(self, agent_key: str) -> None:
        if self._pending is None or agent_key not in self.agent_keys:
            self._request(agent_key)
        (full, ref), self._pending = self._pending, None
        try:
            version, evicted, rows = require_ray().get(ref)
        except _actor_errors() as e:
            self._lose(e)
            return
        self.round_trips += 1
        with self._lock:
            if full:
                self._anchors = {}
            if not self._apply(evicted, rows):  # cannot happen unless the log is broken: resync from scratch
                log.warning("anchor replica out of step with the pool; resyncing")
                self.agent_keys.clear()
                return self._sync(agent_key)
            self.version = version
        self._synced = True

    def _apply(self, evicted, rows) -> bool:
        for name, key, created in evicted:
            a = self._anchors.get(name, {}).get(key)
            if a is not None and a.created == created:
                del self._anchors[name][key]
        touched = set()
        for name, key, created, base, deltas in rows:
            group = self._anchors.setdefault(name, {})
            a = group.get(key)
            if a is None or a.created != created:
                if base is None:
                    return False
                a = group[key] = Anchor(name, key, block_from_bytes(base, self.fp, self.device), created=created)
                self.wire_bytes += len(base)
                touched.add(name)
            for agent_key, dphi, dseg in deltas:
                self.wire_bytes += len(dphi) + len(dseg)
                a.deltas[agent_key] = AgentDelta(block_from_bytes(dphi, self.fp, self.device),
                                                 block_from_bytes(dseg, self.fp, self.device))
        for name in touched:  # matching iterates anchors in creation order, as the pool's dicts hold them
            self._anchors[name] = dict(sorted(self._anchors[name].items(), key=lambda kv: kv[1].created))
        return True

    # ---- the KVPool interface ----------------------------------------------------------------------
    def match_many(self, queries: list[tuple[str, str, KVBlock]]) -> list[Match | None]:
        for agent_key in dict.fromkeys(q[1] for q in queries):
            if not self._synced or agent_key not in self.agent_keys:
                if self.lost:
                    break
                self._sync(agent_key)
        if self.lost:
            return [None] * len(queries)
        return super().match_many(queries)

    def record_use(self, name: str, keys: list[str]) -> None:
        self._uses.append((name, list(keys)))  # counted by the pool actor, which alone evicts

    def stage(self, request, name: str, key: str, base: KVBlock, agent_key: str, delta: AgentDelta) -> None:
        self._stages.append((request, name, key, base, agent_key, delta))  # encoded and sent by `flush`

    def flush(self) -> None:
        """Send the call's uses and staged updates in one call, and wait until the pool actor has them."""
        uses, stages = self._uses, self._stages
        self._uses, self._stages, self._pending, self._synced = [], [], None, False
        if self.lost or not (uses or stages):
            return
        wire = [(req, name, key, block_to_bytes(base, self.fp), agent_key, block_to_bytes(d.placeholder, self.fp),
                 block_to_bytes(d.segment, self.fp)) for req, name, key, base, agent_key, d in stages]
        self.wire_bytes += sum(len(w[3]) + len(w[5]) + len(w[6]) for w in wire)
        try:
            require_ray().get(self.actor.report.remote(uses, wire))
        except _actor_errors() as e:
            self._lose(e)

    def commit(self, request) -> None:
        raise NotImplementedError("the driver commits (RemotePool); a replica only reads")

    def discard(self, request) -> None:
        raise NotImplementedError("the driver discards (RemotePool); a replica only reads")
