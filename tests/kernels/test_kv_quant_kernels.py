"""8-bit KV cache (int8 / fp8 e4m3, one fp16 scale per token and head) in the Triton kernels:
quantize-on-store bit-identical to the torch reference, and decode / prefill attention over a
quantized cache against the dense reference computed on the same dequantized values."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import ON_GPU, PagedBatch, tol

from flashserve.kernels import kv_quant
from flashserve.kernels.cache_ops import store_kv
from flashserve.kernels.decode_attention import DecodeConfig, paged_decode_attention
from flashserve.kernels.prefill_attention import paged_prefill_attention
from flashserve.kernels.reference import paged_attention_ref, store_kv_ref

KV_DTYPES = [torch.int8, torch.float8_e4m3fn]
KV_IDS = ["int8", "fp8"]
# Relative error of attention over a quantized cache against the unquantized one: int8 keeps
# ~1/254 of each row's range, e4m3 ~2^-4 of each value.
QUANT_ERR = {torch.int8: 0.02, torch.float8_e4m3fn: 0.08}


def _quantized(batch: PagedBatch, kv_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's cached context quantized into the 8-bit layout, new tokens stored with the reference."""
    kc, vc = kv_quant.quantize_caches(batch.k_cache, batch.v_cache, kv_dtype)
    store_kv_ref(batch.k_new, batch.v_new, kc, vc, batch.meta.slot_mapping)
    return kc, vc


