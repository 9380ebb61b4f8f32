"""Token-tree verification through the model equals sequential decoding of each branch.

A tiny model holds a context in its paged cache; one forward pass computes a branching token
tree (nodes stored at index positions, rotated at depth positions, tree-masked attention). The
logits of every node must equal those of decoding that node's root-to-node path one token at a
time from the same context - with the torch backend and with the Triton kernels (interpreter)."""

import os

import pytest
import torch

from conftest_models import PagedKVCache, build_metadata, make_tiny_checkpoint
from flashserve.kernels.tree_mask import TreeMask
from flashserve.layers.attention import get_attention_backend
from flashserve.layers.attention_metadata import forward_context
from flashserve.loader import load_model
from flashserve.spec.tree import TokenTree

TREE = TokenTree((0, 11, 12, 13, 14, 15, 16, 17, 18), (-1, 0, 0, 1, 1, 2, 3, 3, 5))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tree_tiny")
    make_tiny_checkpoint("qwen3_qknorm", folder, seed=4)
    return str(folder)


def _model(folder, backend):
    model, cfg = load_model(folder, "safetensors", torch.float32, "cpu", get_attention_backend(backend))
    return model, cfg


@torch.no_grad()
def _tree_logits(model, cfg, context: list[int], tree: TokenTree) -> torch.Tensor:
    cache = PagedKVCache(cfg, block_size=4)
    cache.step(model, [(0, context)])
    start = len(context)
    table = cache._reserve(0, start + tree.size)
    meta = build_metadata([tree.size], [start + tree.size], [list(table)], 4)
    bits = torch.tensor(tree.ancestor_bits, dtype=torch.int64)
    meta.tree = TreeMask(bits, torch.tensor([tree.size], dtype=torch.int32), [tree.size])
    positions = torch.tensor([start + d for d in tree.depths])
    ids = torch.tensor(tree.tokens)
    with forward_context(meta):
        hidden = model(ids, positions, cache.kv_caches)
    return model.compute_logits(hidden)


@torch.no_grad()
def _path_logits(model, cfg, context: list[int], tree: TokenTree, node: int) -> torch.Tensor:
    cache = PagedKVCache(cfg, block_size=4)
    cache.step(model, [(0, context)])
    logits = None
    for token in [tree.tokens[0]] + tree.path_tokens(node):
        logits = cache.step(model, [(0, [token])])
    return logits[0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tree_equals_sequential_decoding_of_each_branch(tiny, backend):
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run in the interpreter only with TRITON_INTERPRET=1 (tests/kernels)")
    model, cfg = _model(tiny, backend)
    context = [5, 9, 33, 2, 71, 70, 8, 100, 45, 6, 3]
    tree_logits = _tree_logits(model, cfg, context, TREE)
    ref_model, _ = _model(tiny, "torch")
    for node in range(TREE.size):
        ref = _path_logits(ref_model, cfg, context, TREE, node)
        torch.testing.assert_close(tree_logits[node], ref, atol=2e-4, rtol=1e-4)


def test_tree_from_chains_and_best_first():
    tree = TokenTree.from_chains(7, [[1, 2, 3], [1, 4], [5], [1, 2, 9]], max_drafts=5)
    assert tree.tokens == (7, 1, 2, 3, 4, 5)
    assert tree.parents == (-1, 0, 1, 2, 1, 0)
    assert tree.depths == [0, 1, 2, 3, 2, 1]
    assert tree.path_tokens(3) == [1, 2, 3]
    assert tree.children() == [[1, 5], [2, 4], [3], [], [], []]
    bits = tree.ancestor_bits
    assert bits[3] == 0b1111 and bits[4] == 0b10011 and bits[5] == 0b100001
    assert not tree.is_chain and TokenTree.chain(7, [1, 2]).is_chain
    from flashserve.spec.tree import best_first_tree

    t = best_first_tree(0, [[10, 11], [20, 21]], [[0.6, 0.3], [0.5, 0.4]], max_drafts=4)
    # values: 10: .6, 11: .3, 10>20: .3, 10>21: .24 -> the best four nodes, best first
    assert t.tokens == (0, 10, 11, 20, 21) and t.parents == (-1, 0, 0, 1, 1)
