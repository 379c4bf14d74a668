"""CUDA-graph capture (`kvcomm.core.graph_capture`): a graph keeps working after another graph captured
before it is dropped and the allocator's cache emptied (each capture gets its own cuBLAS workspace;
without that a later graph replayed into an earlier one's freed pool: pytorch/pytorch#193402).

Limit, measured: on an H100 (torch 2.11) these two-graph tests pass with the fix switched off too; the
failure needed the decoder's longer history (`kvcomm bench --preset gpu --repeats 1 --parts sharing,peer`:
an illegal memory access at the peer's first replay without the fix, none with it). They guard the
property, not that exact sequence."""

from __future__ import annotations

import gc

import pytest
import torch

from kvcomm.core.graph_capture import capture_graph, fresh_blas_workspaces


def test_clearing_blas_workspaces_is_safe_anywhere():
    fresh_blas_workspaces()  # a no-op without CUDA; never raises


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 32])
def test_a_graph_survives_dropping_an_earlier_one_and_emptying_the_cache(rows):
    """Shapes of a decode step and a 32-token question on an 8B layer (cuBLASLt split-K kernels, which use
    the workspace): the second graph replays correctly after the first is gone and the cache is emptied."""
    g = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(1, rows, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    outs = {}

    def step(name):
        outs[name] = torch.nn.functional.linear(x, w)

    first = capture_graph(lambda: step("first"))
    second = capture_graph(lambda: step("second"))
    first.replay()
    second.replay()
    del first
    outs.pop("first")
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    for _ in range(3):
        second.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(outs["second"], torch.nn.functional.linear(x, w), rtol=0, atol=0)
