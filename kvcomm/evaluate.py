"""`kvcomm eval share`: selective-sharing methods × tasks, resumable, with the paper's metrics.

Methods implemented so far: `baseline` (question only), `skyline` (context + question), and at each
ratio `kvcomm` (attention importance + prior), `random` (seeded) and `contiguous` (the best-scoring
contiguous chunk of the same size). NLD, CIPHER, AC and online recalibration are not implemented yet.

Every finished (task, item, method) is appended to `results.jsonl` at once and skipped on a re-run,
so an interrupted run resumes where it stopped. The ranking per task is calibrated on one sample and
saved in the output folder: for a generated task a held-out one (seed + 1000); for a user JSONL file
its first item, which is also evaluated (a file has no held-out split). Costs per item: bytes on the wire and analytic
FLOPs for sender and receiver (`bench.prefill_flops`), wall time.
"""

from __future__ import annotations

import json
from pathlib import Path

from .bench import prefill_flops
from .datasets import read_jsonl
from .metrics import exact_match, match, rouge_l_recall, token_f1
from .prompts import baseline_ids, split_prompt
from .selection import Ranking, calibrate, contiguous_layers, random_layers
from .sharing import generate, send
from .tasks import generate as generate_task

RATIO_METHODS = ("kvcomm", "random", "contiguous")


def load_items(task: str, limit: int, seed: int) -> list[dict]:
    if task.endswith(".jsonl"):
        return read_jsonl(task, require_answers=True)[:limit]
    return generate_task(task, limit, seed)


def method_names(methods: list[str], ratios: list[float]) -> list[str]:
    names = []
    for m in methods:
        names += [f"{m}@{r}" for r in ratios] if m in RATIO_METHODS else [m]
    return names


def task_ranking(lm, task: str, seed: int, out: Path) -> Ranking:
    path = out / "rankings" / f"{Path(task).stem}.json"
    if path.exists():
        return Ranking.load(path)
    held_out = load_items(task, 1, seed + 1000)  # a JSONL file ignores the seed: its first item
    ranking = calibrate(lm, [(held_out[0]["context"], held_out[0]["question"])], task=task)
    ranking.save(path)
    return ranking


def run_item(lm, item: dict, method: str, ranking: Ranking, seed: int, max_new_tokens: int) -> dict:
    name, _, ratio = method.partition("@")
    split = split_prompt(lm.tokenizer, item["context"], item["question"])
    n_ctx, n_q = len(split.sender_ids), len(split.receiver_ids)
    layers, nbytes, sender_flops = [], 0, 0.0
    if name == "baseline":
        gen = generate(lm, baseline_ids(lm.tokenizer, item["question"]), max_new_tokens=max_new_tokens)
        receiver_flops = prefill_flops(lm, gen.prompt_tokens)
    elif name == "skyline":
        gen = generate(lm, split.skyline_ids, max_new_tokens=max_new_tokens)
        receiver_flops = prefill_flops(lm, n_ctx + n_q)
    else:
        r = float(ratio)
        if name == "kvcomm":
            layers = ranking.select(r)
        elif name == "random":
            layers = random_layers(lm.num_layers, r, seed)
        else:
            layers = contiguous_layers(lm.num_layers, r, scores=ranking.combined())
        msg = send(lm, split.sender_ids, layers)
        nbytes = msg.payload_bytes
        sender_flops = prefill_flops(lm, n_ctx)
        gen = generate(lm, split.receiver_ids, msg, max_new_tokens=max_new_tokens)
        receiver_flops = prefill_flops(lm, n_q, past=round(n_ctx * len(layers) / lm.num_layers))
    answers = item["answers"]
    return {"task": item["_task"], "id": item["id"], "method": method, "answer": gen.text,
            "f1": token_f1(gen.text, answers), "match": match(gen.text, answers), "em": exact_match(gen.text, answers),
            "rouge_l": rouge_l_recall(gen.text, answers), "layers": layers, "bytes": nbytes,
            "sender_flops": sender_flops, "receiver_flops": receiver_flops, "ttft_ms": gen.ttft_s * 1e3,
            "total_ms": gen.total_s * 1e3}


def run_eval(lm, tasks: list[str], methods: list[str], ratios: list[float], limit: int, out: Path, seed: int = 0,
             max_new_tokens: int = 24, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[(row["task"], row["id"], row["method"])] = row
    names = method_names(methods, ratios)
    todo = []
    rankings = {}
    for task in tasks:
        items = load_items(task, limit, seed)
        if any(m.partition("@")[0] in RATIO_METHODS for m in names):
            rankings[task] = task_ranking(lm, task, seed, out)
        for item in items:
            item = dict(item, _task=task)
            todo += [(item, m) for m in names if (task, item["id"], m) not in done]
    skipped = len(done)
    with open(results_path, "a") as f:
        for item, m in tqdm(todo, desc="eval", disable=not progress, unit="run"):
            row = run_item(lm, item, m, rankings.get(item["_task"]), seed, max_new_tokens)
            f.write(json.dumps(row) + "\n")
            f.flush()
            done[(row["task"], row["id"], row["method"])] = row
    summary = summarise(list(done.values()), tasks, names)
    summary.update({"model": lm.name, "limit": limit, "seed": seed, "ran": len(todo), "resumed": skipped,
                    "rankings": {t: r.raw for t, r in rankings.items()}})
    tmp = out / "summary.json.partial"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "summary.json")
    (out / "table.md").write_text(markdown_table(summary))
    plot(summary, out)
    return summary


