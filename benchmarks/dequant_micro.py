"""Dequantization alone on the GPU: the KV of 16 layers of an 8B model (8 KV heads, 128 channels),
keys per channel and values per token as messages carry them, codes already on the device; median of 20.

  python benchmarks/dequant_micro.py --out results/quant-ttft/dequant_micro.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvcomm.core.quant import dequantize, quantize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    layers, heads, dim = 16, 8, 128
    rows = []
    for n in (1024, 4096, 16384):
        k = torch.randn(layers, 1, heads, n, dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(layers, 1, heads, n, dim, device="cuda", dtype=torch.bfloat16)
        for p in ("fp8", "int8", "int4"):
            qk = [quantize(k[i], p, 128, axis="token") for i in range(layers)]  # as messages: keys grouped along tokens
            qv = [quantize(v[i], p, 128, axis="channel") for i in range(layers)]  # values along channels

            def run(qk=qk, qv=qv):
                return [dequantize(q, torch.bfloat16) for q in qk + qv]

            run()
            torch.cuda.synchronize()
            times = []
            for _ in range(20):
                t = time.perf_counter()
                run()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t) * 1e3)
            rows.append({"context_tokens": n, "precision": p, "dequantize_ms": statistics.median(times)})
            print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
