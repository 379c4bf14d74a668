"""`kvcomm bench`: TTFT and bytes, every method side by side (kvcomm.experiments.bench)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kvcomm.cli.common import add_compile_arg, apply_compile, bounded, positive_int, setting
from kvcomm.experiments.bench import PARTS, BenchConfig, run_bench
from kvcomm.experiments.bench_models import PRESETS
from kvcomm.experiments.bench_profile import profile_calls


def parts(value: str) -> tuple[str, ...]:
    chosen = tuple(x.strip() for x in value.split(",") if x.strip())
    bad = [x for x in chosen if x not in PARTS]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(f"unknown part(s) {bad or value!r}; choose from {', '.join(PARTS)}")
    return chosen


def settings(value: str) -> tuple[str, ...]:
    chosen = tuple(setting(x.strip()) for x in value.split(",") if x.strip())
    if not chosen:
        raise argparse.ArgumentTypeError("give at least one setting")
    return chosen


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="TTFT and bytes: dense vs prefix caching vs KV reuse, KVComm vs Skyline vs NLD")
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu",
                   help="gpu: Llama-3.1-8B architecture, random bf16 weights; cpu: a small Llama for local runs")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=positive_int, default=5, help="measured requests per setting (median reported)")
    p.add_argument("--anchors", type=positive_int, default=4, help="anchors per placeholder in the pool while timing")
    p.add_argument("--parts", type=parts, default="reuse,sweep,sharing", help="comma list of reuse, sweep, sharing, peer")
    p.add_argument("--out", default="benchmarks/results/local", help="folder for bench.json and bench.png")
    p.add_argument("--fresh", action="store_true", help="ignore finished parts in --out and run everything again")
    p.add_argument("--reuse-settings", type=settings, default="dense,prefix,reuse",
                   help="comma list of reuse-part settings: dense, prefix, reuse, blend@R[:select], cacheblend@R[:select], relay, "
                        "relay@R[:select] "
                        "(e.g. dense,reuse,blend@0.05,blend@0.15,blend@0.3); a trailing +defer (reuse+defer) runs agent 1 on its "
                        "cached prefix and encodes the question's base KV after its first token; +partial recomputes only the "
                        "placeholders that fail the entropy test")
    p.add_argument("--missing-anchors", type=bounded(int, 0), default=0, metavar="N",
                   help="while timing, the last N placeholders of every prompt fail the entropy test (default 0: all "
                        "pass), so reuse falls back to dense prefill and +partial recomputes only those")
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of one agent-5 reuse call and of the receiver at each context length, with phase times")
    p.add_argument("--profile-calls", action="store_true",
                   help="with the reuse part: after timing each setting, run one more request with its last agent's "
                        "call under torch.profiler and write profile-<setting>.txt to --out (kernels, and the phases: "
                        "relay's past, choose and forward; reuse's match, assemble and forward); a reuse part already in --out's "
                        "bench.json is not run again: add --fresh")
    add_compile_arg(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    apply_compile(args)
    if args.profile:
        print(profile_calls(args.preset, Path(args.out), args.device))
        return 0
    config = BenchConfig(preset=args.preset, device=args.device, repeats=args.repeats, anchors=args.anchors,
                         parts=args.parts, fresh=args.fresh, reuse_settings=args.reuse_settings,
                         missing_anchors=args.missing_anchors, profile_calls=args.profile_calls)
    run_bench(config, Path(args.out))
    print(f"wrote {Path(args.out) / 'bench.json'}")
    return 0
