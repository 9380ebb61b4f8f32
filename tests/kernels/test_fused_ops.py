"""rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul (Triton) vs torch references."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import ON_GPU, tol

from flashserve.kernels.activation import silu_and_mul
from flashserve.kernels.norm import fused_add_rms_norm, rms_norm
from flashserve.kernels.reference import (
    build_cos_sin_cache,
    fused_add_rms_norm_ref,
    rms_norm_ref,
    rotary_embedding_ref,
    silu_and_mul_ref,
)
from flashserve.kernels.rotary import rotary_embedding

HIDDEN = [24, 64] + ([4096, 5120] if ON_GPU else [])


def _rand(*shape: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


@pytest.mark.parametrize("hidden", HIDDEN)
def test_rms_norm(device, dtype, hidden):
    x = _rand(7, hidden, dtype=dtype, device=device) * 3 + 0.5
    w = _rand(hidden, dtype=dtype, device=device, seed=1)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), **tol(dtype))
    # 3-D input and a row-strided view (every other row)
    x3 = _rand(2, 6, hidden, dtype=dtype, device=device, seed=2)
    torch.testing.assert_close(rms_norm(x3, w, 1e-5), rms_norm_ref(x3, w, 1e-5), **tol(dtype))
    xs = x3.view(12, hidden)[::2]
    torch.testing.assert_close(rms_norm(xs, w, 1e-5), rms_norm_ref(xs, w, 1e-5), **tol(dtype))


@pytest.mark.parametrize("hidden", HIDDEN)
def test_fused_add_rms_norm_in_place(device, dtype, hidden):
    x = _rand(5, hidden, dtype=dtype, device=device, seed=3)
    res = _rand(5, hidden, dtype=dtype, device=device, seed=4)
    w = _rand(hidden, dtype=dtype, device=device, seed=5)
    ref_out, ref_res = fused_add_rms_norm_ref(x, res, w, 1e-6)
    x_ptr, r_ptr = x.data_ptr(), res.data_ptr()
    out, new_res = fused_add_rms_norm(x, res, w, 1e-6)
    assert out.data_ptr() == x_ptr and new_res.data_ptr() == r_ptr  # in place
    torch.testing.assert_close(new_res, ref_res, **tol(dtype))
    torch.testing.assert_close(out, ref_out, **tol(dtype))


def test_fused_add_rms_norm_non_contiguous(device):
    base = _rand(4, 2 * 32, dtype=torch.float32, device=device, seed=6)
    x = base[:, :32]  # row-strided view
    res = _rand(4, 32, dtype=torch.float32, device=device, seed=7).t().contiguous().t()  # col-major
    w = _rand(32, dtype=torch.float32, device=device, seed=8)
    ref_out, ref_res = fused_add_rms_norm_ref(x.clone(), res.clone(), w, 1e-6)
    fused_add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(x, ref_out, **tol(torch.float32))
    torch.testing.assert_close(res, ref_res, **tol(torch.float32))


# (num_heads, num_kv_heads, head_dim, rotary_dim, layout)
ROPE_CASES = [(4, 2, 16, 16, "flat"), (3, 1, 64, 64, "3d"), (2, 2, 64, 32, "flat"), (8, 0, 16, 16, "3d")]


@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}r{c[3]}{c[4]}")
def test_rotary_embedding(device, dtype, case):
    hq, hkv, d, rot, layout = case
    t = 11 if not ON_GPU else 300
    cache = build_cos_sin_cache(4096, rot, device=device)
    pos = torch.randint(0, 4096, (t,), generator=torch.Generator().manual_seed(9)).to(device)
    q = _rand(t, hq, d, dtype=dtype, device=device, seed=10)
    k = _rand(t, hkv, d, dtype=dtype, device=device, seed=11) if hkv else None
    if layout == "flat":
        q = q.reshape(t, hq * d)
        k = k.reshape(t, hkv * d) if k is not None else None
    q_ref, k_ref = rotary_embedding_ref(pos, q, k, cache, d)
    q_out, k_out = rotary_embedding(pos, q, k, cache, d)
    assert q_out is q and k_out is k  # in place
    torch.testing.assert_close(q, q_ref, **tol(dtype))
    if k is not None:
        torch.testing.assert_close(k, k_ref, **tol(dtype))


def test_rotary_embedding_strided_qkv(device):
    """q and k as column slices of one fused qkv buffer; v must stay untouched."""
    t, hq, hkv, d = 6, 4, 2, 16
    qkv = _rand(t, (hq + 2 * hkv) * d, dtype=torch.float32, device=device, seed=12)
    orig = qkv.clone()
    q, k = qkv[:, : hq * d], qkv[:, hq * d: (hq + hkv) * d]
    cache = build_cos_sin_cache(64, d, device=device)
    pos = torch.arange(t, device=device) * 7
    q_ref, k_ref = rotary_embedding_ref(pos, q.clone(), k.clone(), cache, d)
    rotary_embedding(pos, q, k, cache, d)
    torch.testing.assert_close(q, q_ref, **tol(torch.float32))
    torch.testing.assert_close(k, k_ref, **tol(torch.float32))
    assert torch.equal(qkv[:, (hq + hkv) * d:], orig[:, (hq + hkv) * d:])


@pytest.mark.parametrize("shape", [(5, 2 * 13), (2, 3, 2 * 64)] + ([(257, 2 * 11008)] if ON_GPU else []))
def test_silu_and_mul(device, dtype, shape):
    x = _rand(*shape, dtype=dtype, device=device, seed=13) * 2
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **tol(dtype))
