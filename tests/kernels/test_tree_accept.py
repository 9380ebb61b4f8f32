"""greedy_accept (Triton) and greedy_accept_ref against a walk over ``TokenTree.children``."""

from __future__ import annotations

import random

import pytest
import torch

from flashserve.kernels.tree_accept import greedy_accept_ref, greedy_accept_triton
from flashserve.spec.tree import TokenTree

VOCAB = 12  # small: sibling chains share prefixes, and argmax often hits a child


def _random_trees(seed: int, num_rows: int, max_drafts: int) -> list[TokenTree]:
    rng = random.Random(seed)
    trees = []
    for r in range(num_rows):
        width = 1 if r % 3 == 0 else rng.randint(2, 3)  # chains and branching trees
        chains = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, max(1, max_drafts)))] for _ in range(width)]
        drafts = rng.randint(0, max_drafts) if r % 3 == 1 else max_drafts
        trees.append(TokenTree.from_chains(rng.randrange(1, VOCAB), chains, drafts))
    return trees


def _argmax_following(trees: list[TokenTree], seed: int) -> list[int]:
    """Per node, the target's token: mostly a child's token (so walks go deep), sometimes not."""
    rng = random.Random(seed)
    out = []
    for t in trees:
        for kids in t.children():
            hit = kids and rng.random() < 0.75
            out.append(t.tokens[rng.choice(kids)] if hit else rng.randrange(1, VOCAB))
    return out


def _table(trees: list[TokenTree]) -> torch.Tensor:
    M = max(t.size for t in trees)
    table = torch.zeros((len(trees), 2 + 2 * M), dtype=torch.int64)
    first = 0
    for r, t in enumerate(trees):
        table[r, 0], table[r, 1] = first, t.size
        table[r, 2 : 2 + t.size] = torch.tensor(t.parents)
        table[r, 2 + M : 2 + M + t.size] = torch.tensor(t.tokens)
        table[r, 2 + t.size : 2 + M] = 7  # padding slots must never be read as nodes
        table[r, 2 + M + t.size :] = 5
        first += t.size
    return table


def _walk(trees: list[TokenTree], argmax: list[int]) -> list[tuple[list[int], list[int]]]:
    out, first = [], 0
    for t in trees:
        kids, node, tokens, path = t.children(), 0, [], []
        while True:
            best = argmax[first + node]
            tokens.append(best)
            path.append(node)
            node = next((c for c in kids[node] if t.tokens[c] == best), None)
            if node is None:
                break
        out.append((tokens, path))
        first += t.size
    return out


@pytest.mark.parametrize("num_rows,max_drafts,seed", [(1, 4, 0), (1, 8, 1), (6, 6, 7), (16, 8, 3), (3, 0, 4)])
@pytest.mark.parametrize("impl", [greedy_accept_triton, greedy_accept_ref])
def test_greedy_accept_matches_a_walk(device, impl, num_rows, max_drafts, seed):
    trees = _random_trees(seed, num_rows, max_drafts)
    argmax = _argmax_following(trees, seed)
    width = 1 + max(max(t.depths) for t in trees)
    tokens, path, count, last = impl(torch.tensor(argmax, device=device), _table(trees).to(device), width)
    want = _walk(trees, argmax)
    assert tokens.shape == path.shape == (num_rows, width)
    assert count.tolist() == [len(w) for w, _ in want]
    assert last.tolist() == [w[-1] for w, _ in want]
    for r, (w, p) in enumerate(want):
        assert tokens[r].tolist() == w + [0] * (width - len(w))
        assert path[r].tolist() == p + [0] * (width - len(p))
    if num_rows >= 5:  # the random trees were walked past the root somewhere, into a later branch too
        assert any(len(w) > 1 for w, _ in want)
        assert any(p[-1] != len(p) - 1 for _, p in want)


def test_greedy_accept_takes_the_first_child_that_matches(device):
    # root 1 with children 2 (node 1) and 3 (node 2); node 1 has child 4 (node 3)
    tree = TokenTree((1, 2, 3, 4), (-1, 0, 0, 1))
    table = _table([tree]).to(device)
    for argmax, tokens, path in [([3, 9, 9, 9], [3, 9, 0], [0, 2, 0]),  # the second child, a leaf
                                 ([2, 4, 9, 6], [2, 4, 6], [0, 1, 3]),  # down the first branch to its end
                                 ([8, 4, 9, 6], [8, 0, 0], [0, 0, 0])]:  # no child: the root's token only
        out = greedy_accept_triton(torch.tensor(argmax, device=device), table, 3)
        assert out[0].tolist() == [tokens] and out[1].tolist() == [path]
        assert out[2].tolist() == [len([t for t in tokens if t])] and out[3].tolist() == [tokens[out[2].item() - 1]]
