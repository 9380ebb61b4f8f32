"""Speculative sampling keeps the target distribution (``flashserve.spec.acceptance``).

Fixed target p and draft q over a small vocabulary, 100k independent rows verified at once
through the real code path (``verify`` with the Sampler): the first emitted token must follow p
(chi-square) and not q, for a sampled draft chain, for deterministic candidates (a token tree),
and with temperature / top-k / top-p / min-p and penalties applied as plain decoding applies them.
"""

import math

import pytest
import torch
from scipy.stats import chisquare

from flashserve.layers.sampler import Sampler, SamplingRow
from flashserve.sampling_params import SamplingParams
from flashserve.spec.acceptance import TreeBatch, verify

V = 8
N_SAMPLES = 100_000
P = torch.tensor([0.30, 0.05, 0.20, 0.02, 0.13, 0.10, 0.15, 0.05])
Q = torch.tensor([0.05, 0.40, 0.05, 0.20, 0.05, 0.05, 0.10, 0.10])


def _chain_batch(drafts: torch.Tensor, q: torch.Tensor | None) -> TreeBatch:
    """R chains of one draft each: node 0 (root, logits row 2r), node 1 (draft, row 2r + 1)."""
    R = drafts.shape[0]
    node_rows = torch.stack([torch.arange(R) * 2, torch.arange(R) * 2 + 1], dim=1)
    tokens = torch.stack([torch.zeros(R, dtype=torch.int64), drafts], dim=1)
    children = torch.full((R, 2, 1), -1, dtype=torch.int64)
    children[:, 0, 0] = 1
    draft_probs = sampled = None
    if q is not None:
        draft_probs = q[None, None, :].expand(R, 2, V).contiguous()
        sampled = torch.ones(R, dtype=torch.bool)
    return TreeBatch(node_rows, tokens, children, 1, draft_probs, sampled)


def _assert_follows(tokens: torch.Tensor, expected: torch.Tensor, other: torch.Tensor | None = None) -> None:
    counts = torch.bincount(tokens, minlength=V).double()
    exp = expected.double() * counts.sum() / expected.double().sum()
    keep = exp > 0
    assert counts[~keep].sum() == 0, "a token outside the target's support was emitted"
    assert chisquare(counts[keep].numpy(), exp[keep].numpy()).pvalue > 1e-3
    if other is not None:
        exp_o = other.double() * counts.sum() / other.double().sum()
        assert chisquare(counts.numpy(), exp_o.numpy()).pvalue < 1e-12


def _rows(params: SamplingParams, n: int) -> list[SamplingRow]:
    row = SamplingRow(params, 0, None)
    return [row] * n


def test_sampled_chain_follows_target_not_draft():
    torch.manual_seed(0)
    sampler = Sampler(torch.device("cpu"), V, seed=1)
    drafts = torch.multinomial(Q, N_SAMPLES, replacement=True)
    logits = P.log()[None].expand(2 * N_SAMPLES, V).contiguous()
    params = SamplingParams(temperature=1.0)
    res = verify(sampler, logits, _rows(params, 2 * N_SAMPLES), _rows(params, N_SAMPLES), _chain_batch(drafts, Q))
    first = res.out.token_ids[:, 0]
    _assert_follows(first, P, Q)
    accepted = res.out.num_tokens == 2
    # Acceptance probability of a sampled draft: sum_x min(p(x), q(x)).
    assert accepted.double().mean().item() == pytest.approx(torch.minimum(P, Q).sum().item(), abs=0.01)
    # After an accepted draft the bonus token comes from the next node's distribution (also P).
    _assert_follows(res.out.token_ids[accepted, 1], P)


def test_draft_equal_to_target_accepts_everything():
    sampler = Sampler(torch.device("cpu"), V, seed=2)
    drafts = torch.multinomial(P, 20_000, replacement=True)
    logits = P.log()[None].expand(40_000, V).contiguous()
    params = SamplingParams(temperature=1.0)
    res = verify(sampler, logits, _rows(params, 40_000), _rows(params, 20_000), _chain_batch(drafts, P))
    assert bool((res.out.num_tokens == 2).all())
    assert torch.equal(res.out.token_ids[:, 0], drafts)


def test_deterministic_candidates_in_a_tree_follow_target():
    """A root with three candidate children (tokens 1, 3, 0: what n-gram matches or head top-k
    would give), no draft distribution: the emitted token still follows p."""
    sampler = Sampler(torch.device("cpu"), V, seed=3)
    R = N_SAMPLES
    node_rows = torch.stack([torch.arange(R) * 4 + i for i in range(4)], dim=1)
    tokens = torch.tensor([5, 1, 3, 0]).expand(R, 4).contiguous()
    children = torch.full((R, 4, 3), -1, dtype=torch.int64)
    children[:, 0] = torch.tensor([1, 2, 3])
    logits = P.log()[None].expand(4 * R, V).contiguous()
    params = SamplingParams(temperature=1.0)
    res = verify(sampler, logits, _rows(params, 4 * R), _rows(params, R), TreeBatch(node_rows, tokens, children, 1))
    _assert_follows(res.out.token_ids[:, 0], P, Q)
    assert (res.out.num_tokens == 2).double().mean().item() == pytest.approx((P[1] + P[3] + P[0]).item(), abs=0.01)


