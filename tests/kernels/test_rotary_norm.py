"""rotary_embedding with the per-head q/k RMSNorm fused in (Qwen3, Gemma 3) against the two
kernels it replaces (bit for bit) and against the torch references."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import ON_GPU, tol

from flashserve.kernels.norm import rms_norm
from flashserve.kernels.reference import build_cos_sin_cache, rms_norm_ref, rotary_embedding_ref
from flashserve.kernels.rotary import rotary_embedding
from flashserve.layers.norm import RMSNorm
from flashserve.layers.rotary import RotaryEmbedding

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (num_heads, num_kv_heads, head_dim, rotary_dim); odd head counts, partial rotary, head_dim not a power of 2
CASES = [(4, 2, 16, 16), (3, 1, 64, 64), (5, 3, 32, 16), (2, 1, 80, 40)] + ([(32, 4, 128, 128)] if ON_GPU else [])
LAYOUTS = ["flat", "3d", "qkv"]  # [T, H*D], [T, H, D], column views of one fused qkv buffer
EPS_Q, EPS_K = 1e-6, 1e-5


def _rand(*shape: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


def _inputs(t, hq, hkv, d, layout, dtype, device):
    """(qkv buffer, q, k) with q, k in the given layout, views into qkv."""
    qkv = _rand(t, (hq + 2 * hkv) * d, dtype=dtype, device=device, seed=1) * 2 + 0.25
    if layout != "qkv":  # q and k in buffers of their own
        qkv = qkv.clone()
        q, k = qkv[:, : hq * d].clone(), qkv[:, hq * d: (hq + hkv) * d].clone()
    else:
        q, k = qkv[:, : hq * d], qkv[:, hq * d: (hq + hkv) * d]
    if layout != "flat":
        q, k = q.view(t, hq, d), k.view(t, hkv, d)
    return qkv, q, k


def _assert_same(fused: torch.Tensor, unfused: torch.Tensor) -> None:
    """Bit for bit in the interpreter; on a GPU the two kernels' head sums (different tile
    layouts) may add in a different order, so there only up to rounding."""
    if ON_GPU:
        torch.testing.assert_close(fused, unfused, **tol(fused.dtype))
    else:
        assert torch.equal(fused, unfused)


def _weights(d, dtype, device):
    return (1 + 0.3 * _rand(d, dtype=torch.float32, device=device, seed=2)).to(dtype), \
        (1 + 0.3 * _rand(d, dtype=torch.float32, device=device, seed=3)).to(dtype)


@pytest.mark.parametrize("act_dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}r{c[3]}")
@pytest.mark.parametrize("t", [1, 7] + ([300] if ON_GPU else []))
def test_fused_norm_equals_norm_then_rotary(device, act_dtype, layout, case, t):
    hq, hkv, d, rot = case
    cache = build_cos_sin_cache(4096, rot, device=device)
    pos = torch.randint(0, 4096, (t,), generator=torch.Generator().manual_seed(4)).to(device)
    wq, wk = _weights(d, act_dtype, device)
    qkv, q, k = _inputs(t, hq, hkv, d, layout, act_dtype, device)
    orig = qkv.clone()

    # unfused: the norm kernel on each head, then the rotary kernel on its output
    q2 = rms_norm(q.reshape(t, hq, d), wq, EPS_Q)
    k2 = rms_norm(k.reshape(t, hkv, d), wk, EPS_K)
    rotary_embedding(pos, q2, k2, cache, d)

    q_ref, k_ref = rotary_embedding_ref(pos, rms_norm_ref(q.reshape(t, hq, d), wq, EPS_Q),
                                        rms_norm_ref(k.reshape(t, hkv, d), wk, EPS_K), cache, d)

    q_out, k_out = rotary_embedding(pos, q, k, cache, d, q_norm=(wq, EPS_Q), k_norm=(wk, EPS_K))
    assert q_out is q and k_out is k  # in place
    _assert_same(q.reshape(t, hq, d), q2)
    _assert_same(k.reshape(t, hkv, d), k2)
    torch.testing.assert_close(q.reshape(t, hq, d), q_ref, **tol(act_dtype))
    torch.testing.assert_close(k.reshape(t, hkv, d), k_ref, **tol(act_dtype))
    if layout == "qkv":  # v untouched
        assert torch.equal(qkv[:, (hq + hkv) * d:], orig[:, (hq + hkv) * d:])


def test_fused_norm_q_only(device):
    t, hq, d = 3, 3, 32
    cache = build_cos_sin_cache(64, d, device=device)
    pos = torch.arange(t, device=device) * 5
    w, _ = _weights(d, torch.float32, device)
    q = _rand(t, hq, d, dtype=torch.float32, device=device, seed=5)
    expected = rms_norm(q, w, EPS_Q)
    rotary_embedding(pos, expected, None, cache, d)
    rotary_embedding(pos, q, None, cache, d, q_norm=(w, EPS_Q))
    _assert_same(q, expected)


@pytest.mark.parametrize("rot", [32, 16])
def test_rotary_module_with_norms(device, rot):
    """RotaryEmbedding.forward(..., q_norm, k_norm): the fused kernel (triton) matches the torch
    path, which is the norms followed by the rotation as before."""
    t, hq, hkv, d = 5, 3, 1, 32
    emb = RotaryEmbedding(d, rot, 256, 10000.0).to(device)
    q_norm, k_norm = RMSNorm(d, EPS_Q).to(device), RMSNorm(d, EPS_K).to(device)
    with torch.no_grad():
        q_norm.weight.copy_(_weights(d, torch.float32, device)[0])
        k_norm.weight.copy_(_weights(d, torch.float32, device)[1])
    pos = torch.tensor([0, 3, 17, 100, 255], device=device)
    _, q, k = _inputs(t, hq, hkv, d, "3d", torch.float32, device)

    rope = emb.lookup(pos)
    expected = emb(rope, q_norm(q), k_norm(k))
    q_t, k_t = emb(rope, q.clone(), k.clone(), q_norm, k_norm)
    assert torch.equal(q_t, expected[0]) and torch.equal(k_t, expected[1])

    emb.triton = True
    q_f, k_f = emb(emb.lookup(pos), q.clone(), k.clone(), q_norm, k_norm)
    torch.testing.assert_close(q_f, expected[0], **tol(torch.float32))
    torch.testing.assert_close(k_f, expected[1], **tol(torch.float32))
