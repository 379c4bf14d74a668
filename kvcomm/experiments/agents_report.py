"""Multi-agent runs in several execution modes side by side, and their report.

Each mode gets its own engine (and, for reuse, its own anchor pool) over the same items, so the
table compares the modes on identical inputs. Modes are setting names handed to `make_engine`;
"dense" is the reference. `kvcomm agents` writes the report as `agents.json` (every call),
`agents_ttft.png` (median TTFT per agent position and mode) and `agents_tradeoff.png` (accuracy and
answer agreement with dense against the fraction of tokens prefilled). Runs can be split into
shards and resumed (`kvcomm.experiments.agents_shards`); the report is built from the rows alone,
so merging shards needs no model.

Per mode, besides accuracy and reuse rate: `cap_share` / `cap_share_final`, the share of all replies
/ of graded final replies that hit the answer budget (len(reply_ids) == max_new_tokens: likely cut
off); and with a dense run on the same items, `prefill_fraction` (tokens prefilled / dense's, per
item id in common) and agreement with dense (`answer_`, `final_`, `call_agreement_with_dense`).
"""

from __future__ import annotations

import json
import statistics
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from kvcomm.agents.remote import RayConfig
from kvcomm.agents.runner import REUSED, MultiAgentRunner, make_engine, path_share
from kvcomm.agents.workloads import load_workload
from kvcomm.core import batch_decode
from kvcomm.core.errors import DataError
from kvcomm.experiments.agents_shards import append_row, mode_file, read_rows, shard_range, start_shard
from kvcomm.reuse.anchors import PoolConfig
from kvcomm.reuse.config import ReuseConfig, parse_setting


@dataclass(frozen=True)
class AgentsConfig:
    """One multi-agent run; every default is documented here once.

    model        model spec, loaded by each Ray actor and named in the report
    modes        execution modes, each over the same items (dense is the reference)
    warmup       items left out of the after-warm-up reuse rate and the TTFT medians
    concurrency  requests run at once (batches share one pool snapshot; outputs do not depend on it)
    batch_decode local backend: the concurrent requests' decodes share one batched step of `concurrency`
                 slots (`kvcomm.core.batch_decode`); in bf16 its numerics may differ from batch-1 decoding
    cluster      None runs in this process; a RayConfig runs one Ray actor per agent plus a pool actor
    shard        (K, N): run only the K-th of N contiguous slices of the items (`agents_shards`)
    only         item indices to run, of the shard's (empty: all): to rerun chosen items, e.g. those whose answers
                 changed; not a run setting, so their rows join the folder's others (pooled modes see only them)
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
    batch_decode: bool = False
    reuse: ReuseConfig = field(default_factory=lambda: ReuseConfig(max_new_tokens=32))
    pool: PoolConfig = PoolConfig()
    cluster: RayConfig | None = None
    shard: tuple[int, int] = (0, 1)
    only: tuple[int, ...] = ()


def run_meta(lm, c: AgentsConfig, n_items: int) -> dict:
    """The report's header: what the run was (settings that must match to resume are `run_settings`)."""
    return {"workload": c.workload, "agents": c.agents, "topology": c.topology, "rounds": c.rounds, "items": n_items,
            "model": lm.name if lm else c.model,
            "device": str(lm.device) if lm else f"ray actors ({c.cluster.device or 'auto'})",
            "dtype": str(lm.dtype).removeprefix("torch.") if lm else None,
            "backend": "ray" if c.cluster is not None else "local", "concurrency": c.concurrency,
            "batch_decode": c.batch_decode and c.cluster is None, "gamma": c.pool.gamma,
            "tau": c.pool.tau, "max_distance": c.pool.max_distance, "never_share": list(c.pool.never_share),
            "sink_head": c.reuse.sink_head,
            "offset_precision": c.pool.offset_precision,
            "kv_precision": c.reuse.kv_precision,
            "refresh_tail": c.reuse.refresh_tail, "max_new_tokens": c.reuse.max_new_tokens, "seed": c.seed,
            "limit": c.limit, "modes": list(c.modes)}


