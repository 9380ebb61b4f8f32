"""Pure-torch references for every kernel in ``flashserve.kernels``.

They are written for clarity, not speed (Python loops over sequences), compute in fp32 and
return results in the input dtype. Tests and ``benchmarks/gpu_kernels_check.py`` compare the
Triton kernels against them.
"""

from __future__ import annotations

import torch

from flashserve.kernels import kv_quant


def store_kv_ref(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
) -> None:
    """Write token t's k/v into flat slot ``slot_mapping[t]`` of the paged cache (in place);
    an 8-bit cache gets the values and scales of ``kv_quant.quantize``."""
    num_blocks, block_size = k_cache.shape[:2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    if kv_quant.is_quantized(k_cache):
        kv_quant.store(k[keep], v[keep], k_cache, v_cache, slots)
        return
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def gather_kv_ref(
    cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_table_row: torch.Tensor,  # [max_blocks] int32
    seq_len: int,
) -> torch.Tensor:  # [seq_len, Hkv, D]
    """The first ``seq_len`` tokens of one sequence, read through its block table (an 8-bit
    cache dequantized to fp32)."""
    block_size = cache.shape[1]
    pos = torch.arange(seq_len, device=cache.device)
    blocks = block_table_row.long()[pos // block_size]
    if kv_quant.is_quantized(cache):
        return kv_quant.gather(cache, blocks * block_size + pos % block_size, torch.float32)
    return cache[blocks, pos % block_size]


def window_mask(
    q_pos: torch.Tensor,  # [L] int64 absolute query positions
    k_pos: torch.Tensor,  # [S] int64 absolute key positions
    window: int | None = None,  # tokens seen (itself included); None: no window
    dilation: int = 1,
    num_sinks: int = 0,
) -> torch.Tensor:  # [L, S] bool, True = attend
    """Causal visibility with an optional (dilated) sliding window and sink tokens: key k is seen
    by the query at p when k <= p and either k < num_sinks or p - k is a multiple of ``dilation``
    below ``window * dilation``. ``window=None`` (full attention) ignores the rest."""
    dist = q_pos[:, None] - k_pos[None, :]
    visible = dist >= 0
    if window is not None:
        in_window = (dist < window * dilation) & (dist % dilation == 0)
        visible &= in_window | (k_pos[None, :] < num_sinks)
    return visible


def paged_attention_ref(
    q: torch.Tensor,  # [T, Hq, D], new tokens packed by query_start_loc
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    window: int | None = None,
    dilation: int = 1,
    num_sinks: int = 0,
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of each sequence's new tokens over its whole (paged) context, with an
    optional sliding window (``window_mask``).

    New token i of a sequence with q_len new tokens and seq_len context tokens sits at
    absolute position seq_len - q_len + i and sees positions 0 .. seq_len - q_len + i.
    """
    out = torch.zeros_like(q)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    hq, hkv = q.shape[1], k_cache.shape[2]
    group = hq // hkv
    for b, seq_len in enumerate(lens):
        start, end = qsl[b], qsl[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k = gather_kv_ref(k_cache, block_tables[b], seq_len).float()  # [S, Hkv, D]
        v = gather_kv_ref(v_cache, block_tables[b], seq_len).float()
        k = k.repeat_interleave(group, dim=1)  # [S, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        qb = q[start:end].float()  # [q_len, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", qb, k) * scale  # [Hq, q_len, S]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        visible = window_mask(q_pos, k_pos, window, dilation, num_sinks)
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim; fp32 math, input dtype out."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); the sum is rounded to residual's dtype first."""
    new_residual = (x.float() + residual.float()).to(residual.dtype)
    return rms_norm_ref(new_residual, weight, eps).to(x.dtype), new_residual


def rotary_embedding_ref(
    positions: torch.Tensor,  # [T] int
    q: torch.Tensor,  # [T, Hq * D] or [T, Hq, D]
    k: torch.Tensor | None,  # [T, Hkv * D] or [T, Hkv, D]
    cos_sin_cache: torch.Tensor,  # [max_pos, rotary_dim]: cos | sin
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Neox (rotate-half) rotary embedding of the first rotary_dim dims of every head.
    Returns new tensors (the kernel works in place)."""
    rot = cos_sin_cache.shape[1]
    half = rot // 2
    cs = cos_sin_cache[positions.long()].float()  # [T, rot]
    cos, sin = cs[:, None, :half], cs[:, None, half:]  # [T, 1, half]

    def apply(x: torch.Tensor) -> torch.Tensor:
        xs = x.float().reshape(x.shape[0], -1, head_dim)  # [T, H, D]
        x1, x2 = xs[..., :half], xs[..., half:rot]
        out = xs.clone()
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half:rot] = x2 * cos + x1 * sin
        return out.reshape(x.shape).to(x.dtype)

    return apply(q), (apply(k) if k is not None else None)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] for x [..., 2I]."""
    i = x.shape[-1] // 2
    xf = x.float()
    return (torch.nn.functional.silu(xf[..., :i]) * xf[..., i:]).to(x.dtype)


def build_cos_sin_cache(max_pos: int, rotary_dim: int, base: float = 10000.0, dtype=torch.float32,
                        device: torch.device | str = "cpu") -> torch.Tensor:  # [max_pos, rotary_dim]
    """Standard RoPE table: row p = cos(p * inv_freq) | sin(p * inv_freq)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))
    freqs = torch.arange(max_pos, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)
