"""The benchmark's inputs: random-weight models of real architectures, random prompts, and the machine.

Speed does not depend on weight values, so the GPU preset is the real Llama-3.1-8B architecture
(config in `resources/llama-3.1-8b.json`) with random bf16 weights; token ids are random too.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from kvcomm.core import attention, compiled, decode_attention
from kvcomm.core.kv import cache_to_block, prefill
from kvcomm.core.models import LoadedModel, pick_device, pick_dtype
from kvcomm.reuse.engine import Content
from kvcomm.reuse.templates import AgentTemplate, Template

PRESETS = {
    # name: (config, agents, prefix, user, reply, sweep prefixes, sweep outputs, sharing contexts)
    "gpu": ("llama-3.1-8b.json", 5, 512, 1000, 512, (64, 128, 256, 512, 1024), (128, 256, 512, 1024), (1024, 4096, 16384)),
    "cpu": ({"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 8,
             "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 4096,
             "max_position_embeddings": 8192, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
            5, 64, 128, 64, (32, 64), (32, 64), (256, 1024)),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


class NoTokenizer:
    """Benchmarks feed token ids directly; nothing is decoded."""

    eos_token_id = None
    unk_token_id = None

    def convert_tokens_to_ids(self, _):
        return None

    def get_vocab(self):
        return {}


def random_model(preset: str, device: str | None = None):


    attention.register()
    spec = PRESETS[preset][0]
    cfg_dict = json.loads((Path(__file__).parents[1] / "resources" / spec).read_text()) if isinstance(spec, str) else dict(spec)
    cfg = AutoConfig.for_model(**cfg_dict)
    dev = pick_device(device)
    dtype = pick_dtype(dev)
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="kvcomm")
    model.eval().requires_grad_(False)
    return LoadedModel(model, NoTokenizer(), f"random-{spec if isinstance(spec, str) else 'tiny'}", dev, dtype)


def random_ids(n: int, g: torch.Generator, vocab: int) -> list[int]:
    return torch.randint(10, vocab - 10, (n,), generator=g).tolist()


def peak_tflops(lm) -> float | None:
    if lm.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(lm.device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def agent_templates(n_agents: int, prefix: int, g, vocab: int):
    """Agent k's prompt: its own random `prefix`-token first segment, the question, then each earlier reply after
    an 8-token header that every agent shares (as "Agent j said:" is), then a shared 8-token closing segment, as
    the workloads' prompts are laid out (relay reuses what the agents share past their first segments)."""
    headers = [random_ids(8, g, vocab) for _ in range(n_agents)]
    closing = random_ids(8, g, vocab)
    templates = []
    for k in range(n_agents):
        names = ["user_question"] + [f"agent_{j}_current" for j in range(k)]
        segs = [random_ids(prefix, g, vocab)] + [headers[i] if i < k else closing for i in range(len(names))]
        templates.append(AgentTemplate(f"agent{k}", Template(tuple("" for _ in segs), tuple(names)), segs))
    return templates


def random_request(lm, seed: int, n_agents: int, user: int, reply: int):
    """A random user input and one random reply per agent, each reply with its producer's base KV
    (computed here, outside any timed region: in a real run it is a by-product of decoding)."""

    vocab = lm.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    question = Content(random_ids(user, g, vocab))
    replies = []
    for _ in range(n_agents):
        ids = random_ids(reply, g, vocab)
        replies.append(Content(ids, cache_to_block(prefill(lm, ids)[1])))
    return question, replies


class MissingAnchors:
    """The anchor pool as a call sees it when its last `n` placeholders fail the entropy test.

    Random token ids carry no meaning for the test, so the benchmark decides which placeholders fail: the
    last ones of each prompt (the newest replies, the ones a real pool knows least; agent 1's only one is
    the question). Matching still runs for every placeholder, as in a real call, and its result for
    those `n` is dropped: the paper then prefills the whole prompt, `+partial` recomputes only them."""

    def __init__(self, pool, n: int):
        self.pool, self.n = pool, n

    def match_many(self, queries):
        found = self.pool.match_many(queries)
        return [None if i >= len(found) - self.n else m for i, m in enumerate(found)]

    def __getattr__(self, name):
        return getattr(self.pool, name)


def environment(lm) -> dict:

    env = {"model": lm.name, "weights": "random (speed only; quality is measured on real models)",
           "dtype": str(lm.dtype).removeprefix("torch."), "device": str(lm.device), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "attention": "kvcomm (SDPA)"}
    if lm.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(lm.device)
        env["sdpa_flash"] = torch.backends.cuda.flash_sdp_enabled()
        probe = torch.empty(0, device=lm.device)
        env["static_attention"] = "split-key Triton kernel" if decode_attention.serves(lm.model, probe) else "masked SDPA"
    env["compiled_forwards"] = compiled.wanted()
    return env