def run_settings(lm, c: AgentsConfig) -> dict:
    """Everything that changes an item's rows: a resumed run, and every shard of one --out, must match.
    An unsharded run may change --limit (items are the same whatever the limit: it adds or drops some);
    shards may not (it moves the slices)."""
    settings = {"model": c.model, "workload": c.workload, "seed": c.seed, "agents": c.agents,
                "topology": c.topology, "rounds": c.rounds, "max_new_tokens": c.reuse.max_new_tokens,
                "sink_head": c.reuse.sink_head, "refresh_tail": c.reuse.refresh_tail, "prefix_slots": c.reuse.prefix_slots,
                "gamma": c.pool.gamma, "tau": c.pool.tau, "max_anchors": c.pool.max_anchors,
                "pool_bytes": c.pool.byte_budget, "offset_precision": c.pool.offset_precision, "kv_precision": c.reuse.kv_precision,
                "shards": c.shard[1]}
    if c.pool.max_distance is not None:  # absent when off, so runs from before the option still resume
        settings["max_distance"] = c.pool.max_distance
    if c.pool.never_share:  # likewise
        settings["never_share"] = sorted(c.pool.never_share)
    if c.shard[1] > 1:
        settings["limit"] = c.limit
    if c.batch_decode and c.cluster is None:  # batch-B numerics (bf16) may change replies; absent when off,
        settings["batch_decode"] = c.concurrency  # so runs from before the option still resume
    if lm is not None:
        from kvcomm.core.fingerprint import fingerprint

        settings.update(fingerprint=fingerprint(lm.model, lm.tokenizer).short, dtype=str(lm.dtype).removeprefix("torch."))
    return settings


def run_modes(lm, config: AgentsConfig, progress: bool = True, out: Path | None = None, fresh: bool = False) -> dict:
    """Every mode on the same items (the shard `config.shard` of them); `lm` may be None with the Ray
    backend (the actors load the model). With `out`, every finished item is appended to
    `out/shard-K-of-N/<mode>.jsonl` and items already there are skipped (`kvcomm.experiments.agents_shards`);
    `fresh` discards them first. Returns the report of this shard's items."""
    c = config
    workload = load_workload(c.workload, c.limit, c.seed)
    k, n = c.shard
    indices = shard_range(len(workload.items), k, n)
    if not indices:
        raise DataError(f"shard {k}/{n} of {len(workload.items)} items has no items; use fewer shards or a larger --limit")
    if c.only:
        if max(c.only) >= len(workload.items):
            raise DataError(f"item {max(c.only)} is past the {len(workload.items)} items of --limit {c.limit}")
        indices = [i for i in indices if i in c.only]
    meta = run_meta(lm, c, len(workload.items))
    settings = run_settings(lm, c)
    directory = start_shard(out, k, n, settings, meta, fresh) if out is not None else None
    rows: dict[str, list[dict]] = {}
    for mode in c.modes:
        path = mode_file(directory, mode) if directory is not None else None
        mine = {workload.items[i].id for i in indices}
        done = {r["id"]: r for r in read_rows(path) if r["id"] in mine} if path is not None else {}
        todo = [i for i in indices if workload.items[i].id not in done]
        new = _run_mode(lm, c, workload, mode, todo, path, f"{k}/{n}", progress)
        rows[mode] = sorted([*done.values(), *new], key=lambda r: r["index"])
    meta.update(shards=n, shards_found=[k])
    return build_report(meta, rows, c.warmup, workload)


def _run_mode(lm, c: AgentsConfig, workload, mode: str, todo: list[int], path: Path | None, shard: str,
              progress: bool) -> list[dict]:
    """Items `todo` (indices) through one fresh engine; each finished batch's rows go to `path` at once."""
    from tqdm.auto import tqdm

    if not todo:
        return []
    engine = make_engine(lm, mode, c.reuse, c.pool, model=c.model, cluster=c.cluster)
    runner = MultiAgentRunner(engine, workload, c.agents, c.topology, c.rounds)
    if c.cluster is not None:  # start every actor (and load its model) before anything is timed
        placed = engine.start(sorted({t.agent_id for t in runner.templates.values()} | {runner.decider.agent_id}))
        tqdm.write("ray actors: " + ", ".join(f"{a} pid {i['pid']} GPU {','.join(i['gpu_ids']) or '-'}" for a, i in placed.items()))
    batch, rows = c.concurrency, []
    bar = tqdm(total=len(todo), desc=f"{c.workload}/{mode}", disable=not progress)
    serving = c.batch_decode and c.cluster is None and lm is not None
    with batch_decode.serve(lm, slots=batch) if serving else nullcontext():
        _run_batches(runner, engine, workload, mode, todo, path, shard, batch, rows, bar)
    bar.close()
    if c.cluster is not None:
        engine.shutdown()
    return rows


