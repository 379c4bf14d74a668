"""How close does reuse's assembled KV get to a dense prefill, and does the reply follow? One agent, one placeholder.

Usage: python benchmarks/offset_error.py [--anchors 3] [--questions 20] [--no-sink-head] [--tau 0.003] [--out F.json]

Agent 0 of the 5-agent math runner reads only `{user_question}`. The first `--anchors` questions are
recorded as anchors (dense prefill + deltas); each later question's KV is then assembled several ways:
with zero offsets (re-rotation only), with the anchor-estimated offsets (what reuse does), with the estimated offsets of the segment after the
placeholder only (`segment-only`: the placeholder re-rotated, no offset) or with the placeholder's key
offsets but not its value offsets (`keys-only`), the same
followed by a real prefill of the prompt's last template segment over the assembled KV (`+tail`, what
`--refresh-tail` does), with the true offsets (an oracle; equals dense), and two probes of what a better
estimate would buy:
  token-nearest   each question token, in each layer, takes the delta of the anchor token (any anchor,
                  any position) whose base value vector is nearest, its key delta re-rotated to the
                  token's position; not in the paper (its offsets are position-aligned).
  true×(1-a)      the true offsets scaled by 1-a: every error is the fraction a of the uncorrected one.
                  It shows how small the error must be before greedy replies follow dense.
For each: relative L2 error of keys and values against the dense prefill (layers 1+, the placeholder
and the segment after it), whether the first token and the whole greedy reply equal dense's.
Questions longer than every anchor are skipped (reuse would prefill them).
"""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path

import torch

from kvcomm.agents.runner import MultiAgentRunner
from kvcomm.agents.workloads import load_workload
from kvcomm.core.generation import greedy_continue
from kvcomm.core.kv import KVBlock, cache_to_block, move, prefill
from kvcomm.core.models import load_model
from kvcomm.core.rope import rerotate
from kvcomm.reuse.anchors import AnchorPool
from kvcomm.reuse.assembly import add_offset, assemble
from kvcomm.reuse.blend import choose, recompute
from kvcomm.reuse.config import ReuseConfig
from kvcomm.reuse.engine import Content, ReuseEngine

RESIDUALS = (0.05, 0.1, 0.2, 0.4)  # the a of the true×(1-a) rows


