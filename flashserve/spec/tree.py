"""Token trees: the drafts of one request in one verification step (SpecInfer).

Node 0 is the root: the request's last known token, whose K/V the step computes too. Every other
node is a draft token whose parent precedes it (``parents[i] < i``), so node order is a
topological order. A chain of k drafts is the tree whose node i has parent i - 1.

The target computes all nodes in one pass. Node i is *stored* at cache position
``start + i`` (its index) but *rotated* at position ``start + depth(i)`` (where it will live once
accepted); it attends to the cached context and to its ancestors (``ancestor_bits``: bit j set
when node j is node i or one of its ancestors; 64 nodes fit an int64). After verification the
accepted path's K/V is moved from index positions to depth positions (token-level compaction
inside the blocks), and the rest is dropped (later steps overwrite it).

``TokenTree.from_chains`` merges candidate continuations (several proposers, or the top-k
branches of one draft) into a trie under a node budget; the first chain has priority.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokenTree:
    tokens: tuple[int, ...]  # [N] node tokens; tokens[0] = the root (last known token)
    parents: tuple[int, ...]  # [N] parent node (< i); -1 for the root

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def num_drafts(self) -> int:
        return len(self.tokens) - 1

    @property
    def depths(self) -> list[int]:
        depth = [0] * len(self.tokens)
        for i in range(1, len(self.tokens)):
            depth[i] = depth[self.parents[i]] + 1
        return depth

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    @property
    def ancestor_bits(self) -> list[int]:
        """Per node, a bit mask over nodes: itself and its ancestors (as a signed int64 value)."""
        bits = [0] * len(self.tokens)
        for i, p in enumerate(self.parents):
            bits[i] = (bits[p] if p >= 0 else 0) | (1 << i)
        return [b - (1 << 64) if b >= 1 << 63 else b for b in bits]

    def children(self) -> list[list[int]]:
        """Per node, its children in priority (insertion) order."""
        kids: list[list[int]] = [[] for _ in self.tokens]
        for i in range(1, len(self.tokens)):
            kids[self.parents[i]].append(i)
        return kids

    def path_tokens(self, node: int) -> list[int]:
        """Draft tokens from the root (excluded) down to ``node``."""
        out = []
        while node > 0:
            out.append(self.tokens[node])
            node = self.parents[node]
        return out[::-1]

    def accepted(self, truth: Sequence[int]) -> int:
        """Drafts greedy verification keeps when the target's tokens after the root are ``truth``:
        the deepest path from the root whose tokens are truth's first ones."""
        kids = self.children()
        node = depth = 0
        while depth < len(truth):
            node = next((c for c in kids[node] if self.tokens[c] == truth[depth]), -1)
            if node < 0:
                break
            depth += 1
        return depth

    @staticmethod
    def chain(root: int, drafts: Sequence[int]) -> TokenTree:
        return TokenTree((root, *drafts), tuple(range(-1, len(drafts))))

    @staticmethod
    def from_chains(root: int, chains: Sequence[Sequence[int]], max_drafts: int) -> TokenTree:
        """A trie of ``chains`` (continuations of ``root``) with at most ``max_drafts`` draft nodes.
        Chains are inserted whole in order (earlier ones first), then truncated by the budget."""
        tokens, parents = [root], [-1]
        child_of: dict[tuple[int, int], int] = {}
        for chain in chains:
            node = 0
            for token in chain:
                nxt = child_of.get((node, token))
                if nxt is None:
                    if len(tokens) - 1 >= max_drafts:
                        break
                    nxt = len(tokens)
                    tokens.append(int(token))
                    parents.append(node)
                    child_of[(node, token)] = nxt
                node = nxt
        return TokenTree(tuple(tokens), tuple(parents))


def best_first_tree(root: int, candidates: Sequence[Sequence[int]], probs: Sequence[Sequence[float]],
                    max_drafts: int) -> TokenTree:
    """A tree over per-depth candidates (Medusa-style heads): depth d offers ``candidates[d][j]``
    with estimated acceptance ``probs[d][j]``; a path's value is the product along it. The
    ``max_drafts`` most valuable nodes are kept (each node's parent is worth at least as much,
    so the set is a tree), best first."""
    import heapq

    tokens, parents = [root], [-1]
    heap: list[tuple[float, int, int, int]] = []  # (-value, depth, rank, parent node)
    if candidates:
        for j, p in enumerate(probs[0][: len(candidates[0])]):
            heapq.heappush(heap, (-p, 0, j, 0))
    while heap and len(tokens) - 1 < max_drafts:
        neg, depth, rank, parent = heapq.heappop(heap)
        node = len(tokens)
        tokens.append(int(candidates[depth][rank]))
        parents.append(parent)
        if depth + 1 < len(candidates):
            for j, p in enumerate(probs[depth + 1][: len(candidates[depth + 1])]):
                heapq.heappush(heap, (neg * p, depth + 1, j, node))
    return TokenTree(tuple(tokens), tuple(parents))
