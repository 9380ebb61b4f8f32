"""The L2 prefetch of a layer's output projection (``flashserve.kernels.l2_prefetch``): which
weights a layer chooses (o_proj, then an MoE router; large contiguous tensors on the device only,
each storage once, within the budget), that a model on the CPU plans none, and that the kernel
compiles for Hopper with the bulk prefetch in it (it cannot run in the interpreter: it is inline
PTX; its GPU test is ``tests/test_l2_prefetch_gpu.py``)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from torch import nn

from flashserve.kernels import l2_prefetch
from flashserve.layers.attention import TorchAttentionBackend
from flashserve.loader import build_model, load_model_config

CPU = torch.device("cpu")


def _tiny(name: str) -> nn.Module:
    c = load_model_config(name, "dummy")
    kw = dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
              vocab_size=512)
    if c.num_experts:
        kw.update(num_experts=64, moe_intermediate_size=128, num_experts_per_tok=2, layer_types=c.layer_types[:2])
    return build_model(dataclasses.replace(c, **kw), torch.float32, "cpu", TorchAttentionBackend())


def test_weight_spans_take_large_contiguous_tensors_once_within_the_budget():
    big, other = nn.Linear(256, 128), nn.Linear(128, 256)  # 128 KiB weights (fp32), 512 / 1024 B biases
    shared = nn.Module()
    shared.weight = big.weight  # the same storage again
    strided = nn.Module()
    strided.register_buffer("w", torch.randn(256, 256).t())  # not contiguous
    spans = l2_prefetch.weight_spans([big, shared, strided, other], CPU, 1 << 30)
    assert [s.numel() for s in spans] == [128 * 1024, 128 * 1024]
    assert spans[0].dtype == torch.uint8 and spans[0].data_ptr() == big.weight.data_ptr()
    assert spans[1].data_ptr() == other.weight.data_ptr()
    # the budget cuts the last span (to 16-byte multiples); one with less than MIN_BYTES left is dropped
    cut = l2_prefetch.weight_spans([big, other], CPU, 128 * 1024 + l2_prefetch.MIN_BYTES + 100)
    assert [s.numel() for s in cut] == [128 * 1024, l2_prefetch.MIN_BYTES + 96]
    assert [s.numel() for s in l2_prefetch.weight_spans([big, other], CPU, 128 * 1024 + 1000)] == [128 * 1024]
    assert l2_prefetch.weight_spans([big], torch.device("cuda:0"), 1 << 30) == ()  # not on that device


@pytest.mark.parametrize("name,router", [("llama-3.1-8b", False), ("qwen3-30b-a3b", True)])
def test_decoder_layers_plan_their_output_projection_and_router(name, router):
    model = _tiny(name)
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.prefetch is None  # nothing until planned
        nbytes = layer.plan_l2_prefetch(CPU, 1 << 30)
        expect = [attn.o_proj.weight] + ([layer.mlp.gate.weight] if router else [])
        assert [s.data_ptr() for s in attn.prefetch.spans] == [w.data_ptr() for w in expect]
        assert nbytes == attn.prefetch.nbytes == sum(w.numel() * w.element_size() for w in expect)
    # a model on the CPU: nothing is planned (the prefetch is a Hopper instruction)
    fresh = _tiny(name)
    assert l2_prefetch.plan_model(fresh, CPU) == 0
    assert all(layer.self_attn.prefetch is None for layer in fresh.model.layers)


_COMPILE = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from flashserve.kernels import l2_prefetch

src = ASTSource(fn=l2_prefetch._l2_prefetch_kernel,
                signature={"a_ptr": "*u8", "a_bytes": "i64", "b_ptr": "*u8", "b_bytes": "i64", "a_chunks": "i64",
                           "CHUNK": "constexpr",
                           "BLOCK": "constexpr", "PDL": "constexpr"},
                constexprs={"CHUNK": l2_prefetch.CHUNK, "BLOCK": l2_prefetch.BLOCK, "PDL": 1})
kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print(kernel.asm["ptx"])
print("cubin bytes", len(kernel.asm["cubin"]))
"""


def test_kernel_compiles_for_hopper_with_the_bulk_prefetch():
    # outside the interpreter (this process runs kernels in it), through Triton's own ptxas
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ptx = run.stdout
    assert ptx.count("cp.async.bulk.prefetch.L2.global") == 2  # one per span
    assert "griddepcontrol.launch_dependents" in ptx and "griddepcontrol.wait" in ptx
    assert int(ptx.rsplit("cubin bytes", 1)[1]) > 0


@triton.jit
def _chunks_kernel(a_bytes, b_bytes, a_chunks, out_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    a_start, a_size, b_start, b_size = l2_prefetch._chunks(tl.program_id(0), a_bytes, b_bytes, a_chunks, CHUNK, BLOCK)
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)) * 4
    tl.store(out_ptr + rows, a_start)
    tl.store(out_ptr + rows + 1, a_size.to(tl.int64))
    tl.store(out_ptr + rows + 2, b_start)
    tl.store(out_ptr + rows + 3, b_size.to(tl.int64))


@pytest.mark.parametrize("a_bytes,b_bytes", [(1000, 0), (4096 + 48, 2048 + 16), (3 * 1024, 1024 + 7), (64, 5000)])
def test_chunks_cover_both_spans_aligned(a_bytes, b_bytes):
    chunk, block = 1024, 4  # the kernel's chunk arithmetic, in the interpreter, on small spans
    a_chunks = -(-a_bytes // chunk)
    programs = -(-(a_chunks + -(-b_bytes // chunk)) // block)
    out = torch.full((programs * block, 4), -1, dtype=torch.int64)
    _chunks_kernel[(programs,)](a_bytes, b_bytes, a_chunks, out, CHUNK=chunk, BLOCK=block)
    for span, (start, size), total in (("a", (0, 1), a_bytes), ("b", (2, 3), b_bytes)):
        got = [(int(r[start]), int(r[size])) for r in out if r[size] > 0]
        assert all(s % chunk == 0 and n % 16 == 0 and n <= chunk for s, n in got), span
        covered = sorted(got)
        assert [s for s, _ in covered] == list(range(0, total // 16 * 16, chunk)), span  # each chunk once, in order
        assert sum(n for _, n in covered) == total // 16 * 16, span
