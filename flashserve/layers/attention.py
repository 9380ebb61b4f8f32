"""Paged attention: the ``Attention`` layer and the pure-PyTorch backend.

``Attention.forward`` reads the step's ``AttentionMetadata`` from the forward context and
hands q/k/v plus the layer's KV cache to the backend chosen at start-up. The torch backend is
the reference (CPU and GPU); the Triton backend lives in ``flashserve.kernels.triton_backend``.
Both read an 8-bit cache (``flashserve.kernels.kv_quant``): quantized on store, dequantized to
the query's dtype on read.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flashserve.config import AttentionSpec
from flashserve.kernels import cpu_native, kv_quant
from flashserve.kernels.reference import window_mask
from flashserve.kernels.tree_mask import tree_attention_reference
from flashserve.layers.attention_metadata import AttentionBackend, AttentionMetadata, get_forward_context
from flashserve.layers.attention_rows import decode_rows
from flashserve.layers.request_attention import layer_spec_for
from flashserve.layers.sparse_attention import SideStates, h2o_evict_and_compact, h2o_region_start, visible_keys


FULL = AttentionSpec()


def store_kv(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
    valid: torch.Tensor | None = None,  # [T] bool, slot_mapping >= 0; None = every slot is valid
) -> None:
    """Write the new tokens' k/v into their flat cache slots, skipping slot -1 (quantized
    per token and head when the cache is 8-bit)."""
    if kv_quant.is_quantized(k_cache):
        if valid is not None:
            k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
        kv_quant.store(k, v, k_cache, v_cache, slot_mapping)
        return
    num_kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)  # [num_blocks * block_size, Hkv, D]
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    if valid is None:
        k_flat.index_copy_(0, slot_mapping, k.to(k_flat.dtype))
        v_flat.index_copy_(0, slot_mapping, v.to(v_flat.dtype))
        return
    idx = slot_mapping[valid]  # boolean indexing: syncs on GPU, acceptable for the reference backend
    k_flat.index_copy_(0, idx, k[valid].to(k_flat.dtype))
    v_flat.index_copy_(0, idx, v[valid].to(v_flat.dtype))


def context_slots(block_table: list[int] | np.ndarray | torch.Tensor, seq_len: int, block_size: int,
                  device: torch.device) -> torch.Tensor:
    """Flat cache slot of each of the first ``seq_len`` context tokens of one sequence. -> [S] int64
    (on the CPU by numpy arithmetic: a torch op costs ~10 us in a decode step's cache-cold Python,
    and a step asks once per sequence and KV-cache group)"""
    num_blocks = (seq_len + block_size - 1) // block_size
    if device.type == "cpu":
        blocks = np.asarray(block_table[:num_blocks], dtype=np.int64)
        return torch.from_numpy((blocks[:, None] * block_size + np.arange(block_size)).ravel()[:seq_len])
    blocks = torch.as_tensor(block_table[:num_blocks], device=device).long()
    offsets = torch.arange(block_size, device=device)
    return (blocks[:, None] * block_size + offsets[None, :]).flatten()[:seq_len]


def causal_mask(query_len: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[query_len, seq_len]`` mask (True = attend); query j sits at position
    ``seq_len - query_len + j`` (the new tokens are the last ones of the context)."""
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device).unsqueeze(1)
    k_pos = torch.arange(seq_len, device=device).unsqueeze(0)
    return k_pos <= q_pos


