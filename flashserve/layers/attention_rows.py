"""Verification rows attended exactly as one-token decode steps (the torch backend's lossless path).

A speculative verification step computes the target's logits for 1 + k tokens of a sequence at
once. Plain decoding computes each of them alone, as a one-token step over the context before it.
SDPA's CPU kernel does not give a query row the same bits in both cases: its blocked products and
softmax run over ``G * L`` query rows (G query heads per kv head, L new tokens), and their
summation order depends on L (measured on SmolLM2: attention outputs differ by ~1e-7 between a
5-token chunk and five decode steps; the bf16 activations of the int4 CPU matmuls turn that into
whole bf16 steps a few layers later, and a near tie of the final logits then flips).

``decode_rows`` therefore attends each verification row with the very call a decode step makes
(``grouped_attention`` with one query over the keys that decode step would see, in the same
order and layout), so verified logits equal plain decoding's bit for bit and greedy speculation
is token-identical on any model. Cost: one SDPA call per row instead of one per sequence.
"""

from __future__ import annotations

import torch

from flashserve.config import AttentionSpec
from flashserve.kernels.reference import window_mask


def ancestors(bits: int, num_nodes: int) -> list[int]:
    """A token-tree node's ancestors among the step's ``num_nodes`` nodes, itself included, from
    its ancestor bits: index order, which is depth order."""
    return [b for b in range(num_nodes) if bits >> b & 1]


def node_key_rows(ctx: int, anc: list[int], device: torch.device) -> torch.Tensor:
    """Rows of a sequence's keys (``ctx`` cached ones, then the step's nodes) that a full-attention
    decode step of a node with ancestors ``anc`` would see, in its order: the context, then them."""
    return torch.cat([torch.arange(ctx, device=device), torch.tensor(anc, device=device) + ctx])


def decode_rows(
    q: torch.Tensor,  # [L, H, D] one sequence's new tokens (the last L of its context)
    keys: torch.Tensor,  # [S, Hkv, D] the keys at positions ``k_pos``, in position order
    values: torch.Tensor,  # [S, Hkv, D]
    k_pos: torch.Tensor,  # [S] int64 absolute positions of ``keys``
    seq_len: int,  # context length after this step (cached + new)
    scale: float,
    spec: AttentionSpec,
    tree_bits: list[int] | None = None,  # [L] ancestor bits of a token tree's nodes (None: a chain)
) -> torch.Tensor:  # [L, H, D]
    """Row j of the L new tokens, attended as the decode step of that token would attend it.

    Chains: row j sits at position ``p = seq_len - L + j`` and sees the keys up to p (and, for a
    sliding layer, only those a decode step at p keeps: sinks and the window). Trees: node j sees
    the cached context and its ancestors (bits of ``tree_bits[j]``, itself included), which are
    exactly the keys its decode step would see once the path is accepted, in the same order (a
    node's ancestors precede it); on a sliding layer the window is that decode step's, at the
    node's depth position ``p = ctx + depth``, the ancestors at their depth positions too."""
    from flashserve.layers.attention import grouped_attention, key_positions

    L = q.shape[0]
    ctx = seq_len - L
    dev = keys.device
    outs = []
    for j in range(L):
        if tree_bits is not None:
            anc = ancestors(tree_bits[j], L)
            p = ctx + len(anc) - 1  # the node's depth position
            if spec.kind == "full":
                idx = node_key_rows(ctx, anc, dev)
                outs.append(grouped_attention(q[j : j + 1], keys.index_select(0, idx), values.index_select(0, idx),
                                              scale))
                continue
            # the context keys (position order) then the ancestors, as the decode step at p gathers them
            sink_end, lo = key_positions(spec, p + 1, 1)
            ctx_sel = torch.nonzero((k_pos < ctx) & ((k_pos < sink_end) | (k_pos >= lo)))[:, 0]
            anc_sel = torch.nonzero(k_pos >= ctx)[:, 0][torch.tensor(anc, device=dev)]  # keys at index ctx + a
            sel = torch.cat([ctx_sel, anc_sel])
            pos = torch.cat([k_pos.index_select(0, ctx_sel), torch.arange(ctx, p + 1, device=dev)])
        else:
            p = ctx + j
            if spec.kind == "full":  # keys are positions 0 .. seq_len - 1: a decode step sees the first p + 1
                outs.append(grouped_attention(q[j : j + 1], keys[: p + 1], values[: p + 1], scale))
                continue
            sink_end, lo = key_positions(spec, p + 1, 1)  # the keys a decode step at p gathers
            sel = torch.nonzero((k_pos < sink_end) | ((k_pos >= lo) & (k_pos <= p)))[:, 0]
            pos = k_pos.index_select(0, sel)
        mask = window_mask(torch.tensor([p], device=q.device), pos, spec.sliding_window, spec.dilation,
                           spec.num_sinks)
        outs.append(grouped_attention(q[j : j + 1], keys.index_select(0, sel), values.index_select(0, sel), scale,
                                      mask))
    return torch.cat(outs, dim=0)
