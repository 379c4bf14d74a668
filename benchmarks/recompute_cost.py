"""What a relay recompute rule would prefill, read off a relay run's rows without running it.

For every relayed call of `relay.jsonl` the relayed tokens are its prompt minus p0 (the first call's prompt minus
what it prefilled) minus what relay prefilled; a rule recomputes ceil(R x relayed) of them (+1 token with the
attention picker, `--rerun 1`). `--agents-r` / `--decision-r` set R at the agents' calls and at the decision
agent's (`relay@R+decision` is `--agents-r 0`); `--cap B` caps each call's prefill at B x its prompt (what dense
prefills for it), as `relay@R+capB` does (`ReuseConfig.prefill_cap`); `--budget B` instead spends, call by call,
what the calls before left of B x dense's prefill of the item (relay's own prefill first). Prints the total against dense's prefill
(`dense.jsonl` beside it), the mean and median R per call position, and R at the calls `--show` names (item@call,
e.g. `42@2`: item 42's third call, as the results READMEs' changed-item lists name the first changed call).

    python benchmarks/recompute_cost.py DIR/shard-0-of-1 --agents-r 0 --decision-r 0.1 --rerun 1
    python benchmarks/recompute_cost.py DIR/shard-0-of-1 --agents-r 1 --decision-r 1 --rerun 1 --cap 0.27
    python benchmarks/recompute_cost.py DIR/shard-0-of-1 --budget 0.3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from kvcomm.reuse.blend import cap_room


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", type=Path, help="a folder holding dense.jsonl and relay.jsonl of the same items")
    ap.add_argument("--agents-r", type=float, default=0.1, help="R at the agents' calls")
    ap.add_argument("--decision-r", type=float, default=0.1, help="R at the decision agent's calls")
    ap.add_argument("--rerun", type=int, default=0, help="tokens every recomputing call runs again (attention: 1)")
    ap.add_argument("--cap", type=float, help="cap each call's prefill at B x its prompt (relay@R+capB)")
    ap.add_argument("--budget", type=float, help="spend B x dense's prefill per item instead of fixed R")
    ap.add_argument("--show", default="", help="comma-separated item@call (the row's index) to print R at")
    args = ap.parse_args()
    dense = {r["id"]: r for r in _rows(args.rows / "dense.jsonl")}
    total = dense_total = 0
    shares: dict[int, list[float]] = defaultdict(list)
    show = {tuple(map(int, s.split("@"))) for s in args.show.split(",") if s}
    shown: dict[str, float] = {}
    for r in _rows(args.rows / "relay.jsonl"):
        first = r["calls"][0]
        p0 = first["prompt_tokens"] - first["prefilled_tokens"]
        item_dense = spent = 0
        for k, (c, d) in enumerate(zip(r["calls"], dense[r["id"]]["calls"])):
            item_dense += d["prefilled_tokens"]
            relayed = c["prompt_tokens"] - p0 - c["prefilled_tokens"] if c["path"] == "relay" else 0
            if args.budget is not None:
                picks = max(0, min(int(args.budget * item_dense - spent - c["prefilled_tokens"]), relayed))
                if relayed:
                    shares[k].append(picks / relayed)
            else:
                rate = args.decision_r if c["agent"] == "decision" else args.agents_r
                picks = math.ceil(rate * relayed)
                if args.cap is not None:  # the engine's rule: picks + rerun within what relay's prefill left
                    picks = max(0, min(picks, cap_room(args.cap, c["prompt_tokens"], c["prefilled_tokens"]) - args.rerun))
                if relayed and rate > 0:
                    shares[k].append(picks / relayed)
                if (r["index"], k) in show:
                    shown[f"{r['index']}@{k}"] = picks / relayed if relayed else 0.0
                picks += args.rerun if picks else 0
            spent += c["prefilled_tokens"] + picks
        total += spent
        dense_total += item_dense
    rule = f"budget {args.budget}" if args.budget is not None else f"agents R {args.agents_r}, decision R {args.decision_r}"
    rule += f", cap {args.cap}" if args.cap is not None else ""
    print(f"{rule}: {100 * total / dense_total:.2f}% of dense's prefill ({total} of {dense_total} tokens)")
    for k, v in sorted(shares.items()):
        print(f"  call {k}: R mean {statistics.mean(v):.3f}, median {statistics.median(v):.3f}")
    if shown:
        print("  R at " + ", ".join(f"{key} {v:.2f}" for key, v in sorted(shown.items(), key=lambda kv: int(kv[0].split("@")[0]))))


if __name__ == "__main__":
    main()
