"""The 8-bit KV cache: int8 or fp8 e4m3 values with one fp16 scale per (token, head) row.

Layout. Everything outside the attention code (block tables, prefix caching, swap, block
copies, CUDA graphs) sees a layer's cache as ``[num_blocks, block_size, Hkv, D]`` indexed by
block, and so does an 8-bit cache: each K (or V) block of a layer is one run of
``block_bytes`` bytes,

    [block_size, Hkv, D] 8-bit values | [Hkv, block_size] fp16 scales | padding to 32 bytes

and the layer's cache tensor is a strided view of the values only (dtype int8 or
float8_e4m3fn, block stride ``block_bytes``). The dtype tells the kernels that the cache is
quantized; ``kv_scales(cache)`` is the fp16 view ``[num_blocks, Hkv, block_size]`` of every
block's scale region (one head's scales are contiguous, so a kernel reads them in one sector).
Swap moves whole blocks (values, scales and padding) through ``whole_blocks(pool)``.

Bytes per (token, head): D + 2 instead of 2 D for bf16/fp16 (1.94x the tokens at D = 64,
1.97x at D = 128, before the 32-byte block padding).

Quantization (on store), per row x[D]:
``scale = fp16(clamp(max|x| / QMAX, 2^-14, 65504))``, ``y = x / scale``;
int8: ``round_half_even(y)`` clamped to +-127; fp8: ``y`` clamped to +-448, rounded to the
nearest e4m3 value (ties to even). Dequantized value: ``value * scale``, exact in fp32.
The Triton store kernel (``flashserve.kernels.cache_ops``) computes the same bits as
``quantize`` here; the attention kernels and the torch backend dequantize on read.
"""

from __future__ import annotations

import torch

from flashserve.kernels.quant_reference import divide

KV_CACHE_DTYPES = ("auto", "int8", "fp8")
_STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
SCALE_DTYPE = torch.float16
MIN_SCALE = 2.0**-14  # smallest normal fp16: keeps the rounded scale within 2^-11 of amax / QMAX
MAX_SCALE = 65504.0  # largest fp16
BLOCK_ALIGN = 32  # bytes: a block never shares a DRAM sector with its neighbour


