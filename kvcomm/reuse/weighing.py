"""The arithmetic of anchor matching (KVCOMM Eq. 5-7): distances, weights and blended offsets.

`kvcomm.reuse.anchors.AnchorPool` decides *which* anchors a content is compared with and what happens
with the result; this module computes. Two paths give the same numbers to float32 rounding:
  - eager PyTorch (CPU, or `KVCOMM_TRITON=0`), one anchor at a time so that no stacked float32 copy of
    all anchors lives at once;
  - Triton (`kvcomm.reuse.match_kernel`, CUDA or the interpreter), where a placeholder's weighing is one
    launch per anchor plus one, and each of its two offsets (placeholder, following segment) one launch
    for keys and values with the softmax weights computed in the kernel. On an H100 the eager form of
    this arithmetic was ~40 small launches per placeholder, and matching an 8B agent's five
    placeholders cost ~5 ms of host time for ~0.6 ms of GPU work (`kvcomm bench --profile`).

A query's weighing writes one float32 row on the device, [entropy, scale, w_0 .. w_A-1], so a call's
placeholders are read back to the host in one copy (`AnchorPool.match_many`).
"""

from __future__ import annotations

import torch

from kvcomm.reuse import match_kernel


def square_distances(v: torch.Tensor, anchors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean squared difference between `v` [L, H, n, D] and each anchor's values, per token ([A, n], over
    layers, heads, channels) and per (layer, head, channel) ([A, L, H, D], over tokens), and `v`'s own
    mean square; float32.

    On CUDA Triton kernels read each input once (`kvcomm.reuse.match_kernel`). The eager path goes
    one anchor at a time: a float32 difference of one anchor's size lives at once, not a stacked
    [A, L, H, n, D] one (on an 8B model, 1,000 tokens: 131 MB instead of 524 MB per placeholder)."""
    if match_kernel.available(v):
        return match_kernel.square_distances(v, anchors)
    v = v.float()
    d_tok = v.new_empty(len(anchors), v.shape[2])
    d_ch = v.new_empty(len(anchors), v.shape[0], v.shape[1], v.shape[3])
    for i, a in enumerate(anchors):
        sq = torch.sub(v, a).square_()
        torch.mean(sq, dim=(0, 1, 3), out=d_tok[i])
        torch.mean(sq, dim=2, out=d_ch[i])
    return d_tok, d_ch, v.pow(2).mean()


def blend(parts: list[torch.Tensor], weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_a weights[a] * parts[a], accumulated in float32 (parts in any float dtype, as stored: no float32
    copies of them), returned in `dtype`. One Triton kernel on CUDA, else one part at a time. Matching
    itself calls `blend_pair`, whose kernel also computes the weights; this form serves its eager path
    and benchmarks/match_micro.py."""
    if match_kernel.available(parts[0]):
        return match_kernel.weighted_sum(parts, weights, dtype)
    out = parts[0] * weights[0]
    for part, w in zip(parts[1:], weights[1:]):
        out.addcmul_(part, w)
    return out.to(dtype)


def weigh(v: torch.Tensor, anchors: list[torch.Tensor], tau: float, row: torch.Tensor):
    """Compare content values `v` [L, H, n, D] with the anchors' (their first n tokens).

    Writes [entropy H, scale, w_0 .. w_A-1] into `row` (float32, on v's device): scale = RMS(v), the global
    distance d_a = RMS(v - anchor_a) / scale, w = softmax(-d / tau), H = -sum w log w. Returns what the
    offsets need: per-token mean squared distances [A, n], per-channel distances [A, L, H, D] and the
    factor that makes the latter means (1 when they already are)."""
    if match_kernel.available(v):
        return match_kernel.weigh(v, anchors, tau, row)
    d_tok, d_ch, mean_sq = square_distances(v, anchors)
    scale = mean_sq.sqrt().clamp_min(1e-6)
    w = torch.softmax(-global_distances(d_tok, scale) / tau, dim=0)
    row[0] = -(w * torch.log(w.clamp_min(1e-30))).sum()
    row[1] = scale
    row[2 : 2 + len(anchors)] = w
    return d_tok, d_ch, 1.0


def global_distances(d_tok: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Each anchor's d = RMS(v - anchor) / RMS(v) from `weigh`'s per-token mean squares [A, n] and the scale
    it wrote into row[1] (every token has as many entries, so the mean of the means is the global mean).
    The Triton path computes the same inside `match_kernel.summarize`."""
    return d_tok.mean(1).sqrt() / scale


def blend_pair(keys: list[torch.Tensor], values: list[torch.Tensor], d: torch.Tensor, per_token: bool, norm: float,
               row: torch.Tensor, tau: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of sum_a w_a * offset_a, with w = softmax(-sqrt(d * norm) / scale / tau) over the
    anchors: per token for a placeholder (`per_token`, d [A, n]), per (layer, head, channel) for the
    segment after it (d [A, L, H, D]); scale is `row[1]` from `weigh`."""
    if match_kernel.available(keys[0]):
        return match_kernel.blend_pair(keys, values, d, per_token, norm, row, tau, dtype)
    w = torch.softmax(-((d * norm).sqrt() / row[1]) / tau, dim=0)
    w = w[:, None, None, :, None] if per_token else w[:, :, :, None, :]  # [A, 1, 1, n, 1] or [A, L, H, 1, D]
    return blend(keys, w, dtype), blend(values, w, dtype)
