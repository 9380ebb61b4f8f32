"""Prompt lookup (n-gram) drafts: continue the context the way it continued before.

The last n tokens of the context (n from ``prompt_lookup_max`` down to ``prompt_lookup_min``)
are searched for earlier in the same context (prompt and output); the tokens that followed the
most recent earlier match are the draft. Summaries, edits, code and retrieval answers copy long
stretches of their prompt, so the drafts are often right; they cost no model pass at all.

With ``tree_width`` W > 1 the continuations of the W most recent distinct matches (longest n
first) are merged into a token tree. Host-side numpy over the Worker's token table.
"""

from __future__ import annotations

import numpy as np

from flashserve.spec.tree import TokenTree


def find_continuations(tokens: np.ndarray, min_n: int, max_n: int, k: int, width: int) -> list[list[int]]:
    """Up to ``width`` distinct continuations (of up to ``k`` tokens) of the context's suffix,
    from its most recent earlier occurrences, longest matching suffix first."""
    L = len(tokens)
    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        suffix = tokens[L - n :]
        # Windows starting at 0 .. L - n - 1 (the suffix itself excluded) that equal the suffix.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: L - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        for start in hits[::-1]:  # most recent first
            cont = tokens[start + n : start + n + k]
            if len(cont) == 0:
                continue
            key = tuple(int(t) for t in cont)
            if key in seen:
                continue
            seen.add(key)
            out.append(list(key))
            if len(out) >= width:
                return out
    return out


class NgramProposer:
    """Drafts from prompt lookup; stateless (the Worker's token table is the whole context)."""

    name = "ngram"

    def __init__(self, min_n: int, max_n: int, tree_width: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self.tree_width = tree_width

    def propose_one(self, tokens: np.ndarray, k: int) -> TokenTree:
        """``tokens``: the known context (its last token is the tree's root); ``k``: draft budget."""
        chains = find_continuations(tokens, self.min_n, self.max_n, k, self.tree_width)
        if self.tree_width == 1:
            return TokenTree.chain(int(tokens[-1]), chains[0] if chains else [])
        return TokenTree.from_chains(int(tokens[-1]), chains, k)
