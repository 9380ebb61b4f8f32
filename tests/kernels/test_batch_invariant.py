"""The batch-invariant mode's kernels (flashserve.layers.batch_invariant): a row's bits do not depend
on the other rows of the call, and the results still match the references."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import ON_GPU, PagedBatch, tol

from flashserve.kernels import quant_reference as ref
from flashserve.kernels.quant_gemm import FMT_DENSE, invariant_config, sum_splits, wq_matmul
from flashserve.kernels.reference import paged_attention_ref
from flashserve.kernels.triton_backend import INVARIANT_MAX_QUERY, TritonAttentionBackend
from flashserve.layers.attention_metadata import AttentionMetadata
from flashserve.quant.packed import dense_invariant


@pytest.fixture(autouse=True)
def row_exact_interpreter_dot(monkeypatch):
    """In Triton's interpreter ``tl.dot`` is numpy's BLAS matmul, which on some CPUs (OpenBLAS's
    AMD Zen kernels) rounds a row by its place in the block, where a GPU's does not. Here the
    interpreter's dot sums each element alone, in float64, so that the invariance these tests
    check is the kernels' own and not the BLAS library's."""
    if ON_GPU:
        return
    import numpy as np
    from triton.runtime import interpreter

    plain = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *args):
        if any(t.dtype.is_floating() and t.data.dtype.itemsize == 1 for t in (a, b)):  # fp8: its own conversion
            return plain(self, a, b, d, *args)
        prod = np.einsum("...ij,...jk->...ik", a.data.astype(np.float64), b.data.astype(np.float64), optimize=False)
        return interpreter.TensorHandle(prod.astype(d.data.dtype) + d.data, d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def _rand(*shape: int, seed: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def test_sum_splits_adds_in_split_order(device):
    parts = _rand(5, 3, 37, seed=1, device=device) * 1e3
    want = parts[0].clone()
    for s in range(1, 5):
        want += parts[s]
    assert torch.equal(sum_splits(parts, torch.float32), want)
    assert torch.equal(sum_splits(parts, torch.float16), want.half())


def test_invariant_config_does_not_depend_on_rows(device):
    cfg = invariant_config(4096, 4096, FMT_DENSE, 0, device)
    assert invariant_config(4096, 4096, FMT_DENSE, 0, device, 4).num_stages == 2
    assert cfg.block_m == 64 and cfg.split_k >= 1
    assert invariant_config(4096, 4096, FMT_DENSE, 0, device) == cfg


def _rows_agree(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn`` on all of x equals ``fn`` on its first row, on its first 3 rows and on rows 1..M."""
    full = fn(x)
    assert torch.equal(fn(x[:1]), full[:1])
    assert torch.equal(fn(x[:3]), full[:3])
    assert torch.equal(fn(x[1:]), full[1:])
    return full


@pytest.mark.parametrize("m", [1, 70])
def test_dense_invariant_product(device, dtype, m):
    n, k = (96, 160) if not ON_GPU else (4096, 4096)
    x = _rand(m, k, seed=2, device=device) * k**-0.5  # O(1) outputs, as the tolerances assume
    x = x.to(dtype)
    w = _rand(n, k, seed=3, device=device, dtype=dtype)
    y = dense_invariant(x, w) if m == 1 else _rows_agree(lambda t: dense_invariant(t, w), x)
    torch.testing.assert_close(y, (x.float() @ w.float().t()).to(dtype), **tol(dtype))


def test_packed_invariant_products(device):
    """int8, int4 (g32, zero points) and GGUF (Q4_1, Q6_K) products with the invariant
    configuration: rows independent of M, equal to the dequantize-then-matmul reference."""
    from flashserve.kernels.quant_gemm import FMT_INT4, FMT_INT8
    from flashserve.kernels.quant_gguf import gguf_invariant_config, gguf_matmul

    n, k = (80, 256) if not ON_GPU else (2048, 4096)
    dtype = torch.float32 if not ON_GPU else torch.bfloat16
    w = _rand(n, k, seed=6, device=torch.device("cpu"))
    x = (_rand(70, k, seed=7, device=device) * k**-0.5).to(dtype)  # O(1) outputs

    def check(fn, dense: torch.Tensor) -> None:
        y = _rows_agree(fn, x)
        torch.testing.assert_close(y, (x.float() @ dense.to(device).t()).to(dtype), **tol(dtype))

    q8, s8 = ref.quantize_int8(w)
    cfg8 = invariant_config(n, k, FMT_INT8, 0, device)
    check(lambda t: wq_matmul(t, q8.to(device), s8.to(device), None, FMT_INT8, config=cfg8),
          ref.dequantize_int8(q8, s8))
    u4, s4, z4 = ref.quantize_int4(w, 32, zero_point=True)
    packed = ref.pack_int4(u4)
    cfg4 = invariant_config(n, k, FMT_INT4, 32, device)
    check(lambda t: wq_matmul(t, packed.to(device), s4.to(device), z4.to(device), FMT_INT4, 32, config=cfg4),
          ref.dequantize_int4(packed, s4, z4, 32))
    for qtype in ("Q4_1", "Q6_K"):
        raw = ref.random_gguf_blocks(qtype, n, k, seed=8)
        cfg = gguf_invariant_config(n, k, device)
        check(lambda t, raw=raw.to(device), qtype=qtype: gguf_matmul(t, raw, qtype, cfg), ref.gguf_dequantize(raw, qtype))


