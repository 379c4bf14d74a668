"""Sharded, resumable multi-agent runs: which items a shard runs, where its rows go, and the merge.

`--shard K/N` runs the K-th of N contiguous slices of the items (contiguous, so each shard's anchor
pool warms up on its own items). Layout under `--out`:

  shard-K-of-N/run.json       the run's settings; a resume, and every other shard of the same --out,
                              must match them (model, workload, seed, agents, topology, rounds, answer
                              budget, reuse and pool options, N, and with N > 1 the --limit)
  shard-K-of-N/<mode>.jsonl   one line per finished item of that mode, appended and fsynced as soon as
                              the item (its batch, with --concurrency) finishes; a torn last line is dropped
  agents.json, agents_ttft.png, agents_tradeoff.png
                              the report: written by an unsharded run, or by `--report-only`, which
                              merges every shard file under --out without loading a model

A killed run resumes by skipping the items already in its files. Its anchor pool restarts empty, so a
resumed reuse run is not the run that would have gone through without the kill: each row records how
many items its pool had seen (`pool_items_before`), and the warm-up exclusion counts from there.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from kvcomm.core.errors import DataError
from kvcomm.core.files import file_safe, write_atomic

SHARD_DIR = re.compile(r"^shard-(\d+)-of-(\d+)$")


def shard_range(n_items: int, k: int, n: int) -> range:
    """Item indices of contiguous shard k of n; the n ranges cover 0..n_items-1 exactly once."""
    if not 0 <= k < n:
        raise ValueError(f"shard K/N needs 0 <= K < N, got {k}/{n}")
    return range(k * n_items // n, (k + 1) * n_items // n)


def shard_dir(out: Path, k: int, n: int) -> Path:
    return Path(out) / f"shard-{k}-of-{n}"


def mode_file(directory: Path, mode: str) -> Path:
    """`<mode>.jsonl`; a setting name such as `blend@0.15` is kept, other characters become '_'."""
    return directory / (file_safe(mode) + ".jsonl")


def append_row(path: Path, row: dict) -> None:
    """One finished item as one line, on disk before the next item starts."""
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: Path) -> list[dict]:
    """Every complete line of a mode file; a torn last line (a kill mid-write) is cut off the file."""
    rows: list[dict] = []
    if not path.exists():
        return rows
    good = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                rows.append(json.loads(raw))
            except ValueError:
                break
            good += len(raw)
    if good != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    return rows


def shard_dirs(out: Path) -> list[tuple[int, int, Path]]:
    found = []
    for d in sorted(Path(out).glob("shard-*-of-*")):
        m = SHARD_DIR.match(d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), int(m.group(2)), d))
    return sorted(found)


def _read_run(d: Path) -> dict:
    try:
        return json.loads((d / "run.json").read_text())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise DataError(f"cannot read {d / 'run.json'}: {e}; delete {d} to run that shard again") from None


# run settings whose `kvcomm agents` flag is not the setting's name with dashes
FLAG_OF = {"batch_decode": "--concurrency", "shards": "--shard", "fingerprint": "--model", "kv_precision": "--precision",
           "prefix_slots": None}


def _differences(before: dict, now: dict) -> list[str]:
    """Settings both name with different values (a setting only one names is not compared), each with the
    flag that sets it."""
    def flag(k: str) -> str:
        f = FLAG_OF.get(k, "--" + k.replace("_", "-"))
        return f" ({f})" if f else ""
    return [f"{k} {before[k]!r} there, {v!r} now{flag(k)}" for k, v in now.items() if k in before and before[k] != v]


def start_shard(out: Path, k: int, n: int, settings: dict, meta: dict, fresh: bool = False) -> Path:
    """The shard's folder, ready to append to: refuses results of other settings there or in another
    shard of `out`; `fresh` first deletes this shard's earlier results."""
    d = shard_dir(out, k, n)
    if fresh and d.exists():
        for p in [*d.glob("*.jsonl"), d / "run.json"]:
            p.unlink(missing_ok=True)
    for *_, other in shard_dirs(out):
        diff = _differences(_read_run(other).get("settings", {}), settings)
        if diff:
            where = "this shard's folder" if other == d else f"{other.name} (another shard of {out})"
            raise DataError(f"{where} holds results of another run ({'; '.join(diff)}); use a new --out"
                            + (", or --fresh to discard this shard's results" if other == d else ""))
    before = _read_run(d)
    modes = list(dict.fromkeys([*before.get("meta", {}).get("modes", []), *meta.get("modes", [])]))
    write_atomic(d / "run.json", json.dumps({"settings": settings, "meta": {**meta, "modes": modes}}, indent=1))
    return d


def collect(out: Path) -> tuple[dict, dict, dict[str, list[dict]]]:
    """(settings, meta, rows per mode) of every shard under `out`, rows in item order, one per item id.

    The shards must agree on their settings (a run split into N shards, any of them unfinished or
    missing); the meta is the first shard's, with `shards` (N) and `shards_found` (the Ks present)."""
    dirs = shard_dirs(out)
    if not dirs:
        raise DataError(f"no shard results under {out}; run `kvcomm agents --out {out}` (with --shard K/N) first")
    runs = [(k, n, d, _read_run(d)) for k, n, d in dirs]
    settings, meta = runs[0][3].get("settings", {}), dict(runs[0][3].get("meta", {}))
    for _, _, d, run in runs[1:]:
        diff = _differences(settings, run.get("settings", {}))
        if diff:
            raise DataError(f"{d.name} and {runs[0][2].name} hold different runs ({'; '.join(diff)}); "
                            f"merge only shards of one run")
    modes: list[str] = list(dict.fromkeys(m for *_, run in runs for m in run.get("meta", {}).get("modes", [])))
    rows: dict[str, dict[str, dict]] = {}
    for _, _, d, _ in runs:
        for path in sorted(d.glob("*.jsonl")):
            for row in read_rows(path):
                rows.setdefault(row["mode"], {}).setdefault(row["id"], row)
    modes += [m for m in rows if m not in modes]
    n_items = meta.get("items")  # an unsharded run whose --limit went down keeps rows beyond it: left out
    by_mode = {m: sorted((r for r in rows[m].values() if n_items is None or r["index"] < n_items), key=lambda r: r["index"])
               for m in modes if m in rows}
    meta.update(shards=runs[0][1], shards_found=[k for k, *_ in runs], modes=list(by_mode))
    meta.setdefault("dtype", settings.get("dtype"))  # runs from before meta carried it
    return settings, meta, by_mode
