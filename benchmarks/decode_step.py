"""Milliseconds per generated token: eager decoding vs the fast path (static cache + CUDA graph).

Greedy decoding of `--tokens` tokens after a `--context`-token prefill of random token ids (no stop
tokens, so every path decodes the same number of steps), through `kvcomm.core.generation.greedy_continue`
as the library calls it. Each path: one untimed call first (it captures the graph), then `--repeats`
timed calls on a fresh copy of the same prefilled cache, synchronised; the median is reported. Times
include the fast path's copy of the cache into its static buffers and the copy of the new tokens' KV
back, so they are what a caller pays. Tokens are compared with the eager path's.

  python benchmarks/decode_step.py --model qwen2.5-coder-0.5b --device cuda --context 3500 --tokens 128 --out OUT.json
  python benchmarks/decode_step.py --model random:cpu --device cpu --context 256 --tokens 16   # CPU: no graphs
  python benchmarks/decode_step.py --model qwen2.5-coder-0.5b --device cuda --context 1000 --tokens 200 --batch 16

`--batch B` instead times B requests (B different random prompts of `--context` tokens) decoded by B
threads at once through a `kvcomm.core.batch_decode` server of B slots, against the same B requests
decoded one after another on the single-request path (`graph` on CUDA, `static` elsewhere): aggregate
tokens/s of each, and whether each request's tokens agree.

`--model` takes what `kvcomm.load_model` takes, or `random:gpu` / `random:cpu` (the random-weight models
of `kvcomm bench`). Paths: `eager`; `graph` (CUDA only); `static`, the static cache without graphs (the
path CPU tests check; on CUDA it shows what the graph alone buys).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from kvcomm.core import fast_decode
from kvcomm.core.generation import greedy_continue, last_path, sync
from kvcomm.core.kv import block_to_cache, cache_to_block, prefill


def load(spec: str, device: str | None, dtype: str | None):
    if spec.startswith("random:"):
        from kvcomm.experiments.bench_models import random_model

        return random_model(spec.split(":", 1)[1], device)
    from kvcomm.core.models import load_model

    return load_model(spec, device=device, dtype=dtype, progress=False)


@contextlib.contextmanager
def switches(**values: str):
    """Set kvcomm's environment switches for a block, then put back what was there (or nothing)."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_path(lm, path: str, block, logits, n: int, tokens: int, repeats: int) -> dict:
    """Time one path; returns its row (or why it did not run). `graph+compile` / `static+compile`: the
    same path with the forward through torch.compile (`KVCOMM_COMPILE=1`; the first call compiles)."""
    base, _, compiled = path.partition("+")
    if base == "graph" and lm.device.type != "cuda":
        return {"path": path, "ran": "unavailable: CUDA graphs need a CUDA device"}
    fast = {"eager": False, "graph": True, "static": None}[base]
    with switches(KVCOMM_FAST_DECODE="static" if base == "static" else "1",
                  KVCOMM_COMPILE="1" if compiled == "compile" else "0"):
        times, out, ran = [], None, None
        for _ in range(repeats + 1):
            cache = block_to_cache(lm, block)
            sync(lm.device)
            t = time.perf_counter()
            out = greedy_continue(lm, cache, logits, n, tokens, set(), feed_last=True, fast=fast)
            sync(lm.device)
            times.append(time.perf_counter() - t)
            ran = last_path() + ("+compile" if compiled and last_path() != "eager" else "")
        steady = times[1:]
        return {"path": path, "ran": ran, "tokens": out, "first_call_s": times[0],
                "ms_per_token": statistics.median(steady) / tokens * 1e3,
                "ms_per_token_min": min(steady) / tokens * 1e3, "repeats": len(steady)}