def grouped_attention(
    q: torch.Tensor,  # [L, H, D]
    k: torch.Tensor,  # [S, Hkv, D]
    v: torch.Tensor,  # [S, Hkv, D]
    scale: float,
    mask: torch.Tensor | None = None,  # [L, S] bool (True = attend); None: causal
) -> torch.Tensor:  # [L, H, D]
    """Attention of L new queries over S context tokens, GQA without copying K/V; causal (the
    queries are the last L of the S positions) unless an explicit ``mask`` is given.

    The G = H / Hkv query heads sharing a kv head are folded into the query axis, so SDPA runs
    with batch = Hkv, queries = G * L, keys = S. Softmax accumulates in fp32 (SDPA on GPU; on
    CPU half inputs are upcast). One query that sees every key (a decode row: no mask, or a
    sliding window's mask over the keys gathered for it) in fp32 on the CPU takes the native kernel
    (``cpu_native.attention``), as the CPU decode layer does: the same values.
    """
    L, H, D = q.shape
    S, Hkv = k.shape[0], k.shape[1]
    G = H // Hkv
    out_dtype = q.dtype
    if q.device.type == "cpu" and q.dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    if L == 1 and cpu_native.attention_applies(q, k, v) and (mask is None or bool(mask.all())):  # decode
        return cpu_native.attention(q, k, v, scale).view(1, H, D).to(out_dtype)
    # 4-D [1, Hkv, rows, D]: SDPA's fused CPU kernel takes 4-D inputs (3-D falls back to the
    # much slower math path).
    qg = q.view(L, Hkv, G, D).permute(1, 2, 0, 3).reshape(1, Hkv, G * L, D)  # rows g * L + l
    kg = k.transpose(0, 1).unsqueeze(0)  # [1, Hkv, S, D]
    vg = v.transpose(0, 1).unsqueeze(0)
    if mask is not None:
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask.repeat(G, 1), scale=scale)
    elif L == 1:  # decode: every context token is visible (fp32 on the CPU: the native kernel, above)
        out = F.scaled_dot_product_attention(qg, kg, vg, scale=scale)
    elif L == S and G == 1:  # whole prompt in one step: plain causal
        out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale)
    else:  # a chunk (or speculative tokens) after cached context, or GQA
        mask = causal_mask(L, S, q.device).repeat(G, 1)  # [G * L, S]
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)
    out = out.view(Hkv, G, L, D).permute(2, 0, 1, 3).reshape(L, H, D)  # [1, Hkv, G*L, D] -> [L, H, D]
    return out.to(out_dtype)


def padded_attention(
    q: torch.Tensor,  # [T, H, D], B whole sequences packed back to back
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    lens: list[int],
    scale: float,
    spec: AttentionSpec = FULL,
    memo: dict | None = None,
) -> torch.Tensor:  # [T, H, D]
    """Causal (or windowed) self-attention of B whole sequences with no cache, in one SDPA call
    over a zero-padded ``[B, H, max_len, D]`` batch instead of one call per sequence (training and
    calibration push hundreds of short sequences per step). Padded keys are masked out; padded
    query rows see at least key 0, so they stay finite, and are dropped. Differentiable."""
    H, D = q.shape[1], q.shape[2]
    B, L = len(lens), max(lens)
    window = spec.sliding_window if spec.kind == "sliding" else None
    key = ("padded_attention", window, spec.dilation, spec.num_sinks)
    cached = None if memo is None else memo.get(key)
    if cached is None:
        lens_t = torch.tensor(lens, device=q.device)
        pos = torch.arange(L, device=q.device)
        rows = (torch.arange(B, device=q.device)[:, None] * L + pos[None, :])[pos[None, :] < lens_t[:, None]]  # [T]
        mask = window_mask(pos, pos, window, spec.dilation, spec.num_sinks)[None] & (pos[None, None, :] < lens_t[:, None, None])
        cached = (rows, mask.unsqueeze(1))  # [T], [B, 1, L, L]
        if memo is not None:
            memo[key] = cached
    rows, mask = cached
    out_dtype = q.dtype
    if q.device.type == "cpu" and q.dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()

    def pad(x: torch.Tensor) -> torch.Tensor:  # [T, h, D] -> [B, H, L, D]
        x = x.new_zeros(B * L, x.shape[1], D).index_copy(0, rows, x).view(B, L, x.shape[1], D).transpose(1, 2)
        return x.repeat_interleave(H // x.shape[1], dim=1) if x.shape[1] != H else x

    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, scale=scale)  # [B, H, L, D]
    return out.transpose(1, 2).reshape(B * L, H, D).index_select(0, rows).to(out_dtype)


