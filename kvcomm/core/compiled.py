"""The static path's model forward, optionally through `torch.compile` (opt-in: `KVCOMM_COMPILE=1`).

Why: a CUDA graph removes Python and launch overhead, but still runs every kernel eager transformers
issues: per layer and token an 8B Llama step has dozens of small element-wise kernels (RMSNorm's
pow/mean/rsqrt/mul, rotary's slices and concatenations, SiLU·up, residual adds) of a few microseconds
each next to seven matrix-vector products. Inductor fuses those; the fused kernels are then captured
like any others (`kvcomm.core.fast_decode` captures after its warm-up, when compilation has happened).

Off by default: compiling an 8B model takes tens of seconds per new shape (each captured bucket is
one), which a short CLI run or a test never wins back. `dynamic=False`: the static cache's shapes are
fixed per bucket, and static shapes give the best kernels. The recompile limit is raised to cover
the decode step and the five prefill buckets over a few cache sizes.
"""

from __future__ import annotations

import functools
import os

import torch

RECOMPILE_LIMIT = 64


def wanted() -> bool:
    """Whether `KVCOMM_COMPILE` asks for compiled forwards."""
    return os.environ.get("KVCOMM_COMPILE", "0").strip().lower() in ("1", "true", "on", "yes")


def plain_forward(model, **inputs):
    """The model's forward as transformers defines it."""
    return model(**inputs)


@functools.cache
def forward():
    """`plain_forward` compiled (one compiled function for all models; dynamo guards tell them apart)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # its older name
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    return torch.compile(plain_forward, dynamic=False)
