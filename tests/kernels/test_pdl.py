"""Programmatic dependent launch: off where it cannot work (CPU, the interpreter, FLASHSERVE_PDL=0),
and on the GPU a chain of decode kernels replayed from a CUDA graph with it equals the same chain
run eagerly without it."""

from __future__ import annotations

import torch
from kernel_test_utils import ON_GPU

from flashserve.kernels import pdl
from flashserve.kernels.activation import silu_and_mul
from flashserve.kernels.norm import fused_add_rms_norm


def test_off_on_cpu_and_when_disabled(monkeypatch):
    assert pdl.launch_args(torch.device("cpu")) == {"PDL": False, "launch_pdl": False}
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert not pdl.enabled(torch.device("cuda", 0))


def _chain(x, res, w, steps):
    for _ in range(steps):
        x, res = fused_add_rms_norm(x, res, w, 1e-6)
        x = silu_and_mul(torch.cat([x, x], dim=-1))
    return x, res


def test_graph_chain_equals_eager(device, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(4, 256, device=device)
    res = torch.randn(4, 256, device=device)
    w = torch.rand(256, device=device) + 0.5
    monkeypatch.setattr(pdl, "ENABLED", False)
    expect, expect_res = _chain(x.clone(), res.clone(), w, 6)
    monkeypatch.setattr(pdl, "ENABLED", True)
    if not ON_GPU:  # the interpreter: PDL stays off, the chain is the same code
        got, got_res = _chain(x.clone(), res.clone(), w, 6)
    else:
        xs, rs = x.clone(), res.clone()
        _chain(xs.clone(), rs.clone(), w, 6)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got, got_res = _chain(xs, rs, w, 6)
        for _ in range(3):
            xs.copy_(x)
            rs.copy_(res)
            graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    torch.testing.assert_close(got_res, expect_res, rtol=0, atol=0)
