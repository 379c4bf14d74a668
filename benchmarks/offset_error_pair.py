"""Which reused placeholder's value offsets help? Agent 1's prompt, with the question and agent 0's reply both reused.

Usage: python benchmarks/offset_error_pair.py [--model qwen2.5-coder-0.5b] [--anchors 6] [--questions 20]
       [--reply-tokens 128] [--max-new-tokens 32] [--out F.json]

`benchmarks/offset_error.py` measures agent 0's prompt, whose one placeholder is the stand-alone question. In the
gsm runs the first reply to leave dense's is most often agent 1's, which reuses two placeholders of different kinds:
the question (base KV encoded after the chat head) and agent 0's reply (agent 0's own in-context KV of it). This probe
separates them. The 3-agent gsm runner's first `--anchors` items are recorded as anchors (dense prefills of agents 0
and 1); for each later item, agent 0 replies (dense, up to `--reply-tokens`, the reply's KV kept as reuse hands it
on), agent 1's prompt is prefilled densely (the reference) and assembled by the engine from the pool's matches
(every match accepted) with:
  estimated         the anchors' offsets, as reuse does
  keys-only         no value offsets on either placeholder (`+keysonly`)
  keys-only:q       no value offsets on the question only
  keys-only:reply   no value offsets on agent 0's reply only
  zero:q            no offsets on the question (re-rotated base KV as is; its segment keeps the estimate)
  oracle:q          the question's and its segment's true offsets, the reply's estimated (what a perfect
                    question would give); oracle:reply the other way round
  relay             the question's base KV as is (no offsets), everything after it prefilled over it: with
                    `--question-base context`, agent 1 reading agent 0's prompt KV past the role line
  oracle            the true offsets (equals dense: a check of the assembly)
`--variants` picks some. `--question-base head` (the engine's default) encodes the question's base KV after the chat
head; `context` takes agent 0's own in-context KV of it (after agent 0's whole first segment), as replies' bases are
taken, anchors recorded the same way.
For each: relative L2 value error against dense per placeholder (layers 1+), the first token and the greedy reply
(`--max-new-tokens`) against dense's.
"""

from __future__ import annotations

import argparse
import json
import uuid
from dataclasses import replace
from pathlib import Path

import torch

from kvcomm.agents.runner import MultiAgentRunner
from kvcomm.agents.workloads import load_workload
from kvcomm.core.generation import greedy_continue
from kvcomm.core.kv import KVBlock, cache_to_block, move, prefill
from kvcomm.core.models import load_model
from kvcomm.core.quant import relative_error
from kvcomm.reuse.anchors import AnchorPool
from kvcomm.reuse.config import ReuseConfig
from kvcomm.reuse.engine import Content, ReuseEngine

NAMES = ("user_question", "agent_0_current")
Q, R = NAMES
# variant -> {placeholder: what its offsets become}: "keys" drops the value offsets, "zero" every offset of the
# placeholder (its segment keeps the estimate), "oracle" the true offsets of the placeholder and its segment
VARIANTS = {"estimated": {}, "keys-only": {Q: "keys", R: "keys"}, "keys-only:q": {Q: "keys"}, "keys-only:reply": {R: "keys"},
            "zero:q": {Q: "zero"}, "oracle:q": {Q: "oracle"}, "oracle:reply": {R: "oracle"}, "oracle": {Q: "oracle", R: "oracle"},
            "relay": {Q: "zero"}}


