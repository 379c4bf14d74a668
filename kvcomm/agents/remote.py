"""Agents as Ray actors: the multi-agent runner and sender/receiver sharing across processes or machines.

Layout (one data path, the same engine code as the single-process runner):

  driver     `RayEngine`: the `MultiAgentRunner` drives it exactly as it drives a `ReuseEngine`.
             It holds only the tokenizer; it never loads the model.
  agents     one `AgentActor` per agent id, each with its own model copy and `ReuseEngine`
             (CPU or GPU resources as configured).
  pool       one `PoolActor` holding the `AnchorPool` every agent stages to and the driver commits to
             (when a request finishes); each agent matches on a local read replica of it, synced once
             per call (`kvcomm.agents.pool_replica`), so a match costs no round trip.

What crosses actor boundaries is KV in the project's message format (`kvcomm.message`: safetensors
bytes with the sender model's fingerprint), placed in Ray's object store. Every receiver decodes with
full validation against its own model's fingerprint, so KV from a different model is refused, never
mixed in. A reply's KV goes from the replying actor to the object store and straight to the next
actor that needs it; the driver handles only object references and token ids.

Faults:
- an agent actor that dies is restarted by Ray (`max_restarts`) and the in-flight call is retried
  (`max_task_retries`). The actor reloads the model; its cached template KV is recomputed. A retried
  call may stage its anchor updates twice; staging is idempotent per (placeholder, content, agent), so
  the pool's contents end the same. Greedy decoding is deterministic, so the answers are the same.
  (One thing a retry can change: the interrupted attempt's matches also count as anchor uses, which
  only matters later if the pool fills up and evicts by least use.)
- if the pool actor is lost, the replicas (whose per-call sync then fails) answer every match with
  "no anchor" and drop updates: calls fall back to dense prefill (always correct), never to reuse with
  missing offsets.

Ray is an optional extra (`pip install kvcomm[ray]`); nothing here imports it at module load.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from kvcomm.agents.pool_replica import PoolActor, RemotePool, ReplicaPool
from kvcomm.agents.wire import block_from_bytes, block_to_bytes, require_ray
from kvcomm.core.fingerprint import fingerprint
from kvcomm.core.message import decode, encode
from kvcomm.reuse.anchors import PoolConfig
from kvcomm.reuse.config import ReuseConfig
from kvcomm.reuse.engine import CallResult, Content, ReuseEngine
from kvcomm.sharing.prompts import DEFAULT_LAYOUT

__all__ = ["AgentActor", "PoolActor", "RayConfig", "RayEngine", "RemotePool", "ReplicaPool", "ShareActor",
           "block_from_bytes", "block_to_bytes", "share"]

log = logging.getLogger(__name__)


def _ray():
    return require_ray()


# ---- agents -----------------------------------------------------------------------------------------
class AgentActor:
    """One agent: its own model copy and ReuseEngine, with the shared pool behind a RemotePool."""

    def __init__(self, model: str, mode: str, pool_actor, config: ReuseConfig, device: str | None = None,
                 dtype: str | None = None):
        import os

        from kvcomm.core.models import load_model

        self.lm = load_model(model, device=device, dtype=dtype, progress=False)
        self.fp = fingerprint(self.lm.model, self.lm.tokenizer)
        self.pool = ReplicaPool(pool_actor, self.fp, self.lm.device)
        self.engine = ReuseEngine(self.lm, mode, pool=self.pool, config=config)
        self.pid = os.getpid()
        self.round_trips: list[int] = []  # per call: awaited pool calls before its first token

    def info(self) -> dict:
        return {"pid": self.pid, "fingerprint": self.fp.to_json(), "device": str(self.lm.device),
                "gpu_ids": [str(g) for g in _ray().get_gpu_ids()], "pool_round_trips": self.round_trips}

    def call(self, agent, contents: dict, request: str):
        """contents: name -> (ids, message bytes or ObjectRef of them, or None). Returns (record, reply bytes)."""
        ray = _ray()
        trips, pool_bytes = self.pool.round_trips, self.pool.wire_bytes
        if self.engine.mode == "reuse" and self.engine.config.offsets:
            self.pool.begin(agent.pool_key)  # the replica's one sync, sent before the incoming KV is decoded
        refs = {name: src for name, (_, src) in contents.items() if isinstance(src, ray.ObjectRef)}
        fetched = dict(zip(refs, ray.get(list(refs.values())))) if refs else {}
        local, incoming = {}, 0
        for name, (ids, src) in contents.items():
            data = fetched.get(name, src)
            incoming += len(data) if data is not None else 0
            base = block_from_bytes(data, self.fp, self.lm.device, self.lm.dtype) if data is not None else None
            local[name] = Content(list(ids), base)
        res = self.engine.call(agent, local, request)
        self.round_trips.append(self.pool.round_trips - trips)
        self.pool.flush()  # this call's anchor uses and staged deltas reach the pool before the driver commits
        wire = self.engine.config.kv_precision
        new_bases = {name: block_to_bytes(local[name].base, self.fp, "base", wire)
                     for name, (_, src) in contents.items() if src is None and local[name].base is not None}
        record = {"agent": res.agent, "path": res.path, "reply_ids": res.reply_ids, "ttft_s": res.ttft_s,
                  "total_s": res.total_s, "prompt_tokens": res.prompt_tokens, "prefilled_tokens": res.prefilled_tokens,
                  "matched": res.matched, "distances": res.distances, "new_bases": new_bases}
        reply = block_to_bytes(res.reply.base, self.fp, "reply", wire) if res.reply.base is not None else None
        record["wire_bytes"] = (incoming + sum(map(len, new_bases.values())) + (len(reply) if reply else 0)
                                + self.pool.wire_bytes - pool_bytes)
        return record, reply


@dataclass(frozen=True)
class RayConfig:
    """Where agent actors run. address None starts a local cluster; device/dtype None = each actor's default;
    gpus_per_agent may be fractional (several agents share a GPU)."""

    address: str | None = None
    device: str | None = None
    dtype: str | None = None
    cpus_per_agent: float = 0.0
    gpus_per_agent: float = 0.0
    max_restarts: int = 3


class RayEngine:
    """Driver side: the `Engine` interface (call, pool, tokenizer) over Ray actors."""

    def __init__(self, model: str, mode: str = "reuse", config: ReuseConfig = ReuseConfig(),
                 pool: PoolConfig = PoolConfig(), cluster: RayConfig = RayConfig()):
        from kvcomm.core.models import load_tokenizer

        if mode == "relay":  # it reads the previous agent's conversation KV, which no message carries
            raise ValueError("the relay mode needs every agent in one process: the Ray backend does not ship the "
                             "transcripts it reuses; run it without --ray")
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, configure_logging=True)
        self.model, self.mode, self.config, self.cluster = model, mode, config, cluster
        self.tokenizer = load_tokenizer(model)
        self.actor_options = {"num_cpus": cluster.cpus_per_agent, "num_gpus": cluster.gpus_per_agent,
                              "max_restarts": cluster.max_restarts, "max_task_retries": cluster.max_restarts}
        self.agents: dict[str, object] = {}
        self._agent_cls = ray.remote(AgentActor)
        self.pool_actor = ray.remote(PoolActor).options(num_cpus=0, max_restarts=0).remote(pool)
        self.pool = RemotePool(self.pool_actor)  # the driver only commits, discards and reads stats

    def _agent(self, agent_id: str):
        actor = self.agents.get(agent_id)
        if actor is None:
            actor = self._agent_cls.options(**self.actor_options).remote(
                self.model, self.mode, self.pool_actor, self.config, self.cluster.device, self.cluster.dtype)
            self.agents[agent_id] = actor
        return actor

    def submit(self, agent, contents: dict[str, Content], request: str):
        """Start one call on the agent's actor; returns (record ref, reply-KV ref)."""
        payload = {name: (c.ids, c.remote) for name, c in contents.items()}
        return self._agent(agent.agent_id).call.options(num_returns=2).remote(agent, payload, request)

    def call(self, agent, contents: dict[str, Content], request=None) -> CallResult:
        ray = _ray()
        record_ref, reply_ref = self.submit(agent, contents, request or uuid.uuid4().hex)
        rec = ray.get(record_ref)
        for name, data in rec.pop("new_bases").items():
            contents[name].remote = ray.put(data)  # later agents fetch the question's base KV from the store
        reply = Content(list(rec["reply_ids"]), None, reply_ref if rec["reply_ids"] else None)
        return CallResult(rec["agent"], rec["path"], rec["reply_ids"], reply, rec["ttft_s"], rec["total_s"],
                          rec["prompt_tokens"], rec["prefilled_tokens"], rec["matched"], rec["wire_bytes"],
                          rec.get("distances", {}))

    def shutdown(self) -> None:
        ray = _ray()
        for actor in self.agents.values():
            ray.kill(actor)
        ray.kill(self.pool_actor)
        self.agents.clear()

    def start(self, agent_ids) -> dict[str, dict]:
        """Create (and load the model in) every agent's actor up front, so timings exclude start-up; returns
        each actor's `info` (process, device, the GPUs Ray gave it)."""
        agent_ids = list(agent_ids)
        return dict(zip(agent_ids, _ray().get([self._agent(a).info.remote() for a in agent_ids])))