def _run_batches(runner, engine, workload, mode: str, todo: list[int], path: Path | None, shard: str, batch: int,
                 rows: list[dict], bar) -> None:
    """`todo` in batches of `batch` concurrent requests; each finished batch's rows go to `rows` and `path`."""
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        items = [workload.items[i] for i in chunk]
        results = runner.run_batch(items, workers=batch) if batch > 1 else [runner.run_item(items[0])]
        stats = engine.pool.stats() if engine.mode == "reuse" else None
        for i, res in zip(chunk, results):
            row = {"mode": mode, "index": i, "shard": shard, **res.__dict__, "pool_items_before": start}
            if stats is not None:
                row["pool"] = stats if isinstance(stats, dict) else dict(stats.__dict__)
            if path is not None:
                append_row(path, row)
            rows.append(row)
        bar.update(len(chunk))


def build_report(meta: dict, rows: dict[str, list[dict]], warmup: int, workload=None) -> dict:
    """agents.json from the rows of every mode: today's per-mode fields, the share of replies that hit
    the answer budget, and, against dense on the same item ids, agreement and the fraction prefilled."""
    report = {k: v for k, v in meta.items() if k != "modes"}
    report["warmup"] = warmup
    report["modes"] = {mode: mode_summary(r, meta["max_new_tokens"], warmup) for mode, r in rows.items()}
    dense = rows.get("dense")
    for mode, m in report["modes"].items():
        if dense is None:
            m.update(prefill_fraction=m["prefilled_tokens"] / max(1, m["prompt_tokens"]), prefill_fraction_of="prompt")
            continue
        agree = agreement(workload, dense, rows[mode])
        if not agree["items"]:  # no item in common with dense (a merge of partial shards)
            m.update(prefill_fraction=None, prefill_fraction_of="dense")
            continue
        m.update({f"{k}_agreement_with_dense": agree[k] for k in ("final", "answer", "call")})
        ids = {r["id"] for r in rows[mode]}
        same = [r for r in dense if r["id"] in ids]
        m.update(agreement_items=agree["items"], prefill_fraction=prefill_fraction(dense, rows[mode]),
                 prefill_fraction_of="dense",
                 dense_accuracy_same_items=sum(r["correct"] for r in same) / max(1, len(same)))
    return report


def mode_summary(rows: list[dict], max_new_tokens: int, warmup: int) -> dict:
    """One mode's figures. The warm-up (items while the anchor pool fills) only applies to modes with a pool:
    dense, prefix and relay keep none, so all their items count."""
    warm = [r for r in rows if r.get("pool_items_before", 0) >= warmup or _poolless(r["mode"])]
    calls = [c for r in rows for c in r["calls"]]
    pools = {r.get("shard", "0/1"): r["pool"] for r in sorted(rows, key=lambda r: r["index"]) if r.get("pool")}
    return {
        "accuracy": sum(r["correct"] for r in rows) / max(1, len(rows)),
        "reuse_rate": _reuse_rate(rows),
        "reuse_rate_after_warmup": _reuse_rate(warm),
        "partial_rate_after_warmup": _reuse_rate(warm, ("partial",)),
        "prefilled_tokens": sum(c["prefilled_tokens"] for c in calls),
        "prompt_tokens": sum(c["prompt_tokens"] for c in calls),
        "wire_bytes": sum(c.get("wire_bytes", 0) for c in calls),
        "cap_share": cap_share(rows, max_new_tokens),
        "cap_share_final": cap_share(rows, max_new_tokens, final_only=True),
        "finished": len(rows),
        "pool": next(iter(pools.values())) if len(pools) == 1 else None,
        **({"pool_per_shard": pools} if len(pools) > 1 else {}),
        "items": [{k: v for k, v in r.items() if k != "pool"} for r in rows],
    }