def masked_attention(
    q: torch.Tensor,  # [L, H, D]
    k: torch.Tensor,  # [S, Hkv, D]
    v: torch.Tensor,  # [S, Hkv, D]
    scale: float,
    mask: torch.Tensor,  # [Hkv, G * L, S] bool, rows g * L + l (every row sees at least one key)
) -> tuple[torch.Tensor, torch.Tensor]:  # [L, H, D], probabilities [Hkv, G * L, S] fp32
    """Attention with an explicit per-KV-head mask, in fp32, returning the probabilities too."""
    L, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    qg = q.float().view(L, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * L, D)
    scores = torch.bmm(qg, k.float().permute(1, 2, 0)) * scale  # [Hkv, G * L, S]
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    out = torch.bmm(probs, v.float().transpose(0, 1))  # [Hkv, G * L, D]
    return out.view(Hkv, G, L, D).permute(2, 0, 1, 3).reshape(L, H, D).to(q.dtype), probs


def key_positions(spec: AttentionSpec, seq_len: int, query_len: int) -> tuple[int, int]:
    """The keys a sliding layer's queries can see: positions [0, sink_end) and [lo, seq_len);
    an h2o layer's: its compacted kept tokens and the new ones, [lo, seq_len)."""
    if spec.kind == "h2o":
        return 0, h2o_region_start(spec, seq_len, query_len)
    if spec.kind != "sliding":
        return 0, 0
    lo = max(0, seq_len - query_len - spec.span + 1)
    return min(spec.num_sinks, lo), lo