def storage_dtype(kv_cache_dtype: str) -> torch.dtype | None:
    """The element dtype of an 8-bit cache, or None for "auto" (the model's dtype)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    return _STORAGE.get(kv_cache_dtype)


def is_quantized(cache: torch.Tensor) -> bool:
    """Whether ``cache`` (a layer's K or V cache, or a pool) holds 8-bit values with scales."""
    return cache.dtype in QMAX


def block_bytes(block_size: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of one quantized K (or V) block of one layer: values, scales, padding."""
    raw = block_size * num_kv_heads * (head_dim + SCALE_DTYPE.itemsize)
    return -(-raw // BLOCK_ALIGN) * BLOCK_ALIGN


def allocate_pool(
    num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: torch.device | str, zero: bool = True,
) -> torch.Tensor:  # [num_layers, 2, num_blocks, block_size, Hkv, D] view of the values
    """A quantized pool: one byte buffer of ``num_layers * 2 * num_blocks * block_bytes`` and
    its values view; ``pool[i, 0]`` / ``pool[i, 1]`` are layer i's K / V caches."""
    assert dtype in QMAX, dtype
    bb = block_bytes(block_size, num_kv_heads, head_dim)
    n = num_layers * 2 * num_blocks * bb
    raw = torch.zeros(n, dtype=torch.uint8, device=device) if zero else torch.empty(n, dtype=torch.uint8, device=device)
    return raw.view(dtype).as_strided(
        (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim),
        (2 * num_blocks * bb, num_blocks * bb, bb, num_kv_heads * head_dim, head_dim, 1),
    )


def allocate_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's (k_cache, v_cache) in the quantized layout (tests and benchmarks)."""
    pool = allocate_pool(1, num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
    return pool[0, 0], pool[0, 1]


def whole_blocks(pool: torch.Tensor) -> torch.Tensor:
    """``pool`` (``[..., num_blocks, block_size, Hkv, D]``) as whole blocks along the same block
    dimension: itself when unquantized, else the uint8 view ``[..., num_blocks, block_bytes]``
    that includes the scales (what swap must move)."""
    if not is_quantized(pool):
        return pool
    lead = pool.dim() - 3  # dims up to and including the block dimension
    bb = pool.stride(lead - 1)
    return pool.view(torch.uint8).as_strided((*pool.shape[:lead], bb), (*pool.stride()[:lead], 1),
                                             pool.storage_offset())


def kv_scales(cache: torch.Tensor) -> torch.Tensor:  # [num_blocks, Hkv, block_size] fp16 view
    """The scale region of every block of a quantized layer cache ``[num_blocks, block_size, Hkv, D]``."""
    nb, bs, hkv, d = cache.shape
    bb = cache.stride(0)
    assert is_quantized(cache) and cache.stride()[1:] == (hkv * d, d, 1), "not a quantized KV cache view"
    assert bb >= bs * hkv * (d + SCALE_DTYPE.itemsize) and bb % 2 == 0 and cache.storage_offset() % 2 == 0
    scale_bytes = cache.view(torch.uint8).as_strided(
        (nb, hkv, bs * SCALE_DTYPE.itemsize), (bb, bs * SCALE_DTYPE.itemsize, 1),
        cache.storage_offset() + bs * hkv * d)
    return scale_bytes.view(SCALE_DTYPE)


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (values [..., D] of ``dtype``, scales [...] fp16), one scale per row."""
    xf = x.float()
    qmax = QMAX[dtype]
    scale = divide(xf.abs().amax(dim=-1), qmax).clamp(MIN_SCALE, MAX_SCALE).to(SCALE_DTYPE)
    y = xf / scale.float().unsqueeze(-1)
    if dtype == torch.int8:
        values = y.round().clamp(-qmax, qmax).to(torch.int8)  # round half to even
    else:
        values = y.clamp(-qmax, qmax).to(dtype)  # round to nearest e4m3, ties to even
    return values, scale


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values [..., D] * scales [...] -> [..., D] in ``dtype`` (the product is exact in fp32)."""
    return (values.float() * scales.float().unsqueeze(-1)).to(dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The same elements viewed as uint8 (indexing ops that lack fp8 kernels work on bytes)."""
    return t.view(torch.uint8)


def store(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] quantized view
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [T] int64 flat slots, all valid (>= 0)
) -> None:
    """Quantize the new tokens' k/v and write values and scales into their slots (torch)."""
    bs = k_cache.shape[1]
    blk, off = slots // bs, slots % bs
    for x, cache in ((k, k_cache), (v, v_cache)):
        values, scales = quantize(x, cache.dtype)
        _bytes(cache)[blk, off] = _bytes(values)
        kv_scales(cache)[blk, :, off] = scales  # advanced indices first: [T, Hkv]


def gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # [S, Hkv, D]
    """The K or V rows at flat ``slots`` in ``dtype`` (dequantized when the cache is quantized)."""
    if not is_quantized(cache):
        return cache.flatten(0, 1).index_select(0, slots).to(dtype)
    bs = cache.shape[1]
    blk, off = slots // bs, slots % bs
    values = _bytes(cache)[blk, off].view(cache.dtype)  # [S, Hkv, D]
    return dequantize(values, kv_scales(cache)[blk, :, off], dtype)


def dequantize_cache(cache: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A dense copy ``[num_blocks, block_size, Hkv, D]`` of a quantized cache (references)."""
    return dequantize(cache, kv_scales(cache).transpose(1, 2), dtype)


def quantize_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized copies (layout above) of dense caches ``[num_blocks, block_size, Hkv, D]``,
    every slot quantized as ``store`` would (tests and benchmarks)."""
    nb, bs, hkv, d = k_cache.shape
    out = allocate_cache(nb, bs, hkv, d, dtype, k_cache.device)
    for dense, cache in zip((k_cache, v_cache), out):
        values, scales = quantize(dense, dtype)  # [nb, bs, Hkv, D], [nb, bs, Hkv]
        _bytes(cache).copy_(_bytes(values))
        kv_scales(cache).copy_(scales.transpose(1, 2))
    return out