# ---- sender / receiver sharing ------------------------------------------------------------------------
class ShareActor:
    """A sender or receiver of selective KV sharing (same code for both roles)."""

    def __init__(self, model: str, device: str | None = None, dtype: str | None = None):
        from kvcomm.core.models import load_model

        self.lm = load_model(model, device=device, dtype=dtype, progress=False)

    def send(self, context: str, layers: list[int], layout: str = DEFAULT_LAYOUT) -> bytes:
        from kvcomm.sharing.prompts import sender_ids
        from kvcomm.sharing.send_receive import send

        return encode(send(self.lm, sender_ids(self.lm.tokenizer, context, layout=layout), layers, meta={"layout": layout}))

    def answer(self, question: str, message: bytes, max_new_tokens: int = 32) -> dict:
        from kvcomm.sharing.prompts import receiver_ids
        from kvcomm.sharing.send_receive import generate

        msg = decode(message, receiver=fingerprint(self.lm.model, self.lm.tokenizer))
        layout = msg.meta.get("layout", DEFAULT_LAYOUT)
        gen = generate(self.lm, receiver_ids(self.lm.tokenizer, question, layout=layout), msg, max_new_tokens=max_new_tokens)
        return {"text": gen.text, "token_ids": gen.token_ids, "ttft_s": gen.ttft_s, "bytes": len(message)}


def share(model: str, context: str, question: str, layers: list[int], max_new_tokens: int = 32,
          receiver_model: str | None = None, address: str | None = None, layout: str = DEFAULT_LAYOUT,
          **actor_options) -> dict:
    """Sender and receiver as two actors; the KV message goes through the object store, never the driver."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    cls = ray.remote(ShareActor).options(num_cpus=actor_options.get("num_cpus", 0), num_gpus=actor_options.get("num_gpus", 0))
    sender, receiver = cls.remote(model), cls.remote(receiver_model or model)
    try:
        message_ref = sender.send.remote(context, layers, layout)
        return ray.get(receiver.answer.remote(question, message_ref, max_new_tokens))
    finally:
        ray.kill(sender)
        ray.kill(receiver)
