"""The native GGUF CPU kernel (``flashserve.kernels.cpu_native``) against its torch reference and
the exact product: the split planes hold the file's bytes exactly, int16 activation blocks bit
for bit, products to fp32 summation order (row lengths of whole groups of eight blocks and of a
tail), a row's result independent of the call's other rows and of the thread count, the same bits
from the AVX2, AVX-VNNI and AVX-512 builds where the CPU runs them, bad shapes refused; its
RMSNorm against torch's; LoRA deltas (``lora_add``) against each row's adapter product."""

from __future__ import annotations

import pytest
import torch

from flashserve.kernels import cpu_native as cn
from flashserve.kernels import quant_reference as ref
from flashserve.quant.packed import CpuGGUFWeight, Int4Weight, gguf_weight

pytestmark = pytest.mark.skipif(not cn.available(), reason="no AVX2/FMA/F16C CPU or no C compiler")
QTYPES = ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


def _k(qtype: str, k: int) -> int:
    """A row length of ``qtype``: the K-quants' super-blocks hold 256 columns."""
    return -(-k // 256) * 256 if qtype.endswith("_K") else k


def _x(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, k // 32, 1, generator=g).repeat_interleave(32, 1).view(m, k) * 4
    x[0, :32] = 0.0  # an all-zero block: scale 0
    return x


@pytest.mark.parametrize("k", [32, 96, 576])
def test_activation_blocks_equal_reference_bit_for_bit(k):
    x = _x(5, k, seed=k)
    q, d, s = cn.quantize_rows(x)
    rq, rd, rs = cn.quantize_rows_reference(x)
    assert torch.equal(q, rq) and torch.equal(d, rd) and torch.equal(s, rs)
    assert int(q.abs().max()) == 32767 and float(d[0, 0]) == 0.0
    blocks = (q.float().view(5, -1, 32) * d[..., None]).view(5, k)
    assert ((blocks - x).abs() <= d.repeat_interleave(32, 1) * 0.51).all()  # rounded to nearest, up to x * (1 / d)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("n,k,m", [(37, 96, 1), (48, 576, 3), (16, 64, 17), (20, 512, 2)])
def test_matmul_equals_reference_and_exact_product(qtype, n, k, m):
    k = _k(qtype, k)
    raw = ref.random_gguf_blocks(qtype, n, k, seed=n + k)
    w = cn.split_blocks(raw, qtype)
    if not qtype.endswith("_K"):  # the K-quants' planes hold exact fp32 scales instead of super-blocks
        assert torch.equal(cn.join_blocks(w), raw)  # the planes hold the file's bytes, nothing else
    torch.testing.assert_close(cn.dequantize(w, qtype), ref.gguf_dequantize(raw, qtype), rtol=0, atol=0)
    x = _x(m, k, seed=m)
    y = cn.matmul(x, w, qtype)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    want = cn.matmul_reference(x, w, qtype)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    exact = x.double() @ ref.gguf_dequantize(raw, qtype).double().t()
    assert float((y.double() - exact).abs().max() / exact.abs().max()) < 2e-4  # int16 activations
    bf16 = x.bfloat16().double() @ ref.gguf_dequantize(raw, qtype).double().t()
    assert (y.double() - exact).norm() < (bf16 - exact).norm() / 10  # far closer than bf16 activations


@pytest.mark.parametrize("qtype", QTYPES)
def test_row_results_do_not_depend_on_other_rows_or_threads(qtype):
    """Rows go in tiles of 4 (and one of the rest), one at a time alone: a row's bits are the same
    in every position of every tile size."""
    k = _k(qtype, 320)  # 10 blocks: 8 + a tail (K-quants: 16, groups of 8 only)
    w = cn.split_blocks(ref.random_gguf_blocks(qtype, 80, k, seed=5), qtype)
    x = _x(11, k, seed=9)
    y = cn.matmul(x, w, qtype)  # tiles of 4, 4, 3
    for i in range(11):
        assert torch.equal(cn.matmul(x[i : i + 1], w, qtype), y[i : i + 1])
    for rows in (2, 5, 6):  # a tile of 2; 4 + 1; 4 + 2, starting at other rows
        assert torch.equal(cn.matmul(x[3 : 3 + rows], w, qtype), y[3 : 3 + rows])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(cn.matmul(x, w, qtype), y)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not cn.runnable_isas(), reason="this CPU has neither AVX-VNNI nor AVX-512 VNNI")
@pytest.mark.parametrize("qtype", QTYPES)
def test_every_build_gives_the_same_bits(qtype):
    """The AVX-VNNI and AVX-512 builds sum the same integers as the AVX2 one: equal products."""
    k = _k(qtype, 576)  # two groups of 8 blocks and a tail of 2 (K-quants: groups only)
    w = cn.split_blocks(ref.random_gguf_blocks(qtype, 70, k, seed=3), qtype)
    x = _x(6, k, seed=4)

    def product(isa):
        return cn._product(cn._library(isa), cn.QTYPES[qtype], cn._pointers(w), 70, k, qtype, x)

    plain = product(())
    torch.testing.assert_close(plain, cn.matmul_reference(x, w, qtype), rtol=1e-5, atol=1e-5 * float(plain.abs().max()))
    for isa in cn.runnable_isas():
        assert torch.equal(product(isa), plain), isa
    assert torch.equal(cn.matmul(x, w, qtype), plain)  # the build this CPU uses


def test_bad_shapes_are_refused():
    w = cn.split_blocks(ref.random_gguf_blocks("Q4_1", 16, 64, seed=0), "Q4_1")
    with pytest.raises(ValueError, match="x has 96 columns, the Q4_1 matrix 64"):
        cn.matmul(torch.randn(2, 96), w, "Q4_1")


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_weight_uses_the_native_kernel_unless_switched_off(qtype, monkeypatch):
    k = _k(qtype, 96)
    raw = ref.random_gguf_blocks(qtype, 64, k, seed=2)
    w = gguf_weight(raw, qtype, k, torch.device("cpu"))
    assert type(w) is CpuGGUFWeight
    size = sum(b.numel() * b.element_size() for b in w.buffers())
    # the same bytes; Q4_K: the nibbles and two fp32 numbers a group (0.75 against 0.5625 bytes a
    # weight); Q5_K: and a fifth-bit word a block (0.875 against 0.6875); Q6_K: a byte a weight and
    # two fp32 scales a block (1.25 against 0.82)
    want = {"Q4_K": 64 * k // 2 + 64 * k // 32 * 8, "Q5_K": 64 * k // 2 + 64 * k // 32 * 12,
            "Q6_K": 64 * k + 64 * k // 32 * 8}.get(qtype, raw.numel())
    assert size == want
    x = _x(3, k, seed=4)
    assert torch.equal(w(x), cn.matmul(x, cn.split_blocks(raw, qtype), qtype))
    assert torch.equal(w(x.bfloat16()), w(x.bfloat16().float()).bfloat16())
    torch.testing.assert_close(w.reference(x), w(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.dequantize(), ref.gguf_dequantize(raw, qtype))
    monkeypatch.setattr(cn, "available", lambda: False)
    assert isinstance(gguf_weight(raw, qtype, k, torch.device("cpu")), Int4Weight)  # (Q6_K: its subclass)


@pytest.mark.parametrize("dim", [7, 100, 576])
def test_rms_norm_equals_torch_and_autograd_keeps_torch(dim):
    from flashserve.layers.norm import rms_norm

    g = torch.Generator().manual_seed(dim)
    x, w = torch.randn(2, 3, dim, generator=g) * 3, torch.randn(dim, generator=g)
    want = torch.rms_norm(x, (dim,), w, 1e-6)
    with torch.no_grad():
        got = rms_norm(x, w, 1e-6)
        torch.testing.assert_close(got, cn.rms_norm(x, w, 1e-6), rtol=0, atol=0)
        torch.testing.assert_close(rms_norm(x[:, 1], w, 1e-6), got[:, 1], rtol=0, atol=0)  # a strided view
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    wg = w.clone().requires_grad_()
    y = rms_norm(x, wg, 1e-6)  # autograd on: torch's op, differentiable
    assert y.requires_grad and torch.equal(y.detach(), want)


def test_bound_product_equals_matmul_and_checks_shapes():
    w = cn.split_blocks(ref.random_gguf_blocks("Q4_1", 24, 96, seed=6), "Q4_1")
    x = _x(2, 96, seed=6)
    product = cn.bind(w, "Q4_1")
    assert torch.equal(product(x), cn.matmul(x, w, "Q4_1"))
    with pytest.raises(ValueError, match="x has 64 columns, the Q4_1 matrix 96"):
        product(torch.randn(1, 64))


def test_a_failed_build_falls_back_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHSERVE_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="could not be built or loaded"):
        assert cn._library.__wrapped__() is None
    assert not list(tmp_path.glob("*.so"))


def test_rope_store_equals_rotate_q_k_and_index_copy_bit_for_bit():
    from flashserve.layers.rotary import RotaryEmbedding, rotate_q_k

    T, H, Hkv, D = 3, 6, 2, 64
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=g) * 3
    rope = RotaryEmbedding(D, D, 512, 10000.0).lookup(torch.tensor([5, 300, 511]))
    slots = torch.tensor([9, 2, 30])
    k_cache, v_cache = torch.randn(40, Hkv, D, generator=g), torch.randn(40, Hkv, D, generator=g)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    q_ref, k_ref = rotate_q_k(qkv[:, : H * D].view(T, H, D), qkv[:, H * D : (H + Hkv) * D].view(T, Hkv, D),
                              rope.cos_full, rope.sin_signed)
    want_k.index_copy_(0, slots, k_ref)
    want_v.index_copy_(0, slots, qkv[:, (H + Hkv) * D :].view(T, Hkv, D))
    q = cn.rope_store(qkv, H, rope.cos_full, rope.sin_signed, k_cache, v_cache, slots)
    assert torch.equal(q, q_ref) and torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    with pytest.raises(ValueError, match="contiguous fp32 tensors"):
        cn.rope_store(qkv.bfloat16(), H, rope.cos_full, rope.sin_signed, k_cache, v_cache, slots)


@pytest.mark.parametrize("heads,kv_heads,dim,s_len", [(9, 3, 64, 1), (9, 3, 64, 37), (4, 4, 128, 8), (8, 1, 256, 700)])
def test_attention_equals_exact_softmax_and_is_what_decode_rows_take(heads, kv_heads, dim, s_len):
    """One query over S keys (GQA, whole and partial groups of 8 scores) against fp64 attention;
    the CPU's one-query ``grouped_attention`` (a decode row, without a mask or with a window's mask
    that hides none of the keys gathered for it) returns the native values, as the CPU decode
    layer's rows do, and a head's result does not depend on the thread count."""
    from flashserve.layers.attention import grouped_attention

    g = torch.Generator().manual_seed(s_len)
    q = torch.randn(heads, dim, generator=g) * 2
    k, v = torch.randn(s_len, kv_heads, dim, generator=g) * 2, torch.randn(s_len, kv_heads, dim, generator=g)
    scale = dim ** -0.5
    got = cn.attention(q, k, v, scale)
    kx = k.double().repeat_interleave(heads // kv_heads, dim=1)  # [S, H, D]
    p = torch.softmax(torch.einsum("hd,shd->hs", q.double(), kx) * scale, dim=-1)
    want = torch.einsum("hs,shd->hd", p, v.double().repeat_interleave(heads // kv_heads, dim=1))
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)
    with torch.no_grad():
        assert torch.equal(grouped_attention(q[None], k, v, scale)[0], got)
        # a mask that hides no key (a sliding window's decode row over the keys gathered for it)
        assert torch.equal(grouped_attention(q[None], k, v, scale, torch.ones(1, s_len, dtype=torch.bool))[0], got)
        if s_len > 1:  # one that hides a key: SDPA over the others
            hide = torch.ones(1, s_len, dtype=torch.bool)
            hide[0, 0] = False
            torch.testing.assert_close(grouped_attention(q[None], k, v, scale, hide)[0],
                                       cn.attention(q, k[1:], v[1:], scale), rtol=2e-5, atol=2e-6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # 8 heads x 700 keys: split over threads
        assert torch.equal(cn.attention(q, k, v, scale), got)
    finally:
        torch.set_num_threads(threads)


def test_attention_refuses_what_it_does_not_take():
    q, k = torch.randn(4, 12), torch.randn(5, 2, 12)  # a head size that is not a multiple of 8
    with pytest.raises(ValueError, match=r"D % 8 == 0, D <= 512, Hkv dividing H expected; got \(4, 12\), \(5, 2, 12\)"):
        cn.attention(q, k, k, 0.3)
    with pytest.raises(ValueError, match="Hkv dividing H"):
        cn.attention(torch.randn(3, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8), 0.3)
    assert not cn.attention_applies(q.bfloat16(), k.bfloat16(), k.bfloat16())


@pytest.mark.parametrize("inter", [5, 64, 1536])
def test_silu_mul_is_close_to_torch_and_serves_the_cpu_mlp(inter):
    from flashserve.layers.activation import silu_and_mul

    g = torch.Generator().manual_seed(inter)
    x = torch.randn(3, 2 * inter, generator=g) * 6
    x[0, :4] = torch.tensor([-120.0, -87.5, 90.0, 0.0])  # past the clamped exponent range, and zero
    got = cn.silu_mul(x)
    want = torch.nn.functional.silu(x[:, :inter].double()) * x[:, inter:].double()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-30)
    with torch.no_grad():
        assert torch.equal(silu_and_mul(x), got)
    xg = x.clone().requires_grad_()
    y = silu_and_mul(xg)  # autograd on: torch's ops, differentiable
    assert y.requires_grad
    torch.testing.assert_close(y.detach().double(), want, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("inter", [5, 64, 2048])
def test_gelu_tanh_mul_is_close_to_the_exact_function_and_serves_the_cpu_mlp(inter):
    """GELU's tanh approximation times the up half, against fp64 (``g * sigmoid(2y)``, equal to
    ``0.5 g (1 + tanh y)``); torch's fp32 formula loses digits where ``tanh y`` nears -1, so it is
    compared where the gate is above -3. The Gemma MLP's gate (``blocks.GeluTanhAndMul``) is this
    function on fp32 CPU rows without autograd."""
    import math

    from flashserve.layers.activation import gelu_tanh_and_mul
    from flashserve.models.blocks import GeluTanhAndMul

    g = torch.Generator().manual_seed(inter)
    x = torch.randn(3, 2 * inter, generator=g) * 4
    x[0, : min(inter, 5)] = torch.tensor([-120.0, -10.5, 90.0, 0.0, -4.0])[:inter]  # clamped exponents, zero
    got = cn.gelu_tanh_mul(x)
    gate, up = x[:, :inter].double(), x[:, inter:].double()
    want = gate * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)) * up
    torch.testing.assert_close(got.double(), want, rtol=3e-5, atol=1e-35)
    near = gate > -3
    torch.testing.assert_close(got.double()[near], want[near], rtol=2e-6, atol=0)
    torch_gelu = torch.nn.functional.gelu(x[:, :inter], approximate="tanh") * x[:, inter:]
    torch.testing.assert_close(got[near], torch_gelu[near], rtol=2e-5, atol=0)
    with torch.no_grad():
        assert torch.equal(gelu_tanh_and_mul(x), got)
        assert torch.equal(GeluTanhAndMul()(x), got)
    xg = x.clone().requires_grad_()
    y = gelu_tanh_and_mul(xg)  # autograd on: torch's ops, differentiable
    assert y.requires_grad
    assert torch.equal(y.detach(), torch_gelu)


@pytest.mark.parametrize("m,k,n,width", [(1, 576, 960, 48), (5, 100, 37, 3), (17, 1536, 576, 16)])
def test_lora_add_equals_each_rows_adapter_product(m, k, n, width):
    """``lora_add`` adds, to each row, its own adapter's ``(x A_s^T) B_s^T`` (rows of no adapter
    unchanged); a row's bits depend neither on the call's other rows nor on the thread count."""
    g = torch.Generator().manual_seed(m + k)
    adapters = 3
    lora = cn.LoRAWeights(torch.randn(adapters * width, k, generator=g), torch.randn(adapters * width, n, generator=g),
                          width)
    x, y0 = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g)
    ids = torch.tensor([(-1, 0, 2, 1)[r % 4] for r in range(m)] if m > 1 else [2])
    y = cn.lora_add(y0.clone(), x, lora, ids)
    for r, s in enumerate(ids.tolist()):
        want = y0[r].double()
        if s >= 0:
            rows = slice(s * width, (s + 1) * width)
            want = want + (x[r].double() @ lora.a[rows].double().T) @ lora.b_t[rows].double()
        torch.testing.assert_close(y[r].double(), want, atol=1e-4 * (1 + want.abs().max()), rtol=1e-5)
    assert not torch.equal(y, y0) and all(torch.equal(y[r], y0[r]) for r in range(m) if ids[r] < 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [cn.lora_add(y0[r : r + 1].clone(), x[r : r + 1], lora, ids[r : r + 1]) for r in range(m)]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.cat(alone), y)


def test_lora_add_refuses_what_it_does_not_take():
    lora = cn.LoRAWeights(torch.randn(8, 64), torch.randn(8, 32), 4)  # two adapters
    x, y = torch.randn(2, 64), torch.randn(2, 32)
    with pytest.raises(ValueError, match="names a LoRA adapter that the product does not have"):
        cn.lora_add(y, x, lora, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="fp32 y"):
        cn.lora_add(y, torch.randn(2, 63), lora, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="fp32 y"):
        cn.lora_add(y.double(), x, lora, torch.tensor([0, 1]))
