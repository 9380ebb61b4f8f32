"""Paged prefill attention (Triton) vs paged_attention_ref (torch)."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import ON_GPU, PagedBatch, tol

from flashserve.kernels.prefill_attention import paged_prefill_attention
from flashserve.kernels.reference import paged_attention_ref

# (num_heads, num_kv_heads, head_dim, block_size, seq_lens, q_lens)
CASES = [
    # plain prefill (no cached context), MHA, odd lengths
    (2, 2, 16, 4, [1, 7, 19], [1, 7, 19]),
    # chunked prefill: chunks over cached context, GQA 4
    (8, 2, 16, 4, [21, 40, 6], [5, 17, 6]),
    # MQA (group 8), bigger block
    (8, 1, 16, 16, [37, 3], [20, 2]),
    # head_dim 64, GQA 4, block 16; includes a decode-like 1-token row
    (4, 1, 64, 16, [50, 18, 1], [11, 1, 1]),
    # non-power-of-two group (3) and head_dim (24: padded to 32 in the kernel)
    (6, 2, 24, 4, [15, 9], [6, 9]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}bs{c[3]}")
def test_prefill_matches_reference(device, dtype, case):
    hq, hkv, d, bs, seq_lens, q_lens = case
    if ON_GPU:  # bigger contexts on a GPU, same structure
        seq_lens = [s * 9 for s in seq_lens]
        q_lens = [q * 9 if q > 1 else q for q in q_lens]
    batch = PagedBatch(seq_lens, q_lens, hq, hkv, d, bs, dtype, device, seed=sum(seq_lens))
    batch.store_new_with_reference()
    scale = d ** -0.5
    out = paged_prefill_attention(*batch.attention_args(), max_query_len=batch.meta.max_query_len,
                                  scale=scale)
    ref = paged_attention_ref(*batch.attention_args(), scale=scale)
    torch.testing.assert_close(out, ref, **tol(dtype))


def test_prefill_writes_into_out_and_handles_empty_sequence(device):
    # a sequence with no new tokens this step (q_len 0) must be skipped cleanly
    batch = PagedBatch([9, 12, 5], [3, 0, 5], 4, 2, 16, 4, torch.float32, device, seed=5)
    batch.store_new_with_reference()
    out = torch.full_like(batch.q, float("nan"))
    paged_prefill_attention(*batch.attention_args(), max_query_len=5, scale=0.25, out=out)
    ref = paged_attention_ref(*batch.attention_args(), scale=0.25)
    torch.testing.assert_close(out, ref, **tol(torch.float32))


@pytest.mark.parametrize("paged", [False, True], ids=["per-token", "per-page"])
def test_kv_addressing_modes_agree(device, monkeypatch, paged):
    """Both K/V addressing modes (per key position, per cache page) match the reference, in
    the prefill and the decode kernel (several splits and one split = direct output)."""
    import flashserve.kernels.decode_attention as da
    import flashserve.kernels.prefill_attention as pa

    pcfg, dcfg = pa.prefill_config(16, torch.float32), da.decode_config(16, torch.float32)
    monkeypatch.setattr(pa, "prefill_config", lambda *a: pcfg._replace(paged=paged))
    monkeypatch.setattr(da, "decode_config", lambda *a: dcfg._replace(paged=paged))
    batch = PagedBatch([45, 20], [13, 20], 4, 2, 16, 4, torch.float32, device, seed=9)
    batch.store_new_with_reference()
    out = pa.paged_prefill_attention(*batch.attention_args(), max_query_len=20, scale=0.25)
    torch.testing.assert_close(out, paged_attention_ref(*batch.attention_args(), scale=0.25), **tol(torch.float32))
    batch = PagedBatch([61, 9], [1, 1], 4, 2, 16, 4, torch.float32, device, seed=10)
    batch.store_new_with_reference()
    ref = paged_attention_ref(*batch.attention_args(), scale=0.25)
    for splits in (1, 3):
        out = da.paged_decode_attention(*batch.attention_args(), max_query_len=1, max_seq_len=61, scale=0.25,
                                        num_splits=splits)
        torch.testing.assert_close(out, ref, **tol(torch.float32))
