"""Tree-masked paged attention (Triton) vs its torch reference, and the reference vs first principles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_test_utils import PagedBatch, tol

from flashserve.kernels.reference import paged_attention_ref
from flashserve.kernels.tree_attention import tree_attention
from flashserve.kernels.tree_mask import TreeMask, tree_attention_reference
from flashserve.spec.tree import TokenTree

# A branching tree of 7 nodes: root -> (1 -> (3, 4 -> 6), 2 -> 5)
TREE = TokenTree((0, 1, 2, 3, 4, 5, 6), (-1, 0, 0, 1, 1, 2, 4))


def _with_trees(batch: PagedBatch, trees: dict[int, TokenTree]) -> None:
    qsl = np.array([0] + list(np.cumsum(batch.q_lens)), dtype=np.int64)
    bits = np.zeros(qsl[-1], dtype=np.int64)
    lens = np.zeros(len(batch.q_lens), dtype=np.int32)
    for i, t in trees.items():
        assert batch.q_lens[i] == t.size
        bits[qsl[i] : qsl[i + 1]] = t.ancestor_bits
        lens[i] = t.size
    batch.meta.tree = TreeMask.build(bits, lens, qsl, batch.q.device)


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (8, 1, 32), (6, 2, 24)])
def test_tree_kernel_matches_reference(device, dtype, hq, hkv, d):
    # sequence 0 verifies TREE, 1 is a plain prompt chunk, 2 a decode, 3 a chain of 4 as a tree
    batch = PagedBatch([19, 12, 9, 30], [7, 5, 1, 4], hq, hkv, d, 4, dtype, device, seed=hq * d)
    _with_trees(batch, {0: TREE, 3: TokenTree.chain(0, (1, 2, 3))})
    args = (batch.q, batch.k_new, batch.v_new, batch.k_cache.clone(), batch.v_cache.clone(), batch.meta, d**-0.5)
    ref = tree_attention_reference(*args)
    out = tree_attention(batch.q, batch.k_new, batch.v_new, batch.k_cache, batch.v_cache, batch.meta, d**-0.5)
    torch.testing.assert_close(out, ref, **tol(dtype))
    torch.testing.assert_close(batch.k_cache, args[3])  # both stored the same K/V


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("window", [None, (40, 1, 5), (24, 2, 0)])
def test_tree_kernel_context_slices(device, num_splits, window):
    """Long contexts cut into slices (several 32-key tiles each, some slices empty, the sinks
    their own tiles under a window), reduced as in decode steps: the reference's outputs."""
    from flashserve.config import AttentionSpec

    spec = None if window is None else AttentionSpec("sliding", window[0], dilation=window[1], num_sinks=window[2])
    batch = PagedBatch([157, 12, 200, 71], [7, 5, 1, 4], 4, 2, 16, 4, torch.float32, device, seed=5)
    _with_trees(batch, {0: TREE, 3: TokenTree.chain(0, (1, 2, 3))})
    args = (batch.q, batch.k_new, batch.v_new, batch.k_cache.clone(), batch.v_cache.clone(), batch.meta, 0.25)
    ref = tree_attention_reference(*args, spec)
    out = tree_attention(batch.q, batch.k_new, batch.v_new, batch.k_cache, batch.v_cache, batch.meta, 0.25, spec,
                         num_splits=num_splits)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_reference_is_ancestor_attention():
    """Node i of the tree attends exactly to the context and its ancestors: the same output as
    causal attention over the context followed by the root-to-i path alone."""
    torch.manual_seed(0)
    batch = PagedBatch([15], [7], 4, 2, 16, 4, torch.float32, torch.device("cpu"), seed=3)
    batch.store_new_with_reference()
    _with_trees(batch, {0: TREE})
    out = tree_attention_reference(batch.q, batch.k_new, batch.v_new, batch.k_cache, batch.v_cache, batch.meta, 0.25)
    ctx = 15 - 7
    kc = batch.k_cache[batch.meta.block_tables[0].long()].flatten(0, 1)[:15]  # [15, Hkv, D] in position order
    vc = batch.v_cache[batch.meta.block_tables[0].long()].flatten(0, 1)[:15]
    for node in range(7):
        path = [node]
        while TREE.parents[path[-1]] >= 0:
            path.append(TREE.parents[path[-1]])
        keys = torch.cat([kc[:ctx], kc[[ctx + j for j in reversed(path)]]])
        values = torch.cat([vc[:ctx], vc[[ctx + j for j in reversed(path)]]])
        q = batch.q[node]  # [H, D]
        kk = keys.repeat_interleave(2, dim=1)  # GQA: 2 query heads per kv head
        vv = values.repeat_interleave(2, dim=1)
        att = torch.softmax(torch.einsum("hd,shd->hs", q, kk) * 0.25, dim=-1)
        torch.testing.assert_close(out[node], torch.einsum("hs,shd->hd", att, vv), atol=1e-5, rtol=1e-4)


def test_chain_tree_equals_causal_attention():
    batch = PagedBatch([20, 9], [5, 5], 4, 1, 16, 4, torch.float32, torch.device("cpu"), seed=9)
    batch.store_new_with_reference()
    ref = paged_attention_ref(*batch.attention_args(), scale=0.25)
    _with_trees(batch, {0: TokenTree.chain(0, (1, 2, 3, 4)), 1: TokenTree.chain(0, (1, 2, 3, 4))})
    out = tree_attention_reference(batch.q, batch.k_new, batch.v_new, batch.k_cache, batch.v_cache, batch.meta, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
