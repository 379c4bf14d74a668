"""User datasets: JSONL, one object per line: {"id", "context", "question", "answers": [...]}."""

from __future__ import annotations

import json
from pathlib import Path

from kvcomm.core.errors import DataError

REQUIRED = {"context": str, "question": str}


def read_jsonl(path: str | Path, require_answers: bool = False) -> list[dict]:
    """Read and check every line; a bad line raises DataError naming the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist; check the path")
    items, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(item, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(item).__name__}")
            for key, typ in REQUIRED.items():
                if not isinstance(item.get(key), typ):
                    raise DataError(f"{path}:{lineno}: field {key!r} must be a string")
            answers = item.get("answers")
            if answers is None and require_answers:
                raise DataError(f"{path}:{lineno}: field 'answers' (a list of strings) is required")
            if answers is not None and not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
                raise DataError(f"{path}:{lineno}: field 'answers' must be a list of strings")
            item.setdefault("id", f"{path.stem}-{lineno}")
            item["id"] = str(item["id"])
            if item["id"] in seen:
                raise DataError(f"{path}:{lineno}: duplicate id {item['id']!r}")
            seen.add(item["id"])
            items.append(item)
    if not items:
        raise DataError(f"dataset file {path} holds no items")
    return items
