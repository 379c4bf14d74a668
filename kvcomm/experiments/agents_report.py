"""Multi-agent runs in several execution modes side by side, and their report.

Each mode gets its own engine (and, for reuse, its own anchor pool) over the same items, so the
table compares the modes on identical inputs in one process. `kvcomm agents` writes the report as
`agents.json` (every call) and `agents_ttft.png` (median TTFT per agent position and mode).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from kvcomm.agents.remote import RayConfig
from kvcomm.agents.runner import MultiAgentRunner, make_engine, reuse_rate
from kvcomm.agents.workloads import load_workload
from kvcomm.reuse.anchors import PoolConfig
from kvcomm.reuse.engine import ReuseConfig


@dataclass(frozen=True)
class AgentsConfig:
    """One multi-agent run; every default is documented here once.

    model        model spec, loaded by each Ray actor and named in the report
    modes        execution modes, each over the same items (dense is the reference)
    warmup       items left out of the after-warm-up reuse rate and the TTFT medians
    concurrency  requests run at once (batches share one pool snapshot; outputs do not depend on it)
    cluster      None runs in this process; a RayConfig runs one Ray actor per agent plus a pool actor
    """

    model: str = "embedded"
    workload: str = "math"
    agents: int = 5
    topology: str = "fully_connected"
    rounds: int = 1
    modes: tuple[str, ...] = ("dense", "reuse")
    limit: int = 10
    warmup: int = 2
    seed: int = 0
    concurrency: int = 1
    reuse: ReuseConfig = field(default_factory=lambda: ReuseConfig(max_new_tokens=32))
    pool: PoolConfig = PoolConfig()
    cluster: RayConfig | None = None


def run_modes(lm, config: AgentsConfig, progress: bool = True) -> dict:
    """Every mode on the same items; `lm` may be None with the Ray backend (the actors load the model)."""
    from tqdm.auto import tqdm

    c = config
    workload = load_workload(c.workload, c.limit, c.seed)
    backend = "ray" if c.cluster is not None else "local"
    batch = c.concurrency
    report: dict = {"workload": c.workload, "agents": c.agents, "topology": c.topology, "rounds": c.rounds,
                    "items": len(workload.items), "model": lm.name if lm else c.model,
                    "device": str(lm.device) if lm else f"ray actors ({c.cluster.device or 'auto'})", "backend": backend,
                    "concurrency": batch, "gamma": c.pool.gamma, "tau": c.pool.tau, "sink_head": c.reuse.sink_head,
                    "offset_precision": c.pool.offset_precision,
                    "refresh_tail": c.reuse.refresh_tail, "max_new_tokens": c.reuse.max_new_tokens,
                    "modes": {}}
    for mode in c.modes:
        engine = make_engine(lm, mode, c.reuse, c.pool, model=c.model, cluster=c.cluster)
        runner = MultiAgentRunner(engine, workload, c.agents, c.topology, c.rounds)
        if backend == "ray":  # start every actor (and load its model) before anything is timed
            engine.start(sorted({t.agent_id for t in runner.templates.values()} | {runner.decider.agent_id}))
        results = []
        bar = tqdm(total=len(workload.items), desc=f"{c.workload}/{mode}", disable=not progress)
        for start in range(0, len(workload.items), batch):
            chunk = workload.items[start : start + batch]
            results += runner.run_batch(chunk, workers=batch) if batch > 1 else [runner.run_item(chunk[0])]
            bar.update(len(chunk))
        bar.close()
        stats = engine.pool.stats() if engine.mode == "reuse" else None
        if backend == "ray":
            engine.shutdown()
        calls = [call for r in results for call in r.calls]
        report["modes"][mode] = {
            "accuracy": sum(r.correct for r in results) / len(results),
            "reuse_rate": reuse_rate(results),
            "reuse_rate_after_warmup": reuse_rate(results, c.warmup),
            "prefilled_tokens": sum(call["prefilled_tokens"] for call in calls),
            "prompt_tokens": sum(call["prompt_tokens"] for call in calls),
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


def summary_table(report: dict, warmup: int):
    """The report as a rich Table: one row per mode."""
    from rich.table import Table

    first = next(iter(report["modes"].values()))
    table = Table(title=f"{report['workload']}: {report['agents']} agents, {report['topology']}, {len(first['items'])} items")
    for col in ("mode", "accuracy", "reuse rate (after warm-up)", "agree w/ dense (final / calls)", "tokens prefilled",
                "median TTFT ms by position"):
        table.add_column(col)
    for mode, m in report["modes"].items():
        agree = (f"{m['final_agreement_with_dense']:.0%} / {m['call_agreement_with_dense']:.0%}"
                 if "final_agreement_with_dense" in m else "-")
        table.add_row(mode, f"{m['accuracy']:.1%}", f"{m['reuse_rate']:.0%} ({m['reuse_rate_after_warmup']:.0%})", agree,
                      f"{m['prefilled_tokens']:,}/{m['prompt_tokens']:,}",
                      " ".join(f"{x:.0f}" for x in ttft_by_position(m, warmup)))
    return table
