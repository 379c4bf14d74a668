"""Cross-context KV reuse (KVCOMM, Ye et al. 2025): one agent call in one of four modes.

  dense   prefill the whole prompt (the reference).
  prefix  plain prefix caching: reuse the KV of the longest exact token prefix this agent has
          already encoded (its fixed template head, and more when prompts repeat); prefill the rest.
  reuse   KVCOMM: assemble the prompt's KV without a prefill. The agent's fixed first segment p0 is
          exact (cached once per template). Each placeholder's content comes as its *base KV*
          (encoded without any agent's context, or for another agent's reply that agent's own KV of
          it), moved to position 0; each later segment p_i comes as its template-only KV. Anchor-estimated offsets
          are added (never in layer 0, whose KV depends only on token and position), keys are
          re-rotated to their real positions, and the last prompt token is run through the model to
          give the first logits. If any placeholder is not shareable, the call falls back to a dense
          prefill and records that placeholder as a new anchor (deltas staged until the request ends).
          Options beyond the paper: `sink_head` (how stand-alone contents are encoded, see `base_kv`),
          `refresh_tail` (prefill the last template segment, see `_tail_start`), `recompute` (also
          recompute a fraction of the reused tokens, `kvcomm.reuse.blend`), `offsets=False`
          (no anchors or offsets at all: re-rotated base KV plus recompute, the CacheBlend way),
          `defer_base`, `partial` and `value_offsets` (see ReuseConfig).
  relay   beyond both papers: p0 exact, then the KV the previous agent computed for the conversation
          both prompts share (the question and the replies before the newest, read from the replies'
          `Transcript`s), keys moved to this prompt's positions, no offsets; the rest (the newest reply
          and the closing segment) is prefilled over it. With `recompute` > 0 (`relay@R`), a fraction R
          of the relayed tokens is recomputed too (`kvcomm.reuse.blend`). See `kvcomm.reuse.relay`.

Settings name a mode and its options in one string (`parse_setting`): dense, prefix, relay, reuse (the
paper), blend@R[:select] (offsets + recompute of a fraction R), cacheblend@R[:select] (recompute
without offsets), relay@R[:select] (relay + recompute of a fraction R); a trailing `+defer` on reuse,
blend or cacheblend sets `defer_base`, `+partial` on reuse or blend sets `partial`, `+keysonly` on reuse
or blend clears `value_offsets` (in any order), `+replies` on relay@R sets `spare_question`, `+newest` on relay
sets `relay_newest`, `+decision` on relay@R sets `recompute_only` to the decision agent, `+capB` on relay@R
`prefill_cap`.

Timing: TTFT is measured from the start of the call to the first token's logits, including base-KV
prefills, anchor matching and cache assembly. Template KV is precomputed when an agent template is
first seen (outside the timed region), as the paper does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch.profiler import record_function

from kvcomm.core.generation import greedy_continue, stop_ids, sync
from kvcomm.core.kv import KVBlock, cache_to_block, move, prefill
from kvcomm.core.models import LoadedModel
from kvcomm.reuse.anchors import AgentDelta, AnchorPool, KVPool, content_key, pack, unpacked
from kvcomm.reuse.assembly import assemble
from kvcomm.reuse.blend import cap_room, choose, recompute, spans_without, without_question
from kvcomm.reuse.config import MODES, ReuseConfig
from kvcomm.reuse.relay import Transcript, common_prefix, relay_past, with_newest_reply
from kvcomm.reuse.templates import AgentTemplate, shared_head_ids


@dataclass
class Content:
    """A placeholder's content: token ids and, when its producer has it, its base KV.

    `remote` is where the base KV lives when it is not in this process (the Ray backend keeps an
    object reference to message bytes there); the local engine ignores it."""

    ids: list[int]
    base: KVBlock | None = None
    remote: object | None = None
    transcript: Transcript | None = None  # a reply's producer's conversation KV, for `relay` (kvcomm.reuse.relay)


@dataclass
class CallResult:
    agent: str
    path: str  # dense | prefix | reuse | partial (some placeholders reused, the others recomputed) | relay
    reply_ids: list[int]
    reply: Content  # ids + base KV of the reply, to hand to later agents
    ttft_s: float
    total_s: float
    prompt_tokens: int
    prefilled_tokens: int
    matched: dict[str, float] = field(default_factory=dict)  # placeholder -> entropy, when reused
    wire_bytes: int = 0  # KV message bytes the call's process received and sent (Ray backend; 0 in one process)
    distances: dict[str, float] = field(default_factory=dict)  # placeholder -> nearest anchor's d (PoolConfig.max_distance)


def _run(lm: LoadedModel, ids: list[int], past: KVBlock | None = None):
    """`prefill` of `ids` after `past`, returning (last position's logits, cache)."""
    logits, cache, _ = prefill(lm, ids, past)
    return logits[0, -1], cache


class Engine(Protocol):
    """What the multi-agent runner drives: a local `ReuseEngine` or the Ray backend's `RayEngine`."""

    mode: str
    tokenizer: object
    pool: KVPool

    def call(self, agent: AgentTemplate, contents: dict[str, Content], request=None) -> CallResult: ...


@dataclass
class TemplateKV:
    p0: KVBlock  # exact KV of the first segment at positions 0..
    segments: list[KVBlock]  # template-only KV of p_1.. in the origin frame


class ReuseEngine:
    """Runs agent calls for one model in one mode; holds the template caches and the anchor pool."""

    def __init__(self, lm: LoadedModel, mode: str = "reuse", pool: KVPool | None = None,
                 config: ReuseConfig = ReuseConfig(), force_new_anchors: bool = False):
        """`force_new_anchors` records every call as a new anchor (tests and benchmarks fill pools with it)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "relay" and config.recompute > 0 and config.select == "offset":
            raise ValueError("relay adds no offsets to rank tokens by: select first, deviation or attention")
        if mode == "reuse" and config.recompute > 0 and config.select == "attention":
            raise ValueError("the attention picker is relay's (relay@R:attention): select deviation, offset or first")
        if mode != "relay" and (config.spare_question or config.relay_newest or config.recompute_only
                                or config.prefill_cap is not None):
            raise ValueError("spare_question (+replies), relay_newest (+newest), recompute_only (+decision) and "
                             "prefill_cap (+cap) are relay's options")
        if config.relay_newest and config.recompute > 0 and config.select == "attention":
            raise ValueError("relay+newest with the attention picker: its first pass would run over the newest reply's "
                             "header before it is computed; select first or deviation")
        self.lm = lm
        self.mode = mode
        self.pool = pool if pool is not None else AnchorPool()
        self.config = config
        self.force_new_anchors = force_new_anchors
        self.head = shared_head_ids(lm.tokenizer) if config.sink_head and lm.tokenizer is not None else []
        self.stops = set(stop_ids(lm))
        self._templates: dict[tuple, TemplateKV] = {}
        self._prefix_store: dict[str, list[tuple[list[int], KVBlock]]] = {}

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    # ---- template and base KV ------------------------------------------------------------------
    def template_kv(self, agent: AgentTemplate) -> TemplateKV:
        tkv = self._templates.get(agent.key)
        if tkv is None:
            ids, bounds = [], []
            for seg in agent.segment_ids:
                bounds.append((len(ids), len(ids) + len(seg)))
                ids.extend(seg)
            _, cache = _run(self.lm, ids)
            full = cache_to_block(cache)
            segs = [move(self.lm, full.slice(a, b), -a) for a, b in bounds[1:]]
            tkv = TemplateKV(full.slice(*bounds[0]), segs)
            self._templates[agent.key] = tkv
        return tkv

    def base_kv(self, content: Content) -> tuple[KVBlock, int]:
        """Content's base KV in the origin frame, and the tokens prefilled to get it.

        A content no agent has encoded yet (the user question, a tool result) is encoded after the
        chat template's agent-independent opening tokens (`shared_head_ids`), which are then dropped
        and the keys moved back to position 0. The paper encodes it alone; then its first token
        becomes the attention sink and every token's KV drifts far from its in-prompt value. On
        SmolLM2-135M (math workload, agent 0's question, 3 anchors, 14 new questions) the head cut
        the relative L2 error of the offset-corrected KV against the dense one from 0.14 to 0.09
        (keys) and 0.37 to 0.22 (values), layers 1+. `sink_head=False` gives the paper's choice."""
        if content.base is not None:
            return content.base, 0
        head = self.head
        _, cache = _run(self.lm, head + content.ids)
        block = cache_to_block(cache, len(head))
        content.base = self.handoff(move(self.lm, block, -len(head)) if head else block)
        return content.base, len(head) + len(content.ids)

    def handoff(self, block: KVBlock) -> KVBlock:
        """`block` as another agent receives it at `config.kv_precision` (see ReuseConfig)."""
        p = self.config.kv_precision
        if p is None:
            return block
        return unpacked(pack(block, p)).to_dtype(block.k.dtype)

    # ---- one call -------------------------------------------------------------------------------
    @torch.no_grad()
    def call(self, agent: AgentTemplate, contents: dict[str, Content], request=None) -> CallResult:
        lm = self.lm
        tkv = self.template_kv(agent) if self.mode in ("reuse", "relay") else None
        ids, spans = agent.layout({k: c.ids for k, c in contents.items()})
        sync(lm.device)
        start = time.perf_counter()
        used: dict = {}  # placeholder -> Match, for the placeholders whose offsets were used
        deferred = [n for n in agent.names if contents[n].base is None] if self.mode == "reuse" and self.config.defer_base else []
        if deferred:  # prefix caching over the template's exact first segment; bases encoded after the reply
            logits, cache = _run(lm, ids[tkv.p0.n :], tkv.p0)
            path, prefilled = "prefix", len(ids) - tkv.p0.n
        elif self.mode == "dense":
            logits, cache = _run(lm, ids)
            path, prefilled = "dense", len(ids)
        elif self.mode == "prefix":
            logits, cache, prefilled = self._prefix_call(agent, ids)
            path = "prefix"
        elif self.mode == "relay":
            logits, cache, path, prefilled = self._relay_call(agent, tkv, ids, spans, contents)
        else:
            logits, cache, path, prefilled, used = self._reuse_call(agent, tkv, ids, spans, contents, request)
        sync(lm.device)
        ttft = time.perf_counter() - start
        if self.mode == "prefix":  # bookkeeping a paged prefix cache gets for free: not part of TTFT
            self._remember_prefix(agent, ids, cache)
        reply_ids = greedy_continue(lm, cache, logits, len(ids), self.config.max_new_tokens, self.stops, feed_last=True)
        for name in deferred:  # for the agents after this one; inside total_s, not TTFT
            prefilled += self.base_kv(contents[name])[1]
        sync(lm.device)
        total = time.perf_counter() - start
        end = len(ids) + len(reply_ids)
        reply = Content(list(reply_ids))
        if self.mode == "relay":  # later agents read the producer's conversation, not the reply's base KV
            m = tkv.p0.n
            reply.transcript = Transcript(ids[m:] + list(reply_ids), self.handoff(cache_to_block(cache, m, end)), m)
        elif reply_ids:
            reply.base = self.handoff(move(lm, cache_to_block(cache, len(ids), end), -len(ids)))
        return CallResult(agent.agent_id, path, reply_ids, reply, ttft, total,
                          len(ids), prefilled, {k: m.entropy for k, m in used.items()},
                          distances={k: m.distance for k, m in used.items() if m.distance is not None})

    def _relay_call(self, agent: AgentTemplate, tkv: TemplateKV, ids, spans, contents):
        """Relay (`kvcomm.reuse.relay`), then recompute of `config.recompute` of the relayed tokens:
        the picked ones and the rest of the prompt run in one forward over the relayed KV. With the
        `attention` picker the rest runs first, its closing segment's attention picks, and the picks and
        the last prompt token run again over the result (`blend.attention_pick`)."""
        lm, cfg = self.lm, self.config
        transcripts = [c.transcript for c in contents.values() if c.transcript]
        with record_function("kvcomm.relay.past"):
            past, covered = relay_past(lm, tkv.p0, ids[tkv.p0.n :], transcripts)
        header: list[int] = []  # +newest: the positions between the relayed prefix and the relayed newest reply
        if covered and cfg.relay_newest:
            past, header = with_newest_reply(lm, ids, spans, past, transcripts)
        picked, extra, over = [], 0.0, past
        steered = cfg.recompute_only is None or agent.agent_id == cfg.recompute_only  # +decision: its calls only
        if covered and cfg.recompute > 0 and steered:  # +replies: the question's span left out; +newest: the header
            pickable = without_question(spans) if cfg.spare_question else spans
            limit = None if cfg.prefill_cap is None else \
                cap_room(cfg.prefill_cap, len(ids), len(ids) - past.n + len(header))  # +cap: what relay left
            with record_function("kvcomm.relay.choose"):  # the picker (attention: its own forward over the rest)
                picked, extra, over = choose(lm, cfg.select, cfg.recompute, ids, spans_without(pickable, header), past,
                                             None, limit)
        picked = sorted(set(picked) | set(header))
        with record_function("kvcomm.relay.forward"):
            logits, cache = recompute(lm, ids, over, picked)
        return logits, cache, "relay" if covered else "prefix", len(ids) - past.n + len(picked) + round(extra)

    def _prefix_call(self, agent: AgentTemplate, ids: list[int]):
        store = self._prefix_store.setdefault(agent.agent_id, [])
        best, best_block = 0, None
        for prev_ids, block in store:
            n = common_prefix(prev_ids, ids, len(ids) - 1)  # the last token must run to produce logits
            if n > best:
                best, best_block = n, block.slice(0, n)
        logits, cache = _run(self.lm, ids[best:], best_block)
        return logits, cache, len(ids) - best

    def _remember_prefix(self, agent: AgentTemplate, ids: list[int], cache) -> None:
        store = self._prefix_store.setdefault(agent.agent_id, [])
        store.insert(0, (ids, cache_to_block(cache, 0, len(ids))))
        del store[self.config.prefix_slots :]

    def _reuse_call(self, agent, tkv: TemplateKV, ids, spans, contents, request):
        lm, cfg = self.lm, self.config
        agent_key = agent.pool_key
        prefilled = 0
        bases: dict[str, KVBlock] = {}
        matches = {}
        for name in agent.names:
            bases[name], n = self.base_kv(contents[name])
            prefilled += n
        if cfg.offsets:
            with record_function("kvcomm.reuse.match"):
                found = ([None] * len(agent.names) if self.force_new_anchors else
                         self.pool.match_many([(name, agent_key, bases[name]) for name in agent.names]))
            matches = dict(zip(agent.names, found))
        failed = [name for name, m in matches.items() if m is None]
        if failed and not cfg.partial:
            logits, cache = _run(lm, ids)
            self._record(agent, tkv, cache, spans, contents, bases, matches, agent_key, request)
            return logits, cache, "dense", prefilled + len(ids), {}
        if failed and len(failed) == len(agent.names):  # partial, nothing to reuse: all after p0 is recomputed,
            logits, cache = _run(lm, ids[tkv.p0.n :], tkv.p0)  # which a plain prefill over p0 does fastest
            self._record(agent, tkv, cache, spans, contents, bases, matches, agent_key, request)
            return logits, cache, "partial", prefilled + len(ids) - tkv.p0.n, {}
        with record_function("kvcomm.reuse.assemble"):
            full, offsets = self._assemble(agent, tkv, spans, bases, matches)
        t = self._tail_start(spans, len(ids))
        used = {k: m for k, m in matches.items() if m is not None}
        if cfg.recompute > 0 or failed:
            forced = _failed_positions(agent, spans, failed, t)
            picked, extra, over = [], 0.0, full.slice(0, t)
            if cfg.recompute > 0:
                value_offsets = torch.cat(offsets, 2)[:, :, :t] if offsets else None
                picked, extra, over = choose(lm, cfg.select, cfg.recompute, ids, spans, over, value_offsets)
            picked = sorted(set(picked) | set(forced))
            logits, cache = recompute(lm, ids, over, picked)
            if failed:
                self._record(agent, tkv, cache, spans, contents, bases, matches, agent_key, request)
            return (logits, cache, "partial" if failed else "reuse", prefilled + len(ids) - t + len(picked) + round(extra),
                    used)
        with record_function("kvcomm.reuse.forward"):
            logits, cache = _run(lm, ids[t:], full.slice(0, t))
        return logits, cache, "reuse", prefilled + len(ids) - t, used

    def _assemble(self, agent, tkv: TemplateKV, spans, bases, matches) -> tuple[KVBlock, list[torch.Tensor]]:
        """The prompt's KV from template KV, bases and matched offsets, and (for offset-ranked recompute
        only) the value offsets per span."""
        cfg = self.config
        by_offset = cfg.recompute > 0 and cfg.select == "offset"  # the only user of the value offsets
        pieces, piece_offsets, offsets = [], [], ([torch.zeros_like(tkv.p0.v)] if by_offset else [])
        for kind, _, _ in spans[1:]:
            if kind.startswith("p"):
                i = int(kind[1:])
                base, m = tkv.segments[i - 1], matches.get(agent.names[i - 1])
                offset = m.segment_offset if m is not None else None
            else:
                base, m = bases[kind], matches.get(kind)
                offset = m.placeholder_offset if m is not None else None
                if offset is not None and not cfg.value_offsets:  # `+keysonly`: the placeholder's key offsets only
                    offset = KVBlock(offset.k[:, :, : base.n], torch.zeros_like(base.v))
            pieces.append(base)
            piece_offsets.append(offset)
            if by_offset:
                offsets.append(offset.v[:, :, : base.n] if offset is not None else torch.zeros_like(base.v))
        return assemble(self.lm, tkv.p0, spans, pieces, piece_offsets), offsets

    def _tail_start(self, spans, n: int) -> int:
        """First prompt token that is run through the model on the reuse path.

        Always the last token (it must run to give the first logits). With `refresh_tail`, the whole
        last template segment (on the math agents: "Give only the final number." and the assistant
        header, 13 tokens) is prefilled over the assembled KV instead of taking template KV + estimated offset:
        those tokens sit right before the reply, so their hidden states see the reused contents
        through real attention, for a few tokens of prefill. Not in the paper."""
        kind, a, _ = spans[-1]
        if self.config.refresh_tail and kind.startswith("p"):
            return min(a, n - 1)
        return n - 1

    def _record(self, agent, tkv, cache, spans, contents, bases, matches, agent_key, request) -> None:
        """Stage Δφ and Δp (origin frame) for each placeholder that was not shareable."""
        real = cache_to_block(cache, 0, spans[-1][2])
        for i, name in enumerate(agent.names):
            if matches[name] is not None:
                continue
            _, a, b = spans[2 * i + 1]
            _, sa, sb = spans[2 * i + 2]
            dphi = move(self.lm, real.slice(a, b), -a) - bases[name]
            dseg = move(self.lm, real.slice(sa, sb), -sa) - tkv.segments[i]
            self.pool.stage(request, name, content_key(contents[name].ids), bases[name], agent_key,
                            AgentDelta(_zero_layer0(dphi), _zero_layer0(dseg)))


def _failed_positions(agent: AgentTemplate, spans, failed: list[str], tail: int) -> list[int]:
    """Prompt positions `partial` recomputes for the placeholders in `failed`: each one's tokens and
    the template segment after it (whose offset would come from the same, missing, anchor), before the tail."""
    out: list[int] = []
    for i, name in enumerate(agent.names):
        if name in failed:
            for _, a, b in (spans[2 * i + 1], spans[2 * i + 2]):
                out.extend(range(a, min(b, tail)))
    return out


def _zero_layer0(block: KVBlock) -> KVBlock:
    k, v = block.k.clone(), block.v.clone()
    k[0].zero_()
    v[0].zero_()
    return KVBlock(k, v)
