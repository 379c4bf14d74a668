"""Move cached keys to other positions by re-rotating them (RoPE: R(a)·R(b) = R(a+b)).

Uses the model's own rotary embedding module, so whatever frequency schedule it has (Llama, Qwen2,
Gemma, Mistral; linear / llama3 / YaRN scaling) is honoured. YaRN-style scaling multiplies cos/sin by
`attention_scaling`; a re-rotation must not apply that factor twice, so we divide it out.
Dynamic-NTK RoPE changes its frequencies with sequence length and is *not* shift-invariant: we refuse
it rather than return keys that are silently wrong.
"""

from __future__ import annotations

import torch


def _rotary(model):
    base = getattr(model, "model", model)
    rot = getattr(base, "rotary_emb", None)
    if rot is None:
        raise ValueError(f"{type(model).__name__} has no rotary embedding; kvcomm's position moves need a RoPE model")
    return rot


def check_shift_invariant(model) -> None:
    rope_type = getattr(_rotary(model), "rope_type", "default")
    if rope_type == "dynamic":
        raise ValueError("dynamic-NTK RoPE is not shift-invariant; kvcomm cannot move keys for this model")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


@torch.no_grad()
def rotation(model, positions: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin [t, head_dim] that move keys by `positions` [t] (the model's own rotary
    module, with YaRN-style `attention_scaling` divided out: a move must not apply it twice)."""
    check_shift_invariant(model)
    rot = _rotary(model)
    pos = positions.to(device, torch.long).reshape(1, -1)
    probe = torch.empty(1, dtype=torch.float32, device=device)
    # Computing cos/sin of a negative position is fine: the rotary module takes pos * inv_freq.
    cos, sin = rot(probe, pos)
    scale = float(getattr(rot, "attention_scaling", 1.0) or 1.0)
    return (cos[0] / scale).float(), (sin[0] / scale).float()


@torch.no_grad()
def rerotate(model, keys: torch.Tensor, delta: int | torch.Tensor) -> torch.Tensor:
    """Return keys [b, h, t, d] moved by `delta` positions (an int, or a [t] tensor per token).

    Computed in float32 and cast back, so moving by Δ then by −Δ returns the keys to rounding error.
    """
    if isinstance(delta, int) and delta == 0:
        return keys
    t = keys.shape[-2]
    pos = torch.full((t,), delta, dtype=torch.long) if isinstance(delta, int) else delta
    cos, sin = rotation(model, pos, keys.device)
    cos, sin = cos.unsqueeze(0).unsqueeze(0), sin.unsqueeze(0).unsqueeze(0)  # [1, 1, t, d]
    k = keys.float()
    return (k * cos + rotate_half(k) * sin).to(keys.dtype)