def _poolless(mode: str) -> bool:
    try:
        return parse_setting(mode)[0] != "reuse"
    except ValueError:  # a setting name from another version: treat it as one with a pool
        return False


def _reuse_rate(rows: list[dict], paths: tuple[str, ...] = REUSED) -> float:
    """Share of the calls that took one of `paths` (reuse and relay: every reused token's KV reused without
    a prefill; partial: some placeholders reused, the others recomputed)."""
    return path_share([c for r in rows for c in r["calls"]], paths)


def cap_share(rows: list[dict], max_new_tokens: int, final_only: bool = False) -> float:
    """Share of replies that hit the answer budget (len(reply_ids) == max_new_tokens): every agent call,
    or with `final_only` the reply that is graded (the last call of each item)."""
    calls = [r["calls"][-1] for r in rows if r["calls"]] if final_only else [c for r in rows for c in r["calls"]]
    return sum(len(c["reply_ids"]) == max_new_tokens for c in calls) / max(1, len(calls))


def prefill_fraction(dense_rows: list[dict], rows: list[dict]) -> float | None:
    """Tokens prefilled by `rows` over the tokens dense prefilled on the same item ids (dense prefills
    every prompt token); None without items in common."""
    dense = {d["id"]: d for d in dense_rows}
    common = [r for r in rows if r["id"] in dense]
    den = sum(c["prefilled_tokens"] for r in common for c in dense[r["id"]]["calls"])
    return sum(c["prefilled_tokens"] for r in common for c in r["calls"]) / den if den else None


def agreement(workload, dense_items: list[dict], items: list[dict]) -> dict[str, float]:
    """Shares equal to dense mode's, per item id present in both: final texts, answers (`answer_of`, as
    recorded in the rows or, for rows without it, from `workload`), every agent reply; and `items`, the
    number of items compared."""
    dense = {d["id"]: d for d in dense_items}
    pairs = [(dense[b["id"]], b) for b in items if b["id"] in dense]
    by_id = {it.id: it for it in workload.items} if workload is not None else {}

    def answer(row: dict) -> str:
        if "answer" in row:
            return row["answer"]
        if workload is None:
            return str(row["correct"])
        return workload.answer_of(by_id[row["id"]], row["final"], row.get("correct"))

    calls = [(x, y) for a, b in pairs for x, y in zip(a["calls"], b["calls"])]
    n = max(1, len(pairs))
    return {"final": sum(a["final"] == b["final"] for a, b in pairs) / n,
            "answer": sum(answer(a) == answer(b) for a, b in pairs) / n,
            "call": sum(x["reply_ids"] == y["reply_ids"] for x, y in calls) / max(1, len(calls)), "items": len(pairs)}


