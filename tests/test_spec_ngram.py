"""Prompt lookup's search (``flashserve.spec.ngram.find_continuations``) against its definition:
every n from max_n down to min_n, every earlier window equal to the last n tokens, most recent
first, distinct continuations."""

import numpy as np
import pytest

from flashserve.spec.controller import shadow_acceptance
from flashserve.spec.ngram import consensus_chain, find_continuations


def _by_definition(tokens: np.ndarray, min_n: int, max_n: int, k: int, width: int) -> list[list[int]]:
    L, out, seen = len(tokens), [], set()
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        suffix = tokens[L - n :].tolist()
        for start in range(L - 1 - n, -1, -1):  # windows inside tokens[:L - 1], most recent first
            if tokens[start : start + n].tolist() != suffix:
                continue
            cont = tuple(tokens[start + n : start + n + k].tolist())
            if cont and cont not in seen:
                seen.add(cont)
                out.append(list(cont))
                if len(out) >= width:
                    return out
    return out


def test_equals_the_definition_on_random_contexts():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        L, vocab = int(rng.integers(1, 50)), int(rng.integers(1, 6))  # small vocabularies: many matches
        tokens = rng.integers(0, vocab, size=L).astype(np.int64)
        min_n = int(rng.integers(1, 4))
        max_n, k, width = int(rng.integers(min_n, 6)), int(rng.integers(0, 6)), int(rng.integers(1, 4))
        assert find_continuations(tokens, min_n, max_n, k, width) == _by_definition(tokens, min_n, max_n, k, width), \
            (tokens.tolist(), min_n, max_n, k, width)


def test_longest_match_wins_over_a_more_recent_shorter_one():
    # suffix [1, 2, 3]: "1 2 3" at 0 (continues 7 7) beats the more recent "2 3" at 6 (continues 9)
    tokens = np.array([1, 2, 3, 7, 7, 5, 2, 3, 9, 4, 1, 2, 3])
    assert find_continuations(tokens, 1, 4, 2, 1) == [[7, 7]]
    assert find_continuations(tokens, 1, 4, 2, 3) == [[7, 7], [9, 4]]
    assert find_continuations(tokens, 4, 4, 2, 1) == []  # no earlier 4-gram "x 1 2 3"


def _consensus_by_definition(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    L = len(tokens)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        suffix = tokens[L - n :].tolist()
        starts = [s for s in range(L - 1 - n, -1, -1) if tokens[s : s + n].tolist() == suffix]  # most recent first
        if not starts:
            continue
        conts = [tokens[s + n : s + n + k].tolist() for s in starts]
        draft = []
        while len(draft) < k:
            agree = [c for c in conts if c[: len(draft)] == draft and len(c) > len(draft)]
            if not agree:
                break
            votes = [c[len(draft)] for c in agree]
            draft.append(max(votes, key=lambda t: (votes.count(t), -votes.index(t))))
        return draft
    return []


def test_consensus_chain_equals_its_definition_on_random_contexts():
    rng = np.random.default_rng(1)
    for _ in range(3000):
        L, vocab = int(rng.integers(1, 60)), int(rng.integers(1, 6))
        tokens = rng.integers(0, vocab, size=L).astype(np.int64)
        min_n = int(rng.integers(1, 4))
        max_n, k = int(rng.integers(min_n, 6)), int(rng.integers(0, 9))
        assert consensus_chain(tokens, min_n, max_n, k) == _consensus_by_definition(tokens, min_n, max_n, k), \
            (tokens.tolist(), min_n, max_n, k)


def test_consensus_chain_copies_a_phrase_the_way_it_usually_goes():
    # "5 6" continues "7 8" twice and "9 9" once (the most recent): the chain follows the two;
    # at a tie the most recent occurrence decides, and a longer match outranks any count.
    tokens = np.array([5, 6, 7, 8, 1, 5, 6, 7, 8, 2, 5, 6, 9, 9, 3, 5, 6])
    assert consensus_chain(tokens, 1, 2, 3) == [7, 8, 2]  # the last 7 8's continuation wins the third place
    assert find_continuations(tokens, 1, 2, 3, 1) == [[9, 9, 3]]  # the most recent occurrence alone
    tie = np.array([5, 6, 7, 1, 5, 6, 9, 2, 5, 6])
    assert consensus_chain(tie, 1, 2, 2) == [9, 2]
    longer = np.array([4, 5, 6, 1, 5, 6, 7, 5, 6, 7, 4, 5, 6])  # "4 5 6" once beats "5 6" twice
    assert consensus_chain(longer, 1, 3, 1) == [1]


@pytest.mark.parametrize("k", [2, 4])
def test_shadow_acceptance_counts_accepted_drafts(k):
    # a period-5 sequence: after the first period every draft of k tokens is right
    tokens = np.array([10, 11, 12, 13, 14] * 8)
    assert shadow_acceptance(tokens, 16, k, 1, 4) == pytest.approx(16 / -(-16 // (k + 1)))
    rng = np.random.default_rng(1)  # no repeats: no drafts, one token per step
    assert shadow_acceptance(rng.permutation(1000)[:64], 16, k, 1, 4) == 1.0


@pytest.mark.parametrize("width", [1, 2])
def test_shadow_acceptance_stops_early_only_below_need(width):
    """With ``need`` the replay may stop early; the answer is then below ``need`` exactly when
    the full replay's is, and equal to it otherwise."""
    rng = np.random.default_rng(7)
    stopped = 0
    for trial in range(40):
        # partly copying text: random tokens with stretches copied from earlier
        tokens = list(rng.integers(0, 50, 40))
        while len(tokens) < 120:
            if rng.random() < 0.5:
                start = int(rng.integers(0, len(tokens) - 8))
                tokens += tokens[start : start + int(rng.integers(2, 9))]
            else:
                tokens += list(rng.integers(0, 50, int(rng.integers(1, 6))))
        tokens = np.array(tokens)
        k = int(rng.integers(2, 9))
        full = shadow_acceptance(tokens, 40, k, 1, 3, width)
        for need in (1.0, 1.5, 2.0, 2.5, 3.5):
            fast = shadow_acceptance(tokens, 40, k, 1, 3, width, need)
            assert (fast < need) == (full < need)
            if full >= need:
                assert fast == full
            stopped += fast != full
    assert stopped > 20  # the early stop happened
