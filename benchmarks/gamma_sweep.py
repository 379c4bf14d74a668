"""γ (or τ) sweep of cross-context KV reuse: reuse rate vs accuracy and agreement with dense, one run.

Usage: python benchmarks/gamma_sweep.py [--workload math] [--limit 10] [--param gamma|tau|sink_head|refresh_tail]
       [--values 0.1,0.3,0.5,0.7] [--no-sink-head] [--refresh-tail]
Dense runs once; each value runs reuse with a fresh anchor pool over the same items. Writes
<param>_sweep.json and <param>_sweep.png. γ only acts where the anchor weights are spread out, which
τ (the softmax temperature of the distances) decides; sweeping τ shows the other side of the trade-off.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from kvcomm.agents.workloads import load_workload
from kvcomm.core.models import load_model
from kvcomm.experiments.agents_report import AgentsConfig, agreement, run_modes
from kvcomm.reuse.anchors import PoolConfig
from kvcomm.reuse.config import ReuseConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--workload", default="math")
    ap.add_argument("--agents", type=int, default=5)
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--tau", type=float, default=0.003)
    ap.add_argument("--gamma", type=float, default=0.3)
    ap.add_argument("--param", choices=["gamma", "tau", "sink_head", "refresh_tail"], default="gamma")
    ap.add_argument("--no-sink-head", action="store_true", help="encode stand-alone contents alone (the paper's base KV)")
    ap.add_argument("--refresh-tail", action="store_true", help="prefill the last template segment on the reuse path")
    ap.add_argument("--values", default="0.1,0.3,0.5,0.7")
    ap.add_argument("--out", default="results/gamma-sweep")
    args = ap.parse_args()
    lm = load_model(args.model)
    base = AgentsConfig(model=args.model, workload=args.workload, agents=args.agents, limit=args.limit, warmup=2,
                        reuse=ReuseConfig(max_new_tokens=args.max_new_tokens),
                        pool=PoolConfig(max_anchors=20, byte_budget=8 << 30, gamma=args.gamma, tau=args.tau))
    dense = run_modes(lm, replace(base, modes=("dense",)))["modes"]["dense"]
    wl = load_workload(args.workload, args.limit, 0)
    rows = []
    for g in [float(x) for x in args.values.split(",")]:
        knobs = {"gamma": args.gamma, "tau": args.tau, "sink_head": not args.no_sink_head,
                 "refresh_tail": args.refresh_tail, args.param: g}
        if args.param in ("sink_head", "refresh_tail"):
            knobs[args.param] = bool(g)
        config = replace(base, modes=("reuse",), pool=replace(base.pool, gamma=knobs["gamma"], tau=knobs["tau"]),
                         reuse=replace(base.reuse, sink_head=knobs["sink_head"], refresh_tail=knobs["refresh_tail"]))
        rep = run_modes(lm, config)["modes"]["reuse"]
        agree = agreement(wl, dense["items"], rep["items"])
        rows.append({**knobs, "accuracy": rep["accuracy"], "dense_accuracy": dense["accuracy"],
                     "reuse_rate": rep["reuse_rate"], "reuse_rate_after_warmup": rep["reuse_rate_after_warmup"],
                     **{f"{k}_agreement": v for k, v in agree.items()}, "pool": rep["pool"]})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "pool"}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.param}_sweep.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    gs = [r[args.param] for r in rows]
    ax.plot(gs, [r["reuse_rate"] for r in rows], marker="o", label="reuse rate")
    ax.plot(gs, [r["call_agreement"] for r in rows], marker="o", label="agent calls identical to dense")
    ax.plot(gs, [r["answer_agreement"] for r in rows], marker="o", label="final answers equal to dense")
    ax.plot(gs, [r["accuracy"] for r in rows], marker="o", label="accuracy (reuse)")
    ax.axhline(rows[0]["dense_accuracy"], ls="--", color="gray", label="accuracy (dense)")
    ax.set(xlabel=args.param, ylabel="fraction", title=f"{args.param} sweep: {args.workload}, {args.agents} agents, {args.model}")
    if args.param == "tau":
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{args.param}_sweep.png", dpi=120)


if __name__ == "__main__":
    main()
