"""Partial reuse's recompute of a failing newest placeholder, two ways in one run: the masked forward over
the whole assembled cache (`kvcomm.reuse.blend.masked_recompute`, any picks) and the prefill of the
contiguous picks over the KV before them (`recompute`'s shortcut for picks that reach the tail). The
benchmark's agent 5 by default: 3,600-token prompt, the last 520 tokens recomputed (a 512-token reply and
its 8-token segment), random-weight Llama-3.1-8B architecture in bf16 (`--preset cpu`: a small Llama).
Median of --repeats, the two alternating.

  python benchmarks/recompute_micro.py --device cuda --out results/recompute-micro/h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvcomm.core.generation import sync
from kvcomm.core.kv import cache_to_block, prefill
from kvcomm.experiments.bench_models import random_ids, random_model
from kvcomm.reuse.blend import masked_recompute, recompute


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpu", choices=("gpu", "cpu"))
    ap.add_argument("--device", default=None)
    ap.add_argument("--prompt", type=int, default=3600)
    ap.add_argument("--picked", type=int, default=520)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    lm = random_model(a.preset, a.device)
    ids = random_ids(a.prompt, torch.Generator().manual_seed(0), lm.config.vocab_size)
    t = a.prompt - 1  # the last token always runs
    assembled = cache_to_block(prefill(lm, ids[:t])[1])
    picked = list(range(t - a.picked + 1, t))
    ways = {"masked forward": lambda: masked_recompute(lm, ids, assembled, picked),
            "prefill of the suffix": lambda: recompute(lm, ids, assembled, picked)}
    times = {k: [] for k in ways}
    for _ in range(2):  # warm-up
        for fn in ways.values():
            fn()
    for _ in range(a.repeats):
        for name, fn in ways.items():
            sync(lm.device)
            s = time.perf_counter()
            fn()
            sync(lm.device)
            times[name].append((time.perf_counter() - s) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:24s} {v:8.2f} ms")
    print(f"ratio masked / prefill: {med['masked forward'] / med['prefill of the suffix']:.2f}x")
    if a.out:
        import pathlib
        pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        env = {"device": str(lm.device), "dtype": str(lm.dtype), "gpu": torch.cuda.get_device_name() if lm.device.type == "cuda" else None}
        pathlib.Path(a.out).write_text(json.dumps({"args": vars(a), "env": env, "median_ms": med, "all_ms": times}, indent=1))


if __name__ == "__main__":
    main()
