"""`kvcomm` command line: one parser, one sub-module per verb group, every user error one line and exit 2.

Human-readable output goes to stderr whenever stdout may carry a KV message (`send --out -`).
"""

from __future__ import annotations

import os
import sys

from kvcomm.cli import agents, bench, eval, models, share
from kvcomm.cli.common import EXIT_USER_ERROR, Parser
from kvcomm.core.errors import KVCommError


def build_parser() -> Parser:
    parser = Parser(
        prog="kvcomm",
        description="LLM agents that talk through their KV caches. 'kvcomm demo' shows selective KV sharing on the embedded model.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    share.add_parsers(sub)
    agents.add_parser(sub)
    bench.add_parser(sub)
    eval.add_parser(sub)
    models.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
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
