"""Fixtures: tiny randomly initialised models of real architectures, and the embedded model (e2e)."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the a is at in of to and what which where who country city house river capital answer question "
         "uma noor paris france kansas house museum buy sell company profit loss tip sheet one two three four "
         "five six seven eight nine ten red blue green cat dog sun moon").split()


def clear_kernel_caches() -> None:
    """Forget built Triton kernels and the 'does it build' answers (they differ in and out of the interpreter)."""
    from kvcomm.core import decode_attention, quant_kernel, triton_support
    from kvcomm.reuse import assembly, match_kernel

    for factory in (triton_support.builds, match_kernel._kernels, decode_attention._kernels, assembly._kernel,
                    quant_kernel._kernel):
        factory.cache_clear()


@pytest.fixture
def kernel_device(monkeypatch):
    """'cuda' where there is a GPU; else 'cpu' with Triton's interpreter on (skipped without Triton). For
    the interpreter, Triton must not have been imported before TRITON_INTERPRET is set, or its language
    helpers stay compiled-only: set TRITON_INTERPRET=1 for the whole run where something imports it first."""
    import importlib.util

    if torch.cuda.is_available():
        yield "cuda"
        return
    if importlib.util.find_spec("triton") is None:
        pytest.skip("no CUDA and no Triton for its interpreter")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    clear_kernel_caches()
    yield "cpu"
    clear_kernel_caches()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1, "<pad>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>", pad_token="<pad>")


def tiny_config(arch: str = "llama", layers: int = 4, seed_rope: float = 10000.0):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  rope_parameters={"rope_type": "default", "rope_theta": seed_rope}, eos_token_id=1, pad_token_id=2,
                  tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(arch)


def make_tiny(arch: str = "llama", seed: int = 0, layers: int = 4, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    from kvcomm.core.models import from_objects

    torch.manual_seed(seed)
    cfg = tiny_config(arch, layers)
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # Random init gives near-uniform attention; scale q/k up so attention is peaked and tests are sharp.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return from_objects(model, tiny_tokenizer(), name=f"tiny-{arch}-{seed}")


@pytest.fixture(params=["llama", "qwen2"])
def tiny(request):
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama saved as a local HF directory, loadable by `kvcomm --model DIR`."""
    lm = make_tiny("llama", seed=0)
    d = tmp_path_factory.mktemp("tiny-llama")
    lm.model.config._attn_implementation = "sdpa"
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def embedded():
    from kvcomm.core.models import load_model

    return load_model("embedded", progress=False)


def rand_ids(n: int, seed: int, vocab: int = 64) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def split_message(data: bytes) -> tuple[dict, bytes]:
    """A safetensors message as (header JSON, data section), for tests that edit headers."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_message(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + body
