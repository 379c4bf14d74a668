"""CUDA-graph capture, shared by the single-sequence decoder (`kvcomm.core.fast_decode`) and the
batched one (`kvcomm.core.batch_decode`), and the lock that keeps device-wide syncs out of a capture."""

from __future__ import annotations

import threading

import torch

WARMUP_STEPS = 3  # eager steps on a side stream before capture (allocator and library initialisation)

# Held while a graph is captured. A device-wide synchronize from another thread during a capture fails
# and invalidates it (seen on an H100: agents with 8 worker threads timing their calls), so
# `kvcomm.core.generation.sync` takes this lock too.
capture_lock = threading.Lock()


def capture_graph(step, reset=None, warmup: int = WARMUP_STEPS) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `step()` (device work only): `warmup` eager runs on a side stream (lazy kernel
    and allocator set-up must not happen under capture), `reset()` before the warm-up and again before
    the capture, then the capture in thread-local mode, since other threads may run eager work on the
    same GPU meanwhile. Decoding (`GraphDecoder`) and batched decoding (`batch_decode`) both use it."""
    with capture_lock:
        if reset is not None:
            reset()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        if reset is not None:
            reset()
        graph = torch.cuda.CUDAGraph()
        fresh_blas_workspaces()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            step()
    return graph


def fresh_blas_workspaces() -> None:
    """Drop PyTorch's cached cuBLAS workspaces so that the next capture allocates its own, in its own pool.

    Graphs captured on one stream otherwise share the workspace allocated during the first capture, in
    that graph's private pool: when the decoder drops its graphs for a larger bucket, that pool goes, and
    a later graph's replay reads freed memory ("illegal memory access" on an H100 once `empty_cache`
    returned it, `kvcomm bench --parts sharing,peer`; pytorch/pytorch#193402). A workspace dropped
    here while a live graph embeds it stays in that graph's pool, which lives as long as the graph."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