def ttft_by_position(mode_report: dict, skip_items: int) -> list[float]:
    """Median TTFT of each call position over the items after the warm-up (all items if none is)."""
    items = mode_report["items"]
    items = [it for it in items if it.get("pool_items_before", 0) >= skip_items] or items
    if not items:
        return []
    positions = len(items[0]["calls"])
    return [statistics.median(it["calls"][p]["ttft_ms"] for it in items) for p in range(positions)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(report: dict) -> str:
    dtype = f" ({report['dtype']})" if report.get("dtype") else ""
    return f"{report['workload']}, {report['agents']} agents, {report['topology']}, {report['model']} on {report['device']}{dtype}"


def plot_ttft(report: dict, path: Path, skip_items: int) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, m in report["modes"].items():
        ys = ttft_by_position(m, skip_items)
        ax.plot(range(1, len(ys) + 1), ys, marker="o", label=f"{mode} (reuse {m['reuse_rate_after_warmup']:.0%})")
    ax.set_xlabel("agent position (last = decision agent)")
    ax.set_ylabel("median TTFT (ms)")
    ax.set_title(_title(report))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tradeoff(report: dict, path: Path) -> None:
    """Quality against compute: x = fraction of tokens prefilled (vs dense), y = accuracy (circles) and
    answer agreement with dense (squares), one colour and label per mode."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    versus_dense = all(m.get("prefill_fraction_of") == "dense" for m in report["modes"].values())
    for i, (mode, m) in enumerate(report["modes"].items()):
        x, color, dy = m["prefill_fraction"], f"C{i}", 9 * (i % 3)  # staggered labels stay readable when points meet
        if x is None:
            continue
        ax.scatter([x], [m["accuracy"]], marker="o", s=60, color=color, label=mode)
        ax.annotate(mode, (x, m["accuracy"]), textcoords="offset points", xytext=(6, 4 + dy), fontsize=8, color=color)
        if "answer_agreement_with_dense" in m:
            ax.scatter([x], [m["answer_agreement_with_dense"]], marker="s", s=60, facecolors="none", edgecolors=color)
            ax.annotate(mode, (x, m["answer_agreement_with_dense"]), textcoords="offset points", xytext=(6, -10 - dy),
                        fontsize=8, color=color)
    ax.scatter([], [], marker="o", color="gray", label="accuracy")
    if versus_dense:
        ax.scatter([], [], marker="s", facecolors="none", edgecolors="gray", label="answer agreement with dense")
    ax.set_xlabel("fraction of tokens prefilled" + (" (dense = 1)" if versus_dense else " (of the prompt tokens)"))
    ax.set_ylabel("fraction of items")
    xs = [m["prefill_fraction"] for m in report["modes"].values() if m["prefill_fraction"] is not None]
    ax.set_xlim(0, max([1.0, *xs]) * 1.15)
    ax.set_ylim(-0.05, 1.08)
    ax.set_title(_title(report), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path) -> list[Path]:
    """agents.json and both plots into `out` (atomically); returns their paths."""
    from kvcomm.core.files import write_atomic

    paths = [out / "agents.json", out / "agents_ttft.png", out / "agents_tradeoff.png"]
    write_atomic(paths[0], json.dumps(report, indent=1, default=str))
    plot_ttft(report, paths[1], report.get("warmup", 0))
    plot_tradeoff(report, paths[2])
    return paths


def summary_table(report: dict, warmup: int):
    """The report as a rich Table: one row per mode."""
    from rich.table import Table

    first = next(iter(report["modes"].values()))
    shards = f", {report['shards']} shards" if report.get("shards", 1) > 1 else ""
    table = Table(title=f"{report['workload']}: {report['agents']} agents, {report['topology']}, "
                        f"{len(first['items'])} items{shards}, answer budget {report['max_new_tokens']} tokens")
    for col in ("mode", "accuracy", "agree w/ dense: answer / final / calls", "prefill fraction",
                "reuse rate (after warm-up)", "at budget: calls / final", "tokens prefilled / prompt",
                "median TTFT ms by position", "KV across processes MB/item"):
        table.add_column(col)
    for mode, m in report["modes"].items():
        agree = (f"{m['answer_agreement_with_dense']:.0%} / {m['final_agreement_with_dense']:.0%} / "
                 f"{m['call_agreement_with_dense']:.0%}" if "final_agreement_with_dense" in m else "-")
        frac = "-" if m.get("prefill_fraction") is None else f"{m['prefill_fraction']:.2f}"
        if m.get("prefill_fraction_of") == "prompt" and frac != "-":
            frac += " of prompt"
        partial = f" + {m['partial_rate_after_warmup']:.0%} partial" if m.get("partial_rate_after_warmup") else ""
        table.add_row(mode, f"{m['accuracy']:.1%}", agree, frac,
                      f"{m['reuse_rate']:.0%} ({m['reuse_rate_after_warmup']:.0%}{partial})",
                      f"{m['cap_share']:.0%} / {m['cap_share_final']:.0%}",
                      f"{m['prefilled_tokens']:,}/{m['prompt_tokens']:,}",
                      " ".join(f"{x:.0f}" for x in ttft_by_position(m, warmup)),
                      f"{m['wire_bytes'] / 1e6 / max(1, m['finished']):.1f}" if m.get("wire_bytes") else "-")
    return table