def profile_steps(lm, block, logits, n: int, steps: int, compiled: bool) -> dict:
    """CUDA kernels of `steps` decode steps on the static path without a graph (a graph hides its kernels
    from the profiler; it replays the same ones): per kernel name, launches and GPU time per step, and
    the sum, which is what a graph replay costs at best."""
    from torch.profiler import ProfilerActivity, profile

    with switches(KVCOMM_FAST_DECODE="static", KVCOMM_COMPILE="1" if compiled else "0"):
        for _ in range(2):  # compile, allocate
            greedy_continue(lm, block_to_cache(lm, block), logits, n, steps, set(), feed_last=True)
        cache = block_to_cache(lm, block)
        sync(lm.device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            greedy_continue(lm, cache, logits, n, steps, set(), feed_last=True)
            sync(lm.device)
    kernels: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name[:90], [0, 0.0])
            k[0] += 1
            k[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    rows = sorted(({"kernel": name, "launches_per_step": c / steps, "us_per_step": t / steps}
                   for name, (c, t) in kernels.items()), key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    print(f"\nstatic path{' + compile' if compiled else ''}: {sum(r['launches_per_step'] for r in rows):.0f} kernels and "
          f"{total / 1e3:.2f} ms of GPU time per step (profiler, {steps} steps); top kernels:")
    for r in rows[:15]:
        print(f"  {r['us_per_step']:8.1f} us  x{r['launches_per_step']:5.0f}  {r['kernel']}")
    return {"compiled": compiled, "ms_per_step": total / 1e3, "kernels": rows[:40]}


def run_batch(lm, prompts: list, tokens: int, repeats: int) -> list[dict]:
    """B requests through the batch server (B threads) vs one after another; aggregate tokens/s."""
    from concurrent.futures import ThreadPoolExecutor

    from kvcomm.core import batch_decode

    single = "graph" if lm.device.type == "cuda" else "static"

    def one(p, fast=True):
        logits, block = p
        cache = block_to_cache(lm, block)
        out = greedy_continue(lm, cache, logits, block.n, tokens, set(), feed_last=True, fast=fast)
        return out, last_path()

    def timed(fn):
        times, outs = [], None
        for _ in range(repeats + 1):  # the first call captures graphs
            sync(lm.device)
            t = time.perf_counter()
            outs = fn()
            sync(lm.device)
            times.append(time.perf_counter() - t)
        return outs, statistics.median(times[1:]), times[0]

    rows = []
    seq, seq_s, seq_first = timed(lambda: [one(p) for p in prompts])
    rows.append({"path": f"sequential {single}", "ran": seq[0][1], "seconds": seq_s, "first_call_s": seq_first,
                 "tokens": [o for o, _ in seq]})
    with batch_decode.serve(lm, slots=len(prompts), max_len=prompts[0][1].n + tokens) as server:
        with ThreadPoolExecutor(len(prompts)) as pool:
            bat, bat_s, bat_first = timed(lambda: list(pool.map(one, prompts)))
        rows.append({"path": f"batched x{len(prompts)}", "ran": bat[0][1], "seconds": bat_s, "first_call_s": bat_first,
                     "tokens": [o for o, _ in bat], "steps": server.steps, "captures": server.captures})
    total = sum(len(o) for o, _ in seq)
    print("\n| path | ran as | s (median) | tokens/s aggregate | first call s | same tokens as sequential |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        r["tokens_per_s"] = total / r["seconds"]
        r["same_tokens"] = [a == b for a, b in zip(r["tokens"], rows[0]["tokens"])]
        print(f"| {r['path']} | {r['ran']} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | {r['first_call_s']:.2f} | "
              f"{sum(r['same_tokens'])}/{len(prompts)} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--context", type=int, default=3500)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--paths", default="eager,graph,static", help="comma-separated: eager, graph, static, graph+compile, static+compile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=0,
                    help="B > 0: B concurrent requests through a batch_decode server vs B sequential decodes")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also list the CUDA kernels of STEPS static-path steps, plain and compiled")
    ap.add_argument("--out", default=None, help="write the rows and the set-up as JSON here")
    args = ap.parse_args()

    lm = load(args.model, args.device, args.dtype)
    vocab = lm.config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    if args.batch > 0:
        prompts = []
        for _ in range(args.batch):
            ids = torch.randint(10, min(vocab, 32000) - 10, (args.context,), generator=g).tolist()
            logits, cache, _ = prefill(lm, ids)
            prompts.append((logits[0, -1], cache_to_block(cache)))
        print(f"{lm.name} on {lm.device}, {lm.dtype}: {args.batch} requests, context {args.context}, "
              f"{args.tokens} tokens each, median of {args.repeats}", flush=True)
        rows = run_batch(lm, prompts, args.tokens, args.repeats)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"setup": vars(args) | {"device": str(lm.device), "dtype": str(lm.dtype)},
                                                  "rows": rows}, indent=1))
        return
    ids = torch.randint(10, min(vocab, 32000) - 10, (args.context,), generator=g).tolist()
    logits, cache, _ = prefill(lm, ids)
    block = cache_to_block(cache)
    print(f"{lm.name} on {lm.device} ({torch.cuda.get_device_name(lm.device) if lm.device.type == 'cuda' else platform.processor() or 'cpu'}), "
          f"{lm.dtype}, {lm.num_layers} layers, context {args.context}, {args.tokens} tokens, median of {args.repeats}; "
          f"static cache bucket {fast_decode.bucket(args.context + args.tokens)}", flush=True)

    rows = []
    for path in [p.strip() for p in args.paths.split(",") if p.strip()]:
        rows.append(run_path(lm, path, block, logits[0, -1], args.context, args.tokens, args.repeats))
    profiles = [profile_steps(lm, block, logits[0, -1], args.context, args.profile, c) for c in (False, True)] if args.profile else []
    eager = next((r["tokens"] for r in rows if r.get("ran") == "eager"), None)
    print("\n| path | ran as | ms/token (median) | min | tokens/s | first call s | speed-up | same tokens as eager |")
    print("|---|---|---|---|---|---|---|---|")
    base = next((r["ms_per_token"] for r in rows if r.get("ran") == "eager"), None)
    for r in rows:
        if "tokens" not in r:
            print(f"| {r['path']} | {r['ran']} | | | | | | |")
            continue
        if eager is not None:
            r["same_tokens"] = r["tokens"] == eager
            r["first_difference"] = next((i for i, (a, b) in enumerate(zip(r["tokens"], eager)) if a != b), None)
        same = "" if eager is None else ("yes" if r["same_tokens"] else f"no (from token {r['first_difference']})")
        speed = f"{base / r['ms_per_token']:.2f}x" if base else ""
        print(f"| {r['path']} | {r['ran']} | {r['ms_per_token']:.2f} | {r['ms_per_token_min']:.2f} | "
              f"{1e3 / r['ms_per_token']:.0f} | {r['first_call_s']:.2f} | {speed} | {same} |")
    if args.out:
        setup = {"model": lm.name, "device": str(lm.device), "dtype": str(lm.dtype), "layers": lm.num_layers,
                 "gpu": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else None,
                 "context": args.context, "tokens": args.tokens, "repeats": args.repeats,
                 "bucket": fast_decode.bucket(args.context + args.tokens),
                 "torch": torch.__version__, "transformers": transformers.__version__}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"setup": setup, "rows": rows, "profiles": profiles}, indent=1))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