def _args(batch: PagedBatch, kc: torch.Tensor, vc: torch.Tensor) -> tuple:
    m = batch.meta
    return (batch.q, kc, vc, m.query_start_loc, m.seq_lens, m.block_tables)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _same_cache(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values (+0 and -0 alike) and bit-identical scales."""
    return torch.equal(a.float(), b.float()) and torch.equal(kv_quant.kv_scales(a), kv_quant.kv_scales(b))


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=KV_IDS)
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(1, 16, 4), (2, 64, 16), (3, 24, 3)])
def test_store_kv_quantizes_like_the_reference(device, dtype, kv_dtype, num_kv_heads, head_dim, block_size):
    batch = PagedBatch([7, 13, 4], [7, 2, 1], num_kv_heads * 2, num_kv_heads, head_dim, block_size,
                       dtype, device, seed=1)
    # rows of very different magnitudes (some below the scale floor), one all-zero row
    t = batch.k_new.shape[0]
    mag = torch.logspace(-5, 3, t, dtype=torch.float64)[torch.randperm(t, generator=torch.Generator().manual_seed(2))]
    k_new = (batch.k_new.double() * mag[:, None, None].to(device)).to(dtype)
    k_new[1, 0] = 0
    slots = batch.meta.slot_mapping.clone()
    slots[3] = -1  # a skipped token
    kc, vc = kv_quant.quantize_caches(batch.k_cache, batch.v_cache, kv_dtype)
    kc_ref, vc_ref = kv_quant.quantize_caches(batch.k_cache, batch.v_cache, kv_dtype)
    skipped = int(batch.meta.slot_mapping[3])
    blk, off = skipped // block_size, skipped % block_size
    old_row, old_scale = kc[blk, off].float().clone(), kv_quant.kv_scales(kc)[blk, :, off].clone()
    store_kv_ref(k_new, batch.v_new, kc_ref, vc_ref, slots)
    store_kv(k_new, batch.v_new, kc, vc, slots)
    assert _same_cache(kc, kc_ref) and _same_cache(vc, vc_ref)
    assert torch.equal(kc[blk, off].float(), old_row) and torch.equal(kv_quant.kv_scales(kc)[blk, :, off], old_scale)
    # Each stored row: a tight scale, and values within the format's rounding error.
    keep = slots >= 0
    x = k_new[keep].float()  # [n, Hkv, D]
    got = kv_quant.gather(kc, slots[keep], torch.float32)
    scale = kv_quant.kv_scales(kc)[slots[keep] // block_size, :, slots[keep] % block_size].float()[..., None]
    tight = (x.abs().amax(-1, keepdim=True) / kv_quant.QMAX[kv_dtype]).clamp_min(kv_quant.MIN_SCALE)
    assert bool((scale <= tight * (1 + 2**-11)).all()) and bool((scale >= tight * (1 - 2**-11)).all())
    err = (got - x).abs()
    if kv_dtype == torch.int8:
        assert bool((err <= scale / 2 * (1 + 1e-6)).all())
    else:  # 3 mantissa bits: half an ulp is 2^-4 of the value; subnormal spacing 2^-9 scales
        assert bool((err <= x.abs() / 16 + scale * 2**-10 * (1 + 1e-6)).all())
    assert bool((got[1, 0] == 0).all())


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=KV_IDS)
def test_store_kv_quantized_strided_input(device, kv_dtype):
    # k, v as views into a fused qkv projection output: [T, (Hq + 2 Hkv) * D]
    batch = PagedBatch([9, 5], [9, 5], 4, 2, 16, 4, torch.float32, device, seed=2)
    t = batch.q.shape[0]
    qkv = torch.randn(t, (4 + 2 + 2) * 16, device=device)
    k, v = qkv[:, 64:96].view(t, 2, 16), qkv[:, 96:].view(t, 2, 16)
    kc, vc = kv_quant.quantize_caches(batch.k_cache, batch.v_cache, kv_dtype)
    kc_ref, vc_ref = kv_quant.quantize_caches(batch.k_cache, batch.v_cache, kv_dtype)
    store_kv_ref(k, v, kc_ref, vc_ref, batch.meta.slot_mapping)
    store_kv(k, v, kc, vc, batch.meta.slot_mapping)
    assert _same_cache(kc, kc_ref) and _same_cache(vc, vc_ref)


# (num_heads, num_kv_heads, head_dim, block_size, seq_lens, q_lens, num_splits)
DECODE_CASES = [
    (8, 2, 16, 4, [70, 5, 41], [1, 1, 1], 3),  # GQA 4, 3 splits (some empty for short seqs)
    (8, 1, 64, 16, [90, 17], [1, 1], 4),  # MQA, head_dim 64
    (4, 4, 24, 3, [40, 1, 29], [1, 1, 1], 2),  # MHA, odd head_dim and block size, a 1-token context
    (4, 1, 16, 16, [66, 30, 8], [4, 2, 3], 2),  # speculative verify: several tokens per sequence
]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=KV_IDS)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}bs{c[3]}s{c[6]}")
def test_decode_over_quantized_cache(device, dtype, kv_dtype, case):
    hq, hkv, d, bs, seq_lens, q_lens, splits = case
    if ON_GPU:
        seq_lens = [s * 37 for s in seq_lens]
        splits *= 4
    batch = PagedBatch(seq_lens, q_lens, hq, hkv, d, bs, dtype, device, seed=sum(seq_lens))
    kc, vc = _quantized(batch, kv_dtype)
    m = batch.meta
    out = paged_decode_attention(*_args(batch, kc, vc), max_query_len=m.max_query_len, max_seq_len=m.max_seq_len,
                                 scale=d ** -0.5, num_splits=splits)
    ref = paged_attention_ref(*_args(batch, kc, vc), scale=d ** -0.5)  # same dequantized values
    torch.testing.assert_close(out, ref, **tol(dtype))
    batch.store_new_with_reference()
    exact = paged_attention_ref(*batch.attention_args(), scale=d ** -0.5)
    assert 0 < _rel(out, exact) < QUANT_ERR[kv_dtype] + 2 * tol(dtype)["rtol"]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=KV_IDS)
def test_decode_page_wise_loads_over_quantized_cache(device, kv_dtype):
    """The PAGED addressing (a tile = whole blocks, 16-byte alignment hint) on the 8-bit layout."""
    batch = PagedBatch([61, 33], [1, 2], 4, 2, 16, 8, torch.float32, device, seed=5)
    kc, vc = _quantized(batch, kv_dtype)
    m = batch.meta
    cfg = DecodeConfig(16, 4, 1, paged=True)
    out = paged_decode_attention(*_args(batch, kc, vc), max_query_len=2, max_seq_len=m.max_seq_len, scale=0.25,
                                 num_splits=2, config=cfg)
    torch.testing.assert_close(out, paged_attention_ref(*_args(batch, kc, vc), scale=0.25), **tol(torch.float32))


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=KV_IDS)
@pytest.mark.parametrize("phi", [2.0, 400.0], ids=["fast", "fallback"])
def test_unified_max_over_quantized_cache(device, dtype, kv_dtype, phi):
    batch = PagedBatch([57, 29, 4], [1, 1, 1], 8, 2, 16, 4, dtype, device, seed=11)
    kc, vc = _quantized(batch, kv_dtype)
    out, flags = paged_decode_attention(*_args(batch, kc, vc), max_query_len=1, max_seq_len=57, scale=0.25,
                                        num_splits=3, unified_max=phi, return_fallback_flags=True)
    assert (int(flags.sum()) > 0) == (phi > 100)
    torch.testing.assert_close(out, paged_attention_ref(*_args(batch, kc, vc), scale=0.25), **tol(dtype))


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=KV_IDS)
@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16bit_queries_use_fp16_operands(device, kv_dtype, q_dtype):
    """16-bit queries take the fp16-operand path (a bf16 query is cast to fp16): decode and
    prefill. (On CPU the interpreter runs it; its bf16 emulation cannot run the unified-max
    path's bf16 P @ V, which the GPU run of the tests above covers.)"""
    batch = PagedBatch([29, 9], [1, 3], 4, 2, 16, 4, q_dtype, device, seed=9)
    kc, vc = _quantized(batch, kv_dtype)
    m = batch.meta
    ref = paged_attention_ref(*_args(batch, kc, vc), scale=0.25)
    dec = paged_decode_attention(*_args(batch, kc, vc), max_query_len=m.max_query_len, max_seq_len=m.max_seq_len,
                                 scale=0.25, num_splits=2)
    pre = paged_prefill_attention(*_args(batch, kc, vc), max_query_len=m.max_query_len, scale=0.25)
    torch.testing.assert_close(dec, ref, **tol(q_dtype))
    torch.testing.assert_close(pre, ref, **tol(q_dtype))


# (num_heads, num_kv_heads, head_dim, block_size, seq_lens, q_lens)
PREFILL_CASES = [
    (8, 2, 16, 4, [33, 20], [33, 7]),  # a prompt, and a chunk after 13 cached tokens
    (4, 1, 32, 16, [50, 17, 1], [18, 17, 1]),  # MQA, chunk after 32 cached tokens
    (6, 3, 24, 5, [23, 12], [23, 4]),  # odd head_dim and block size
]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=KV_IDS)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}bs{c[3]}")
def test_prefill_over_quantized_cache(device, dtype, kv_dtype, case):
    hq, hkv, d, bs, seq_lens, q_lens = case
    batch = PagedBatch(seq_lens, q_lens, hq, hkv, d, bs, dtype, device, seed=sum(seq_lens) + bs)
    kc, vc = _quantized(batch, kv_dtype)
    out = paged_prefill_attention(*_args(batch, kc, vc), max_query_len=batch.meta.max_query_len, scale=d ** -0.5)
    ref = paged_attention_ref(*_args(batch, kc, vc), scale=d ** -0.5)
    torch.testing.assert_close(out, ref, **tol(dtype))
    batch.store_new_with_reference()
    exact = paged_attention_ref(*batch.attention_args(), scale=d ** -0.5)
    assert 0 < _rel(out, exact) < QUANT_ERR[kv_dtype] + 2 * tol(dtype)["rtol"]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=KV_IDS)
@pytest.mark.parametrize("q_lens", [[1, 1, 1], [12, 1, 3]], ids=["decode", "mixed"])
def test_triton_backend_equals_torch_backend_on_quantized_cache(device, kv_dtype, q_lens):
    """Both backends store (quantize) the same bytes and attend over them alike."""
    from flashserve.kernels.triton_backend import TritonAttentionBackend
    from flashserve.layers.attention import TorchAttentionBackend

    batch = PagedBatch([40, 17, 9], q_lens, 8, 2, 16, 4, torch.float32, device, seed=7)
    caches = [kv_quant.quantize_caches(batch.k_cache, batch.v_cache, kv_dtype) for _ in range(2)]
    outs = []
    for backend, (kc, vc) in zip((TritonAttentionBackend(), TorchAttentionBackend()), caches):
        outs.append(backend.forward(batch.q, batch.k_new, batch.v_new, kc, vc, batch.meta, 0.25))
    (kt, vt), (kr, vr) = caches
    assert _same_cache(kt, kr) and _same_cache(vt, vr)
    torch.testing.assert_close(outs[0], outs[1], **tol(torch.float32))
