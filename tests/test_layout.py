"""The package's layout rules, checked on the source: what a reviewer would otherwise check by eye."""

from __future__ import annotations

import ast
from pathlib import Path

import kvcomm

ROOT = Path(kvcomm.__file__).parent
MAX_LINES = 400


def modules():
    return sorted(ROOT.rglob("*.py"))


def test_no_module_imports_a_private_name_from_another():
    problems = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kvcomm"):
                problems += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not problems, problems


def test_no_module_is_over_the_size_limit():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in modules()}
    assert not {k: v for k, v in sizes.items() if v > MAX_LINES}


def test_argparse_stays_in_the_cli():
    users = [str(p.relative_to(ROOT)) for p in modules()
             if "argparse" in {a.name for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Import) for a in n.names}]
    assert users and all(u.startswith("cli/") for u in users), users


def test_public_api_resolves():
    for name in kvcomm.__all__:
        assert getattr(kvcomm, name) is not None, name
