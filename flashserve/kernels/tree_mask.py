"""Token-tree masks for speculative verification, and the pure-torch tree attention (no Triton).

A sequence verifying a tree of ``n`` nodes has them as its last ``n`` new tokens, stored at the
cache positions ``ctx .. ctx + n - 1`` (``ctx = seq_len - n``, in node order). Node i attends to
the whole cached context and, among the tree's nodes, to itself and its ancestors: the key at
position ``ctx + j`` is visible iff bit j of ``bits[i]`` is set (``TokenTree.ancestor_bits``).
Sequences without a tree (``tree_len = 0``) in the same step attend causally as usual.
``tree_attention_reference`` is the oracle of the Triton kernel
(``flashserve.kernels.tree_attention``) and the torch backend's path.

Sliding-window layers (Gemma 3's local layers, Mistral) measure the window from a node's
*rotated* position ``ctx + depth(i)``, where its decode step would sit once its path is accepted:
a context key k is seen when ``ctx + depth(i) - k`` is inside the window (or k is a sink), an
ancestor a when ``depth(i) - depth(a)`` is. Keys below the root's window are never read (their
blocks may have been released, ``flashserve.cache.window``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class TreeMask:
    """Per step: ancestor bits of every new token (0 outside trees), each sequence's tree size
    and each node's depth (0 outside trees; the number of its ancestors, from the bits when not given)."""

    bits: torch.Tensor  # [T] int64
    tree_lens: torch.Tensor  # [B] int32
    tree_lens_cpu: list[int]
    depths: torch.Tensor | None = None  # [T] int32

    def __post_init__(self) -> None:
        if self.depths is None:  # popcount of the bits minus one: a node's ancestors form one path
            depth = [max(0, (b & 0xFFFFFFFFFFFFFFFF).bit_count() - 1) for b in self.bits.tolist()]
            self.depths = torch.tensor(depth, dtype=torch.int32).to(self.bits.device)

    @staticmethod
    def build(bits: np.ndarray, tree_lens: np.ndarray, query_start_loc: np.ndarray,
              device: torch.device | None = None, depths: np.ndarray | None = None) -> TreeMask:
        """From host arrays; a tree's nodes must be its sequence's new tokens (bits [T], lens [B],
        depths [T] or None: from the bits)."""
        qlens = np.diff(query_start_loc)
        bad = np.flatnonzero((tree_lens > 0) & (tree_lens != qlens))
        if len(bad):
            raise ValueError(f"sequence {int(bad[0])}: a token tree must be all of its new tokens")
        mask = TreeMask(torch.from_numpy(bits), torch.from_numpy(tree_lens.astype(np.int32)),
                        [int(x) for x in tree_lens],
                        torch.from_numpy(depths.astype(np.int32)) if depths is not None else None)
        return mask.to(device) if device is not None else mask

    def to(self, device: torch.device) -> TreeMask:
        if self.bits.device == device:
            return self
        pin = device.type == "cuda"
        bits, lens, depths = ((t.pin_memory() if pin else t).to(device, non_blocking=pin)
                              for t in (self.bits, self.tree_lens, self.depths))
        return TreeMask(bits, lens, self.tree_lens_cpu, depths)


def tree_mask_matrix(bits: torch.Tensor, query_len: int, seq_len: int, tree_len: int,
                     depths: torch.Tensor | None = None, k_pos: torch.Tensor | None = None,
                     spec=None) -> torch.Tensor:
    """Boolean [query_len, S] mask (True = attend) of one sequence whose new tokens are the last
    ``query_len`` of its context; the last ``tree_len`` (0 or query_len) form a tree. ``k_pos``:
    the (index) positions of the S keys (default: all ``seq_len``); ``spec``: a sliding layer's
    ``AttentionSpec`` (window measured at the nodes' depth positions, see the module docstring),
    with the nodes' ``depths`` [query_len]."""
    dev = bits.device
    q_pos = torch.arange(seq_len - query_len, seq_len, device=dev)[:, None]
    k_pos = (torch.arange(seq_len, device=dev) if k_pos is None else k_pos)[None, :]
    mask = k_pos <= q_pos
    ctx = seq_len - tree_len
    if tree_len:
        j = (k_pos - ctx).clamp(min=0, max=63)
        in_tree = ((bits[:, None] >> j) & 1).bool()
        mask = torch.where(k_pos >= ctx, in_tree, mask)
    if spec is not None and spec.kind == "sliding":
        q_rot, k_rot = q_pos, k_pos
        if tree_len:  # nodes and tree keys sit at their depth positions
            d = depths.to(dev).long()
            q_rot = ctx + d[:, None]
            k_rot = torch.where(k_pos >= ctx, ctx + d[(k_pos - ctx).clamp(min=0, max=tree_len - 1)], k_pos)
        dist = q_rot - k_rot
        in_window = (dist < spec.sliding_window * spec.dilation) & (dist % spec.dilation == 0)
        mask = mask & (in_window | (k_pos < spec.num_sinks))
    return mask


def tree_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, meta, scale: float, spec=None) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D], paged caches; ``meta.tree`` a TreeMask; ``spec`` the layer's
    ``AttentionSpec`` (None: full attention). -> [T, H, D]"""
    from flashserve.kernels import kv_quant
    from flashserve.layers.attention import context_slots, key_positions, store_kv

    tree: TreeMask = meta.tree
    valid = meta.slot_mapping >= 0
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping, None if bool(valid.all()) else valid)
    H, D = q.shape[1], q.shape[2]
    Hkv = k_cache.shape[2]
    G = H // Hkv
    outs = []
    start = 0
    bits = tree.bits.to(q.device)
    depths = tree.depths.to(q.device)
    for i, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        end = start + qlen
        if qlen == 0:
            continue
        slots = context_slots(meta.block_tables[i], slen, k_cache.shape[1], q.device)
        k_pos = torch.arange(slen, device=q.device)
        if spec is not None and spec.kind == "sliding":  # only the sinks and the window of the oldest query
            sink_end, lo = key_positions(spec, slen, qlen)
            k_pos = torch.cat([k_pos[:sink_end], k_pos[lo:]])
            slots = slots[k_pos]
        keys = kv_quant.gather(k_cache, slots, q.dtype).float()  # [S, Hkv, D]
        values = kv_quant.gather(v_cache, slots, q.dtype).float()
        mask = tree_mask_matrix(bits[start:end], qlen, slen, tree.tree_lens_cpu[i], depths[start:end], k_pos,
                                spec)  # [L, S]
        qg = q[start:end].float().view(qlen, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * qlen, D)
        out = F.scaled_dot_product_attention(qg[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                                             attn_mask=mask.repeat(G, 1)[None, None], scale=scale)[0]
        outs.append(out.view(Hkv, G, qlen, D).permute(2, 0, 1, 3).reshape(qlen, H, D).to(q.dtype))
        start = end
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