def token_nearest(lm, anchors, agent_key: str, base: KVBlock) -> KVBlock:
    """Placeholder offsets from the nearest anchor token per (layer, token), by base-value distance."""
    bases = torch.cat([a.base.v for a in anchors], 2).float()  # [L, H, M, D]
    dk = torch.cat([a.deltas[agent_key].placeholder.k for a in anchors], 2)
    dv = torch.cat([a.deltas[agent_key].placeholder.v for a in anchors], 2)
    pos = torch.cat([torch.arange(a.base.n) for a in anchors])
    L, H, n, D = base.v.shape
    q = base.v.float().permute(0, 2, 1, 3).reshape(L, n, H * D)
    nearest = torch.cdist(q, bases.permute(0, 2, 1, 3).reshape(L, -1, H * D)).argmin(-1)  # [L, n]
    k = torch.stack([rerotate(lm.model, dk[i : i + 1, :, nearest[i]], torch.arange(n) - pos[nearest[i]])[0]
                     for i in range(L)])
    v = torch.stack([dv[i][:, nearest[i]] for i in range(L)])
    k[0] = 0  # layer 0 is never offset
    v[0] = 0
    return KVBlock(k.to(base.k.dtype), v.to(base.v.dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--anchors", type=int, default=3)
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--tau", type=float, default=0.003)
    ap.add_argument("--no-sink-head", action="store_true")
    ap.add_argument("--out", help="also write the JSON summary here")
    ap.add_argument("--workload", default="math", choices=["math", "gsm"], help="whose agent-0 prompt (gsm: the paper-shaped one)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--variants", default=None, help="comma list of the variants to run (default: all)")
    ap.add_argument("--recompute", type=float, default=0.15, help="fraction recomputed by the `blend` variant")
    args = ap.parse_args()
    lm = load_model(args.model, device=args.device)
    wl = load_workload(args.workload, args.anchors + args.questions)
    pool = AnchorPool(gamma=1e9, tau=args.tau)  # no entropy gate: every question is matched
    eng = ReuseEngine(lm, "reuse", pool=pool, config=ReuseConfig(max_new_tokens=args.max_new_tokens, sink_head=not args.no_sink_head))
    agent = MultiAgentRunner(eng, wl, 5).templates[(0, 0)]
    tok = lm.tokenizer

    def ids_of(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    eng.force_new_anchors = True
    for it in wl.items[: args.anchors]:
        req = uuid.uuid4().hex
        eng.call(agent, {"user_question": Content(ids_of(it.question))}, req)
        pool.commit(req)
    tkv = eng.template_kv(agent)

    variants = ("zero", "estimated", "segment-only", "keys-only", "estimated+tail", "blend", "token-nearest", "oracle", *(f"true*(1-{a})" for a in RESIDUALS))
    if args.variants:
        variants = tuple(v for v in variants if v in args.variants.split(","))
    stats = {v: {"key_err": [], "value_err": [], "first_token": 0, "reply": 0, "layer_value_err": [], "token_value_err": []}
             for v in variants}
    skipped = 0
    for it in wl.items[args.anchors :]:
        q = ids_of(it.question)
        ids, spans = agent.layout({"user_question": q})
        logits, cache, _ = prefill(lm, ids)
        logits = logits[0, -1]
        true = cache_to_block(cache, 0, len(ids))
        dense_reply = greedy_continue(lm, cache, logits, len(ids), args.max_new_tokens, eng.stops, feed_last=True)
        base, _ = eng.base_kv(Content(q))
        m = pool.match("user_question", agent.pool_key, base)
        if m is None:
            skipped += 1
            continue
        (_, a, b), (_, sa, sb) = spans[1], spans[2]
        zeros = (KVBlock(torch.zeros_like(base.k), torch.zeros_like(base.v)),
                 KVBlock(torch.zeros_like(tkv.segments[0].k), torch.zeros_like(tkv.segments[0].v)))
        oracle = (move(lm, true.slice(a, b), -a) - base, move(lm, true.slice(sa, sb), -sa) - tkv.segments[0])
        est = (m.placeholder_offset, m.segment_offset)
        offsets = {"zero": zeros, "estimated": est, "segment-only": (zeros[0], est[1]),
                   "keys-only": (KVBlock(est[0].k, zeros[0].v), est[1]), "estimated+tail": est, "blend": est,
                   "oracle": oracle}
        if "token-nearest" in variants:
            offsets["token-nearest"] = (token_nearest(lm, pool.anchors("user_question"), agent.pool_key, base), est[1])
        for r in RESIDUALS:
            offsets[f"true*(1-{r})"] = tuple(KVBlock(o.k * (1 - r), o.v * (1 - r)) for o in oracle)
        for name, (po, so) in offsets.items():
            if name not in variants:
                continue
            full = assemble(lm, tkv.p0, spans, [add_offset(base, po), add_offset(tkv.segments[0], so)])
            t = sa if name.endswith("+tail") else len(ids) - 1  # +tail: the last segment is prefilled
            if name == "blend":  # the estimated offsets, then `--recompute` of the reused tokens (deviation picker)
                picked, _, _ = choose(lm, "deviation", args.recompute, ids, spans, full.slice(0, t), None)
                lg, c2 = recompute(lm, ids, full.slice(0, t), picked)
                full = cache_to_block(c2, 0, len(ids))
            else:
                lg, c2, _ = prefill(lm, ids[t:], full.slice(0, t))
                lg = lg[0, -1]
            if t < len(ids) - 1 or name == "blend":
                full = cache_to_block(c2, 0, len(ids))  # the assembled prefix, then what was run
            reply = greedy_continue(lm, c2, lg, len(ids), args.max_new_tokens, eng.stops, feed_last=True)
            s = stats[name]
            s["first_token"] += int(lg.argmax() == logits.argmax())
            s["reply"] += int(reply == dense_reply)
            for key, x, y in (("key_err", full.k, true.k), ("value_err", full.v, true.v)):
                s[key].append(float((x[1:, :, a:sb] - y[1:, :, a:sb]).norm() / y[1:, :, a:sb].norm()))
            dv = (full.v[:, :, a:b].float() - true.v[:, :, a:b].float())
            ref = true.v[:, :, a:b].float().pow(2).sum(dim=(1, 2, 3)).sqrt().clamp_min(1e-9)
            s["layer_value_err"].append((dv.pow(2).sum(dim=(1, 2, 3)).sqrt() / ref).tolist())
            s["token_value_err"].append(dv[1:].pow(2).sum(dim=(0, 1, 3)).tolist())  # per placeholder token
    n = max(1, args.questions - skipped)
    out = {"args": vars(args), "questions": n, "skipped": skipped}
    for name, s in stats.items():
        layers = torch.tensor(s["layer_value_err"]).mean(0).tolist() if s["layer_value_err"] else []
        first8 = [sum(t[:8]) / max(1e-12, sum(t)) for t in s["token_value_err"]]
        out[name] = {"key_err": sum(s["key_err"]) / n, "value_err": sum(s["value_err"]) / n,
                     "first_token_equal": s["first_token"] / n, "reply_equal": s["reply"] / n,
                     "placeholder_value_err_per_layer": layers,
                     "share_of_placeholder_value_error_in_first_8_tokens": sum(first8) / max(1, len(first8))}
        print(f"{name:16s} key err {out[name]['key_err']:.3f}  value err {out[name]['value_err']:.3f}  "
              f"first token = dense {s['first_token']}/{n}  reply = dense {s['reply']}/{n}")
    print(json.dumps(out))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
