"""Model fingerprints: what must agree before one model's KV may enter another model's cache.

A fingerprint holds the shape facts (architecture, layer count, KV heads, head dim), the RoPE
settings (keys are stored rotated, so a different base or scaling makes them meaningless), a digest
of the tokenizer's vocabulary (token ids must mean the same), and a digest of the weights.

Weights digest: hashing every byte of an 8B model costs seconds, so we hash each parameter's name,
shape and a strided sample of up to 4,096 of its values, cast to bfloat16 first. The cast makes the
digest the same whether the model was loaded in fp32 or bf16 (a sender on a GPU in bf16 and a receiver
on a CPU in fp32 share KV legitimately); the sample catches any fine-tune or different checkpoint,
which changes essentially every tensor.

Compatibility: by default every field must match. `allow_finetune=True` (an explicit opt-in) waives
the weights digest only, for fine-tunes of one base (the KVComm paper's setting); shapes, RoPE and
tokenizer must still match.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

from kvcomm.core.errors import IncompatibleModelError

SHAPE_FIELDS = ("architecture", "num_layers", "num_kv_heads", "head_dim")


@dataclass(frozen=True)
class Fingerprint:
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope: str  # canonical JSON of the RoPE settings
    tokenizer_digest: str
    weights_digest: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Fingerprint:
        try:
            data = json.loads(text)
            fp = cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise IncompatibleModelError(f"message carries an unreadable model fingerprint ({_short(e)}); re-send it with this kvcomm") from None
        for name in cls.__dataclass_fields__:
            value = getattr(fp, name)
            ok = (isinstance(value, int) and not isinstance(value, bool) and value > 0 if name in SHAPE_FIELDS[1:]
                  else isinstance(value, str))
            if not ok:
                raise IncompatibleModelError(f"message carries a malformed model fingerprint ({name} is {_short(value)}); "
                                             "re-send it with this kvcomm")
        return fp

    @property
    def short(self) -> str:
        return f"{self.architecture}/{self.num_layers}L/w:{self.weights_digest[:10]}"

    def check_compatible(self, other: Fingerprint, allow_finetune: bool = False) -> None:
        """Raise IncompatibleModelError naming the first field that differs (self = receiver)."""
        fields = list(SHAPE_FIELDS) + ["rope", "tokenizer_digest"]
        if not allow_finetune:
            fields.append("weights_digest")
        for name in fields:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                hint = (
                    " (if both are fine-tunes of one base, opt in with allow_finetune / --allow-finetune)"
                    if name == "weights_digest"
                    else ""
                )
                raise IncompatibleModelError(
                    f"KV message is from a different model: {name} is {_short(theirs)} in the message but "
                    f"{_short(mine)} in the receiver; send it from the receiver's model{hint}"
                )


def _short(v) -> str:
    s = str(v)
    return s if len(s) <= 24 else s[:21] + "..."


def rope_settings(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params)
    if "rope_theta" not in params and hasattr(config, "rope_theta"):
        params["rope_theta"] = config.rope_theta
    params.setdefault("max_position_embeddings", getattr(config, "max_position_embeddings", None))
    return json.dumps(params, sort_keys=True, default=str)


def tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode())
    return h.hexdigest()


@torch.no_grad()
def weights_digest(model: torch.nn.Module, sample: int = 4096) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        values = flat[::step][:sample].to(torch.bfloat16).view(torch.int16).cpu()
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(values.numpy().tobytes())
    return h.hexdigest()


def fingerprint(model: torch.nn.Module, tokenizer) -> Fingerprint:
    """Compute (and memoise on the model object) the model's fingerprint."""
    cached = getattr(model, "_kvcomm_fingerprint", None)
    if cached is not None:
        return cached
    cfg = model.config
    fp = Fingerprint(
        architecture=cfg.model_type,
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        rope=rope_settings(cfg),
        tokenizer_digest=tokenizer_digest(tokenizer),
        weights_digest=weights_digest(model),
    )
    model._kvcomm_fingerprint = fp
    return fp
