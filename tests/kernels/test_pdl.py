"""Programmatic dependent launch: off where it cannot work (CPU, the interpreter, FLASHSERVE_PDL=0),
and on the GPU a chain of decode kernels replayed from a CUDA graph with it (norms launching the
next kernel early or not) equals the same chain run eagerly without it. Norms launch early only in
models whose products prefer it (int4)."""

from __future__ import annotations

import torch
from kernel_test_utils import ON_GPU

import pytest
from torch import nn

from flashserve.kernels import pdl, quant_reference as ref
from flashserve.kernels.activation import silu_and_mul
from flashserve.kernels.norm import fused_add_rms_norm
from flashserve.layers.fused import use_triton_ops
from flashserve.layers.norm import RMSNorm
from flashserve.quant.packed import Int4Weight, Int8Weight


def test_off_on_cpu_and_when_disabled(monkeypatch):
    assert pdl.launch_args(torch.device("cpu")) == {"PDL": 0, "launch_pdl": False}
    assert pdl.launch_args(torch.device("cpu"), early=True) == {"PDL": 0, "launch_pdl": False}
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert not pdl.enabled(torch.device("cuda", 0))


def test_early_flag_where_enabled(monkeypatch):
    monkeypatch.setattr(pdl, "enabled", lambda device: True)
    assert pdl.launch_args(torch.device("cuda", 0)) == {"PDL": 1, "launch_pdl": True}
    assert pdl.launch_args(torch.device("cuda", 0), early=True) == {"PDL": pdl.EARLY, "launch_pdl": True}


def test_norms_launch_early_only_before_int4_products():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    int4 = Int4Weight(*ref.quantize_int4(w, 32, zero_point=True), 32)
    q = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
    int8 = Int8Weight(q, torch.rand(32, generator=g) * 0.01)
    for product, early in ((int4, True), (int8, False), (nn.Linear(64, 32), False)):
        model = nn.Sequential(RMSNorm(64), product, RMSNorm(32))
        assert use_triton_ops(model) == 2
        assert [m.early_dependents for m in (model[0], model[2])] == [early, early]
        use_triton_ops(model, enabled=False)
        assert not model[0].triton and not model[0].early_dependents


def _chain(x, res, w, steps, early):
    for _ in range(steps):
        x, res = fused_add_rms_norm(x, res, w, 1e-6, early)
        x = silu_and_mul(torch.cat([x, x], dim=-1))
    return x, res


@pytest.mark.parametrize("early", [False, True])
def test_graph_chain_equals_eager(device, monkeypatch, early):
    torch.manual_seed(0)
    x = torch.randn(4, 256, device=device)
    res = torch.randn(4, 256, device=device)
    w = torch.rand(256, device=device) + 0.5
    monkeypatch.setattr(pdl, "ENABLED", False)
    expect, expect_res = _chain(x.clone(), res.clone(), w, 6, early)
    monkeypatch.setattr(pdl, "ENABLED", True)
    if not ON_GPU:  # the interpreter: PDL stays off, the chain is the same code
        got, got_res = _chain(x.clone(), res.clone(), w, 6, early)
    else:
        xs, rs = x.clone(), res.clone()
        _chain(xs.clone(), rs.clone(), w, 6, early)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got, got_res = _chain(xs, rs, w, 6, early)
        for _ in range(3):
            xs.copy_(x)
            rs.copy_(res)
            graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    torch.testing.assert_close(got_res, expect_res, rtol=0, atol=0)
