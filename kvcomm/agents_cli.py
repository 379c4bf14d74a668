"""`kvcomm agents`: run one multi-agent workload in one or more modes, side by side, and report.

Each mode gets its own engine (and, for reuse, its own anchor pool) over the same items, so the
table compares the modes on identical inputs in one process. Writes `agents.json` (every call) and
`agents_ttft.png` (median TTFT per agent position and mode) to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def add_parser(sub, add_model_args, positive_int) -> None:
    from .cli import _bounded

    p = sub.add_parser("agents", help="multi-agent workload in dense / prefix / reuse modes, side by side")
    add_model_args(p)
    p.add_argument("--workload", choices=["math", "coding", "retrieval"], default="math")
    p.add_argument("--agents", type=_bounded(int, 1, 16), default=5, help="number of agents (default 5)")
    p.add_argument("--topology", choices=["fully_connected", "chain", "star"], default="fully_connected")
    p.add_argument("--rounds", type=positive_int, default=1)
    p.add_argument("--mode", action="append", choices=["dense", "prefix", "reuse"],
                   help="execution mode; repeat to compare (default: dense and reuse)")
    p.add_argument("--limit", type=positive_int, default=10, help="workload items (default 10)")
    p.add_argument("--warmup", type=_bounded(int, 0), default=2, help="items excluded from the after-warm-up reuse rate (default 2)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--gamma", type=_bounded(float, 0.0, 1.0), default=0.3, help="entropy threshold γ (default 0.3)")
    p.add_argument("--sink-head", action=argparse.BooleanOptionalAction, default=True,
                   help="encode stand-alone contents (the question, tool results) after the chat template's "
                        "agent-independent opening tokens (default); --no-sink-head encodes them alone, as the paper does")
    p.add_argument("--refresh-tail", action=argparse.BooleanOptionalAction, default=False,
                   help="on the reuse path, prefill the prompt's last template segment over the reused KV instead of "
                        "estimating its offset (a few more tokens of prefill; not in the paper)")
    p.add_argument("--tau", type=_bounded(float, 0.0, lo_open=True), default=0.003, help="softmax temperature of anchor distances (default 0.003)")
    p.add_argument("--max-anchors", type=positive_int, default=20, help="anchors per placeholder V (default 20)")
    p.add_argument("--pool-bytes", type=positive_int, default=2 << 30, help="byte budget of the anchor pool")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=positive_int, default=1,
                   help="requests run at once (batches share one pool snapshot; outputs do not depend on it)")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: one process; ray: one Ray actor per agent plus a pool actor")
    p.add_argument("--address", help="Ray cluster address (default: start a local cluster)")
    p.add_argument("--gpus-per-agent", type=_bounded(float, 0.0), default=None,
                   help="GPUs per agent actor (default: 1/agents when CUDA is visible, else 0)")
    p.add_argument("--cpus-per-agent", type=_bounded(float, 0.0), default=0.0,
                   help="CPUs reserved per agent actor (default 0, so N agents fit on a small machine)")
    p.add_argument("--out", default="runs/agents", help="output folder for JSON and plot")
    p.set_defaults(func=cmd_agents)


def _engine(lm, args, mode: str):
    """A local ReuseEngine, or a RayEngine whose actors each load `args.model`."""
    pool_kwargs = {"max_anchors": args.max_anchors, "byte_budget": args.pool_bytes, "gamma": args.gamma, "tau": args.tau}
    if getattr(args, "backend", "local") == "ray":
        import torch

        from .ray_backend import RayEngine

        gpus = args.gpus_per_agent
        if gpus is None:
            gpus = 1.0 / (args.agents + 1) if torch.cuda.is_available() else 0.0
        return RayEngine(args.model, mode, args.max_new_tokens, pool_kwargs, address=args.address,
                         device=None if args.device == "auto" else args.device, dtype=None if args.dtype == "auto" else args.dtype,
                         cpus_per_agent=args.cpus_per_agent, gpus_per_agent=gpus, engine_options=_engine_options(args))
    from .anchors import AnchorPool
    from .reuse import ReuseEngine

    return ReuseEngine(lm, mode, pool=AnchorPool(**pool_kwargs), max_new_tokens=args.max_new_tokens,
                       **_engine_options(args))


def _engine_options(args) -> dict:
    """ReuseEngine options beyond the paper; `refresh_tail` may be absent from a caller-built Namespace."""
    return {"sink_head": args.sink_head, "refresh_tail": getattr(args, "refresh_tail", False)}


def run_modes(lm, args, progress: bool = True) -> dict:
    """Every mode on the same items; `lm` may be None with the Ray backend (the actors load the model)."""
    from tqdm.auto import tqdm

    from .agents import MultiAgentRunner, reuse_rate
    from .workloads import load_workload

    workload = load_workload(args.workload, args.limit, args.seed)
    modes = args.mode or ["dense", "reuse"]
    backend = getattr(args, "backend", "local")
    batch = getattr(args, "concurrency", 1)
    report: dict = {"workload": args.workload, "agents": args.agents, "topology": args.topology, "rounds": args.rounds,
                    "items": len(workload.items), "model": lm.name if lm else args.model,
                    "device": str(lm.device) if lm else f"ray actors ({args.device})", "backend": backend,
                    "concurrency": batch, "gamma": args.gamma, "tau": args.tau, **_engine_options(args),
                    "max_new_tokens": args.max_new_tokens,
                    "modes": {}}
    for mode in modes:
        engine = _engine(lm, args, mode)
        runner = MultiAgentRunner(engine, workload, args.agents, args.topology, args.rounds)
        if backend == "ray":  # start every actor (and load its model) before anything is timed
            engine.start(sorted({t.agent_id for t in runner.templates.values()} | {runner.decider.agent_id}))
        results = []
        bar = tqdm(total=len(workload.items), desc=f"{args.workload}/{mode}", disable=not progress)
        for start in range(0, len(workload.items), batch):
            chunk = workload.items[start : start + batch]
            results += runner.run_batch(chunk, workers=batch) if batch > 1 else [runner.run_item(chunk[0])]
            bar.update(len(chunk))
        bar.close()
        stats = engine.pool.stats() if mode == "reuse" else None
        if backend == "ray":
            engine.shutdown()
        calls = [c for r in results for c in r.calls]
        report["modes"][mode] = {
            "accuracy": sum(r.correct for r in results) / len(results),
            "reuse_rate": reuse_rate(results),
            "reuse_rate_after_warmup": reuse_rate(results, args.warmup),
            "prefilled_tokens": sum(c["prefilled_tokens"] for c in calls),
            "prompt_tokens": sum(c["prompt_tokens"] for c in calls),
            "pool": stats if isinstance(stats, dict) or stats is None else stats.__dict__,
            "items": [r.__dict__ for r in results],
        }
    if "dense" in report["modes"]:
        dense = report["modes"]["dense"]["items"]
        for m in report["modes"].values():
            m.update({f"{k}_agreement_with_dense": v for k, v in agreement(workload, dense, m["items"]).items()})
    return report


def agreement(workload, dense_items: list[dict], items: list[dict]) -> dict[str, float]:
    """Shares equal to dense mode's on the same items: final texts, graded answers, every agent reply."""
    pairs = list(zip(dense_items, items))
    calls = [(x, y) for a, b in pairs for x, y in zip(a["calls"], b["calls"])]
    return {"final": sum(a["final"] == b["final"] for a, b in pairs) / len(pairs),
            "answer": sum(workload.answer_of(it, a["final"]) == workload.answer_of(it, b["final"])
                          for it, (a, b) in zip(workload.items, pairs)) / len(pairs),
            "call": sum(x["reply_ids"] == y["reply_ids"] for x, y in calls) / len(calls)}


