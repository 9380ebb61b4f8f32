"""TritonAttentionBackend end to end: store + attention over several steps vs the reference."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import ON_GPU, PagedBatch, tol

from flashserve.kernels.reference import paged_attention_ref, store_kv_ref
from flashserve.kernels.triton_backend import TritonAttentionBackend


def _check_step(backend: TritonAttentionBackend, batch: PagedBatch, dtype: torch.dtype) -> None:
    scale = batch.q.shape[-1] ** -0.5
    kc_ref, vc_ref = batch.k_cache.clone(), batch.v_cache.clone()
    store_kv_ref(batch.k_new, batch.v_new, kc_ref, vc_ref, batch.meta.slot_mapping)
    m = batch.meta
    ref = paged_attention_ref(batch.q, kc_ref, vc_ref, m.query_start_loc, m.seq_lens, m.block_tables, scale)
    out = backend.forward(batch.q, batch.k_new, batch.v_new, batch.k_cache, batch.v_cache, m, scale)
    torch.testing.assert_close(batch.k_cache, kc_ref, atol=0, rtol=0)
    torch.testing.assert_close(out, ref, **tol(dtype))


# (seq_lens, q_lens): prefill, chunked prefill + decode mix, decode, speculative verify
STEPS = [
    ([13, 6, 21], [13, 6, 21]),
    ([40, 7, 22], [27, 1, 1]),
    ([41, 8, 23], [1, 1, 1]),
    ([45, 12, 26], [4, 4, 3]),
]


@pytest.mark.parametrize("hq,hkv,d,bs", [(4, 1, 16, 4), (8, 8, 64, 16)])
@pytest.mark.parametrize("step", STEPS, ids=["prefill", "mixed", "decode", "spec"])
def test_backend_step(device, dtype, hq, hkv, d, bs, step):
    seq_lens, q_lens = step
    if ON_GPU:
        seq_lens = [s * 11 for s in seq_lens]
        q_lens = [q * 11 if q > 4 else q for q in q_lens]
    batch = PagedBatch(seq_lens, q_lens, hq, hkv, d, bs, dtype, device, seed=len(q_lens) + sum(q_lens))
    _check_step(TritonAttentionBackend(), batch, dtype)


def test_backend_routing():
    backend = TritonAttentionBackend(decode_max_query_len=8)
    cpu = torch.device("cpu")
    decode = PagedBatch([5, 9], [1, 1], 4, 1, 16, 4, torch.float32, cpu).meta
    spec = PagedBatch([5, 9], [4, 3], 4, 1, 16, 4, torch.float32, cpu).meta
    prefill = PagedBatch([5, 9], [5, 9], 4, 1, 16, 4, torch.float32, cpu).meta
    assert backend.use_decode_kernel(decode, 4, 1)
    assert backend.use_decode_kernel(spec, 4, 1)
    assert not backend.use_decode_kernel(prefill, 4, 1)
    # 8 spec tokens x group 32 = 256 rows: too many for the decode tile -> prefill kernel
    assert not backend.use_decode_kernel(PagedBatch([9], [8], 32, 1, 16, 4, torch.float32, cpu).meta, 32, 1)


def test_backend_does_not_synchronise(device, monkeypatch):
    """forward() must not read device tensors on the host (.item() / .tolist())."""
    batch = PagedBatch([30, 9], [1, 1], 4, 2, 16, 4, torch.float32, device, seed=7)

    def boom(*args, **kwargs):
        raise AssertionError("host synchronisation inside forward()")

    backend = TritonAttentionBackend(unified_max=3.0)
    with monkeypatch.context() as mp:
        mp.setattr(torch.Tensor, "item", boom)
        mp.setattr(torch.Tensor, "tolist", boom)
        out = backend.forward(batch.q, batch.k_new, batch.v_new, batch.k_cache, batch.v_cache,
                              batch.meta, 0.25)
    m = batch.meta
    ref = paged_attention_ref(batch.q, batch.k_cache, batch.v_cache, m.query_start_loc, m.seq_lens,
                              m.block_tables, 0.25)
    torch.testing.assert_close(out, ref, **tol(torch.float32))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_backend_decode_cuda_graph(device):
    """Capture one decode step, then replay it with other (longer and shorter) contexts."""
    hq, hkv, d, bs = 8, 2, 64, 16
    backend = TritonAttentionBackend(max_seq_len_cap=2048)
    # blocks are allocated for the replay lengths; the capture uses shorter ones
    replay_lens, capture_lens = [1300, 1900, 3, 1], [700, 1500, 64, 1]
    batch = PagedBatch([1300, 1900, 64, 1], [1, 1, 1, 1], hq, hkv, d, bs, torch.bfloat16, device, seed=3)
    m = batch.meta
    table = m.block_tables

    def set_lens(lens: list[int]) -> None:
        m.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32, device=device))
        slots = [int(table[b, (s - 1) // bs]) * bs + (s - 1) % bs for b, s in enumerate(lens)]
        m.slot_mapping.copy_(torch.tensor(slots, dtype=torch.int64, device=device))

    set_lens(capture_lens)
    m.max_seq_len = max(capture_lens)
    args = (batch.q, batch.k_new, batch.v_new, batch.k_cache, batch.v_cache, m, 0.125)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        backend.forward(*args)  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(*args)
    for lens in (replay_lens, capture_lens):
        set_lens(lens)
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_attention_ref(batch.q, batch.k_cache, batch.v_cache, m.query_start_loc, m.seq_lens,
                                  m.block_tables, 0.125)
        torch.testing.assert_close(out, ref, **tol(torch.bfloat16))