class TorchAttentionBackend(AttentionBackend):
    """Reference paged attention in plain PyTorch: one SDPA call per sequence.

    An empty cache (``k_cache is None`` or ``numel() == 0``, e.g. a memory-profiling run)
    means "no cache": nothing is stored and each sequence attends over its new tokens only.
    """

    name = "torch"
    attention_kinds = ("full", "sliding", "h2o", "quest", "lsh")

    def __init__(self) -> None:
        self.side_states = SideStates()  # per layer cache: h2o / quest side state

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor | None,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor | None,
        meta: AttentionMetadata,
        scale: float,
        spec: AttentionSpec = FULL,
    ) -> torch.Tensor:  # [T, H, D]
        # a token tree: nodes see their ancestors only (full and sliding layers of a verification step:
        # below, by row)
        if meta.tree is not None and not (meta.verify_seqs and spec.kind in ("full", "sliding")):
            return tree_attention_reference(q, k, v, k_cache, v_cache, meta, scale, spec)
        has_cache = k_cache is not None and v_cache is not None and k_cache.numel() > 0
        state = None
        if has_cache:
            valid = self._valid_slots(meta)
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping, valid)
            if spec.kind in ("quest", "h2o"):
                state = self.side_states.get(k_cache)
                new_slots = meta.slot_mapping if valid is None else meta.slot_mapping[valid]
                state.update(spec, k if valid is None else k[valid], new_slots)
        elif spec.kind in ("quest", "h2o"):
            raise ValueError(f"{spec.kind} attention needs a KV cache")
        elif spec.kind in ("full", "sliding") and meta.seq_attention is None and len(meta.query_lens_cpu) > 1:
            return padded_attention(q, k, v, meta.query_lens_cpu, scale, spec, meta.memo)
        outputs = []
        start = 0
        layer_spec = spec
        for i, (query_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            end = start + query_len
            if query_len == 0:
                continue
            spec = layer_spec if meta.seq_attention is None else layer_spec_for(layer_spec, meta.seq_attention[i])
            if has_cache:
                sink_end, lo = key_positions(spec, seq_len, query_len)
                slots, k_pos = self._context_slots(meta, i, k_cache, sink_end, lo)  # [S]
                keys = kv_quant.gather(k_cache, slots, q.dtype)  # [S, Hkv, D]
                values = kv_quant.gather(v_cache, slots, q.dtype)
            else:  # no cache (a profiling run): the new tokens are the whole context
                keys, values = k[start:end], v[start:end]
                k_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)
                slots = None
            if spec.kind == "h2o":  # the kept tokens (compacted) then the new ones: causal over the region
                region = keys.shape[0]
                G = q.shape[1] // keys.shape[1]
                mask = causal_mask(query_len, region, q.device).repeat(G, 1).expand(keys.shape[1], -1, -1)
                out, probs = masked_attention(q[start:end], keys, values, scale, mask)
                h2o_evict_and_compact(spec, probs, slots, seq_len, state, k_cache, v_cache)
                outputs.append(out)
            elif spec.kind in ("quest", "lsh"):
                mask = visible_keys(spec, q[start:end], keys, slots, state, scale)
                outputs.append(masked_attention(q[start:end], keys, values, scale, mask)[0])
            elif has_cache and i in meta.verify_seqs and spec.kind in ("full", "sliding"):  # attention_rows
                tree_len = meta.tree.tree_lens_cpu[i] if meta.tree is not None else 0
                bits = meta.tree.bits[start:end].tolist() if tree_len else None
                outputs.append(decode_rows(q[start:end], keys, values, k_pos, seq_len, scale, spec, bits))
            else:
                mask = None
                if spec.kind == "sliding":
                    q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)
                    mask = window_mask(q_pos, k_pos, spec.sliding_window, spec.dilation, spec.num_sinks)
                outputs.append(grouped_attention(q[start:end], keys, values, scale, mask))
            start = end
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)

    @staticmethod
    def _valid_slots(meta: AttentionMetadata) -> torch.Tensor | None:
        """Mask of storable slots, or None when all are (checked once per step, not per layer; on
        the CPU the common all-storable case by numpy, without torch ops)."""
        if "valid_slots" not in meta.memo:
            slots = meta.slot_mapping
            if slots.device.type == "cpu" and (slots.numpy() >= 0).all():
                meta.memo["valid_slots"] = None
            else:
                valid = slots >= 0
                meta.memo["valid_slots"] = None if bool(valid.all()) else valid
        return meta.memo["valid_slots"]

    @staticmethod
    def _context_slots(meta: AttentionMetadata, i: int, cache: torch.Tensor, sink_end: int = 0,
                       lo: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat slots and positions [S] of sequence i's keys at positions [0, sink_end) and
        [lo, seq_len), derived once per step and shared by every layer of the same window."""
        key = ("context_slots", i, sink_end, lo)
        if key not in meta.memo:
            seq_len = meta.seq_lens_cpu[i]
            slots = context_slots(meta.block_tables[i], seq_len, cache.shape[1], cache.device)
            if sink_end == 0 and lo == 0:
                pos = torch.arange(seq_len, device=cache.device)
            else:
                pos = torch.cat([torch.arange(sink_end, device=cache.device),
                                 torch.arange(lo, seq_len, device=cache.device)])
                slots = slots[pos]
            meta.memo[key] = (slots, pos)
        return meta.memo[key]


class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query attention over the paged KV cache.

    q: [T, H * D], k, v: [T, Hkv * D] (already rotated) -> [T, H * D].
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        backend: AttentionBackend,
        spec: AttentionSpec | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec or AttentionSpec()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = backend
        self.kv_group = 0  # the layer's group of block tables (flashserve.cache.kv_groups; set by the Worker)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor | None,
        v_cache: torch.Tensor | None,
    ) -> torch.Tensor:
        meta = get_forward_context().for_group(self.kv_group)
        T = q.shape[0]
        out = self.backend.forward(
            q.view(T, self.num_heads, self.head_dim),
            k.view(T, self.num_kv_heads, self.head_dim),
            v.view(T, self.num_kv_heads, self.head_dim),
            k_cache,
            v_cache,
            meta,
            self.scale,
            self.spec,
        )
        return out.reshape(T, self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, backend={self.backend.name}"


def get_attention_backend(name: str, max_seq_len_cap: int | None = None,
                          batch_invariant: bool = False) -> AttentionBackend:
    """``"torch"`` -> TorchAttentionBackend; ``"triton"`` -> TritonAttentionBackend (imported lazily),
    whose decode split count under CUDA-graph capture is sized for ``max_seq_len_cap`` tokens
    (``batch_invariant``: see ``flashserve.layers.batch_invariant``; the torch backend's rows are
    row-exact already)."""
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        from flashserve.kernels.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(max_seq_len_cap=max_seq_len_cap, batch_invariant=batch_invariant)
    raise ValueError(f"unknown attention backend {name!r}; expected 'torch' or 'triton'")
