"""Markdown table of one or more `kvcomm agents` reports (agents.json), one row per setting.

Usage: python benchmarks/agents_table.py results/agents-gsm3-q05 [more report folders]
Columns: items, accuracy (and dense's on the same items), answer / final text / agent-call agreement
with dense, fraction of dense's prefilled tokens, reuse rate after warm-up, replies at the budget.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(report: dict) -> list[str]:
    out = []
    for mode, m in report["modes"].items():
        agree = (f"{m['answer_agreement_with_dense']:.0%} / {m['final_agreement_with_dense']:.0%} / "
                 f"{m['call_agreement_with_dense']:.0%}") if "answer_agreement_with_dense" in m else "–"
        dense_acc = m.get("dense_accuracy_same_items")
        acc = f"{m['accuracy']:.1%}" + (f" ({dense_acc:.1%})" if dense_acc is not None and mode != "dense" else "")
        frac = m.get("prefill_fraction")
        partial = f" + {m['partial_rate_after_warmup']:.0%} partial" if m.get("partial_rate_after_warmup") else ""
        out.append(f"| {mode} | {m['finished']} | {acc} | {agree} | {'–' if frac is None else f'{frac:.1%}'} | "
                   f"{m['reuse_rate_after_warmup']:.0%}{partial} | {m['cap_share']:.1%} / {m['cap_share_final']:.1%} |")
    return out


def main() -> None:
    for folder in sys.argv[1:]:
        report = json.loads((Path(folder) / "agents.json").read_text())
        dtype = f" ({report['dtype']})" if report.get("dtype") else ""
        print(f"\n{report['workload']}, {report['agents']} agents + judge, {report['model']} on {report['device']}{dtype}, "
              f"budget {report['max_new_tokens']} tokens ({folder})\n")
        print("| setting | items | accuracy (dense, same items) | same answer / final text / agent calls as dense | "
              "tokens prefilled vs dense | reuse rate after warm-up | replies at budget (all / final) |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows(report)))


if __name__ == "__main__":
    main()
