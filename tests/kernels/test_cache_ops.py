"""store_kv (Triton) vs store_kv_ref (torch); the fused rotary + store launch vs the two launches."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import PagedBatch

from flashserve.kernels import kv_quant
from flashserve.kernels.cache_ops import rotary_store_kv, store_kv
from flashserve.kernels.reference import build_cos_sin_cache, store_kv_ref
from flashserve.kernels.rotary import rotary_embedding


@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(1, 16, 4), (2, 64, 16), (3, 24, 4)])
def test_store_kv_matches_reference(device, dtype, num_kv_heads, head_dim, block_size):
    batch = PagedBatch([7, 13, 4], [7, 2, 1], num_kv_heads * 2, num_kv_heads, head_dim, block_size,
                       dtype, device, seed=1)
    slots = batch.meta.slot_mapping.clone()
    slots[3] = -1  # a skipped token
    kc_ref, vc_ref = batch.k_cache.clone(), batch.v_cache.clone()
    kc_old = batch.k_cache.clone()
    store_kv_ref(batch.k_new, batch.v_new, kc_ref, vc_ref, slots)
    store_kv(batch.k_new, batch.v_new, batch.k_cache, batch.v_cache, slots)
    torch.testing.assert_close(batch.k_cache, kc_ref, atol=0, rtol=0)
    torch.testing.assert_close(batch.v_cache, vc_ref, atol=0, rtol=0)
    flat, flat_old = batch.k_cache.flatten(0, 1), kc_old.flatten(0, 1)
    skipped = batch.meta.slot_mapping[3]
    assert torch.equal(flat[skipped], flat_old[skipped])  # slot -1: untouched
    assert torch.equal(flat[slots[0]], batch.k_new[0].to(flat.dtype))  # stored


def test_store_kv_strided_input(device):
    # k, v as views into a fused qkv projection output: [T, (Hq + 2 Hkv) * D]
    batch = PagedBatch([9, 5], [9, 5], 4, 2, 16, 4, torch.float32, device, seed=2)
    t = batch.q.shape[0]
    qkv = torch.randn(t, (4 + 2 + 2) * 16, device=device)
    k = qkv[:, 64:96].view(t, 2, 16)
    v = qkv[:, 96:].view(t, 2, 16)
    kc_ref, vc_ref = batch.k_cache.clone(), batch.v_cache.clone()
    store_kv_ref(k, v, kc_ref, vc_ref, batch.meta.slot_mapping)
    store_kv(k, v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    torch.testing.assert_close(batch.k_cache, kc_ref, atol=0, rtol=0)
    torch.testing.assert_close(batch.v_cache, vc_ref, atol=0, rtol=0)


# (cache dtype: None = the model's, per-head q / k norms, rotary_dim of head_dim 32)
FUSED_CASES = [(None, False, 32), (None, True, 32), (None, False, 16), (torch.int8, True, 32),
               (torch.float8_e4m3fn, False, 16)]


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: f"{str(c[0]).split('.')[-1]}-norm{int(c[1])}-r{c[2]}")
def test_rotary_store_kv_equals_rotary_then_store(device, dtype, case):
    """One launch gives the bits of rotary_embedding followed by store_kv: q and k rotated in
    place inside one qkv buffer (v untouched), the rotated keys and the values in the cache
    (quantized for an 8-bit cache), a skipped slot left alone."""
    kv_dtype, norm, rot = case
    hq, hkv, d = 4, 2, 32
    batch = PagedBatch([7, 13, 4], [7, 2, 1], hq, hkv, d, 4, dtype, device, seed=3)
    t = batch.q.shape[0]
    gen = torch.Generator().manual_seed(4)
    qkv = (torch.randn(t, (hq + 2 * hkv) * d, generator=gen) * 2 + 0.3).to(dtype).to(device)
    pos = torch.randint(0, 512, (t,), generator=gen).to(device)
    cache = build_cos_sin_cache(512, rot, device=device)
    norms = {}
    if norm:
        w = lambda: (torch.rand(d, generator=gen) + 0.5).to(dtype).to(device)  # noqa: E731
        norms = dict(q_norm=(w(), 1e-6), k_norm=(w(), 1e-5))
    slots = batch.meta.slot_mapping.clone()
    slots[5] = -1

    def fresh_caches():
        if kv_dtype is None:
            return batch.k_cache.clone(), batch.v_cache.clone()
        return kv_quant.quantize_caches(batch.k_cache, batch.v_cache, kv_dtype)

    def views(buf):
        return (buf[:, : hq * d].view(t, hq, d), buf[:, hq * d: (hq + hkv) * d].view(t, hkv, d),
                buf[:, (hq + hkv) * d:].view(t, hkv, d))

    caches, ref_caches, old = fresh_caches(), fresh_caches(), fresh_caches()
    orig, ref = qkv.clone(), qkv.clone()
    q, k, v = views(ref)
    rotary_embedding(pos, q, k, cache, d, **norms)
    store_kv(k, v, *ref_caches, slots)
    q, k, v = views(qkv)
    rotary_store_kv(pos, q, k, v, cache, *caches, slots, **norms)
    assert torch.equal(qkv, ref) and not torch.equal(qkv, orig)
    assert torch.equal(qkv[:, (hq + hkv) * d:], orig[:, (hq + hkv) * d:])  # v untouched
    for got, want in zip(caches, ref_caches):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # bit for bit
        if kv_dtype is not None:
            assert torch.equal(kv_quant.kv_scales(got), kv_quant.kv_scales(want))
    skipped = int(batch.meta.slot_mapping[5])
    assert torch.equal(caches[0].flatten(0, 1)[skipped].view(torch.uint8), old[0].flatten(0, 1)[skipped].view(torch.uint8))
    assert not torch.equal(caches[0].view(torch.uint8), old[0].view(torch.uint8))  # something was stored
