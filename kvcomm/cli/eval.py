"""`kvcomm eval share`: the selective-sharing evaluation (kvcomm.experiments.share_eval)."""

from __future__ import annotations

from pathlib import Path

from kvcomm.cli.common import add_layout_arg, add_model_args, load, positive_int, shard
from kvcomm.core.errors import DataError
from kvcomm.core.quant import PRECISIONS
from kvcomm.experiments.share_eval import (
    DEFAULT_METHODS,
    DEFAULT_TASKS,
    RATIO_METHODS,
    EvalConfig,
    expand_methods,
    load_items,
    method_names,
    run_eval,
)
from kvcomm.experiments.share_report import PLAIN_METHODS, markdown_table, report
from kvcomm.sharing.selection import DEFAULT_SPAN, SPANS


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate methods × tasks (selective sharing), resumable",
                       description="Compare KV sharing with Baseline, Skyline, NLD, CIPHER, AC, Random and contiguous "
                                   "layers on generated tasks or your JSONL files. Re-running with the same --out resumes.")
    p.add_argument("what", choices=["share"], help="what to evaluate (share = selective KV sharing)")
    add_model_args(p)
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help="comma list of countries, tipsheets, twohop, needle[:words], or .jsonl paths")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list of {', '.join(PLAIN_METHODS + RATIO_METHODS)}; 'ac' = its three modes (default: all)")
    p.add_argument("--ratios", default="0.3,0.5,0.7", help="layer ratios for kvcomm/kvcomm-online/random/contiguous")
    p.add_argument("--limit", type=positive_int, default=200, help="items per task (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=positive_int, default=32,
                   help="answer budget; the table reports the share of replies that hit it (default 32)")
    p.add_argument("--answer-prefix", default="",
                   help="text that starts every reply, e.g. 'The answer is:' (default: none)")
    add_layout_arg(p)
    p.add_argument("--span", choices=SPANS, default=DEFAULT_SPAN,
                   help="what calibration counts as attention on the context: every sender token (sender) or the "
                        f"context's own tokens (context); default {DEFAULT_SPAN}")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="send the KV messages at this precision (fp8/int8/int4 quantized; default: the model's dtype)")
    p.add_argument("--calibration-items", type=positive_int, default=1, metavar="N",
                   help="held-out items per task each ranking is calibrated on (default 1, as in the paper)")
    p.add_argument("--recalibrate-every", type=positive_int, default=50, metavar="T",
                   help="kvcomm-online recalibrates on every T-th query (default 50)")
    p.add_argument("--summary-tokens", type=positive_int, default=48, help="NLD/CIPHER message length (default 48)")
    p.add_argument("--ac-layer", type=int, default=None, help="AC layer k = j (default round(26/32 · layers))")
    p.add_argument("--out", default="runs/eval", help="output folder (re-running resumes)")
    p.add_argument("--shard", type=shard, default=(0, 1), metavar="K/N",
                   help="run only items whose index is K mod N (0 <= K < N), to split a run over N processes "
                        "with separate --out folders; concatenate their results.jsonl and --report-only")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite summary.json, table.md and eval.png from the results so far; run nothing")
    p.set_defaults(func=cmd_eval)


def config_of(args) -> EvalConfig:
    """The run's EvalConfig; bad methods, ratios, tasks or files fail here, before any model loads."""
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    expand_methods(list(methods))
    try:
        ratios = tuple(float(r) for r in args.ratios.split(",") if r.strip())
    except ValueError:
        raise DataError(f"--ratios must be numbers in (0, 1], got {args.ratios!r}") from None
    if not ratios or not all(0 < r <= 1 for r in ratios):
        raise DataError(f"--ratios must be numbers in (0, 1], got {args.ratios!r}")
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    for t in tasks:
        load_items(t, 1, args.seed)
    return EvalConfig(tasks=tasks, methods=methods, ratios=ratios, limit=args.limit, seed=args.seed,
                      max_new_tokens=args.max_new_tokens, answer_prefix=args.answer_prefix,
                      recalibrate_every=args.recalibrate_every, calibration_items=args.calibration_items,
                      summary_tokens=args.summary_tokens,
                      ac_layer=args.ac_layer, shard=args.shard, layout=args.layout, span=args.span,
                      precision=args.precision)


def cmd_eval(args) -> int:
    config = config_of(args)
    if args.report_only:
        summary = report(Path(args.out), list(config.tasks), method_names(list(config.methods), list(config.ratios)))
        print(markdown_table(summary))
        print(f"wrote {args.out}/summary.json, table.md, eval.png from {summary['rows']} finished item-methods")
        return 0
    lm = load(args)
    if args.ac_layer is not None and not 0 <= args.ac_layer < lm.num_layers:
        raise DataError(f"--ac-layer must be in 0..{lm.num_layers - 1} for {lm.name}, got {args.ac_layer}")
    summary = run_eval(lm, config, Path(args.out))
    print(markdown_table(summary))
    print(f"ran {summary['ran']} item-methods, resumed {summary['resumed']}; wrote {args.out}/summary.json, table.md, eval.png")
    return 0
