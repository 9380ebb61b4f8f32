"""Rotary position embedding (neox / HF Llama ``rotate_half`` style).

The module keeps a fp32 ``cos_sin_cache`` of shape ``[max_position, rotary_dim]``: cos in the
first half, sin in the second half (one row per position), the layout fused rope kernels read.

Scaling types (``rope_scaling["rope_type"]``): ``default`` (or None), ``linear`` and ``llama3``
(Llama 3.1), plus ``freq_factors`` (per-frequency divisors read from a GGUF ``rope_freqs`` tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flashserve.layers.norm import RMSNorm

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")


def rope_type_of(rope_scaling: dict[str, Any] | None) -> str:
    """The scaling type name, accepting the old ``type`` key."""
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def base_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    """``1 / base^(2i / d)`` for i in [0, d/2), fp32 on the current default device. -> [d/2]"""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (base**exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by ``factor``, short ones kept,
    a smooth interpolation in between. [d/2] -> [d/2]"""
    factor = float(rope_scaling["factor"])
    low_freq_factor = float(rope_scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(rope_scaling.get("high_freq_factor", 4.0))
    old_context = float(rope_scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def compute_inv_freq(rotary_dim: int, base: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies after scaling. -> [rotary_dim / 2] fp32"""
    rope_type = rope_type_of(rope_scaling)
    inv_freq = base_inv_freq(rotary_dim, base)
    if rope_type == "default":
        return inv_freq
    assert rope_scaling is not None
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if rope_type == "llama3":
        return llama3_inv_freq(inv_freq, rope_scaling)
    if rope_type == "freq_factors":
        factors = torch.tensor(rope_scaling["freq_factors"], dtype=torch.float32)
        if factors.numel() != inv_freq.numel():
            raise ValueError(f"rope freq_factors has {factors.numel()} entries, expected {inv_freq.numel()}")
        return inv_freq / factors.to(inv_freq.device)
    raise ValueError(f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of every head (rotate_half style), math in fp32.

    x: [T, heads, head_dim]; cos, sin: [T, 1, rotary_dim / 2] fp32 -> [T, heads, head_dim]
    """
    half = rotary_dim // 2
    xf = x[..., :rotary_dim].float()
    x1, x2 = xf[..., :half], xf[..., half:]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def rotate_q_k(q: torch.Tensor, k: torch.Tensor, cos_full: torch.Tensor,
               sin_signed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary`` of q and k over whole heads in one pass (rotary_dim == head_dim).

    ``x * [cos, cos] + swap_halves(x) * [-sin, sin]`` is the rotate_half formula term by term
    (``x1 cos - x2 sin`` as ``x1 cos + x2 (-sin)``: the same fp32 values), in five tensor ops
    for both instead of about twenty: at batch-1 decode the per-op cost dominates these tiny
    tensors. q: [T, H, D], k: [T, Hkv, D]; cos_full, sin_signed: [T, 1, D] fp32."""
    heads = q.shape[1]
    x = torch.cat([q, k], dim=1).float()  # [T, H + Hkv, D]
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [x2, x1]
    out = (x * cos_full + swapped * sin_signed).to(q.dtype)
    return out[:, :heads], out[:, heads:]


@dataclass(frozen=True)
class RopeInputs:
    """One forward pass's rope inputs, looked up once and shared by every layer: the positions
    (the fused kernel reads the cache itself), or cos/sin rows [T, 1, rotary_dim / 2] fp32
    (plus, for whole-head rotation, ``[cos, cos]`` and ``[-sin, sin]`` rows [T, 1, rotary_dim])."""

    positions: torch.Tensor  # [T]
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    cos_full: torch.Tensor | None = None
    sin_signed: torch.Tensor | None = None


class RotaryEmbedding(nn.Module):
    """Applies rope to q and k given each token's absolute position."""

    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        max_position: int,
        base: float,
        rope_scaling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(f"rotary_dim {rotary_dim} must be even and <= head_dim {head_dim}")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.base = base
        self.rope_type = rope_type_of(rope_scaling)
        inv_freq = compute_inv_freq(rotary_dim, base, rope_scaling)  # [rd/2]
        if inv_freq.device.type == "meta":
            cache = torch.empty(max_position, rotary_dim, dtype=torch.float32)
        else:
            t = torch.arange(max_position, dtype=torch.float32, device=inv_freq.device)
            freqs = torch.outer(t, inv_freq)  # [max_pos, rd/2]
            cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_pos, rd]
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self.triton = False  # set by flashserve.layers.fused.use_triton_ops

    def lookup(self, positions: torch.Tensor) -> RopeInputs:
        """The rope inputs of a forward pass (positions: [T]); done once, used by every layer."""
        if self.triton:
            return RopeInputs(positions)
        cos_sin = self.cos_sin_cache.index_select(0, positions).float()  # [T, rd]
        cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)
        if self.rotary_dim != self.head_dim:
            return RopeInputs(positions, cos, sin)
        return RopeInputs(positions, cos, sin, torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1))

    def forward(self, rope: RopeInputs, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm | None = None,
                k_norm: RMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D]; k: [T, Hkv, D] -> rotated (q, k), same shapes/dtypes.

        ``q_norm`` / ``k_norm`` (RMSNorm over head_dim, both or neither): each head is normalised
        first. With ``triton`` one kernel launch does both, in place, with the Triton norm's
        formula; otherwise the norm modules run, then the rotation."""
        if rope.cos is None:  # fused GPU kernel, in place
            from flashserve.kernels.rotary import rotary_embedding

            return rotary_embedding(  # type: ignore[return-value]
                rope.positions, q, k, self.cos_sin_cache, self.head_dim,
                q_norm=(q_norm.weight, q_norm.eps) if q_norm is not None else None,
                k_norm=(k_norm.weight, k_norm.eps) if k_norm is not None else None,
            )
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        if rope.cos_full is not None:
            return rotate_q_k(q, k, rope.cos_full, rope.sin_signed)
        return apply_rotary(q, rope.cos, rope.sin, self.rotary_dim), apply_rotary(k, rope.cos, rope.sin, self.rotary_dim)
