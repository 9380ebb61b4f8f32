"""The CPU decode fast path's pieces compute what the general code computes: q and k rotated in
one pass equal ``apply_rotary`` bit for bit, the fp32 RMSNorm equals its formula, and an int4
CPU weight's build-time forward equals the general forward and the dense reference."""

from __future__ import annotations

import pytest
import torch

from flashserve.kernels import cpu_native, quant_reference as ref
from flashserve.layers.norm import rms_norm
from flashserve.layers.rotary import RotaryEmbedding, apply_rotary, rotate_q_k
from flashserve.quant.packed import Int4Weight, gguf_weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5])
def test_q_and_k_rotated_together_equal_apply_rotary(dtype, tokens):
    g = torch.Generator().manual_seed(tokens)
    emb = RotaryEmbedding(64, 64, 512, 10000.0)
    positions = torch.randint(0, 512, (tokens,), generator=g)
    rope = emb.lookup(positions)
    q = torch.randn(tokens, 9, 64, generator=g).to(dtype)
    k = torch.randn(tokens, 3, 64, generator=g).to(dtype)
    rq, rk = rotate_q_k(q, k, rope.cos_full, rope.sin_signed)
    assert torch.equal(rq, apply_rotary(q, rope.cos, rope.sin, 64))
    assert torch.equal(rk, apply_rotary(k, rope.cos, rope.sin, 64))
    fq, fk = emb(rope, q, k)
    assert torch.equal(fq, rq) and torch.equal(fk, rk)
    partial = RotaryEmbedding(64, 32, 512, 10000.0)  # partial rotation keeps the general path
    assert partial.lookup(positions).cos_full is None


def test_fp32_rms_norm_equals_its_formula():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 576, generator=g) * 3, torch.randn(576, generator=g)
    want = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(rms_norm(x, w, 1e-5), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_int4_cpu_forward_chosen_at_build_equals_general_and_reference(qtype, monkeypatch):
    monkeypatch.setattr(cpu_native, "available", lambda: False)  # torch's int4 kernel, as without AVX2
    raw = ref.random_gguf_blocks(qtype, 128, 96, seed=3)
    part = gguf_weight(raw, qtype, 96, torch.device("cpu"))
    assert isinstance(part, Int4Weight) and part.forward == part._cpu_forward
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(1))
    fast = part(x)
    assert torch.equal(fast, Int4Weight.forward(part, x))  # the general method, same kernel call
    torch.testing.assert_close(fast, part.reference(x), rtol=2e-2, atol=2e-2)
    dense = x @ ref.gguf_dequantize(raw, qtype).t()
    assert (fast - dense).norm() / dense.norm() < 1e-2  # bf16 activations against exact fp32
