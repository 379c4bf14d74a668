"""Why does a layer ranking lose to a contiguous block, and what fixes it? One model, the four tasks.

For each task: per-layer attention importance Ŝ of `--calibration` held-out items (seed + 1000) in
the paper's prompt layout, counted over every sender token (`span=sender`, what the ranking used) and
over the context's own tokens only (`span=context`, Eq. 1's c ∈ C without the chat template and its
attention sink); its spread over items; how far a 1-item ranking's top layers agree with the
all-items ranking's; then the answer-contained rate on `--items` evaluation items (seed 0) of the
layer sets that rankings of each variant select at 0.3/0.5/0.7, beside the best contiguous block of
the same ranking, a random set and Skyline. One layer set is generated once per item however many
variants pick it. Writes JSON and a plot.

  python benchmarks/ranking_probe.py --model qwen2.5-coder-0.5b --device cuda --out results/ranking-probe/q05
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvcomm.core.models import load_model
from kvcomm.experiments.metrics import contains
from kvcomm.experiments.share_eval import load_items
from kvcomm.sharing.prompts import split_prompt
from kvcomm.sharing.selection import Ranking, default_alpha, importance_per_sample, layers_for
from kvcomm.sharing.send_receive import generate, send

RATIOS = (0.3, 0.5, 0.7)


def variants(lm, imp: dict[str, torch.Tensor]) -> dict[str, Ranking]:
    """Rankings to compare: (span, calibration items, α)."""
    L, a = lm.num_layers, default_alpha(lm.config.model_type)

    def rk(raw, alpha):
        return Ranking(raw.tolist(), alpha, L / 2, 10.0, 1)

    return {"sender,1,default-alpha": rk(imp["sender"][0], a), "context,1,default-alpha": rk(imp["context"][0], a),
            "sender,all,default-alpha": rk(imp["sender"].mean(0), a), "context,all,default-alpha": rk(imp["context"].mean(0), a),
            "context,1,alpha=1": rk(imp["context"][0], 1.0), "sender,1,alpha=1": rk(imp["sender"][0], 1.0),
            "context,1,alpha=0.5": rk(imp["context"][0], 0.5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tasks", default="countries,tipsheets,twohop,needle")
    ap.add_argument("--calibration", type=int, default=16, help="held-out items whose importance is measured")
    ap.add_argument("--items", type=int, default=40, help="evaluation items per task")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "layers": lm.num_layers, "tasks": {}}
    for task in args.tasks.split(","):
        cal = [(it["context"], it["question"]) for it in load_items(task, args.calibration, 1000)]
        imp = {span: importance_per_sample(lm, cal, span=span) for span in ("sender", "context")}
        ranks = variants(lm, imp)
        sets: dict[str, list[int]] = {}
        for name, r in ranks.items():
            for ratio in RATIOS:
                sets[f"{name}@{ratio}"] = r.select(ratio)
                sets[f"{name}@{ratio} contiguous"] = layers_for("contiguous", ratio, lm.num_layers, r)
        for ratio in RATIOS:
            sets[f"random@{ratio}"] = layers_for("random", ratio, lm.num_layers)
        distinct = sorted({tuple(v) for v in sets.values()})
        right = {s: 0 for s in distinct}
        skyline = 0
        items = load_items(task, args.items, 0)
        for it in items:
            p = split_prompt(lm.tokenizer, it["context"], it["question"])
            full = send(lm, p.sender_ids)
            skyline += contains(generate(lm, p.skyline_ids, max_new_tokens=args.max_new_tokens).text, it["answers"])
            for s in distinct:
                gen = generate(lm, p.receiver_ids, full.select(list(s)), max_new_tokens=args.max_new_tokens)
                right[s] += contains(gen.text, it["answers"])
        n = len(items)
        top_agree = {}
        for span in ("sender", "context"):
            one, many = ranks[f"{span},1,default-alpha"], ranks[f"{span},all,default-alpha"]
            top_agree[span] = {r: len(set(one.select(r)) & set(many.select(r))) / len(one.select(r)) for r in RATIOS}
        report["tasks"][task] = {
            "importance": {span: {"mean": v.mean(0).tolist(), "std": v.std(0).tolist()} for span, v in imp.items()},
            "top_layers_shared_1_vs_all": top_agree,
            "skyline": skyline / n, "items": n,
            "accuracy": {k: right[tuple(v)] / n for k, v in sets.items()},
            "layers": {k: v for k, v in sets.items()},
        }
        print(task, json.dumps({k: round(v, 3) for k, v in report["tasks"][task]["accuracy"].items()}), "skyline",
              skyline / n, flush=True)
        (out / "ranking_probe.json").write_text(json.dumps(report, indent=1))
    plot(report, out / "ranking_probe.png")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 7), squeeze=False)
    for j, t in enumerate(tasks):
        d = report["tasks"][t]
        for span, colour in (("sender", "C0"), ("context", "C1")):
            m, s = torch.tensor(d["importance"][span]["mean"]), torch.tensor(d["importance"][span]["std"])
            x = range(len(m))
            axes[0][j].plot(x, m, color=colour, label=f"Ŝ over {span} tokens")
            axes[0][j].fill_between(x, m - s, m + s, color=colour, alpha=0.2)
        axes[0][j].set(title=t, xlabel="layer", ylabel="attention mass (mean ± sd over items)")
        axes[0][j].legend(fontsize=7)
        acc = d["accuracy"]
        for name, style in (("sender,1,default-alpha", "o-"), ("context,1,default-alpha", "s-"),
                            ("context,all,default-alpha", "^-"), ("sender,1,default-alpha@{} contiguous", "x--")):
            keys = [name.format(r) if "{}" in name else f"{name}@{r}" for r in RATIOS]
            axes[1][j].plot(RATIOS, [acc[k] for k in keys], style, label=name.replace("@{}", ""))
        axes[1][j].plot(RATIOS, [acc[f"random@{r}"] for r in RATIOS], "k:", label="random")
        axes[1][j].axhline(d["skyline"], color="gray", ls="--", label="skyline")
        axes[1][j].set(xlabel="share of layers sent", ylabel="answer contained", ylim=(0, 1.05))
        axes[1][j].legend(fontsize=6)
    fig.suptitle(f"layer ranking probe: {report['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