def _variant(how: str | None, m, oracle):
    """The match `m` with its placeholder offsets changed as `VARIANTS` says."""
    off = m.placeholder_offset
    if how == "keys":
        return replace(m, placeholder_offset=KVBlock(off.k, torch.zeros_like(off.v)))
    if how == "zero":
        return replace(m, placeholder_offset=KVBlock(torch.zeros_like(off.k), torch.zeros_like(off.v)))
    return oracle if how == "oracle" else m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--anchors", type=int, default=6)
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--reply-tokens", type=int, default=128, help="agent 0's reply budget (anchors and new items)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="agent 1's greedy reply compared with dense's")
    ap.add_argument("--tau", type=float, default=0.003)
    ap.add_argument("--device", default=None)
    ap.add_argument("--variants", default="estimated,keys-only,keys-only:q,keys-only:reply,oracle",
                    help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--question-base", choices=("head", "context"), default="head")
    ap.add_argument("--out", help="also write the JSON summary here")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    lm = load_model(args.model, device=args.device)
    wl = load_workload("gsm", args.anchors + args.questions)
    pool = AnchorPool(gamma=1e9, tau=args.tau)  # no entropy gate: every placeholder is matched
    speaker = ReuseEngine(lm, "reuse", pool=pool, config=ReuseConfig(max_new_tokens=args.reply_tokens), force_new_anchors=True)
    listener = ReuseEngine(lm, "reuse", pool=pool, config=ReuseConfig(max_new_tokens=1), force_new_anchors=True)
    runner = MultiAgentRunner(speaker, wl, 3)
    agent0, agent1 = runner.templates[(0, 0)], runner.templates[(0, 1)]
    tok = lm.tokenizer

    def agent0_reply(question: list[int], request: str) -> Content:
        return speaker.call(agent0, {"user_question": Content(question)}, request).reply

    def question(q: list[int]) -> Content:
        if args.question_base == "head":
            return Content(q)
        ids, spans = agent0.layout({Q: q})
        _, cache, _ = prefill(lm, ids)
        _, a, b = spans[1]
        return Content(q, move(lm, cache_to_block(cache, a, b), -a))

    for it in wl.items[: args.anchors]:  # agent 0's and agent 1's prompts recorded as anchors
        req, q = uuid.uuid4().hex, tok(it.question, add_special_tokens=False)["input_ids"]
        listener.call(agent1, {Q: question(q), R: agent0_reply(q, req)}, req)
        pool.commit(req)

    tkv = listener.template_kv(agent1)
    stats = {v: {"first_token": 0, "reply": 0, **{f"value_err:{n}": [] for n in NAMES}} for v in variants}
    used = 0
    for it in wl.items[args.anchors :]:
        req, q = uuid.uuid4().hex, tok(it.question, add_special_tokens=False)["input_ids"]
        reply = agent0_reply(q, req)
        pool.discard(req)  # the pool stays as the anchors left it
        contents = {Q: question(q), R: reply}
        ids, spans = agent1.layout({k: c.ids for k, c in contents.items()})
        logits, cache, _ = prefill(lm, ids)
        true = cache_to_block(cache, 0, len(ids))
        dense_reply = greedy_continue(lm, cache, logits[0, -1], len(ids), args.max_new_tokens, listener.stops, feed_last=True)
        bases = {n: listener.base_kv(contents[n])[0] for n in NAMES}
        found = pool.match_many([(n, agent1.pool_key, bases[n]) for n in NAMES])
        if any(m is None for m in found):  # no anchor long enough: reuse would recompute it
            continue
        used += 1
        matches = dict(zip(NAMES, found))
        where = {n: (spans[2 * i + 1][1:], spans[2 * i + 2][1:]) for i, n in enumerate(NAMES)}
        oracle = {n: replace(matches[n], placeholder_offset=move(lm, true.slice(*p), -p[0]) - bases[n],
                             segment_offset=move(lm, true.slice(*s), -s[0]) - tkv.segments[i])
                  for i, (n, (p, s)) in enumerate(where.items())}
        for name in stats:
            ms = {n: _variant(VARIANTS[name].get(n), m, oracle[n]) for n, m in matches.items()}
            full, _ = listener._assemble(agent1, tkv, spans, bases, ms)
            t = where[Q][0][1] if name == "relay" else len(ids) - 1
            lg, c2, _ = prefill(lm, ids[t:], full.slice(0, t))
            full = cache_to_block(c2, 0, len(ids))
            out = greedy_continue(lm, c2, lg[0, -1], len(ids), args.max_new_tokens, listener.stops, feed_last=True)
            s = stats[name]
            s["first_token"] += int(lg[0, -1].argmax() == logits[0, -1].argmax())
            s["reply"] += int(out == dense_reply)
            for n, (p, _) in where.items():
                s[f"value_err:{n}"].append(relative_error(true.v[1:, :, p[0] : p[1]], full.v[1:, :, p[0] : p[1]]))  # layers 1+
        print(f"item {it.id}: " + "  ".join(f"{k} {v['reply']}" for k, v in stats.items()), flush=True)
    out = {"args": vars(args), "items": used}
    for name, s in stats.items():
        out[name] = {"first_token_equal": s["first_token"] / max(1, used), "reply_equal": s["reply"] / max(1, used),
                     **{k: sum(v) / max(1, len(v)) for k, v in s.items() if k.startswith("value_err")}}
        print(f"{name:16s} value err question {out[name]['value_err:user_question']:.3f}  reply "
              f"{out[name]['value_err:agent_0_current']:.3f}  first token = dense {s['first_token']}/{used}  "
              f"reply = dense {s['reply']}/{used}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
