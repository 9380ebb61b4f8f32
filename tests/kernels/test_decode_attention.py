"""Split-KV decode attention (Triton) vs paged_attention_ref, incl. the unified-max path."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import ON_GPU, PagedBatch, tol

from flashserve.kernels.decode_attention import choose_num_splits, paged_decode_attention
from flashserve.kernels.reference import paged_attention_ref

# (num_heads, num_kv_heads, head_dim, block_size, seq_lens, q_lens, num_splits)
CASES = [
    (4, 4, 16, 4, [1, 9, 33], [1, 1, 1], 1),  # MHA, one split, a 1-token context
    (8, 2, 16, 4, [70, 5, 41], [1, 1, 1], 3),  # GQA 4, 3 splits (some empty for short seqs)
    (8, 1, 64, 16, [90, 17], [1, 1], 4),  # MQA (group 8), head_dim 64
    (4, 1, 16, 16, [66, 30, 8], [4, 2, 3], 2),  # speculative verify: several tokens per seq
    (8, 8, 64, 4, [45, 23], [1, 1], None),  # heuristic split count
]


def _run(batch: PagedBatch, scale: float, **kw):
    m = batch.meta
    return paged_decode_attention(*batch.attention_args(), max_query_len=m.max_query_len,
                                  max_seq_len=m.max_seq_len, scale=scale, **kw)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}bs{c[3]}s{c[6]}")
def test_decode_matches_reference(device, dtype, case):
    hq, hkv, d, bs, seq_lens, q_lens, splits = case
    if ON_GPU:
        seq_lens = [s * 37 for s in seq_lens]
        splits = splits * 4 if splits else None
    batch = PagedBatch(seq_lens, q_lens, hq, hkv, d, bs, dtype, device, seed=sum(seq_lens))
    batch.store_new_with_reference()
    scale = d ** -0.5
    out = _run(batch, scale, num_splits=splits)
    ref = paged_attention_ref(*batch.attention_args(), scale=scale)
    torch.testing.assert_close(out, ref, **tol(dtype))


def test_decode_split_count_does_not_change_result(device):
    batch = PagedBatch([77, 40], [1, 2], 4, 2, 16, 4, torch.float32, device, seed=3)
    batch.store_new_with_reference()
    outs = [_run(batch, 0.25, num_splits=s) for s in (1, 2, 5)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)


def _unified_case(device, dtype):
    batch = PagedBatch([57, 29, 4], [1, 1, 1], 8, 2, 16, 4, dtype, device, seed=11)
    batch.store_new_with_reference()
    ref = paged_attention_ref(*batch.attention_args(), scale=0.25)
    return batch, ref


def test_unified_max_fast_path(device, dtype):
    """phi near the true score scale: no program is flagged, result matches."""
    batch, ref = _unified_case(device, dtype)
    out, flags = _run(batch, 0.25, num_splits=3, unified_max=2.0, return_fallback_flags=True)
    assert flags is not None and int(flags.sum()) == 0
    torch.testing.assert_close(out, ref, **tol(dtype))


@pytest.mark.parametrize("phi", [-400.0, 400.0], ids=["overflow", "underflow"])
def test_unified_max_fallback(device, dtype, phi):
    """phi far from the scores: programs are flagged and recomputed with the online softmax."""
    batch, ref = _unified_case(device, dtype)
    out, flags = _run(batch, 0.25, num_splits=3, unified_max=phi, return_fallback_flags=True)
    assert int(flags.sum()) > 0
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **tol(dtype))


def test_unified_max_partial_fallback(device):
    """Only the slice holding an outlier key is flagged; the rest stay on the fast path."""
    # 256 tokens in 4 splits: 64-token slices for any decode tile size (16/32/64)
    batch = PagedBatch([256], [1], 2, 1, 16, 16, torch.float32, device, seed=4)
    q = batch.q  # [1, 2, 16]
    # make the key at position 200 (slice 3 of 4) align strongly with both query heads
    table = batch.meta.block_tables[0]
    blk, off = int(table[200 // 16]), 200 % 16
    batch.k_cache[blk, off, 0] = 300.0 * q[0].mean(0) / q[0].mean(0).norm()
    ref = paged_attention_ref(*batch.attention_args(), scale=0.25)
    out, flags = _run(batch, 0.25, num_splits=4, unified_max=1.0, return_fallback_flags=True)
    assert flags[0, 0].tolist() == [0, 0, 0, 1]
    torch.testing.assert_close(out, ref, **tol(torch.float32))


def test_choose_num_splits_heuristic():
    # batch 1, long context: many splits, capped
    assert choose_num_splits(1, 8, 32768, 132) == 64
    # short context: splits never shorter than 4 tiles of 64 tokens
    assert choose_num_splits(1, 8, 512, 132) == 2
    assert choose_num_splits(1, 8, 100, 132) == 1
    # large batch already fills the machine: no split
    assert choose_num_splits(256, 8, 32768, 132) == 1
    # powers of two only
    for b in (1, 3, 7, 20):
        n = choose_num_splits(b, 4, 8192, 132)
        assert n & (n - 1) == 0
