"""When kvcomm's Triton kernels run: one gate for the dequantization kernel (`kvcomm.core.quant_kernel`)
and the reuse kernels (`kvcomm.reuse.match_kernel`, `kvcomm.reuse.assembly`).

A kernel runs for CUDA tensors, or for CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, how
the tests check kernels without a GPU), unless `KVCOMM_TRITON=0`; and only if Triton imports and the
kernel builds. Anything else takes the eager PyTorch path, which every kernel is tested against.
"""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def wanted(t: torch.Tensor) -> bool:
    """Whether kernels should run for tensors like `t` (CUDA or the interpreter, not turned off)."""
    return os.environ.get("KVCOMM_TRITON", "1") != "0" and (t.is_cuda or interpreting())


@functools.cache
def builds(factory) -> bool:
    """Whether a kernel factory imports Triton and builds its kernel; asked once per factory (a failed
    import is not retried)."""
    try:
        factory()
    except Exception:  # no Triton, or one too old for this kernel: the eager path serves
        return False
    return True
