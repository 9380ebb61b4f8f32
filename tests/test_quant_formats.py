"""Weight formats on the CPU: the torch GGUF block decoder equals ``gguf.quants.dequantize``; the
int4 CPU packer equals torch's own on AVX-512, AVX2 and scalar builds; torch's int8 / int4 CPU
ops compute exactly the reference arithmetic; GGUF blocks re-expressed for the int4 CPU kernel
(one or two 4-bit planes) give the reference product of the GGUF values."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from flashserve.kernels import cpu_native, quant_reference as ref
from flashserve.kernels.quant_cpu import (
    cpu_int4_matmul,
    cpu_int4_reference,
    cpu_int8_matmul,
    cpu_int8_reference,
    pack_int4_for_cpu,
    scale_zeros_for_cpu,
    unpack_int4_for_cpu,
)
from flashserve.quant.packed import Int4Weight, Int8Weight, gguf_weight


def _gguf_raw(qtype: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Real quantizer output where gguf-py has one, else random valid blocks (K-quants)."""
    import gguf

    qt = getattr(gguf.GGMLQuantizationType, qtype)
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    try:
        return torch.from_numpy(gguf.quants.quantize(w, qt))
    except NotImplementedError:
        return ref.random_gguf_blocks(qtype, n, k, seed)


@pytest.mark.parametrize("qtype", list(ref.GGUF_BLOCKS))
def test_block_decoder_equals_gguf_dequantize(qtype):
    import gguf

    k = 512 if qtype.endswith("_K") else 160
    raw = _gguf_raw(qtype, 7, k)
    expect = gguf.quants.dequantize(raw.numpy(), getattr(gguf.GGMLQuantizationType, qtype)).reshape(7, k)
    assert np.array_equal(ref.gguf_dequantize(raw, qtype).numpy(), expect)
    rows = torch.tensor([5, 0, 5])
    assert np.array_equal(ref.gguf_dequantize_rows(raw, qtype, rows).numpy(), expect[[5, 0, 5]])


@pytest.mark.parametrize("qtype", [q for q in ref.GGUF_BLOCKS if q != "Q6_K"])
def test_affine_decoding_is_exact(qtype):
    raw = _gguf_raw(qtype, 5, 256, seed=1)
    u, a, c = ref.gguf_affine(raw, qtype)
    assert int(u.max()) < 2 ** ref.GGUF_AFFINE_BITS[qtype]
    w = (u.reshape(5, -1, 32).double() * a[..., None].double() + c[..., None].double()).reshape(5, -1)
    torch.testing.assert_close(w.float(), ref.gguf_dequantize(raw, qtype), atol=0, rtol=1e-6)


_LAYOUT_CHECK = """
import torch
from flashserve.kernels.quant_cpu import _block_n, _pack_layout
for n in (16, 32, 48, 64, 80, 112, 176):
    u = torch.randint(0, 16, (n, 96), dtype=torch.int32)
    assert torch.equal(_pack_layout(u.to(torch.uint8), _block_n()),
                       torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)), n
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.parametrize("capability", ["avx512", "avx2", "default"])
def test_int4_cpu_packer_matches_torch_on_every_vector_width(capability):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", _LAYOUT_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_cpu_int4_and_int8_ops_compute_the_reference_exactly():
    g = torch.Generator().manual_seed(0)
    n, k, group = 176, 256, 64  # 176 rows: full and partial packing blocks
    u = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales, zeros = torch.rand(n, k // group, generator=g) * 0.1, torch.randn(n, k // group, generator=g) * 0.1
    x = torch.randn(5, k, generator=g)
    packed = pack_int4_for_cpu(u)
    assert torch.equal(unpack_int4_for_cpu(packed, n, k), u)
    y = cpu_int4_matmul(x, packed, group, scale_zeros_for_cpu(scales, zeros))
    assert torch.equal(y, cpu_int4_reference(x, u, scales, zeros, group))
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g) * 0.01
    # int8: same products, its own summation order (one bf16 ulp apart at most)
    torch.testing.assert_close(cpu_int8_matmul(x, q, s.bfloat16()), cpu_int8_reference(x, q, s), atol=0, rtol=2**-7)


def test_int4_weight_pads_rows_regroups_and_permutes():
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(40, 192, generator=g), torch.randn(3, 192, generator=g)
    u, s, z = ref.quantize_int4(w, 192, zero_point=True)  # per-channel group: 192 -> 6 x 32 on the CPU
    m = Int4Weight(u, s, z, 192)
    assert m.group == 32 and m(x).shape == (3, 40)  # 40 rows padded to 48 inside, sliced back
    torch.testing.assert_close(m.dequantize(), ref.dequantize_int4(ref.pack_int4(u), s, z, 192), atol=0.02, rtol=0.01)
    assert torch.equal(m(x), m.reference(x))
    perm = torch.randperm(192, generator=g)
    u, s, _ = ref.quantize_int4(w[:, perm], 64, zero_point=False)
    m = Int4Weight(u, s, None, 64, perm=perm)
    assert torch.equal(m(x), m.reference(x))
    exact = x @ w.t()
    assert (m(x) - exact).norm() < 0.15 * exact.norm()  # int4 error size: the permutation is undone


def test_int8_weight_forward_is_its_reference():
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(48, 96, generator=g), torch.randn(2, 96, generator=g)
    m = Int8Weight(*ref.quantize_int8(w))
    torch.testing.assert_close(m(x), m.reference(x), atol=0, rtol=2**-7)
    torch.testing.assert_close(m(x), x @ w.t(), atol=0.5, rtol=0.02)


@pytest.mark.parametrize("qtype", list(ref.GGUF_BLOCKS))
def test_gguf_blocks_on_cpu(qtype, monkeypatch):
    """torch's int4 kernel (the native one switched off, as on CPUs without AVX2; tests/test_cpu_native.py
    covers that one). One plane (4-bit types), two planes (5 and 8-bit types, and Q6_K's 16-column
    groups with the high bits fed 8x): the product is the reference product of the exact GGUF
    values up to the kernel's bf16 rounding."""
    monkeypatch.setattr(cpu_native, "available", lambda: False)
    k, n = 256, 160  # 128 rows packed straight from the file's bytes (whole vector blocks), 160 not
    raw = _gguf_raw(qtype, n, k, seed=4)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(4))
    m = gguf_weight(raw, qtype, k, torch.device("cpu"))
    assert m.label.startswith(f"gguf-{qtype}")
    y = m(x)
    assert torch.equal(y, m.reference(x))
    fast = gguf_weight(raw[:128], qtype, k, torch.device("cpu"))
    assert torch.equal(fast(x), y[:, :128])
    exact = x @ ref.gguf_dequantize(raw, qtype).t()
    assert (y - exact).abs().max() <= 0.02 * exact.abs().max()  # bf16 activations, scales, output
    planes = 1 if ref.GGUF_AFFINE_BITS.get(qtype, 8) <= 4 else 2
    assert m.planes == planes
    # the stored planes hold the GGUF values up to bf16 scales and zeros (relative to the row)
    if qtype == "Q6_K":  # per 16 columns: the low bits, then the high bits (fed 8x)
        w = (m.dequantize().reshape(n, -1, 2, 16) * torch.tensor([1.0, 8.0])[:, None]).sum(2).reshape(n, k)
    else:
        w = m.dequantize().reshape(n, planes, k).sum(1)
    exact_w = ref.gguf_dequantize(raw, qtype)
    assert ((w - exact_w).abs() <= 2**-7 * exact_w.abs().amax(1, keepdim=True)).all()
