"""The receiver's GPU cost of a compressed message: all 16 layers' keys and values of an 8B model
(8 KV heads, 128 channels) already on the device, through `kvcomm.core.message.layer_tensors`:
scale checks, dequantization of the stacked layers in one fused Triton kernel
(`kvcomm.core.quant_kernel`), finiteness check where codes can encode NaN. Median of 20. `batched_eager`:
the same with KVCOMM_TRITON=0 (broadcast group scales, cast fused, PyTorch elementwise ops). Beside it, in the same run: `per_layer`
(dequantize layer by layer) and `reference` (the stacked layers through the definition: scales
expanded to full size, float32 intermediates, a finiteness pass: the decoder before the fused path).

  python benchmarks/dequant_micro.py --out results/quant-ttft/dequant_micro.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from kvcomm.core.message import layer_tensors
from kvcomm.core.quant import Quantized, _dequantize_reference, dequantize, quantize

LAYERS, HEADS, DIM = 16, 8, 128
AXIS = {"k": "token", "v": "channel"}  # as messages carry them: keys per channel, values per token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for n in (1024, 4096, 16384):
        shape = [1, HEADS, n, DIM]
        kv = {kind: torch.randn(LAYERS, *shape, device="cuda", dtype=torch.bfloat16) for kind in "kv"}
        for p in ("fp8", "int8", "int4"):
            tensors, quantized = {}, []
            for kind, x in kv.items():
                for layer in range(LAYERS):
                    q = quantize(x[layer], p, 128, AXIS[kind])
                    quantized.append(q)
                    for part, t in q.parts().items():
                        tensors[f"{kind}.{layer}" if part == "codes" else f"{kind}_{part}.{layer}"] = t
            layers = list(range(LAYERS))

            def batched(tensors=tensors, layers=layers, p=p, shape=shape):
                return [layer_tensors(tensors, kind, layers, p, 128, shape, torch.bfloat16, "cuda") for kind in "kv"]

            def per_layer(quantized=quantized):
                return [dequantize(q, torch.bfloat16) for q in quantized]

            stacked = [Quantized(p, 128, AXIS[kind], (LAYERS, *shape),
                                 torch.stack([q.codes for q in quantized[i * LAYERS:(i + 1) * LAYERS]]),
                                 torch.stack([q.scale for q in quantized[i * LAYERS:(i + 1) * LAYERS]]),
                                 None if p != "int4" else torch.stack([q.zero for q in quantized[i * LAYERS:(i + 1) * LAYERS]]))
                       for i, kind in enumerate("kv")]

            def reference(stacked=stacked):
                out = [_dequantize_reference(q, torch.bfloat16) for q in stacked]
                return [bool(torch.isfinite(x).all()) for x in out]

            def batched_eager(batched=batched):
                os.environ["KVCOMM_TRITON"] = "0"
                try:
                    return batched()
                finally:
                    os.environ.pop("KVCOMM_TRITON")

            for name, fn in (("batched", batched), ("batched_eager", batched_eager), ("per_layer", per_layer),
                             ("reference", reference)):
                fn()
                torch.cuda.synchronize()
                times = []
                for _ in range(20):
                    t = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - t) * 1e3)
                rows.append({"context_tokens": n, "precision": p, "path": name, "ms": statistics.median(times)})
                print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
