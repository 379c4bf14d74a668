"""No untrusted bytes ever reach pickle, torch.load (pickle-based), eval or exec in kvcomm's own code."""

from __future__ import annotations

import ast
from pathlib import Path

import kvcomm

BANNED_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve"}
BANNED_CALLS = {"eval", "exec", "compile", "__import__"}


def test_package_source_has_no_pickle_eval_or_torch_load():
    root = Path(kvcomm.__file__).parent
    problems = []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                if any(n.split(".")[0] in BANNED_MODULES for n in names):
                    problems.append(f"{path.name}:{node.lineno} imports {names}")
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in BANNED_CALLS:
                    problems.append(f"{path.name}:{node.lineno} calls {f.id}()")
                if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) and f.value.id == "torch":
                    problems.append(f"{path.name}:{node.lineno} calls torch.load()")
    assert not problems, problems
    assert len(list(root.rglob("*.py"))) > 10  # the scan really read the package
