"""`kvcomm` command line. Subcommands live in small functions; all user errors exit 2 with one line.

Human-readable output goes to stderr whenever stdout may carry a KV message (`send --out -`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from .errors import KVCommError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the flag and where to read more (exit 2)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _text_arg(value: str) -> str:
    """'@path' reads the text from a file; anything else is the text itself."""
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise KVCommError(f"text file {path} does not exist; pass the text itself or @<existing file>")
        return path.read_text()
    return value


def _ratio(value: str) -> float:
    try:
        r = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in (0, 1], got {value!r}") from None
    if not 0 < r <= 1:
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1], got {r}")
    return r


def _bounded(kind, lo=None, hi=None, lo_open=False):
    """An argparse type: `kind(value)` within [lo, hi] (lo excluded with `lo_open`), with a clear message."""

    def parse(value: str):
        try:
            x = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {value!r}") from None
        if (lo is not None and (x < lo or (lo_open and x == lo))) or (hi is not None and x > hi):
            left = "(" if lo_open else "["
            raise argparse.ArgumentTypeError(f"must be in {left}{lo if lo is not None else '-inf'}, "
                                             f"{hi if hi is not None else 'inf'}], got {x}")
        return x

    return parse


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _load(args, quiet: bool = False):
    from .models import load_model

    console = _console(stderr=True)
    with console.status(f"loading model {args.model} …", spinner="dots") if not quiet else contextlib.nullcontext():
        lm = load_model(args.model, device=args.device, dtype=args.dtype, progress=not quiet)
    if not quiet:
        console.print(f"[dim]model {lm.name}: {lm.num_layers} layers on {lm.device} ({str(lm.dtype).removeprefix('torch.')}), "
                      f"loaded in {lm.load_seconds:.1f}s[/dim]")
    return lm


def _calibration_samples(path: str | None) -> list[tuple[str, str]]:
    from .datasets import read_jsonl

    src = Path(path) if path else Path(__file__).parent / "resources" / "calibration.jsonl"
    return [(item["context"], item["question"]) for item in read_jsonl(src)]


def _select_layers(lm, args, progress: bool = True) -> tuple[list[int], str]:
    from .selection import cached_ranking, contiguous_layers, parse_layers, random_layers

    if args.layers:
        return parse_layers(args.layers, lm.num_layers), "explicit"
    if args.selection == "random":
        return random_layers(lm.num_layers, args.ratio, args.seed), "random"
    if args.selection == "contiguous":
        return contiguous_layers(lm.num_layers, args.ratio), "contiguous"
    ranking = cached_ranking(lm, args.task, _calibration_samples(args.calibration), progress=progress)
    return ranking.select(args.ratio), "kvcomm"


def _add_model_args(p):
    p.add_argument("--model", default="embedded", help="'embedded' (default, SmolLM2-135M GGUF), a .gguf file, a model dir or a hub id")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")


def _add_selection_args(p):
    p.add_argument("--ratio", type=_ratio, default=0.5, help="share of layers to send (default 0.5)")
    p.add_argument("--layers", help="explicit layer list, e.g. 0,3,10-14 (overrides --ratio)")
    p.add_argument("--selection", choices=["kvcomm", "random", "contiguous"], default="kvcomm",
                   help="how to pick layers at --ratio (default: kvcomm attention importance + prior)")
    p.add_argument("--task", default="default", help="name under which the calibrated ranking is saved and reused")
    p.add_argument("--calibration", help="JSONL of calibration samples (default: 2 built-in samples)")
    p.add_argument("--seed", type=int, default=0, help="seed for --selection random")


def cmd_demo(args) -> int:
    from rich.table import Table

    from .prompts import baseline_ids, split_prompt
    from .selection import format_layers
    from .sharing import generate, send

    lm = _load(args)
    generate(lm, baseline_ids(lm.tokenizer, "warm-up"), max_new_tokens=1)  # first call pays one-off costs
    layers, how = _select_layers(lm, args)
    console = _console()
    split = split_prompt(lm.tokenizer, args.context, args.question)
    full = send(lm, split.sender_ids)
    msg = full.select(layers)
    rows = [
        ("Baseline (question only)", generate(lm, baseline_ids(lm.tokenizer, args.question), max_new_tokens=args.max_new_tokens), 0, "-"),
        ("Skyline (context + question)", generate(lm, split.skyline_ids, max_new_tokens=args.max_new_tokens), 0, "-"),
        (f"KVComm ({len(layers)}/{lm.num_layers} layers)", generate(lm, split.receiver_ids, msg, max_new_tokens=args.max_new_tokens),
         msg.payload_bytes, format_layers(layers)),
    ]
    console.print(f"[bold]context:[/bold] {args.context}\n[bold]question:[/bold] {args.question}")
    table = Table(title=f"kvcomm demo on {lm.name}")
    for col in ("method", "answer", "bytes sent", "TTFT ms", "layers"):
        table.add_column(col, overflow="fold")
    for name, gen, nbytes, lay in rows:
        table.add_row(name, gen.text, f"{nbytes:,}" if nbytes else "0", f"{gen.ttft_s * 1e3:.1f}", lay)
    console.print(table)
    console.print(f"KVComm sent {len(layers)} of {lm.num_layers} layers ({len(layers) / lm.num_layers:.0%}, selection: {how}), "
                  f"{msg.payload_bytes:,} bytes for {msg.seq_len} context tokens "
                  f"({msg.bytes_per_token_per_layer():,} bytes per token per layer).")
    return 0


def cmd_share(args) -> int:
    from .prompts import split_prompt
    from .sharing import generate, send

    context, question = _text_arg(args.context), _text_arg(args.question)
    lm = _load(args)
    layers, how = _select_layers(lm, args)
    split = split_prompt(lm.tokenizer, context, question)
    msg = send(lm, split.sender_ids, layers)
    gen = generate(lm, split.receiver_ids, msg, max_new_tokens=args.max_new_tokens)
    result = {"answer": gen.text, "layers": layers, "selection": how, "bytes_sent": msg.payload_bytes,
              "context_tokens": msg.seq_len, "ttft_ms": round(gen.ttft_s * 1e3, 2), "total_ms": round(gen.total_s * 1e3, 2)}
    if args.json:
        print(json.dumps(result))
    else:
        console = _console()
        console.print(f"[bold]answer:[/bold] {gen.text}")
        console.print(f"layers sent: {len(layers)}/{lm.num_layers} ({how}) {layers}")
        console.print(f"bytes sent: {msg.payload_bytes:,} for {msg.seq_len} context tokens; "
                      f"TTFT {gen.ttft_s * 1e3:.1f} ms, total {gen.total_s * 1e3:.1f} ms")
    return 0


def cmd_send(args) -> int:
    from .message import save_message
    from .prompts import sender_ids
    from .sharing import send

    to_stdout = args.out == "-"
    if to_stdout and sys.stdout.isatty():
        raise KVCommError("refusing to write a binary KV message to a terminal; pass --out FILE or pipe stdout")
    context = _text_arg(args.context)
    lm = _load(args, quiet=to_stdout and not args.verbose)
    layers, how = _select_layers(lm, args, progress=not to_stdout)
    msg = send(lm, sender_ids(lm.tokenizer, context), layers, meta={"selection": how})
    n = save_message(msg, args.out)
    if not to_stdout or args.verbose:
        _console(stderr=True).print(f"wrote {n:,} bytes to {args.out}: layers {layers} ({how}), {msg.seq_len} context tokens")
    return 0


def cmd_receive(args) -> int:
    from .fingerprint import fingerprint
    from .message import load_message
    from .prompts import receiver_ids
    from .sharing import generate

    question = _text_arg(args.question)
    lm = _load(args, quiet=True)
    messages = [load_message(m, fingerprint(lm.model, lm.tokenizer), args.max_bytes, args.allow_finetune) for m in args.message]
    gen = generate(lm, receiver_ids(lm.tokenizer, question), messages, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({"answer": gen.text, "layers": [m.layers for m in messages],
                          "prefix_tokens": gen.prefix_tokens, "ttft_ms": round(gen.ttft_s * 1e3, 2)}))
    else:
        print(gen.text)
    return 0


def cmd_calibrate(args) -> int:
    from .selection import calibrate, ranking_path

    lm = _load(args)
    samples = _calibration_samples(args.samples)
    if args.limit:
        samples = samples[: args.limit]
    ranking = calibrate(lm, samples, alpha=args.alpha, sigma=args.sigma, task=args.task, progress=True)
    path = Path(args.out) if args.out else ranking_path(lm, args.task)
    ranking.save(path)
    console = _console()
    scores = ranking.combined()
    console.print(f"calibrated on {len(samples)} samples; saved to {path}")
    console.print(f"layer scores S' (α={ranking.alpha:.2f}): " + " ".join(f"{i}:{s:.2f}" for i, s in enumerate(scores.tolist())))
    for r in (0.3, 0.5, 0.7):
        console.print(f"ratio {r}: layers {ranking.select(r)}")
    return 0


def cmd_inspect(args) -> int:
    from .message import decode, read_message_bytes

    msg = decode(read_message_bytes(args.message, args.max_bytes), None, args.max_bytes)
    info = {"layers": msg.layers, "seq_len": msg.seq_len, "dtype": str(msg.dtype).removeprefix("torch."),
            "position_start": msg.position_start, "payload_bytes": msg.payload_bytes,
            "model": msg.fingerprint.short, "meta": msg.meta}
    print(json.dumps(info, indent=1))
    return 0


DEMO_CONTEXT = "Uma is at the Mahaffie House. The Mahaffie House is in the city of Olathe, Kansas, in the United States."
DEMO_QUESTION = "Which country is Uma located in?"


def build_parser() -> argparse.ArgumentParser:
    from .message import DEFAULT_MAX_BYTES

    parser = _Parser(
        prog="kvcomm",
        description="LLM agents that talk through their KV caches. 'kvcomm demo' shows selective KV sharing on the embedded model.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="Baseline vs Skyline vs KVComm on one context question (embedded model)")
    _add_model_args(p)
    _add_selection_args(p)
    p.add_argument("--context", default=DEMO_CONTEXT)
    p.add_argument("--question", default=DEMO_QUESTION)
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("share", help="a sender reads the context, a receiver answers with the shared KV")
    _add_model_args(p)
    _add_selection_args(p)
    p.add_argument("--context", required=True, help="context text, or @file")
    p.add_argument("--question", required=True, help="question text, or @file")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_share)

    p = sub.add_parser("send", help="prefill a context and write the selected layers' KV as a message file")
    _add_model_args(p)
    _add_selection_args(p)
    p.add_argument("--context", required=True, help="context text, or @file")
    p.add_argument("--out", required=True, help="message file to write, or - for stdout")
    p.add_argument("--verbose", action="store_true", help="report to stderr even when writing to stdout")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("receive", help="answer a question with the KV of one or more message files")
    _add_model_args(p)
    p.add_argument("--message", required=True, action="append", help="message file, or - for stdin (repeat for several senders)")
    p.add_argument("--question", required=True, help="question text, or @file")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.add_argument("--max-bytes", type=_positive_int, default=DEFAULT_MAX_BYTES, help="refuse larger messages")
    p.add_argument("--allow-finetune", action="store_true", help="accept KV from a fine-tune of the same base model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_receive)

    p = sub.add_parser("calibrate", help="rank layers by attention importance and save the ranking for a task")
    _add_model_args(p)
    p.add_argument("--samples", help="JSONL with context/question per line (default: built-in samples)")
    p.add_argument("--task", default="default")
    p.add_argument("--limit", type=_positive_int, help="use only the first N samples")
    p.add_argument("--alpha", type=float, help="weight of attention scores vs the Gaussian prior (default by family)")
    p.add_argument("--sigma", type=float, default=10.0, help="Gaussian prior width (default 10)")
    p.add_argument("--out", help="where to write the ranking JSON (default: the cache used by share/send)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("inspect", help="validate a message file and print its header")
    p.add_argument("message", help="message file, or - for stdin")
    p.add_argument("--max-bytes", type=_positive_int, default=DEFAULT_MAX_BYTES)
    p.set_defaults(func=cmd_inspect)

    from .agents_cli import add_parser as add_agents_parser

    add_agents_parser(sub, _add_model_args, _positive_int)
    from .bench import add_parser as add_bench_parser

    add_bench_parser(sub, _add_model_args, _positive_int)
    from .evaluate import add_parser as add_eval_parser

    add_eval_parser(sub, _add_model_args, _positive_int)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KVCommError as e:
        print(f"kvcomm: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("kvcomm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
