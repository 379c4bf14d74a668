"""Results files: atomic writes (a reader, or a crash, never sees half a file) and file names for setting names."""

from __future__ import annotations

import os
import re
from pathlib import Path


def file_safe(name: str) -> str:
    """`name` (a setting such as relay@0.1:attention) as a file name: characters other than letters, digits and
    @.=+_- become _."""
    return re.sub(r"[^A-Za-z0-9@.=+_-]", "_", name)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write to `<path>.partial`, flush it to disk, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
