"""Relay: an agent reuses the KV the agent before it computed for the conversation they share.

Beyond both papers. In the multi-agent prompts kvcomm runs, every agent's prompt is its own first
segment p0 (system text and role line, exact from the template cache), then the conversation: the
question and the replies so far, in the same order for every agent. The agent before this one has
already encoded most of that conversation, in its own prompt, after its own p0. Relay takes that KV
for the longest run of tokens the two prompts share past their p0s, moves its keys to this prompt's
positions, and prefills only the rest (the newest reply and the closing instruction) over it. So the
reused tokens keep the context they were computed in, down to the question and the replies before
them; the only thing that differs is the role line they were computed after.

Why: KVCOMM's base KV is a content encoded in another context (alone, or after another prefix), and
its anchors estimate the offsets to this context from other items' contents; on Qwen2.5-Coder-0.5B
that leaves a relative value error of 0.29 on the question and 0.22 on a reply (gsm, agent 1, float32,
`benchmarks/offset_error_pair.py`), ten times what replies need to follow dense. The question's KV
taken from agent 0's prompt has 0.018 without any offsets (and 0.022 with anchor offsets: they do not
help here, so relay uses none). The newest reply is the exception: its producer computed it after
its own closing instruction and assistant header, not after "Agent N said:", so relay prefills it
(`+newest`, `with_newest_reply`, relays it anyway and recomputes its header: measured far worse end to end).

Recompute (`relay@R`, `ReuseConfig.recompute`): the relayed tokens' error is not spread evenly. On the gsm
judge (Qwen2.5-Coder-0.5B, float32, the 11 items whose judge call left dense's, `benchmarks/relay_error.py`)
the tenth of the relayed tokens that deviate most hold 82% of the squared value error (a quarter: 93%), most
of it in the last layers, and the tokens an agent prefilled under its own role line (the "Agent j said:"
headers and the replies) deviate 35-40x more than the question's. The first tokens of every relayed segment
(EPIC's chunk-start rule, free to pick) hold 48% at a tenth; recomputing them cut the judge's value error from
0.080 to 0.060 at R = 0.1 and gave dense's whole reply on 5 of the 11 (relay: 0); CacheBlend's layer-1 deviation rule
picked badly (2 of 11 at R = 0.25: the error grows late, layer 1 does not see it); the ideal picker (the
true top 25%) gets 8 of 11. `first` is the default picker; `deviation` is there to compare. `attention` picks the
relayed tokens the closing segment reads most (`blend.attention_pick`): fewer whole replies (3 of 11) but more first
tokens (10 vs 9) and answers (8 vs 7 of 11), among them the two near-tie judges the ideal picker returns; end to end
(gsm, 3 agents, 100 items, GPU) 95% of dense's answers against 93% for `first`, at ~32 ms more per call on an 8B model.

What it needs: the runner hands replies as `Content`s that carry their producer's `Transcript`; the
agents run in one process (the Ray backend does not ship transcripts). Memory: each reply's
`Transcript` keeps its producer's conversation KV until the request ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcomm.core.kv import KVBlock, move


@dataclass
class Transcript:
    """What the agent that produced a reply saw past its first segment, and the KV it computed there.

    ids    its prompt's tokens after its p0, then the reply's tokens
    kv     their KV, keys at the positions they had in that prompt
    start  that prompt's p0 length: the position of ids[0]"""

    ids: list[int]
    kv: KVBlock
    start: int


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens `a` and `b` share, at most `limit`."""
    n = 0
    for x, y in zip(a, b):
        if n >= limit or x != y:
            break
        n += 1
    return n


def relay_past(lm, p0: KVBlock, rest: list[int], transcripts: list[Transcript]) -> tuple[KVBlock, int]:
    """The KV to prefill `rest` (the prompt after p0) over, and how many of its tokens it covers.

    Of the `transcripts` (those of this prompt's contents), the one sharing the longest run of leading
    tokens with `rest` gives that run's KV, moved from its positions to this prompt's; at least the
    last prompt token is left to run, for the first logits. No transcript in common: p0 alone."""
    best, src = 0, None
    for t in transcripts:
        n = common_prefix(rest, t.ids, len(rest) - 1)
        if n > best:
            best, src = n, t
    if src is None:
        return p0, 0
    return KVBlock.cat([p0, move(lm, src.kv.slice(0, best), p0.n - src.start)]), best


def with_newest_reply(lm, ids: list[int], spans, past: KVBlock, transcripts: list[Transcript]) -> tuple[KVBlock, list[int]]:
    """`past` extended by the newest reply's KV as its producer computed it (`relay@R+newest`), and the positions
    that must run: those between the relayed prefix and that reply (its "Agent j said:" header).

    The newest reply is the first placeholder after the relayed prefix whose content ends a transcript (its
    producer's reply); its KV is moved from the producer's positions to this prompt's. The header positions get
    zeros here: the caller recomputes them (they are picked, so their stale copy is masked). No such reply:
    (`past`, [])."""
    for name, a, b in spans:
        if a < past.n or name.startswith("p") or b == a:  # template segments are p<i>; no placeholder starts so
            continue
        for t in transcripts:
            n, m = len(t.ids), b - a
            if n >= m and t.ids[n - m :] == ids[a:b] and t.kv.n >= n:
                k, v = past.k, past.v
                gap = KVBlock(k.new_zeros(*k.shape[:2], a - past.n, k.shape[3]), v.new_zeros(*v.shape[:2], a - past.n, v.shape[3]))
                reply = move(lm, t.kv.slice(n - m, n), a - (t.start + n - m))
                return KVBlock.cat([past, gap, reply]), list(range(past.n, a))
        break  # only the first placeholder after the relayed prefix can follow it directly
    return past, []