def _one_token_meta(batch: PagedBatch, seq: int, pos: int, device: torch.device) -> AttentionMetadata:
    """A one-token decode step of sequence ``seq`` at position ``pos`` whose K/V is stored already."""
    m = batch.meta
    return AttentionMetadata(
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([pos + 1], dtype=torch.int32, device=device),
        block_tables=m.block_tables[seq : seq + 1].clone(),
        slot_mapping=torch.tensor([-1], dtype=torch.int64, device=device),
        max_query_len=1, max_seq_len=pos + 1, query_lens_cpu=[1], seq_lens_cpu=[pos + 1],
        block_size=m.block_size, is_decode=True,
    )


# (seq_lens, q_lens): a verification (4 tokens) beside a decode, whose context the split rule of
# the default mode cuts at other places than for its tokens' own decode steps; the same beside a
# prompt chunk too long for token rows
STEPS = [([321, 200], [4, 1]), ([37, 20, 45], [4, 1, INVARIANT_MAX_QUERY + 3])]


@pytest.mark.parametrize("window", [None, 9], ids=["full", "sliding"])
@pytest.mark.parametrize("step", STEPS, ids=["verify", "mixed"])
def test_invariant_attention_rows_equal_one_token_steps(device, dtype, window, step):
    """Every token of a short sequence gets the bits of its own one-token decode step; all rows
    match the reference (the default mode fails the first check for the "verify" step on the CPU
    interpreter too)."""
    from flashserve.config import AttentionSpec

    hq, hkv, d, bs = 4, 2, 16, 4
    seq_lens, q_lens = step
    if ON_GPU:
        hq, hkv, d, bs = 8, 2, 128, 16
        seq_lens = [s * 23 for s in seq_lens]
    batch = PagedBatch(seq_lens, q_lens, hq, hkv, d, bs, dtype, device, seed=11)
    backend = TritonAttentionBackend(max_seq_len_cap=512 if not ON_GPU else 4096, batch_invariant=True)
    spec = AttentionSpec() if window is None else AttentionSpec(kind="sliding", sliding_window=window)
    scale = d**-0.5
    out = backend.forward(batch.q, batch.k_new, batch.v_new, batch.k_cache, batch.v_cache, batch.meta, scale, spec)
    m = batch.meta
    win = {} if window is None else {"window": window}
    want = paged_attention_ref(batch.q, batch.k_cache, batch.v_cache, m.query_start_loc, m.seq_lens, m.block_tables,
                               scale, **win)
    torch.testing.assert_close(out, want, **tol(dtype))
    token = 0
    for seq, (s, q) in enumerate(zip(seq_lens, q_lens)):
        for pos in range(s - q, s):
            if q <= INVARIANT_MAX_QUERY:
                one = _one_token_meta(batch, seq, pos, device)
                row = backend.forward(batch.q[token : token + 1], batch.k_new[:1], batch.v_new[:1], batch.k_cache,
                                      batch.v_cache, one, scale, spec)
                assert torch.equal(row[0], out[token]), (seq, pos)
            token += 1


def test_invariant_backend_needs_a_cap():
    with pytest.raises(ValueError, match="max_seq_len_cap"):
        TritonAttentionBackend(batch_invariant=True)


def test_wrapped_linear_layer(device):
    """A dense (biased) Linear switched by use_batch_invariant: rows independent of M, close to F.linear."""
    from flashserve.layers.batch_invariant import use_batch_invariant
    from flashserve.layers.linear import Linear

    torch.manual_seed(12)
    layer = Linear(96, 72, bias=True, prefix="p").to(device)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    x = _rand(70, 96, seed=13, device=device)
    want = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert use_batch_invariant(torch.nn.Sequential(layer)) == 1
    y = _rows_agree(layer, x)
    torch.testing.assert_close(y, want, **tol(torch.float32))


def test_token_rows_address_only_real_blocks(device):
    """Rows of long prompt chunks and of padding get a 1-token context (never 0: the decode kernel
    reads a row's last block at seq_len - 1); short sequences' rows their own positions."""
    from flashserve.kernels.triton_backend import token_rows

    batch = PagedBatch([30, 9, 40], [3, 1, INVARIANT_MAX_QUERY + 2], 4, 2, 16, 4, torch.float32, device, seed=2)
    m = batch.meta
    m.slot_mapping = torch.cat([m.slot_mapping, torch.full((5,), -1, device=device)])  # 5 padding tokens
    qsl, lens, tables, short = token_rows(m)
    assert qsl.tolist() == list(range(len(m.slot_mapping) + 1))
    assert lens.tolist() == [28, 29, 30, 9] + [1] * (INVARIANT_MAX_QUERY + 2) + [1] * 5
    assert short.tolist() == [True] * 4 + [False] * (INVARIANT_MAX_QUERY + 7)
    assert torch.equal(tables[:3], m.block_tables[[0, 0, 0]]) and torch.equal(tables[3], m.block_tables[1])
