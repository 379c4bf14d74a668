"""`kvcomm agents`: a multi-agent workload in several execution modes (kvcomm.experiments.agents_report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvcomm.agents.workloads import WORKLOADS
from kvcomm.cli.common import (
    add_model_args,
    apply_compile,
    bounded,
    console,
    load,
    positive_int,
    setting,
    shard,
)


def item_list(value: str) -> tuple[int, ...]:
    """A comma list of item indices, each >= 0, sorted and without repeats."""
    try:
        items = {int(v) for v in value.split(",") if v.strip()}
    except ValueError:
        items = {-1}
    if not items or min(items) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated item indices >= 0, got {value!r}")
    return tuple(sorted(items))


def placeholder_list(value: str) -> tuple[str, ...]:
    """A comma list of placeholder names (`kvcomm.reuse.templates.placeholder_names` checks them)."""
    from kvcomm.reuse.templates import placeholder_names

    try:
        return placeholder_names(n.strip() for n in value.split(",") if n.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(sub) -> None:
    p = sub.add_parser("agents", help="multi-agent workload in dense / prefix / reuse modes, side by side",
                       description="Run a multi-agent workload in several execution modes on the same items and "
                                   "compare them (accuracy, agreement with dense, fraction of tokens prefilled, "
                                   "replies at the answer budget, TTFT). Finished items are kept under --out, so "
                                   "re-running the same command resumes; --shard K/N splits a run over processes "
                                   "and --report-only merges their results.")
    add_model_args(p)
    p.add_argument("--workload", choices=WORKLOADS, default="math",
                   help="math: short word problems; gsm: 3-5 step word problems ending in 'Answer: N' (give "
                        "--max-new-tokens 256 or so); coding: HumanEval, graded in a sandbox (all 164 problems with "
                        "--limit 164; give ~384 tokens); retrieval: a fact from a generated document (default math)")
    p.add_argument("--agents", type=bounded(int, 1, 16), default=5, help="number of agents (default 5)")
    p.add_argument("--topology", choices=["fully_connected", "chain", "star"], default="fully_connected")
    p.add_argument("--rounds", type=positive_int, default=1)
    p.add_argument("--mode", action="append", type=setting,
                   help="execution setting; repeat to compare (default: dense and reuse): dense, prefix (exact prefix "
                        "caching), relay (each agent reuses the previous agent's KV of the conversation both prompts "
                        "share past the role line, and prefills the newest reply; no anchors; local backend only), relay@R[:select] "
                        "(relay + recompute of a fraction R of the relayed tokens: the first of each segment, by deviation, or "
                        ":attention, those the closing instruction reads most), "
                        "reuse (KVCOMM's offsets), blend@R[:select] (offsets + recompute of a fraction R of the "
                        "reused tokens, picked by deviation, offset or first), cacheblend@R[:select] (recompute without offsets); "
                        "append +defer to reuse/blend/cacheblend to run the agent that first meets the question on its cached "
                        "prefix and encode the question's base KV after its reply; append +partial to reuse/blend to reuse the "
                        "placeholders that pass the entropy test and recompute only the others (instead of a dense "
                        "prefill of the whole prompt); append +keysonly to reuse/blend to add a reused placeholder's key offsets "
                        "but not its value offsets; append +newest to relay (relay the newest reply too) or +replies to "
                        "relay@R (spare the question from recompute): both measured worse, kept to reproduce; append "
                        "+decision to relay@R to recompute only in the decision agent's calls, +capB (0 < B <= 1) to "
                        "cap each call's prefill at B of its prompt (e.g. relay@1:attention+cap0.27: recompute what relay "
                        "leaves of 27%%); "
                        "e.g. reuse+partial+defer")
    p.add_argument("--limit", type=positive_int, default=10,
                   help="workload items (default 10; coding has 164: a larger --limit takes them all)")
    p.add_argument("--items", type=item_list, default=(),
                   help="comma-separated item indices (0-based, below --limit) to run instead of all, e.g. to rerun "
                        "the items whose answers changed; their rows join --out's others (default: all)")
    p.add_argument("--warmup", type=bounded(int, 0), default=2,
                   help="items excluded from the after-warm-up reuse rate and the TTFT medians, counted from where "
                        "each anchor pool started empty: per shard, and again after a resume (default 2)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32,
                   help="answer budget per agent call; the report gives the share of replies that hit it (default 32)")
    p.add_argument("--gamma", type=bounded(float, 0.0, 1.0), default=0.3, help="entropy threshold γ (default 0.3)")
    p.add_argument("--sink-head", action=argparse.BooleanOptionalAction, default=True,
                   help="encode stand-alone contents (the question, tool results) after the chat template's "
                        "agent-independent opening tokens (default); --no-sink-head encodes them alone, as the paper does")
    p.add_argument("--refresh-tail", action=argparse.BooleanOptionalAction, default=False,
                   help="on the reuse path, prefill the prompt's last template segment over the reused KV instead of "
                        "estimating its offset (a few more tokens of prefill; not in the paper)")
    p.add_argument("--tau", type=bounded(float, 0.0, lo_open=True), default=0.003, help="softmax temperature of anchor distances (default 0.003)")
    p.add_argument("--max-distance", type=bounded(float, 0.0, lo_open=True), default=None, metavar="D",
                   help="a second shareability test (not in the paper): the nearest anchor's relative value distance "
                        "must be ≤ D as well; 'inf' gates nothing and records each match's distance in the rows "
                        "(default: off)")
    p.add_argument("--never-share", type=placeholder_list, default=(), metavar="NAMES",
                   help="placeholders never reused, e.g. user_question or agent_0_current (comma list; not in the "
                        "paper): their KV is always recomputed with +partial, else the call is prefilled densely; "
                        "to measure which placeholders' offsets cost agreement (default: none)")
    p.add_argument("--max-anchors", type=positive_int, default=20, help="anchors per placeholder V (default 20)")
    p.add_argument("--pool-bytes", type=positive_int, default=2 << 30, help="byte budget of the anchor pool")
    p.add_argument("--offset-precision", choices=["bf16", "fp16", "fp32", "fp8", "int8", "int4"],
                   help="store the anchors' offsets compressed (fp8/int8/int4 quantized, as KV messages) or cast "
                        "(default: as computed); the byte budget counts the stored size")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32", "fp8", "int8", "int4"],
                   help="precision of the KV one agent hands another (replies' KV and the question's base KV), as a KV "
                        "message at that precision would deliver it (default: as computed); the Ray backend also "
                        "sends it at this precision")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=positive_int, default=1,
                   help="requests run at once (batches share one pool snapshot; outputs do not depend on it)")
    p.add_argument("--batch-decode", action="store_true",
                   help="local backend: the --concurrency requests' decodes share one batched step (continuous "
                        "batching, CUDA graph on a GPU) instead of taking turns at batch 1; in bf16 tokens may differ "
                        "slightly from batch-1 decoding (default off)")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: one process; ray: one Ray actor per agent plus a pool actor")
    p.add_argument("--address", help="Ray cluster address (default: start a local cluster)")
    p.add_argument("--gpus-per-agent", type=bounded(float, 0.0), default=None,
                   help="GPUs per agent actor (default: 1/agents when CUDA is visible, else 0)")
    p.add_argument("--cpus-per-agent", type=bounded(float, 0.0), default=0.0,
                   help="CPUs reserved per agent actor (default 0, so N agents fit on a small machine)")
    p.add_argument("--out", default="runs/agents",
                   help="output folder: finished items under shard-K-of-N/<mode>.jsonl (a re-run resumes from them), "
                        "the report as agents.json, agents_ttft.png and agents_tradeoff.png (default runs/agents)")
    p.add_argument("--shard", type=shard, default=(0, 1), metavar="K/N",
                   help="run only the K-th of N contiguous slices of the items (0 <= K < N), to split a run over N "
                        "processes with the same --out; each shard has its own anchor pool (its reuse rate and "
                        "warm-up are per shard); merge with --report-only")
    p.add_argument("--report-only", action="store_true",
                   help="merge every shard file under --out into agents.json, the plots and the table; loads no model")
    p.add_argument("--fresh", action="store_true",
                   help="discard this shard's finished items under --out and start it again")
    p.set_defaults(func=cmd_agents)



def config_of(args):
    """The run's AgentsConfig (Ray's GPUs per agent default to 1/(agents+1) where CUDA is visible)."""
    from kvcomm.agents.remote import RayConfig
    from kvcomm.experiments.agents_report import AgentsConfig
    from kvcomm.reuse.anchors import PoolConfig
    from kvcomm.reuse.config import ReuseConfig

    cluster = None
    if args.batch_decode and args.backend != "local":
        from kvcomm.core.errors import KVCommError

        raise KVCommError("--batch-decode works with the local backend only; drop it or use --backend local")
    if args.backend == "ray":
        gpus = args.gpus_per_agent
        if gpus is None:
            import torch

            gpus = 1.0 / (args.agents + 1) if torch.cuda.is_available() else 0.0
        cluster = RayConfig(address=args.address, device=None if args.device == "auto" else args.device,
                            dtype=None if args.dtype == "auto" else args.dtype, cpus_per_agent=args.cpus_per_agent,
                            gpus_per_agent=gpus)
    return AgentsConfig(model=args.model, workload=args.workload, agents=args.agents, topology=args.topology,
                        rounds=args.rounds, modes=tuple(args.mode or ("dense", "reuse")), limit=args.limit,
                        warmup=args.warmup, seed=args.seed, concurrency=args.concurrency,
                        batch_decode=args.batch_decode, shard=args.shard, only=args.items,
                        reuse=ReuseConfig(max_new_tokens=args.max_new_tokens, sink_head=args.sink_head,
                                          refresh_tail=args.refresh_tail, kv_precision=args.precision),
                        pool=PoolConfig(max_anchors=args.max_anchors, byte_budget=args.pool_bytes, gamma=args.gamma,
                                        tau=args.tau, offset_precision=args.offset_precision,
                                        max_distance=args.max_distance, never_share=args.never_share),
                        cluster=cluster)


def cmd_agents(args) -> int:
    from kvcomm.experiments.agents_report import build_report, run_modes, summary_table, write_report
    from kvcomm.experiments.agents_shards import collect, shard_dir

    apply_compile(args)  # before a local Ray cluster starts, so its actors inherit it too
    out, term = Path(args.out), console()
    if args.report_only:
        _, meta, rows = collect(out)
        report = build_report(meta, rows, args.warmup)
        paths = write_report(report, out)
        term.print(summary_table(report, args.warmup))
        found = f"{len(meta['shards_found'])} of {meta['shards']} shards"
        term.print(f"merged {found} ({sum(len(r) for r in rows.values())} item-modes); wrote {', '.join(map(str, paths))}")
        return 0
    config = config_of(args)
    lm = None if config.cluster is not None else load(args)
    report = run_modes(lm, config, out=out, fresh=args.fresh)
    term.print(summary_table(report, args.warmup))
    k, n = config.shard
    if n == 1:
        paths = write_report(report, out)
        term.print(f"wrote {', '.join(map(str, paths))}")
    else:  # shards may finish at the same time: only --report-only writes the merged report
        term.print(f"shard {k}/{n} done in {shard_dir(out, k, n)}; when every shard is, merge them: "
                   f"kvcomm agents --report-only --out {out}")
    return 0
