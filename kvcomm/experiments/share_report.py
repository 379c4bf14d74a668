"""Tables, statistics and plots of a sharing evaluation, from its results rows alone (no model needed).

Two scores per reply: `contains` (a gold answer occurs in the reply: recall, whatever the reply's
length) and the paper's `match` (token F1 > 0.5 on the reply's first line). Each table names the
prompt layout, the answer budget and prefix, and the share of replies that hit the budget
(`capped`), so a cut reply is never mistaken for a wrong one. Selection quality: exact McNemar tests
of KVComm against Random and against Contiguous at each ratio, paired over every item of every task.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvcomm.core.errors import DataError
from kvcomm.core.files import write_atomic
from kvcomm.experiments.metrics import mcnemar_exact
from kvcomm.sharing.selection import METHODS as RATIO_METHODS
from kvcomm.sharing.selection import Ranking, score_suffix

PLAIN_METHODS = ("baseline", "skyline", "nld", "cipher", "ac-replace", "ac-mean", "ac-sum")
MEANS = ("contains", "match", "em", "f1", "rouge_l", "capped", "bytes", "sender_flops", "receiver_flops", "ttft_ms",
         "sender_s")


def read_results(path: Path) -> dict:
    """Finished rows keyed by (task, id, method). A torn last line (killed mid-write) is cut off the file."""
    done: dict = {}
    if not path.exists():
        return done
    good = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                row = json.loads(raw)
            except ValueError:
                break
            if not raw.endswith(b"\n"):
                break
            done[(row["task"], row["id"], row["method"])] = row
            good += len(raw)
    if good != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def summarise(rows: list[dict], tasks: list[str], names: list[str]) -> dict:
    """Means per (method, task), and KVComm against Random and Contiguous per ratio."""
    table: dict = {}
    for m in names:
        table[m] = {}
        for t in tasks:
            sel = [r for r in rows if r["method"] == m and r["task"] == t]
            if sel:
                table[m][t] = {k: sum(float(r.get(k, 0)) for r in sel) / len(sel) for k in MEANS}
                table[m][t]["n"] = len(sel)
    return {"tasks": tasks, "methods": names, "table": table, "comparisons": compare(rows, names)}


def compare(rows: list[dict], names: list[str]) -> dict:
    """Exact McNemar on `contains`, over items both ran: kvcomm@r and fidelity@r against random@r,
    contiguous@r and Skyline, and fidelity@r against kvcomm@r."""
    by = {(r["task"], r["id"], r["method"]): bool(r.get("contains", r["match"])) for r in rows}
    out = {}
    for m in names:
        base, _, r = m.partition("@")
        if base not in ("kvcomm", "fidelity"):
            continue
        others = [f"random@{r}", f"contiguous@{r}", "skyline"] + ([f"kvcomm@{r}"] if base == "fidelity" else [])
        for other in others:
            keys = [(t, i) for (t, i, mm) in by if mm == m and (t, i, other) in by]
            if keys:
                a, b = [by[(t, i, m)] for t, i in keys], [by[(t, i, other)] for t, i in keys]
                out[f"{m} vs {other}"] = {"items": len(keys), "kvcomm": sum(a), "other": sum(b), **mcnemar_exact(a, b)}
    return out


def _mean(table: dict, m: str, key: str, tasks: list[str]) -> float | None:
    vals = [table[m][t][key] for t in tasks if t in table[m]]
    return sum(vals) / len(vals) if vals else None


def markdown_table(summary: dict) -> str:
    """Answer contained and F1 match, methods × tasks (the paper's table), then costs and comparisons."""
    tasks, table = summary["tasks"], summary["table"]
    methods = [m for m in summary["methods"] if table.get(m)]
    names = [Path(t).stem for t in tasks]
    sky = _mean(table, "skyline", "contains", tasks) if "skyline" in methods else None
    head = (f"model {summary.get('model', '?')}; layout {summary.get('layout', '?')}; calibration span "
            f"{summary.get('span', '?')}; KV precision {summary.get('precision') or 'model dtype'}; answer budget "
            f"{summary.get('max_new_tokens', '?')} tokens; answer prefix {summary.get('answer_prefix', '')!r}\n\n")
    lines = ["| method | " + " | ".join(names) + " | mean | % of Skyline | replies capped |",
             "|---" * (len(tasks) + 4) + "|"]
    for m in methods:
        cells = [table[m].get(t, {}).get("contains") for t in tasks]
        mean = _mean(table, m, "contains", tasks)
        rel = f"{mean / sky:.0%}" if sky else "-"
        lines.append(f"| {m} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells)
                     + f" | {mean:.3f} | {rel} | {_mean(table, m, 'capped', tasks):.0%} |")
    f1 = ["| method | " + " | ".join(names) + " | mean | bytes/item | sender GFLOP | receiver GFLOP | sender ms "
          "| receiver TTFT ms |", "|---" * (len(tasks) + 7) + "|"]
    for m in methods:
        cells = [table[m].get(t, {}).get("match") for t in tasks]
        f1.append(f"| {m} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells)
                  + f" | {_mean(table, m, 'match', tasks):.3f} | {_mean(table, m, 'bytes', tasks):,.0f} "
                  f"| {_mean(table, m, 'sender_flops', tasks) / 1e9:.2f} | {_mean(table, m, 'receiver_flops', tasks) / 1e9:.2f} "
                  f"| {_mean(table, m, 'sender_s', tasks) * 1e3:.0f} | {_mean(table, m, 'ttft_ms', tasks):.0f} |")
    n = {t: max((table[m][t]["n"] for m in table if t in table[m]), default=0) for t in tasks}
    comp = ["| comparison (answer contained) | items | first right | second right | first only | second only | exact McNemar p |",
            "|---|---|---|---|---|---|---|"]
    for k, c in summary.get("comparisons", {}).items():
        comp.append(f"| {k} | {c['items']} | {c['kvcomm']} | {c['other']} | {c['a_only']} | {c['b_only']} | {c['p']:.2g} |")
    return (head + "**Answer contained** (a gold answer occurs in the reply)\n\n" + "\n".join(lines)
            + "\n\n**Token-F1 match** (the paper's 'F1': F1 > 0.5 on the reply's first line) and costs per item\n\n"
            + "\n".join(f1) + "\n\n" + "\n".join(comp) + "\n\nitems per task: "
            + ", ".join(f"{Path(t).stem} {k}" for t, k in n.items()) + "\n")


def ranking_file(out: Path, task: str, score: str = "attention") -> Path:
    """Where an evaluation run keeps a task's ranking by `score`."""
    return out / "rankings" / f"{Path(task).stem}{score_suffix(score)}.json"


def report(out: Path, tasks: list[str], names: list[str]) -> dict:
    """Summary, table and plot from `results.jsonl` as it stands (a partial run included), no model needed."""
    rows = list(read_results(out / "results.jsonl").values())
    if not rows:
        raise DataError(f"{out / 'results.jsonl'} holds no finished results yet; run without --report-only first")
    summary = summarise(rows, tasks, names)
    paths = {t: ranking_file(out, t) for t in tasks}
    rankings = {t: Ranking.load(p) for t, p in paths.items() if p.exists()}
    fidelity = {t: ranking_file(out, t, "fidelity") for t in tasks}
    orders = {t: Ranking.load(p).order() for t, p in fidelity.items() if p.exists()}
    counts = [c["n"] for cells in summary["table"].values() for c in cells.values()]
    complete = len(counts) == len(tasks) * len(names) and len(set(counts)) == 1
    settings = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    # the model, as the calibrations recorded it (a file path shortened to its name)
    models = {Path(r.model).name for r in rankings.values()} - {""}
    summary.update({"rows": len(rows), "partial": not complete, "rankings": {t: r.raw for t, r in rankings.items()},
                    **({"fidelity_orders": orders} if orders else {}),
                    "model": ", ".join(sorted(models)), **{k: settings[k] for k in ("layout", "span", "precision", "max_new_tokens",
                                                                                   "answer_prefix") if k in settings}})
    write_report(out, summary)
    return summary


def write_report(out: Path, summary: dict) -> None:
    write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    write_atomic(out / "table.md", markdown_table(summary))
    plot(summary, out)


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6), gridspec_kw={"width_ratios": [1.15, 1.15, 1]})
    tasks, table = summary["tasks"], summary["table"]

    def mean(m, key):
        vals = [table[m][t][key] for t in tasks if t in table[m]]
        return sum(vals) / len(vals) if vals else None

    # One colour per method family in both panels; ratio methods that coincide (kvcomm and
    # kvcomm-online often do) stay visible through different line styles and marker sizes.
    colour = {m: f"C{i}" for i, m in enumerate(RATIO_METHODS + PLAIN_METHODS)}
    style = {"kvcomm": ("-", 9), "kvcomm-online": ("--", 5), "fidelity": ("-", 7), "random": ("-", 6),
             "contiguous": (":", 6)}
    for base in RATIO_METHODS:
        pts = sorted((float(m.split("@")[1]), mean(m, "contains")) for m in summary["methods"]
                     if m.startswith(base + "@") and mean(m, "contains") is not None)
        if pts:
            ls, ms = style.get(base, ("-", 6))
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], ls=ls, marker="o", ms=ms, color=colour[base], label=base)
    for i, m in enumerate(PLAIN_METHODS):
        if m in table and mean(m, "contains") is not None:
            axes[0].axhline(mean(m, "contains"), ls=("--", ":", "-.")[i % 3], color=colour[m], label=m, lw=1.2)
    axes[0].set(xlabel="share of layers sent", ylabel="answer contained (mean over tasks)", title="accuracy vs layer ratio")
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    markers = {0: "o", 1: "s", 2: "^", 3: "D"}
    ratios = sorted({m.split("@")[1] for m in summary["methods"] if "@" in m}, key=float)
    for m in summary["methods"]:
        if mean(m, "bytes"):
            base, _, r = m.partition("@")
            axes[1].scatter(mean(m, "bytes"), mean(m, "contains"), color=colour[base], label=m, s=36,
                            marker=markers.get(ratios.index(r) if r else 3, "o"), alpha=0.85)
    axes[1].set(xscale="log", xlabel="bytes sent per item", ylabel="answer contained", title="accuracy vs bytes")
    if axes[1].collections:
        axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), ncol=1)
    for t, raw in summary.get("rankings", {}).items():
        axes[2].plot(range(len(raw)), raw, marker=".", label=Path(t).stem)
    axes[2].set(xlabel="layer", ylabel="attention importance Ŝ_l", title="per-layer importance (calibration)")
    if summary.get("rankings"):
        axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"selective KV sharing on {summary.get('model', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "eval.png", dpi=120)
    plt.close(fig)
