"""Multi-agent runner: N agents, a topology, R rounds and a final decision agent, in one mode.

Topologies (who sees whose reply):
  fully_connected  agent k sees the current-round replies of agents 0..k-1 and, from round 2 on, the
                   previous-round replies of agents k..N-1 (as `agent_<j>_history_1`);
  chain            agent k sees agent k-1 (current round) only;
  star             agent 0 is the hub and sees the previous round of every spoke; spokes see the hub.
The decision agent sees the question and every agent's last reply. Every agent call goes through the
`ReuseEngine` of the chosen mode; one request = one workload item, and the anchor pool commits a
request's updates when the item finishes.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, fields

from kvcomm.agents.workloads import Item, Workload
from kvcomm.core.models import LoadedModel
from kvcomm.reuse.anchors import PoolConfig
from kvcomm.reuse.config import DECISION_AGENT, ReuseConfig, parse_setting
from kvcomm.reuse.engine import CallResult, Content, Engine, ReuseEngine
from kvcomm.reuse.templates import AgentTemplate

TOPOLOGIES = ("fully_connected", "chain", "star")


def visible(topology: str, k: int, n: int, round_idx: int) -> list[tuple[int, str]]:
    """[(agent j, 'current' | 'history_1')] that agent k reads in round `round_idx` (0-based)."""
    if topology == "fully_connected":
        seen = [(j, "current") for j in range(k)]
        if round_idx > 0:
            seen += [(j, "history_1") for j in range(k, n)]
        return seen
    if topology == "chain":
        return [(k - 1, "current")] if k > 0 else ([(n - 1, "history_1")] if round_idx > 0 else [])
    if topology == "star":
        if k == 0:
            return [(j, "history_1") for j in range(1, n)] if round_idx > 0 else []
        return [(0, "current")]
    raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")


def agent_body(seen: list[tuple[int, str]], instruction: str) -> str:
    lines = ["Question: {user_question}"]
    for j, when in seen:
        label = "said" if when == "current" else "said earlier"
        lines.append(f"Agent {j} {label}: {{agent_{j}_{when}}}")
    lines.append(instruction)
    return "\n".join(lines)


@dataclass
class ItemResult:
    id: str
    final: str
    correct: bool
    calls: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    answer: str = ""  # `Workload.answer_of` the final reply: what agreement between two runs compares


class MultiAgentRunner:
    def __init__(self, engine: Engine, workload: Workload, n_agents: int = 5, topology: str = "fully_connected",
                 rounds: int = 1, decision: bool = True):
        if not 1 <= n_agents <= 16:
            raise ValueError("n_agents must be between 1 and 16")
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")
        self.engine, self.workload = engine, workload
        self.n, self.topology, self.rounds, self.decision = n_agents, topology, rounds, decision
        tok = engine.tokenizer
        self.templates: dict[tuple[int, int], AgentTemplate] = {}
        for r in range(rounds):
            for k in range(n_agents):
                role = workload.role(f"{workload.roles[k % len(workload.roles)]} You are agent {k}.")
                body = agent_body(visible(topology, k, n_agents, r), workload.instruction)
                self.templates[(r, k)] = AgentTemplate.build(tok, f"agent{k}", role, body)
        final_seen = [(j, "current") for j in range(n_agents)]
        self.decider = AgentTemplate.build(tok, DECISION_AGENT, workload.role(workload.decision_role),
                                           agent_body(final_seen, workload.instruction))

    def run_item(self, item: Item, request=None, commit: bool = True) -> ItemResult:
        """One request: every agent call, then the decision agent. Its anchor-pool updates are staged and
        committed when it finishes (`commit=False` leaves that to the caller, as `run_batch` does)."""
        tok = self.engine.tokenizer
        start = time.perf_counter()
        question = Content(tok(item.question, add_special_tokens=False)["input_ids"])
        latest: dict[int, Content] = {}
        previous: dict[int, Content] = {}
        calls: list[CallResult] = []
        request = uuid.uuid4().hex if request is None else request  # a string: it may cross to a Ray pool actor
        try:
            for r in range(self.rounds):
                for k in range(self.n):
                    agent = self.templates[(r, k)]
                    contents = {"user_question": question}
                    for j, when in visible(self.topology, k, self.n, r):
                        contents[f"agent_{j}_{when}"] = latest[j] if when == "current" else previous[j]
                    res = self.engine.call(agent, contents, request)
                    calls.append(res)
                    latest[k] = res.reply if res.reply_ids else Content(tok(" ", add_special_tokens=False)["input_ids"])
                previous = dict(latest)
            final_text = ""
            if self.decision:
                contents = {"user_question": question, **{f"agent_{j}_current": latest[j] for j in range(self.n)}}
                res = self.engine.call(self.decider, contents, request)
                calls.append(res)
                final_text = tok.decode(res.reply_ids, skip_special_tokens=True).strip()
            else:
                final_text = tok.decode(latest[self.n - 1].ids, skip_special_tokens=True).strip()
            if commit:
                self.engine.pool.commit(request)
        except BaseException:
            self.engine.pool.discard(request)
            raise
        correct = self.workload.grade(item, final_text)
        return ItemResult(item.id, final_text, correct, [_call_record(c, tok) for c in calls], time.perf_counter() - start,
                          self.workload.answer_of(item, final_text, correct))

    def run_batch(self, items: list[Item], workers: int = 8) -> list[ItemResult]:
        """Run `items` as concurrent requests on `workers` threads against one shared pool.

        All requests of a batch match against the pool as it was when the batch started; their
        updates are committed in item order once every request has finished. So the outputs do not
        depend on thread timing: `workers=8` gives exactly what `workers=1` gives (a tested property).
        If any request fails, the whole batch's updates are dropped and the first error is raised.
        """
        from concurrent.futures import ThreadPoolExecutor

        requests = [uuid.uuid4().hex for _ in items]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = [pool.submit(self.run_item, it, req, False) for it, req in zip(items, requests)]
            errors = [f.exception() for f in futures]
        if any(errors):
            for req in requests:
                self.engine.pool.discard(req)
            raise next(e for e in errors if e)
        for req in requests:
            self.engine.pool.commit(req)
        return [f.result() for f in futures]


def _call_record(c: CallResult, tok) -> dict:
    d = {f.name: getattr(c, f.name) for f in fields(c) if f.name != "reply"}  # the reply's KV stays out
    d["reply_text"] = tok.decode(c.reply_ids, skip_special_tokens=True)
    d["ttft_ms"] = round(d.pop("ttft_s") * 1e3, 3)
    d["total_ms"] = round(d.pop("total_s") * 1e3, 3)
    return d


REUSED = ("reuse", "relay")  # call paths that reuse KV without a prefill of it


def path_share(calls: list[dict], paths: tuple[str, ...] = REUSED) -> float:
    """Share of the call records that took one of `paths`."""
    return sum(c["path"] in paths for c in calls) / max(1, len(calls))


def reuse_rate(results: list[ItemResult], skip_items: int = 0) -> float:
    return path_share([c for r in results[skip_items:] for c in r.calls])


def make_engine(lm: LoadedModel | None, setting: str, config: ReuseConfig = ReuseConfig(), pool: PoolConfig = PoolConfig(),
                model: str | None = None, cluster=None) -> Engine:
    """A local `ReuseEngine` over `lm` with its own anchor pool, or, given a `RayConfig` as `cluster`, a
    `RayEngine` whose actors each load `model` (then `lm` may be None). `setting` is a mode or a mode
    with options (`parse_setting`: dense, prefix, reuse, blend@0.15, cacheblend@0.15, ...)."""
    mode, config = parse_setting(setting, config)
    if cluster is not None:
        from kvcomm.agents.remote import RayEngine

        return RayEngine(model, mode, config, pool, cluster)
    return ReuseEngine(lm, mode, pool=pool.build(), config=config)