def summarise(rows: list[dict], tasks: list[str], names: list[str]) -> dict:
    table: dict = {}
    for m in names:
        table[m] = {}
        for t in tasks:
            sel = [r for r in rows if r["method"] == m and r["task"] == t]
            if sel:
                table[m][t] = {k: sum(float(r[k]) for r in sel) / len(sel) for k in ("match", "em", "f1", "rouge_l", "bytes",
                                                                                     "sender_flops", "receiver_flops", "ttft_ms")}
                table[m][t]["n"] = len(sel)
    return {"tasks": tasks, "methods": names, "table": table}


def markdown_table(summary: dict) -> str:
    tasks = summary["tasks"]
    lines = ["| method | " + " | ".join(Path(t).stem for t in tasks) + " | mean | bytes/item |",
             "|---" * (len(tasks) + 3) + "|"]
    for m in summary["methods"]:
        cells = [summary["table"][m].get(t, {}).get("match") for t in tasks]
        vals = [c for c in cells if c is not None]
        mean_bytes = [summary["table"][m][t]["bytes"] for t in tasks if t in summary["table"][m]]
        lines.append(f"| {m} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells)
                     + f" | {sum(vals) / len(vals):.2f} | {sum(mean_bytes) / max(1, len(mean_bytes)):,.0f} |")
    return "\n".join(lines) + "\n\nmatch rate = share of answers with token F1 > 0.5 (the paper's 'F1')\n"


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    tasks, table = summary["tasks"], summary["table"]

    def mean(m, key):
        vals = [table[m][t][key] for t in tasks if t in table[m]]
        return sum(vals) / len(vals) if vals else None

    for base in RATIO_METHODS:
        pts = sorted((float(m.split("@")[1]), mean(m, "match")) for m in summary["methods"] if m.startswith(base + "@"))
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=base)
    for m, style in (("skyline", "--"), ("baseline", ":")):
        if m in table and mean(m, "match") is not None:
            axes[0].axhline(mean(m, "match"), ls=style, color="gray", label=m)
    axes[0].set(xlabel="share of layers sent", ylabel="match rate (mean over tasks)", title="accuracy vs layer ratio")
    axes[0].legend(fontsize=8)
    for m in summary["methods"]:
        if mean(m, "bytes"):
            axes[1].scatter(mean(m, "bytes"), mean(m, "match"), label=m)
    axes[1].set(xscale="log", xlabel="bytes sent per item", ylabel="match rate", title="accuracy vs bytes")
    axes[1].legend(fontsize=7)
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


def add_parser(sub, add_model_args, positive_int) -> None:
    p = sub.add_parser("eval", help="evaluate methods × tasks (selective sharing), resumable")
    p.add_argument("what", choices=["share"], help="what to evaluate (share = selective KV sharing)")
    add_model_args(p)
    p.add_argument("--tasks", default="countries,tipsheets,twohop,needle",
                   help="comma list of countries, tipsheets, twohop, needle[:words], or .jsonl paths")
    p.add_argument("--methods", default="baseline,skyline,kvcomm,random,contiguous",
                   help="comma list of baseline, skyline, kvcomm, random, contiguous")
    p.add_argument("--ratios", default="0.3,0.5,0.7", help="layer ratios for kvcomm/random/contiguous")
    p.add_argument("--limit", type=positive_int, default=200, help="items per task (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=positive_int, default=24)
    p.add_argument("--out", default="runs/eval", help="output folder (re-running resumes)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from .cli import _load
    from .errors import DataError

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ("baseline", "skyline", *RATIO_METHODS)]
    if unknown:
        raise DataError(f"unknown or not yet implemented methods {unknown}; choose baseline, skyline, kvcomm, random, contiguous")
    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        raise DataError(f"--ratios must be numbers in (0, 1], got {args.ratios!r}") from None
    if not ratios or not all(0 < r <= 1 for r in ratios):
        raise DataError(f"--ratios must be numbers in (0, 1], got {args.ratios!r}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        load_items(t, 1, args.seed)  # fail fast on a bad task name or JSONL file, before loading the model
    lm = _load(args)
    summary = run_eval(lm, tasks, methods, ratios, args.limit, Path(args.out), args.seed, args.max_new_tokens)
    print(markdown_table(summary))
    print(f"ran {summary['ran']} item-methods, resumed {summary['resumed']}; wrote {args.out}/summary.json, table.md, eval.png")
    return 0
