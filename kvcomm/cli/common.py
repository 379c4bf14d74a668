"""What every sub-command shares: the parser class, argument types, model loading, the error exit."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from kvcomm.core.errors import KVCommError
from kvcomm.sharing.prompts import DEFAULT_LAYOUT, LAYOUTS

EXIT_USER_ERROR = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the flag and where to read more (exit 2)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def text_arg(value: str) -> str:
    """'@path' reads the text from a file; anything else is the text itself."""
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise KVCommError(f"text file {path} does not exist; pass the text itself or @<existing file>")
        return path.read_text()
    return value


def ratio(value: str) -> float:
    try:
        r = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in (0, 1], got {value!r}") from None
    if not 0 < r <= 1:
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1], got {r}")
    return r


def bounded(kind, lo=None, hi=None, lo_open=False):
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


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def shard(text: str) -> tuple[int, int]:
    """An argparse type: 'K/N' with 0 <= K < N, as (K, N)."""
    k, _, n = text.partition("/")
    try:
        k, n = int(k), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N such as 0/4, got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"K/N needs 0 <= K < N, got {text!r}")
    return k, n


def setting(value: str) -> str:
    """A reuse setting (`kvcomm.reuse.config.parse_setting`: dense, prefix, reuse, blend@R, …), checked."""
    from kvcomm.reuse.config import parse_setting

    try:
        parse_setting(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def add_compile_arg(p) -> None:
    p.add_argument("--compile", action="store_true",
                   help="CUDA: run short forwards and decode steps through torch.compile before graph capture "
                        "(KVCOMM_COMPILE=1): fewer kernels per step, after ~10-30 s of compilation per new shape")


def apply_compile(args) -> None:
    """--compile reaches the static path through its environment switch (read when a model's decoder is made)."""
    if getattr(args, "compile", False):
        os.environ["KVCOMM_COMPILE"] = "1"


def add_model_args(p) -> None:
    p.add_argument("--model", default="embedded", help="'embedded' (default, SmolLM2-135M GGUF), a name from 'kvcomm models list' "
                        "(e.g. qwen2.5-coder-0.5b), a .gguf file, a model dir or a hub id")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")
    add_compile_arg(p)


def load(args, quiet: bool = False):
    """The model named by --model/--device/--dtype, with a spinner and a one-line summary on stderr."""
    from kvcomm.core.models import load_model

    apply_compile(args)
    err = console(stderr=True)
    with err.status(f"loading model {args.model} …", spinner="dots") if not quiet else contextlib.nullcontext():
        lm = load_model(args.model, device=args.device, dtype=args.dtype, progress=not quiet)
    if not quiet:
        err.print(f"[dim]model {lm.name}: {lm.num_layers} layers on {lm.device} ({str(lm.dtype).removeprefix('torch.')}), "
                  f"loaded in {lm.load_seconds:.1f}s[/dim]")
    return lm


def add_layout_arg(p, default=DEFAULT_LAYOUT) -> None:
    p.add_argument("--layout", choices=LAYOUTS, default=default,
                   help="prompt layout: paper (sender and receiver each read their own chat prompt; default), turn "
                        "(the receiver's prompt is the next user turn of the sender's conversation) or split (the "
                        "receiver continues the single prompt where the question begins)"
                   + ("; default: the sender's, as its message records it" if default is None else ""))
