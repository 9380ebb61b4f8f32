"""Pure-torch references for quantized weights: quantizers, dequantizers, GGUF block decoding.

Every quantized matmul in flashserve (Triton kernels, torch's CPU int8/int4 ops) is tested
against "dequantize with these functions, then matmul". The functions run on any device and
never loop in Python over rows or blocks.

Weight formats (a linear weight is ``[N, K]``: N output rows, K input columns):

* int8 per output channel: ``q`` int8 ``[N, K]``, ``scale`` fp32 ``[N]``; ``w = q * scale``.
* int4 group-wise: values ``u`` in 0..15 packed two per byte, ``[N, K / 2]`` uint8 with column
  ``2j`` in the low nibble of byte ``j`` and ``2j + 1`` in the high nibble; ``scales`` and
  ``zeros`` fp32 ``[N, K / G]``; ``w = (u - 8) * scale + zero`` (the convention of torch's int4
  CPU kernel). Symmetric weights have ``zero = 0``; an integer zero point ``z`` is
  ``zero = (8 - z) * scale``.
* fp8 e4m3 per output channel: ``q`` float8_e4m3fn ``[N, K]``, ``scale`` fp32 ``[N]``.
* GGUF blocks (llama.cpp's layouts, rows of ``K / block_elems`` blocks of ``block_bytes``):
  Q8_0, Q4_0, Q4_1, Q5_0 (32 elements per block) and Q4_K, Q5_K, Q6_K (256 per super-block).
  Every type but Q6_K is an affine map of an unsigned integer per group of 32 columns,
  ``w = a * u + c`` (``gguf_affine``); Q6_K has 16-column groups.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn

# ggml type name -> (elements per block, bytes per block)
GGUF_BLOCKS: dict[str, tuple[int, int]] = {
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
# bits of the unsigned integer ``u`` of each affine type
GGUF_AFFINE_BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q4_K": 4, "Q5_K": 5}


# ------------------------------------------------------------------------------------ int8/int4/fp8
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: ``q`` in [-127, 127], ``scale = amax / 127``."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # [N]
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


INT4_SHRINKS = tuple(1.0 - 0.025 * i for i in range(12))  # clipping ratios tried per group


def quantize_int4(w: torch.Tensor, group_size: int, zero_point: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise int4 of ``w [N, K]``: returns (``u`` uint8 [N, K] in 0..15, scales, zeros [N, K/G])
    in the ``w = (u - 8) * scale + zero`` convention.

    Symmetric: the group's value of largest magnitude maps to -8 (llama.cpp's Q4_0 rule) and
    ``zero = 0``. With a zero point: 16 levels from the group's minimum to its maximum and a
    float offset (llama.cpp's Q4_1 rule; ``zero = min + 8 * scale``). Either way the range is
    then shrunk by the ratio in ``INT4_SHRINKS`` that minimises the group's squared error
    (round-to-nearest with a clipping search; no calibration data).
    """
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {k}")
    g = w.float().reshape(n, k // group_size, group_size)
    if zero_point:
        lo0, hi0 = g.amin(dim=2, keepdim=True), g.amax(dim=2, keepdim=True)
        mid = (lo0 + hi0) / 2
    else:
        extreme = g.gather(2, g.abs().argmax(dim=2, keepdim=True))  # signed value of largest magnitude
    best_err = best = None
    for shrink in INT4_SHRINKS:
        if zero_point:
            lo = mid + (lo0 - mid) * shrink
            scale = ((mid + (hi0 - mid) * shrink - lo) / 15.0).clamp_min(1e-12)
            u = torch.round((g - lo) / scale).clamp_(0, 15)
            zero = lo + 8.0 * scale
        else:
            scale = extreme * (shrink / -8.0)
            scale = torch.where(scale == 0, torch.full_like(scale, 1e-12), scale)
            u = torch.round(g / scale + 8.0).clamp_(0, 15)
            zero = torch.zeros_like(scale)
        err = ((u - 8.0) * scale + zero - g).square().sum(dim=2, keepdim=True)
        if best is None:
            best_err, best = err, (u, scale, zero)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = tuple(torch.where(better, new, old) for new, old in zip((u, scale, zero), best))
    u, scale, zero = best
    return u.reshape(n, k).to(torch.uint8), scale.squeeze(2), zero.squeeze(2)


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """``u`` uint8 [N, K] (0..15) -> [N, K/2]: column 2j in the low nibble of byte j."""
    u = u.to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: [N, K/2] -> uint8 [N, K]."""
    lo, hi = packed & 15, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """``w = (u - 8) * scale + zero`` per group: [N, K/2] packed -> fp32 [N, K]."""
    u = unpack_int4(packed).float()
    s = scales.float().repeat_interleave(group_size, dim=1)
    w = (u - 8.0) * s
    if zeros is not None:
        w = w + zeros.float().repeat_interleave(group_size, dim=1)
    return w


def divide(x: torch.Tensor, c: float) -> torch.Tensor:
    """``x / c`` as an IEEE division on every device, as the Triton kernels divide (``div_rn``):
    torch's CUDA divide by a Python scalar multiplies by its reciprocal, which can differ in the
    last bit."""
    return x / x.new_full((), c)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 e4m3 per row (weights per output channel, activations per token): ``scale = amax / 448``."""
    w = w.float()
    scale = divide(w.abs().amax(dim=-1).clamp_min(1e-12), FP8_MAX)
    q = (w / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().unsqueeze(-1)


# --------------------------------------------------------------------------------------------- GGUF
def gguf_row_bytes(qtype: str, k: int) -> int:
    elems, nbytes = GGUF_BLOCKS[qtype]
    if k % elems:
        raise ValueError(f"{qtype} rows need a multiple of {elems} columns, got {k}")
    return k // elems * nbytes


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 from the last dim (2 bytes) of a uint8 tensor -> fp32, last dim dropped."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _k_scale_min(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in the 12 bytes ``sc [..., 12]`` of Q4_K / Q5_K."""
    d, m, md = sc[..., 0:4], sc[..., 4:8], sc[..., 8:12]
    scale = torch.cat([d & 63, (md & 15) | ((d >> 6) << 4)], dim=-1)
    mins = torch.cat([m & 63, (md >> 4) | ((m >> 6) << 4)], dim=-1)
    return scale.float(), mins.float()


def _blocks(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """[N, row_bytes] -> [N, blocks per row, block_bytes]."""
    _, nbytes = GGUF_BLOCKS[qtype]
    return raw.reshape(raw.shape[0], -1, nbytes)


def gguf_group_scales(raw: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``c`` fp32 [N, K / 32] of the affine types: ``w = a * u + c`` per 32 columns."""
    b = _blocks(raw, qtype)
    n = b.shape[0]
    d = _f16(b[..., 0:2])
    if qtype in ("Q8_0", "Q4_0", "Q5_0"):
        return d, {"Q8_0": -128.0, "Q4_0": -8.0, "Q5_0": -16.0}[qtype] * d
    if qtype == "Q4_1":
        return d, _f16(b[..., 2:4])
    if qtype in ("Q4_K", "Q5_K"):
        sc, mn = _k_scale_min(b[..., 4:16])  # [N, nb, 8]
        return (d[..., None] * sc).reshape(n, -1), (-(_f16(b[..., 2:4])[..., None] * mn)).reshape(n, -1)
    raise ValueError(f"no affine decoding for GGUF type {qtype}")


def gguf_quant_bytes(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """The quant bytes of the 4 and 8-bit affine types, [N, K / 2] (4-bit) or [N, K] (Q8_0, as
    ``u = q + 128``). 4-bit: byte i of each run of ``2 * NIBBLE_HALF[qtype]`` columns holds column i
    in its low nibble and column ``i + NIBBLE_HALF[qtype]`` in its high nibble."""
    b = _blocks(raw, qtype)
    n = b.shape[0]
    start, size = {"Q8_0": (2, 32), "Q4_0": (2, 16), "Q4_1": (4, 16), "Q4_K": (16, 128)}[qtype]
    qs = b[..., start : start + size].reshape(n, -1)
    return qs ^ 128 if qtype == "Q8_0" else qs  # int8 q + 128 == its byte with the top bit flipped


NIBBLE_HALF = {"Q4_0": 16, "Q4_1": 16, "Q4_K": 32}


def gguf_affine(raw: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode every type but Q6_K as ``w = a * u + c`` per group of 32 columns.

    raw: uint8 [N, row_bytes]. Returns ``u`` uint8 [N, K] (unsigned, ``GGUF_AFFINE_BITS`` bits),
    ``a`` and ``c`` fp32 [N, K / 32].
    """
    b = _blocks(raw, qtype)
    n, nb, _ = b.shape
    a, c = gguf_group_scales(raw, qtype)
    if qtype == "Q8_0":
        return gguf_quant_bytes(raw, qtype), a, c
    if qtype in NIBBLE_HALF:
        half = NIBBLE_HALF[qtype]
        qs = gguf_quant_bytes(raw, qtype).reshape(n, -1, 1, half)
        return torch.cat([qs & 15, qs >> 4], dim=2).reshape(n, -1), a, c
    if qtype == "Q5_0":
        qs = b[..., 6:22]
        qh = b[..., 2:6].to(torch.int32)
        bits = torch.arange(32, device=raw.device)
        high = (qh[..., bits // 8] >> (bits % 8)) & 1  # [N, nb, 32]
        u = torch.cat([qs & 15, qs >> 4], dim=-1) | (high.to(torch.uint8) << 4)
        return u.reshape(n, -1), a, c
    if qtype == "Q5_K":
        qs = b[..., 48:176].reshape(n, nb, 4, 32)
        u = torch.stack([qs & 15, qs >> 4], dim=3).reshape(n, nb, 8, 32)  # sub-block 2c + hi
        qh = b[..., 16:48]  # [N, nb, 32]: bit s of byte l is the 5th bit of sub-block s, column l
        shifts = torch.arange(8, device=raw.device, dtype=torch.uint8)
        u = u | (((qh[:, :, None, :] >> shifts[:, None]) & 1) << 4)
        return u.reshape(n, -1), a, c
    raise ValueError(f"no affine decoding for GGUF type {qtype}")


def gguf_q6_k(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode Q6_K as ``w = a * (q - 32)`` per group of 16 columns: ``q`` uint8 [N, K] in 0..63,
    ``a`` fp32 [N, K / 16] (the super-block's fp16 scale times the group's int8 scale)."""
    b = _blocks(raw, "Q6_K")
    n, nb, _ = b.shape
    ql = b[..., 0:128].reshape(n, nb, 2, 2, 32)  # [half, which 32 of the 64, column]
    qh = b[..., 128:192].reshape(n, nb, 2, 1, 32)
    scales = b[..., 192:208].view(torch.int8).float()  # [N, nb, 16]
    d = _f16(b[..., 208:210])
    low = torch.stack([ql & 15, ql >> 4], dim=3).reshape(n, nb, 2, 4, 32)  # quarter r = 2 * shift + which
    high = (qh >> torch.tensor([0, 2, 4, 6], device=raw.device, dtype=torch.uint8)[:, None]) & 3
    return (low | (high << 4)).reshape(n, -1), (d[..., None] * scales).reshape(n, -1)


def gguf_dequantize(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """uint8 [N, row_bytes] in ``qtype`` -> fp32 [N, K]."""
    if qtype == "Q6_K":
        q, a = gguf_q6_k(raw)
        n = q.shape[0]
        return ((q.float() - 32.0).reshape(n, -1, 16) * a[..., None]).reshape(n, -1)
    u, a, c = gguf_affine(raw, qtype)
    n = u.shape[0]
    w = u.reshape(n, -1, 32).float() * a[..., None] + c[..., None]
    return w.reshape(n, -1)


def gguf_dequantize_rows(raw: torch.Tensor, qtype: str, rows: torch.Tensor) -> torch.Tensor:
    """Embedding lookup in a packed table: fp32 [len(rows), K] of the selected rows only."""
    return gguf_dequantize(raw.index_select(0, rows), qtype)


def random_gguf_blocks(qtype: str, n: int, k: int, seed: int = 0, scale: float = 0.05) -> torch.Tensor:
    """Valid random ``qtype`` blocks, uint8 ``[n, row_bytes]`` (tests and benchmarks): random
    quants, sub-block scales and mins, fp16 super-scales uniform in ``[-scale, scale]`` (divided
    by the largest sub-scale product for K-quants, so weights stay about ``scale * 8``)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, gguf_row_bytes(qtype, k)), generator=g, dtype=torch.uint8)
    blocks = raw.view(n, -1, GGUF_BLOCKS[qtype][1])
    fp16_fields = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2],
                   "Q6_K": [208]}[qtype]
    bound = scale / 63 if qtype.endswith("_K") else scale
    for off in fp16_fields:
        value = (torch.rand(blocks.shape[:2], generator=g) * 2 - 1) * bound
        blocks[..., off : off + 2] = value.half().view(torch.uint8).reshape(*blocks.shape[:2], 2)
    return raw
