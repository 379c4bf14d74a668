"""Selective-sharing verbs: demo, share, send, receive, calibrate, inspect."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvcomm.cli.common import add_layout_arg, add_model_args, console, load, positive_int, ratio, text_arg
from kvcomm.core.errors import KVCommError
from kvcomm.sharing.prompts import DEFAULT_LAYOUT, LAYOUTS

DEMO_CONTEXT = "Uma is at the Mahaffie House. The Mahaffie House is in the city of Olathe, Kansas, in the United States."
DEMO_QUESTION = "Which country is Uma located in?"


def add_selection_args(p) -> None:
    p.add_argument("--ratio", type=ratio, default=0.5, help="share of layers to send (default 0.5)")
    p.add_argument("--layers", help="explicit layer list, e.g. 0,3,10-14 (overrides --ratio)")
    p.add_argument("--selection", choices=["kvcomm", "fidelity", "random", "contiguous"], default="kvcomm",
                   help="how to pick layers at --ratio (default: kvcomm attention importance + prior; fidelity: "
                        "the layers the receiver's answer needs, found by backward elimination on the calibration "
                        "samples, best with --layout turn; contiguous: the best-scoring chunk of the attention ranking)")
    p.add_argument("--task", default="default", help="name under which the calibrated ranking is saved and reused")
    p.add_argument("--calibration", help="JSONL of calibration samples (default: 2 built-in samples)")
    p.add_argument("--seed", type=int, default=0, help="seed for --selection random")


def add_precision_args(p, what: str) -> None:
    from kvcomm.core.quant import DEFAULT_GROUP_SIZE, PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS,
                   help=f"how {what} the KV: bf16/fp16/fp32 as is, fp8/int8/int4 quantized with scales "
                        "(default: the model's dtype, as is)")
    p.add_argument("--group-size", type=positive_int,
                   help=f"fp8/int8/int4: tokens per key group and channels per value group (default {DEFAULT_GROUP_SIZE})")


def check_precision_args(args) -> None:
    if args.group_size is not None and args.precision not in ("fp8", "int8", "int4"):
        raise KVCommError(f"--group-size applies to --precision fp8, int8 or int4, not {args.precision or 'the default'}; "
                          "drop --group-size or pick a quantized precision")


def add_sender_args(p) -> None:
    """What every verb that prefills a context takes: the model, the layer selection, the prompt layout."""
    add_model_args(p)
    add_selection_args(p)
    add_layout_arg(p)


def selection_of(args):
    from kvcomm.sharing.selection import Selection

    return Selection(ratio=args.ratio, method=args.selection, layers=args.layers, task=args.task,
                     calibration=args.calibration, seed=args.seed, layout=args.layout)


def cmd_demo(args) -> int:
    from rich.table import Table

    from kvcomm.sharing.prompts import baseline_ids, split_prompt
    from kvcomm.sharing.selection import choose_layers, format_layers
    from kvcomm.sharing.send_receive import generate, send

    lm = load(args)
    generate(lm, baseline_ids(lm.tokenizer, "warm-up", layout=args.layout), max_new_tokens=1)  # pays one-off costs
    layers, how = choose_layers(lm, selection_of(args))
    out = console()
    split = split_prompt(lm.tokenizer, args.context, args.question, layout=args.layout)
    full = send(lm, split.sender_ids)
    msg = full.select(layers)
    rows = [
        ("Baseline (question only)", generate(lm, split.baseline_ids, max_new_tokens=args.max_new_tokens), 0, "-"),
        ("Skyline (context + question)", generate(lm, split.skyline_ids, max_new_tokens=args.max_new_tokens), 0, "-"),
        (f"KVComm ({len(layers)}/{lm.num_layers} layers)", generate(lm, split.receiver_ids, msg, max_new_tokens=args.max_new_tokens),
         msg.payload_bytes, format_layers(layers)),
    ]
    out.print(f"[bold]context:[/bold] {args.context}\n[bold]question:[/bold] {args.question}")
    table = Table(title=f"kvcomm demo on {lm.name}")
    for col in ("method", "answer", "bytes sent", "TTFT ms", "layers"):
        table.add_column(col, overflow="fold")
    for name, gen, nbytes, lay in rows:
        table.add_row(name, gen.text, f"{nbytes:,}" if nbytes else "0", f"{gen.ttft_s * 1e3:.1f}", lay)
    out.print(table)
    out.print(f"KVComm sent {len(layers)} of {lm.num_layers} layers ({len(layers) / lm.num_layers:.0%}, selection: {how}), "
              f"{msg.payload_bytes:,} bytes for {msg.seq_len} context tokens "
              f"({msg.bytes_per_token_per_layer():,} bytes per token per layer).")
    return 0


def cmd_share(args) -> int:
    from kvcomm.sharing.prompts import split_prompt
    from kvcomm.sharing.selection import choose_layers
    from kvcomm.sharing.send_receive import generate, send

    check_precision_args(args)
    context, question = text_arg(args.context), text_arg(args.question)
    lm = load(args)
    layers, how = choose_layers(lm, selection_of(args))
    split = split_prompt(lm.tokenizer, context, question, layout=args.layout)
    msg = send(lm, split.sender_ids, layers)
    if args.precision:  # what the receiver would decode from a message at this precision
        msg = msg.quantized(args.precision, args.group_size)
    gen = generate(lm, split.receiver_ids, msg, max_new_tokens=args.max_new_tokens)
    result = {"answer": gen.text, "layers": layers, "selection": how,
              "bytes_sent": msg.wire_bytes if args.precision else msg.payload_bytes,
              "precision": msg.precision or str(msg.dtype).removeprefix("torch."),
              "context_tokens": msg.seq_len, "ttft_ms": round(gen.ttft_s * 1e3, 2), "total_ms": round(gen.total_s * 1e3, 2)}
    if args.json:
        print(json.dumps(result))
    else:
        out = console()
        out.print(f"[bold]answer:[/bold] {gen.text}")
        out.print(f"layers sent: {len(layers)}/{lm.num_layers} ({how}) {layers}")
        out.print(f"bytes sent: {result['bytes_sent']:,} ({result['precision']}) for {msg.seq_len} context tokens; "
                  f"TTFT {gen.ttft_s * 1e3:.1f} ms, total {gen.total_s * 1e3:.1f} ms")
    return 0


def cmd_send(args) -> int:
    from kvcomm.core.message import save_message
    from kvcomm.sharing.prompts import sender_ids
    from kvcomm.sharing.selection import choose_layers
    from kvcomm.sharing.send_receive import send

    check_precision_args(args)
    to_stdout = args.out == "-"
    if to_stdout and sys.stdout.isatty():
        raise KVCommError("refusing to write a binary KV message to a terminal; pass --out FILE or pipe stdout")
    context = text_arg(args.context)
    lm = load(args, quiet=to_stdout and not args.verbose)
    layers, how = choose_layers(lm, selection_of(args), progress=not to_stdout)
    msg = send(lm, sender_ids(lm.tokenizer, context, layout=args.layout), layers,
               meta={"selection": how, "layout": args.layout})
    try:
        n = save_message(msg, args.out, args.precision, args.group_size)
    except ValueError as e:  # KV the chosen precision cannot hold (NaN/Inf, or beyond float16 scales)
        raise KVCommError(f"cannot send at --precision {args.precision}: {e}") from None
    if not to_stdout or args.verbose:
        precision = args.precision or str(msg.dtype).removeprefix("torch.")
        console(stderr=True).print(f"wrote {n:,} bytes to {args.out}: layers {layers} ({how}), {msg.seq_len} context tokens, "
                                   f"{precision}, {n / msg.seq_len:,.0f} bytes per context token")
    return 0


def cmd_receive(args) -> int:
    from kvcomm.core.fingerprint import fingerprint
    from kvcomm.core.message import load_message
    from kvcomm.sharing.prompts import receiver_ids
    from kvcomm.sharing.send_receive import generate

    question = text_arg(args.question)
    lm = load(args, quiet=True)
    fp = fingerprint(lm.model, lm.tokenizer)  # quantized messages are dequantized on the model's device, in its dtype
    messages = [load_message(m, fp, args.max_bytes, args.allow_finetune, lm.dtype, lm.device) for m in args.message]
    layout = args.layout or messages[0].meta.get("layout", DEFAULT_LAYOUT)
    if layout not in LAYOUTS:
        raise KVCommError(f"the message names an unknown prompt layout {layout!r}; pass --layout {' or '.join(LAYOUTS)}")
    gen = generate(lm, receiver_ids(lm.tokenizer, question, layout=layout), messages, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({"answer": gen.text, "layers": [m.layers for m in messages],
                          "prefix_tokens": gen.prefix_tokens, "ttft_ms": round(gen.ttft_s * 1e3, 2)}))
    else:
        print(gen.text)
    return 0


def cmd_calibrate(args) -> int:
    from kvcomm.sharing.selection import calibrate, calibrate_fidelity, calibration_samples, ranking_path

    lm = load(args)
    samples = calibration_samples(args.samples)
    if args.limit:
        samples = samples[: args.limit]
    if args.score == "fidelity":
        ranking = calibrate_fidelity(lm, samples, task=args.task, progress=True, layout=args.layout)
    else:
        ranking = calibrate(lm, samples, alpha=args.alpha, sigma=args.sigma, task=args.task, progress=True,
                            layout=args.layout)
    path = Path(args.out) if args.out else ranking_path(lm, args.task, args.layout, args.score)
    ranking.save(path)
    out = console()
    out.print(f"calibrated on {len(samples)} samples; saved to {path}")
    if ranking.score == "fidelity":
        out.print("layers, most needed first: " + " ".join(map(str, ranking.order())))
    else:
        scores = ranking.combined().tolist()
        out.print(f"layer scores S' (α={ranking.alpha:.2f}): " + " ".join(f"{i}:{s:.2f}" for i, s in enumerate(scores)))
    for r in (0.3, 0.5, 0.7):
        out.print(f"ratio {r}: layers {ranking.select(r)}")
    return 0


def cmd_inspect(args) -> int:
    from kvcomm.core.message import decode, read_message_bytes

    msg = decode(read_message_bytes(args.message, args.max_bytes), None, args.max_bytes)
    info = {"layers": msg.layers, "seq_len": msg.seq_len, "dtype": str(msg.dtype).removeprefix("torch."),
            "precision": msg.precision, "group_size": msg.group_size, "file_bytes": msg.wire_bytes,
            "bytes_per_context_token": round(msg.bytes_per_context_token(), 1),
            "position_start": msg.position_start, "payload_bytes": msg.payload_bytes,
            "model": msg.fingerprint.short, "meta": msg.meta}
    print(json.dumps(info, indent=1))
    return 0


def add_parsers(sub) -> None:
    from kvcomm.core.message import DEFAULT_MAX_BYTES
    from kvcomm.sharing.selection import SCORES

    p = sub.add_parser("demo", help="Baseline vs Skyline vs KVComm on one context question (embedded model)")
    add_sender_args(p)
    p.add_argument("--context", default=DEMO_CONTEXT)
    p.add_argument("--question", default=DEMO_QUESTION)
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("share", help="a sender reads the context, a receiver answers with the shared KV")
    add_sender_args(p)
    p.add_argument("--context", required=True, help="context text, or @file")
    p.add_argument("--question", required=True, help="question text, or @file")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    add_precision_args(p, "the sender would send")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_share)

    p = sub.add_parser("send", help="prefill a context and write the selected layers' KV as a message file")
    add_sender_args(p)
    p.add_argument("--context", required=True, help="context text, or @file")
    p.add_argument("--out", required=True, help="message file to write, or - for stdout")
    add_precision_args(p, "to store")
    p.add_argument("--verbose", action="store_true", help="report to stderr even when writing to stdout")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("receive", help="answer a question with the KV of one or more message files")
    add_model_args(p)
    add_layout_arg(p, default=None)
    p.add_argument("--message", required=True, action="append", help="message file, or - for stdin (repeat for several senders)")
    p.add_argument("--question", required=True, help="question text, or @file")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--max-bytes", type=positive_int, default=DEFAULT_MAX_BYTES, help="refuse larger messages")
    p.add_argument("--allow-finetune", action="store_true", help="accept KV from a fine-tune of the same base model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_receive)

    p = sub.add_parser("calibrate", help="rank layers (attention importance or output fidelity) and save the ranking")
    add_model_args(p)
    add_layout_arg(p)
    p.add_argument("--score", choices=SCORES, default="attention",
                   help="attention: the paper's Eq. 1 with the Gaussian prior (default); fidelity: backward "
                        "elimination by the KL of the receiver's reply to all-layer sharing (--selection fidelity)")
    p.add_argument("--samples", help="JSONL with context/question per line (default: built-in samples)")
    p.add_argument("--task", default="default")
    p.add_argument("--limit", type=positive_int, help="use only the first N samples")
    p.add_argument("--alpha", type=float, help="weight of attention scores vs the Gaussian prior (default by family)")
    p.add_argument("--sigma", type=float, default=10.0, help="Gaussian prior width (default 10)")
    p.add_argument("--out", help="where to write the ranking JSON (default: the cache used by share/send)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("inspect", help="validate a message file and print its header (payload_bytes: decoded, "
                                       "in the sender's dtype; file_bytes: on the wire)")
    p.add_argument("message", help="message file, or - for stdin")
    p.add_argument("--max-bytes", type=positive_int, default=DEFAULT_MAX_BYTES)
    p.set_defaults(func=cmd_inspect)
