"""Sliding-window (+ dilation, sinks) paged attention: the Triton decode and prefill kernels and
the torch backend against the dense masked reference, on random paged inputs."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import ON_GPU, PagedBatch, tol

from flashserve.config import AttentionSpec
from flashserve.kernels import kv_quant
from flashserve.kernels.decode_attention import paged_decode_attention
from flashserve.kernels.prefill_attention import paged_prefill_attention
from flashserve.kernels.reference import paged_attention_ref, window_mask
from flashserve.layers.attention import TorchAttentionBackend

# (window, dilation, sinks)
WINDOWS = [(5, 1, 0), (7, 1, 3), (4, 3, 2), (1, 1, 1), (64, 1, 0)]


def test_window_mask_matches_its_definition():
    q_pos, k_pos = torch.arange(20, 30), torch.arange(30)
    for w, d, n in WINDOWS:
        mask = window_mask(q_pos, k_pos, w, d, n)
        for i, p in enumerate(q_pos.tolist()):
            seen = {k for k in range(p + 1) if k < n or any(p - j * d == k for j in range(w))}
            assert set(torch.nonzero(mask[i]).flatten().tolist()) == seen, (w, d, n, p)


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w[0]}d{w[1]}s{w[2]}")
@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_window_matches_reference(device, dtype, window, block_size):
    w, d, n = window
    seq_lens, q_lens = [70, 9, 33], [1, 1, 3]
    if ON_GPU:
        seq_lens = [s * 41 for s in seq_lens]
    batch = PagedBatch(seq_lens, q_lens, 8, 2, 16, block_size, dtype, device, seed=w + d + n)
    batch.store_new_with_reference()
    m = batch.meta
    ref = paged_attention_ref(*batch.attention_args(), scale=0.25, window=w, dilation=d, num_sinks=n)
    for splits in (1, 3):
        out = paged_decode_attention(*batch.attention_args(), max_query_len=m.max_query_len,
                                     max_seq_len=m.max_seq_len, scale=0.25, num_splits=splits,
                                     window=w, dilation=d, num_sinks=n)
        torch.testing.assert_close(out, ref, **tol(dtype))


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w[0]}d{w[1]}s{w[2]}")
@pytest.mark.parametrize("block_size", [4, 16])
def test_prefill_window_matches_reference(device, dtype, window, block_size):
    w, d, n = window
    seq_lens, q_lens = [61, 24, 40], [61, 10, 17]  # a whole prompt, and chunks after cached context
    if ON_GPU:
        seq_lens, q_lens = [s * 23 for s in seq_lens], [q * 23 for q in q_lens]
    batch = PagedBatch(seq_lens, q_lens, 4, 2, 16, block_size, dtype, device, seed=3 * w + n)
    batch.store_new_with_reference()
    m = batch.meta
    out = paged_prefill_attention(*batch.attention_args(), max_query_len=m.max_query_len, scale=0.25,
                                  window=w, dilation=d, num_sinks=n)
    ref = paged_attention_ref(*batch.attention_args(), scale=0.25, window=w, dilation=d, num_sinks=n)
    torch.testing.assert_close(out, ref, **tol(dtype))


@pytest.mark.parametrize("window", WINDOWS[:3], ids=lambda w: f"w{w[0]}d{w[1]}s{w[2]}")
def test_torch_backend_window_matches_reference(window):
    w, d, n = window
    spec = AttentionSpec("sliding", w, dilation=d, num_sinks=n)
    batch = PagedBatch([50, 23, 31], [1, 23, 6], 4, 2, 8, 4, torch.float32, torch.device("cpu"), seed=5)
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    out = TorchAttentionBackend().forward(batch.q, batch.k_new, batch.v_new, k_cache, v_cache, batch.meta, 0.3, spec)
    batch.store_new_with_reference()
    ref = paged_attention_ref(*batch.attention_args(), scale=0.3, window=w, dilation=d, num_sinks=n)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_window_kernels_read_8bit_caches(device):
    batch = PagedBatch([45, 20], [1, 20], 4, 2, 16, 4, torch.float32, device, seed=9)
    batch.store_new_with_reference()
    kq, vq = kv_quant.quantize_caches(batch.k_cache, batch.v_cache, torch.int8)
    args = (batch.q, kq, vq, *batch.attention_args()[3:])
    ref = paged_attention_ref(*args, scale=0.25, window=6, num_sinks=2)
    out = paged_prefill_attention(*args, max_query_len=20, scale=0.25, window=6, num_sinks=2)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
