"""What compressed KV messages cost and save: bytes per context token and the receiver's added TTFT.

Random-weight model of a real architecture (`--preset gpu`: Llama-3.1-8B in bf16; speed does not
depend on weight values), context lengths 1K/4K/16K, half the layers sent (contiguous middle).
For each precision: the encoded message's bytes per context token, the receiver's time from message
bytes in host memory to first-token logits (decode with every check + dequantize on the GPU +
receiver prefill of a 32-token question), median of `--repeats`, and the same minus bf16's: the
added TTFT of dequantization. A computed column adds the transfer at `--link-gbit` (10 Gbit/s):
end-to-end = transfer + receive, so compression wins where its saved transfer exceeds its added time.

  python benchmarks/quant_ttft.py --preset gpu --out results/quant-ttft
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kvcomm.core.fingerprint import fingerprint
from kvcomm.core.generation import sync
from kvcomm.core.message import decode, encode
from kvcomm.experiments.bench_models import random_ids, random_model
from kvcomm.sharing.selection import layers_for
from kvcomm.sharing.send_receive import receive_prefill, send

PRECISIONS = ("bf16", "fp8", "int8", "int4")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--link-gbit", type=float, default=10.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    lm = random_model(args.preset)
    fp = fingerprint(lm.model, lm.tokenizer)
    g = torch.Generator().manual_seed(0)
    question = random_ids(32, g, lm.config.vocab_size)
    rows = []
    for n in [int(x) for x in args.contexts.split(",")]:
        msg = send(lm, random_ids(n, g, lm.config.vocab_size), layers_for("contiguous", 0.5, lm.num_layers))
        for precision in PRECISIONS:
            data = encode(msg, precision)

            def receive(data=data):
                m = decode(data, fp, max_bytes=1 << 40, dtype=lm.dtype, device=lm.device)
                return receive_prefill(lm, question, [m])

            receive()
            times = []
            for _ in range(args.repeats):
                sync(lm.device)
                t = time.perf_counter()
                receive()
                sync(lm.device)
                times.append((time.perf_counter() - t) * 1e3)
            transfer = len(data) * 8 / (args.link_gbit * 1e9) * 1e3
            rows.append({"context_tokens": n, "precision": precision, "bytes": len(data), "bytes_per_token": len(data) / n,
                         "receive_ms": statistics.median(times), "transfer_ms": transfer})
            base = next(r for r in rows if r["context_tokens"] == n and r["precision"] == "bf16")
            r = rows[-1]
            r.update(bytes_vs_bf16=r["bytes"] / base["bytes"], added_ms=r["receive_ms"] - base["receive_ms"],
                     end_to_end_ms=r["transfer_ms"] + r["receive_ms"])
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
        del msg
        torch.cuda.empty_cache() if lm.device.type == "cuda" else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"device": str(lm.device), "gpu": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else None,
           "model": lm.name, "dtype": str(lm.dtype), "torch": torch.__version__, "link_gbit": args.link_gbit,
           "layers_sent": len(layers_for("contiguous", 0.5, lm.num_layers))}
    (out / "quant_ttft.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
