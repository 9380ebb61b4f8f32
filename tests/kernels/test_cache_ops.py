"""store_kv (Triton) vs store_kv_ref (torch)."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import PagedBatch

from flashserve.kernels.cache_ops import store_kv
from flashserve.kernels.reference import store_kv_ref


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
