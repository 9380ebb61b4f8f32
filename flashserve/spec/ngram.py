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
    from its most recent earlier occurrences, longest matching suffix first.

    One pass finds the earlier positions holding the context's last token; each one's match
    length (how many tokens before it also equal the suffix's, up to ``max_n``) comes from one
    gather over those positions only. An n-gram match ending at position c continues at c + 1
    whatever n, so the answer is the candidates ordered by match length, then recency."""
    L = len(tokens)
    top = min(max_n, L - 1)
    if top < min_n or k < 1:
        return []
    ends = np.flatnonzero(tokens[: L - 1] == tokens[L - 1])  # match ends, oldest first
    if ends.size == 0:
        return []
    back = np.arange(top)[:, None]
    before = ends - back  # [top, C]: the token j places before each end, against the suffix's
    equal = tokens.take(before, mode="clip") == tokens[L - 1 - back]
    equal &= before >= 0
    length = equal.cumprod(axis=0).sum(axis=0)  # [C] matching suffix length, <= top
    keep = length >= min_n
    ends, length = ends[keep], length[keep]
    order = np.lexsort((-ends, -length))  # longest first, then most recent
    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for c in ends[order]:
        key = tuple(int(t) for t in tokens[c + 1 : c + 1 + k])
        if key in seen:
            continue
        seen.add(key)
        out.append(list(key))
        if len(out) >= width:
            break
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
