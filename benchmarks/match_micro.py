"""Anchor matching's heavy part, up to three ways in one run: the stacked [A, L, H, n, D] float32 form
(as the paper writes it), kvcomm's eager per-anchor reductions (`kvcomm.reuse.weighing.square_distances`
and `blend` with KVCOMM_TRITON=0) and, on CUDA, its Triton kernels (`kvcomm.reuse.match_kernel`).
One placeholder of an 8B-shaped model by default: 32 layers x 8 KV heads x 128 channels, 1,000 tokens,
4 anchors, bf16 KV. Median of --repeats.

  python benchmarks/match_micro.py --device cpu --out results/match-micro/cpu.json
  python benchmarks/match_micro.py --device cuda --out results/match-micro/h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from kvcomm.reuse import match_kernel
from kvcomm.reuse.weighing import blend as _blend
from kvcomm.reuse.weighing import square_distances as _square_distances


def stacked(v, anchors, dphi, segs, w_tok, w_ch):
    sq = torch.stack([v.float() - a.float() for a in anchors]).square_()
    d_tok, d_ch = sq.mean(dim=(1, 2, 4)), sq.mean(dim=3)
    p = (w_tok * torch.stack(dphi)).sum(0).to(torch.bfloat16)
    s = (w_ch * torch.stack(segs)).sum(0).to(torch.bfloat16)
    return d_tok, d_ch, p, s


def kvcomm_path(v, anchors, dphi, segs, w_tok, w_ch):
    d_tok, d_ch, _ = _square_distances(v, anchors)
    return d_tok, d_ch, _blend(dphi, w_tok, torch.bfloat16), _blend(segs, w_ch, torch.bfloat16)


def eager(*args):
    os.environ["KVCOMM_TRITON"] = "0"
    try:
        return kvcomm_path(*args)
    finally:
        del os.environ["KVCOMM_TRITON"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--anchors", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    L, H, n, D, A, dev = args.layers, 8, args.tokens, 128, args.anchors, args.device
    bf = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16).to(dev)  # noqa: E731
    v = bf(L, H, n, D)
    anchors, dphi, segs = [bf(L, H, n, D) for _ in range(A)], [bf(L, H, n, D) for _ in range(A)], [bf(L, H, 20, D) for _ in range(A)]
    w_tok = torch.softmax(torch.randn(A, 1, 1, n, 1, generator=g), 0).to(dev)
    w_ch = torch.softmax(torch.randn(A, L, H, 1, D, generator=g), 0).to(dev)
    rows, outs = {}, {}
    variants = [("stacked", stacked), ("per_anchor", eager)]
    if match_kernel.available(v):
        variants.append(("kernel", kvcomm_path))
    for name, fn in variants:
        fn(v, anchors, dphi, segs, w_tok, w_ch)
        times = []
        for _ in range(args.repeats):
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn(v, anchors, dphi, segs, w_tok, w_ch)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
        rows[name] = statistics.median(times)
        outs[name] = fn(v, anchors, dphi, segs, w_tok, w_ch)
    report = {"setup": {"layers": L, "kv_heads": H, "tokens": n, "head_dim": D, "anchors": A, "device": dev,
                        "torch": torch.__version__, "threads": torch.get_num_threads()},
              "ms": rows, "speedup_vs_stacked": {k: rows["stacked"] / t for k, t in rows.items()},
              "max_abs_diff_vs_stacked": {k: [float((x.float() - y.float()).abs().max()) for x, y in zip(outs["stacked"], o)]
                                          for k, o in outs.items()}}
    print(json.dumps(report, indent=1))
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