def test_filters_and_temperature_match_plain_decoding():
    """temperature 0.7, top-k 5, top-p 0.9, min-p 0.05: the emitted distribution is the one the
    plain sampler draws from (``Sampler.distribution``), with drafts sampled from Q."""
    sampler = Sampler(torch.device("cpu"), V, seed=4)
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05)
    logits = P.log()[None].expand(2 * N_SAMPLES, V).contiguous()
    target = Sampler.distribution(P.log()[None], [SamplingRow(params, 0, None)])[0]
    assert (target == 0).sum() >= 3  # the filters really remove tokens
    drafts = torch.multinomial(Q, N_SAMPLES, replacement=True)
    res = verify(sampler, logits, _rows(params, 2 * N_SAMPLES), _rows(params, N_SAMPLES), _chain_batch(drafts, Q))
    _assert_follows(res.out.token_ids[:, 0], target, Q)


def test_penalties_count_the_drafts_before_each_position():
    """The penalty state plus the drafts on the path (``extra``) equals the state after those
    tokens were generated: what plain decoding would see at that position."""
    vocab = 16
    sampler = Sampler(torch.device("cpu"), vocab, seed=5)
    params = SamplingParams(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2)
    slot = sampler.penalties.add((1, 2, 3), (4, 4))
    logits = torch.randn(1, vocab)
    row = SamplingRow(params, 2, slot)
    drafts = torch.tensor([4, 7, 7])
    extra = (torch.zeros(3, dtype=torch.int64), drafts)
    with_extra = sampler.process(logits, [row], extra)
    other = Sampler(torch.device("cpu"), vocab, seed=5)
    s2 = other.penalties.add((1, 2, 3), (4, 4, 4, 7, 7))
    plain = other.process(logits, [SamplingRow(params, 5, s2)])
    assert torch.allclose(with_extra, plain)
    assert not torch.allclose(with_extra, sampler.process(logits, [row]))


def test_greedy_walk_follows_argmax_through_a_tree():
    """Greedy verification of a tree: the target's argmax picks the branch; the bonus token is
    the argmax at the last accepted node."""
    sampler = Sampler(torch.device("cpu"), V)
    # Tree: root -> {a: token 2, b: token 6}; b -> {c: token 1}. Target argmax: root 6, b 1, c 3.
    tokens = torch.tensor([[0, 2, 6, 1]])
    children = torch.tensor([[[1, 2], [-1, -1], [3, -1], [-1, -1]]])
    logits = torch.full((4, V), -5.0)
    for node, best in ((0, 6), (1, 0), (2, 1), (3, 3)):
        logits[node, best] = 5.0
    params = SamplingParams(temperature=0.0)
    res = verify(sampler, logits, _rows(params, 4), _rows(params, 1),
                 TreeBatch(torch.arange(4)[None], tokens, children, 2), raw=logits, want_logprobs=2)
    assert res.out.num_tokens.tolist() == [3]
    assert res.out.token_ids[0].tolist() == [6, 1, 3]
    assert res.path[0].tolist() == [0, 2, 3]
    assert res.out.logprobs[0, 0].item() == pytest.approx(float(logits[0].log_softmax(-1)[6]))
    assert math.isfinite(res.out.top_logprobs.sum().item())


@pytest.mark.parametrize("want_logprobs", [None, 3])
def test_greedy_chains_shortcut_equals_the_walk(want_logprobs):
    """Greedy chains skip the level-by-level walk (``_greedy_chains``): the same tokens, counts,
    paths and logprobs as the walk, for chains of different lengths whose drafts match their
    parent's argmax at random (a draft after a wrong one may be right again; some chains have no
    drafts)."""
    g = torch.Generator().manual_seed(3)
    R, K, vocab = 64, 5, 11
    lengths = torch.randint(0, K + 1, (R,), generator=g)
    lengths[:3] = torch.tensor([0, K, 1])
    logits = torch.randn(R * (K + 1), vocab, generator=g)
    tstar = logits.argmax(dim=-1).view(R, K + 1)
    node_rows = torch.arange(R * (K + 1)).view(R, K + 1)
    tokens = torch.zeros(R, K + 1, dtype=torch.int64)
    children = torch.full((R, K + 1, 1), -1, dtype=torch.int64)
    right_draft = torch.rand(R, K + 1, generator=g) < 0.7
    for r in range(R):
        n = int(lengths[r])
        node_rows[r, n + 1 :] = node_rows[r, 0]  # padding: the root's row
        for j in range(1, n + 1):
            right = int(tstar[r, j - 1])
            tokens[r, j] = right if right_draft[r, j] else (right + 1 + int(torch.randint(0, vocab - 1, (1,), generator=g))) % vocab
            children[r, j - 1, 0] = j
    rows = _rows(SamplingParams(temperature=0.0), R)
    node_params = _rows(SamplingParams(temperature=0.0), R * (K + 1))
    sampler = Sampler(torch.device("cpu"), vocab, seed=0)
    depth = int(lengths.max())
    walk = verify(sampler, logits, node_params, rows, TreeBatch(node_rows, tokens, children, depth), logits,
                  want_logprobs)
    fast = verify(sampler, logits, node_params, rows, TreeBatch(node_rows, tokens, children, depth, chains=True),
                  logits, want_logprobs)
    assert torch.equal(fast.out.num_tokens, walk.out.num_tokens)
    assert torch.equal(fast.out.token_ids, walk.out.token_ids)
    assert torch.equal(fast.path, walk.path)
    assert sorted(set(walk.out.num_tokens.tolist())) == list(range(1, K + 2))  # every count occurs
    if want_logprobs is not None:
        assert torch.equal(fast.out.logprobs, walk.out.logprobs)
        assert torch.equal(fast.out.top_ids, walk.out.top_ids)
        assert torch.equal(fast.out.top_logprobs, walk.out.top_logprobs)
