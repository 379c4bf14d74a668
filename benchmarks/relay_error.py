"""Where relay's remaining error sits: each agent call's KV under relay against a dense prefill, on dense's replies.

Usage: python benchmarks/relay_error.py --rows DIR/shard-0-of-1/dense.jsonl [--model qwen2.5-coder-0.5b]
       [--workload gsm] [--agents 3] [--items 20] [--only ID,..] [--calib ID,..] [--variants relay,first,shift]
       [--max-new-tokens 16] [--first 16] [--out F.json]

Reads a dense `kvcomm agents` run's rows for the agents' replies, so nothing long is generated on a CPU. Per item,
agent by agent, the relay chain is built as `--mode relay` builds it (each agent's transcript: its prompt after p0
under relay, then dense's reply prefilled over it), so every call sees dense's inputs. Each call after the first is
compared with a dense prefill of the same prompt: relative L2 value error (layers 1+) over the reused span, per
layer and over the span's first `--first` tokens against the rest; the first token and the greedy reply
(`--max-new-tokens`) against dense's. Variant `first`: the span's first `--first` tokens prefilled over p0 (exact)
before the moved rest, a candidate fix if the error sits next to the role line. Variants `first@R`, `blend@R`,
`oracle@R`, `attn@R`: relay plus recompute of a fraction R of the span (`relay@R`), picked as the first tokens of each
segment, by CacheBlend's layer-1 deviation, by the true deviation from dense (the best any picker of deviating tokens
could do), or by the attention of the closing segment (`relay@R:attention`: its last token rerun; `attnall@R`: the
whole rest of the prompt rerun; `mix@R`: half the budget `first`, half attention); any `@R` variant may end in
`+replies` (`relay@R+replies`: the question's span is neither picked nor counted in R). `newest@R` relays the
newest reply too, as its producer computed it, and recomputes its header and the first tokens of every relayed span
(`_with_newest`); it and `relay` also report their prefill against dense's of the same call. `--chain`: each
variant reads transcripts it made itself at the calls before (dense's replies run over its own prompt KV), as end to
end, instead of relay's; without it a variant's error is measured one call at a time and never passed on. Per call also: the gsm answer
(`Workload.answer_of`) of the reply against dense's (meaningful for the judge with `--full-reply`). Per agent it
also reports where the error sits (`_where`) and dense's first-token margin per item. Variant `shift` (needs `--calib`):
the reused span's values plus the mean value difference dense minus relay that the same call (agent position)
showed on the `--calib` items, per layer, head and channel: the simplest learned offset for a role change.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvcomm.agents.runner import MultiAgentRunner
from kvcomm.agents.workloads import load_workload
from kvcomm.core.generation import greedy_continue
from kvcomm.core.kv import KVBlock, cache_to_block, prefill
from kvcomm.core.models import load_model
from kvcomm.core.quant import relative_error
from kvcomm.reuse.blend import (
    attention_mass,
    budget,
    layer1_value_deviation,
    pick_first,
    pick_top,
    recompute,
    reusable_positions,
    spans_without,
    without_question,
)
from kvcomm.reuse.config import ReuseConfig
from kvcomm.reuse.engine import ReuseEngine
from kvcomm.reuse.relay import Transcript, relay_past, with_newest_reply

VARIANTS = ("relay", "first", "shift", "oracle@R", "blend@R", "first@R", "attn@R", "attnall@R", "mix@R", "newest@R")


def _with_newest(lm, ids: list[int], spans, past: KVBlock, prev: Transcript, r: float):
    """`newest@R` (`relay@R+newest`): relay, and the newest reply's KV too as its producer computed it
    (`with_newest_reply`); its header runs, with the first tokens of every relayed span (the reply's included) up to
    a fraction R of the relayed tokens, and the rest of the prompt. Returns (logits, cache, tokens prefilled)."""
    assembled, header = with_newest_reply(lm, ids, spans, past, [prev])
    relayed = reusable_positions(spans_without(spans, header), assembled.n)  # as the engine's picks see it
    picks = sorted(set(header) | set(pick_first(relayed, budget(r, relayed))))
    lg, cache = recompute(lm, ids, assembled, picks)
    return lg, cache, len(picks) + len(ids) - assembled.n


def _variant(name: str, lm, ids: list[int], spans, p0: KVBlock, past: KVBlock, first: int, shift, dense: KVBlock):
    """(last logits, cache) of the call under one variant (see the module docstring); `dense` is the
    dense prefill's KV of the reused span."""
    m = p0.n
    if name == "first":
        _, head, _ = prefill(lm, ids[m : m + first], p0)
        past = KVBlock.cat([cache_to_block(head, 0, m + first), past.slice(m + first, past.n)])
    elif name == "shift":
        v = past.v.clone()
        v[:, :, m:] += shift[0] / shift[1]
        past = KVBlock(past.k, v)
    elif "@" in name:  # recompute the top fraction R of the span, by true value deviation or CacheBlend's layer-1 rule
        kind, r = name.split("@")
        r, _, flag = r.partition("+")
        if flag == "replies":  # relay@R+replies: the question's span is neither picked nor counted in R
            spans = without_question(spans)
        reusable = reusable_positions(spans, past.n)
        if kind == "first":
            return recompute(lm, ids, past, pick_first(reusable, budget(float(r), reusable)))
        if kind.startswith("attn") or kind == "mix":  # the closing segment's attention; rerun its last token (attn,
            window = spans[-1][2] - spans[-1][1]         # mix) or all the rest (attnall); mix: half the budget `first`
            k = budget(float(r), reusable)
            mass, over = attention_mass(lm, ids, past, window, 1 if kind != "attnall" else len(ids) - past.n)
            firsts = pick_first(reusable, k // 2) if kind == "mix" else []
            mass[firsts] = -float("inf")
            picked = sorted(firsts + pick_top(mass, reusable, k - len(firsts)))
            return recompute(lm, ids, over, picked)
        if kind == "oracle":
            scores = torch.zeros(past.n)
            scores[m:] = (dense.v.float() - past.v[:, :, m:].float()).pow(2).sum(dim=(0, 1, 3)).cpu()
        else:
            scores = layer1_value_deviation(lm, ids, past)
        return recompute(lm, ids, past, pick_top(scores, reusable, budget(float(r), reusable)))
    lg, cache, _ = prefill(lm, ids[past.n :], past)
    return lg[0, -1], cache


def _measure(s: dict, it, lg, cache, n: int, dense: KVBlock, dlg, dense_reply: list[int], budget_k: int, m: int,
             covered: int, lm, wl, stops, first: int) -> None:
    """Add one call's comparison with dense to a variant's stats (its `n`-token prompt's last logits `lg` and
    cache): first token, greedy reply, answer, value errors of the relayed span [m, m + covered)."""
    got = cache_to_block(cache, m, m + covered)
    s["calls"] += 1
    s["first_token"] += int(lg.argmax() == dlg[0, -1].argmax())
    out = greedy_continue(lm, cache, lg, n, budget_k, stops)
    tok = lm.tokenizer
    s["reply"] += int(out == dense_reply)
    s["answer"] += int(wl.answer_of(it, tok.decode(out)) == wl.answer_of(it, tok.decode(dense_reply)))
    s["items"][it.id] = out == dense_reply
    s["err"].append(relative_error(dense.v[1:], got.v[1:]))
    s["err_first"].append(relative_error(dense.v[1:, :, :first], got.v[1:, :, :first]))
    s["err_rest"].append(relative_error(dense.v[1:, :, first:], got.v[1:, :, first:]))
    s["per_layer"].append([relative_error(dense.v[i], got.v[i]) for i in range(got.v.shape[0])])


def _where(dense: KVBlock, past: KVBlock, m: int, spans, origin: list[int]) -> dict:
    """Where the reused span's squared value error (layers 1+) sits: the share the most-deviating 10% / 25% of
    its tokens hold, the share the `first` picker's tokens hold at the same budget, and the mean per token by
    the agent that computed the token (0: the first agent, which encoded the question)."""
    dev = (dense.v[1:].float() - past.v[1:, :, m:].float()).pow(2).sum(dim=(0, 1, 3)).cpu()
    reusable = reusable_positions(spans, past.n)
    out = {}
    for r in (0.1, 0.25):
        k = budget(r, reusable)
        out[f"top{r}"] = float(dev.topk(k).values.sum() / dev.sum())
        out[f"first{r}"] = float(dev[[p - m for p in pick_first(reusable, k)]].sum() / dev.sum())
    out["by_origin"] = {str(o): float(dev[[i for i, x in enumerate(origin) if x == o]].mean()) for o in sorted(set(origin))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", required=True, help="a dense run's rows (shard-K-of-N/dense.jsonl)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--workload", default="gsm")
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--items", type=int, default=20, help="the workload's first N items")
    ap.add_argument("--only", help="comma-separated item ids among them (default: all N)")
    ap.add_argument("--calib", help="comma-separated item ids (among the first N) that calibrate `shift`")
    ap.add_argument("--variants", default="relay,first", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--full-reply", action="store_true", help="compare whole replies (dense's reply length + 1, or --max-new-tokens if longer) instead")
    ap.add_argument("--calls", help="comma-separated agent ids to measure (default: every call after the first)")
    ap.add_argument("--first", type=int, default=16)
    ap.add_argument("--chain", action="store_true",
                    help="each variant reads its own transcripts (dense's replies run over the KV it made at the calls "
                         "before), as end to end, instead of relay's: the error a variant passes on down the chain")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if {v.split("@")[0] + ("@R" if "@" in v else "") for v in variants} - set(VARIANTS) or ("shift" in variants and not args.calib) \
            or any(v.partition("+")[2] not in ("", "replies") or ("+" in v and ("@" not in v or v.startswith("newest"))) for v in variants):
        ap.error(f"--variants takes {', '.join(VARIANTS)} (an @R variant but newest@R may end in +replies); shift needs --calib")
    lm = load_model(args.model, device=args.device)
    wl = load_workload(args.workload, args.items)
    engine = ReuseEngine(lm, "relay", config=ReuseConfig(max_new_tokens=1))
    runner = MultiAgentRunner(engine, wl, args.agents)
    templates = [runner.templates[(0, k)] for k in range(args.agents)] + [runner.decider]
    tok = lm.tokenizer
    rows = {r["id"]: r for r in map(json.loads, Path(args.rows).read_text().splitlines())}
    stats = {(v, t.agent_id): {"calls": 0, "first_token": 0, "reply": 0, "answer": 0, "err": [], "err_first": [], "err_rest": [],
                               "per_layer": [], "items": {}} for v in variants for t in templates[1:]}
    measured = set(args.calls.split(",")) if args.calls else {t.agent_id for t in templates[1:]}
    stats = {k: s for k, s in stats.items() if k[1] in measured}
    only = set(args.only.split(",")) if args.only else None
    calib = args.calib.split(",") if args.calib else []
    shift: dict[str, list] = {}  # agent id -> [sum over tokens of dense - relay values, tokens]
    where: dict[str, list] = {}  # agent id -> `_where` per measured call
    margins: dict[str, dict] = {}  # agent id -> item -> dense's first-token margin (top-1 minus top-2 logit)
    by_id = {it.id: it for it in wl.items}
    todo = [(by_id[i], True) for i in calib] + [(it, False) for it in wl.items if only is None or it.id in only]
    for it, calibrating in todo:
        calls = rows[it.id]["calls"]
        q = tok(it.question, add_special_tokens=False)["input_ids"]
        replies: dict[int, list[int]] = {}
        prev: Transcript | None = None
        prevs: dict[str, Transcript] = {}  # --chain: each variant's own transcript of the call before
        origin: list[int] = []
        for k, (agent, call) in enumerate(zip(templates, calls)):
            contents = {"user_question": q, **{f"agent_{j}_current": replies[j] for j in range(min(k, args.agents))}}
            ids, spans = agent.layout(contents)
            p0 = engine.template_kv(agent).p0
            m, rest = p0.n, ids[p0.n :]
            past, covered = relay_past(lm, p0, rest, [prev] if prev else [])
            if covered and (calibrating or agent.agent_id in measured or args.chain):
                dlg, dcache, _ = prefill(lm, ids)
                dense = cache_to_block(dcache, m, m + covered)
                if calibrating:
                    acc = shift.setdefault(agent.agent_id, [0.0, 0])
                    acc[0] = acc[0] + (dense.v - past.v[:, :, m:]).sum(2, keepdim=True)
                    acc[1] += covered
                elif agent.agent_id in measured:
                    budget_k = max(len(call["reply_ids"]) + 1, args.max_new_tokens) if args.full_reply else args.max_new_tokens
                    dense_reply = greedy_continue(lm, dcache, dlg[0, -1], len(ids), budget_k, engine.stops)
                    where.setdefault(agent.agent_id, []).append(_where(dense, past, m, spans, origin[:covered]))
                    top2 = dlg[0, -1].float().topk(2).values
                    margins.setdefault(agent.agent_id, {})[it.id] = float(top2[0] - top2[1])
            run = [] if calibrating or not covered or (agent.agent_id not in measured and not args.chain) else variants
            for name in run:
                src = prevs.get(name, prev) if args.chain else prev
                vpast = relay_past(lm, p0, rest, [src])[0] if args.chain else past
                if name.startswith("newest@"):  # the prefill it pays, against dense's of the whole prompt
                    lg, cache, cost = _with_newest(lm, ids, spans, vpast, src, float(name.split("@")[1]))
                else:
                    lg, cache = _variant(name, lm, ids, spans, p0, vpast, args.first, shift.get(agent.agent_id), dense)
                    cost = len(ids) - vpast.n if name == "relay" else None
                if args.chain:  # this variant's transcript: dense's reply run over the prompt KV the variant made
                    _, ext, _ = prefill(lm, list(call["reply_ids"]), cache_to_block(cache, 0, len(ids)))
                    prevs[name] = Transcript(rest + list(call["reply_ids"]), cache_to_block(ext, m, len(ids) + len(call["reply_ids"])), m)
                if agent.agent_id in measured:
                    if cost is not None:
                        stats[(name, agent.agent_id)].setdefault("prefill", []).append(cost / len(ids))
                    _measure(stats[(name, agent.agent_id)], it, lg, cache, len(ids), dense, dlg, dense_reply, budget_k, m,
                             covered, lm, wl, engine.stops, args.first)
            reply = list(call["reply_ids"])
            _, cache, _ = prefill(lm, ids[past.n :] + reply, past)  # this agent's transcript, as relay leaves it
            prev = Transcript(rest + reply, cache_to_block(cache, m, len(ids) + len(reply)), m)
            origin = origin[:covered] + [k] * (len(rest) - covered + len(reply))  # which agent computed each token
            if k < args.agents:
                replies[k] = reply
        print(f"{it.id}{' (calibration)' if calibrating else ''}: " + "  ".join(f"{v}/{a} {s['reply']}/{s['calls']}" for (v, a), s in stats.items()), flush=True)
    out = {"args": vars(args)}
    for (v, a), s in stats.items():
        n = max(1, s["calls"])
        layers = [sum(col) / n for col in zip(*s["per_layer"])] if s["per_layer"] else []
        out[f"{v}/{a}"] = {"calls": s["calls"], "first_token_equal": s["first_token"] / n, "reply_equal": s["reply"] / n, "answer_equal": s["answer"] / n,
                           "value_err": sum(s["err"]) / n, "value_err_first": sum(s["err_first"]) / n,
                           "value_err_rest": sum(s["err_rest"]) / n, "value_err_per_layer": layers,
                           "reply_equal_by_item": s["items"],
                           **({"prefill_vs_dense": sum(s["prefill"]) / n} if s.get("prefill") else {})}
        print(f"{v:6s} {a:9s} value err {out[f'{v}/{a}']['value_err']:.4f} (first {args.first}: "
              f"{out[f'{v}/{a}']['value_err_first']:.4f}, rest {out[f'{v}/{a}']['value_err_rest']:.4f})  "
              f"first token = dense {s['first_token']}/{s['calls']}  reply = dense {s['reply']}/{s['calls']}  "
              f"answer = dense {s['answer']}/{s['calls']}" + (f"  prefill {sum(s['prefill']) / n:.1%} of dense's" if s.get("prefill") else ""))
    for a, rows_a in where.items():
        keys = [k for k in rows_a[0] if k != "by_origin"]
        origins = sorted({o for w in rows_a for o in w["by_origin"]})
        out[f"where/{a}"] = {**{k: sum(w[k] for w in rows_a) / len(rows_a) for k in keys},
                             "by_origin": {o: sum(w["by_origin"].get(o, 0) for w in rows_a) / sum(o in w["by_origin"] for w in rows_a)
                                           for o in origins},
                             "dense_first_token_margin": margins[a]}
        print(f"where/{a}: " + "  ".join(f"{k} {out[f'where/{a}'][k]:.2f}" for k in keys) +
              "  by origin " + " ".join(f"{o}:{v:.1f}" for o, v in out[f"where/{a}"]["by_origin"].items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