def ttft_by_position(mode_report: dict, skip_items: int) -> list[float]:
    items = mode_report["items"][skip_items:] or mode_report["items"]
    positions = len(items[0]["calls"])
    return [statistics.median(it["calls"][p]["ttft_ms"] for it in items) for p in range(positions)]


def plot_ttft(report: dict, path: Path, skip_items: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, m in report["modes"].items():
        ys = ttft_by_position(m, skip_items)
        ax.plot(range(1, len(ys) + 1), ys, marker="o", label=f"{mode} (reuse {m['reuse_rate_after_warmup']:.0%})")
    ax.set_xlabel("agent position (last = decision agent)")
    ax.set_ylabel("median TTFT (ms)")
    ax.set_title(f"{report['workload']}, {report['agents']} agents, {report['topology']}, {report['model']} on {report['device']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_agents(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .cli import _load
    from .files import write_atomic

    lm = None if args.backend == "ray" else _load(args)
    report = run_modes(lm, args)
    out = Path(args.out)
    write_atomic(out / "agents.json", json.dumps(report, indent=1, default=str))
    plot_ttft(report, out / "agents_ttft.png", args.warmup)
    table = Table(title=f"{args.workload}: {args.agents} agents, {args.topology}, {len(report['modes'][next(iter(report['modes']))]['items'])} items")
    for col in ("mode", "accuracy", "reuse rate (after warm-up)", "agree w/ dense (final / calls)", "tokens prefilled",
                "median TTFT ms by position"):
        table.add_column(col)
    for mode, m in report["modes"].items():
        agree = (f"{m['final_agreement_with_dense']:.0%} / {m['call_agreement_with_dense']:.0%}"
                 if "final_agreement_with_dense" in m else "-")
        table.add_row(mode, f"{m['accuracy']:.1%}", f"{m['reuse_rate']:.0%} ({m['reuse_rate_after_warmup']:.0%})", agree,
                      f"{m['prefilled_tokens']:,}/{m['prompt_tokens']:,}",
                      " ".join(f"{x:.0f}" for x in ttft_by_position(m, args.warmup)))
    console = Console()
    console.print(table)
    console.print(f"wrote {out / 'agents.json'} and {out / 'agents_ttft.png'}")
    return 0
