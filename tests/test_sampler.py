"""Sampler: exact masks, seeded reproducibility, the distribution of temperature sampling, penalties."""

import math

import pytest
import torch
from scipy.stats import chisquare

from flashserve.layers.sampler import PenaltyState, Sampler, SamplingRow, race_argmax, top_k_top_p_min_p_mask
from flashserve.sampling_params import SamplingParams

CPU = torch.device("cpu")
VOCAB = 1000


def row(num_output=0, banned=(), **kw):
    return SamplingRow(SamplingParams(**kw), num_output, None, tuple(banned))


def sampler(seed=0, vocab=VOCAB):
    return Sampler(CPU, vocab, seed)


def ids(out):
    return out.token_ids.tolist()


def kept(masked: torch.Tensor) -> list[list[int]]:
    return [sorted(torch.nonzero(torch.isfinite(r)).flatten().tolist()) for r in masked]


def test_top_k_top_p_min_p_masks_are_exact():
    # probabilities 0.4, 0.3, 0.2, 0.1 for tokens 3, 1, 0, 2
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.1, 0.4]])).repeat(5, 1)
    top_k = torch.tensor([2, -1, -1, -1, 1])
    top_p = torch.tensor([1.0, 0.7, 0.71, 1.0, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.45, 0.0])
    out = top_k_top_p_min_p_mask(logits, top_k, top_p, min_p)
    assert kept(out) == [[1, 3], [1, 3], [0, 1, 3], [0, 1, 3], [3]]
    # kept logits are unchanged
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])


def test_greedy_is_argmax_and_ignores_seed():
    logits = torch.randn(4, 50)
    out = sampler()(logits, [row(temperature=0.0, seed=s) for s in range(4)])
    assert ids(out) == logits.argmax(-1).tolist()


def test_seeded_sampling_reproducible_across_batches_and_runs():
    torch.manual_seed(0)
    logits = torch.randn(1, 1000)
    a = ids(sampler(1)(logits, [row(temperature=1.0, seed=42)]))[0]
    other = torch.randn(3, 1000)
    batch = torch.cat([other[:2], logits, other[2:]])
    rows = [row(temperature=1.0), row(temperature=0.7), row(temperature=1.0, seed=42), row(temperature=1.0)]
    b = ids(sampler(2)(batch, rows))[2]
    assert a == b
    # Different output positions draw different noise, so a long run is not one repeated token.
    draws = {ids(sampler()(logits, [row(num_output=i, temperature=1.0, seed=42)]))[0] for i in range(20)}
    assert len(draws) > 5


def test_temperature_sampling_matches_softmax_chi_square():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0]])
    temperature = 0.8
    n = 20000
    tokens = sampler(123, vocab=6)(logits.repeat(n, 1), [row(temperature=temperature)] * n).token_ids
    counts = torch.bincount(tokens, minlength=6).double()
    expected = torch.softmax(logits[0].double() / temperature, -1) * n
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def test_top_p_sampling_never_leaves_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    tokens = ids(sampler(vocab=4)(logits, [row(temperature=1.0, top_p=0.75)] * 2000))
    assert set(tokens) == {0, 1}


def test_race_never_picks_a_zero_probability_token_on_a_zero_draw():
    # a draw of exactly 0 on a masked token would be 0 / 0 = NaN, which argmax takes.
    g = torch.Generator().manual_seed(5)
    probs = torch.rand(8, 64, generator=g) + 0.1
    probs[:, ::2] = 0.0  # masked tokens
    noise = torch.empty(8, 64).exponential_(generator=g)
    noise[:, ::4] = 0.0  # zero draws on masked tokens, and on no allowed one
    drawn = race_argmax(probs / probs.sum(-1, keepdim=True), noise)
    assert (drawn % 2 == 1).all()
    assert torch.equal(drawn, (probs / noise.clamp_min(1e-30)).argmax(-1))


def test_penalties_change_logits_as_specified_and_count_sampled_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    state = PenaltyState(4, CPU)
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    slot = state.add(prompt_token_ids=(1,), output_token_ids=(0, 0, 2))
    out = state.apply(logits.clone(), [SamplingRow(params, 3, slot)], [0])
    # token 0: seen -> 2/2 = 1, minus freq 0.25*2 and presence 0.5 -> 0.0
    # token 1: in the prompt only -> -2*2 = -4, no presence/frequency (output only)
    # token 2: 1/2 = 0.5, minus 0.25 and 0.5 -> -0.25 ; token 3 untouched
    assert torch.allclose(out, torch.tensor([[0.0, -4.0, -0.25, 0.5]]))
    # The sampler records what it samples: after a greedy draw of token 3, token 3 is penalised too.
    s = sampler(vocab=4)
    slot = s.penalties.add((1,), (0, 0, 2))
    greedy = SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    assert ids(s(logits, [SamplingRow(greedy, 3, slot)])) == [3]
    assert s.penalties.counts[slot].tolist() == [2.0, 0.0, 1.0, 1.0] and bool(s.penalties.seen[slot, 3])
    s.penalties.release(slot)
    assert s.penalties.add((), ()) == slot and s.penalties.counts[slot].sum() == 0


def test_min_tokens_masks_eos_and_logprobs_are_log_softmax():
    logits = torch.tensor([[0.0, 0.0, 10.0]])
    s = sampler(vocab=3)
    out = s(logits, [row(banned=(2,), temperature=0.0, min_tokens=2, num_output=1, logprobs=2)])
    assert ids(out) == [0] or ids(out) == [1]
    ref = torch.log_softmax(logits[0], -1)
    token = ids(out)[0]
    assert math.isclose(out.logprobs[0].item(), ref[token].item(), rel_tol=1e-6)
    assert out.top_ids[0, 0].item() == 2 and math.isclose(out.top_logprobs[0, 0].item(), ref[2].item(), rel_tol=1e-6)
    out = s(logits, [row(temperature=0.0, min_tokens=1, num_output=1)])
    assert ids(out) == [2] and out.logprobs is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, r"temperature must be a finite number in \[0, 100\]"),
        ({"top_p": 0.0}, r"top_p must be a finite number in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be a finite number in \(0, 1\]"),
        ({"top_k": -2}, "top_k must be -1"),
        ({"max_tokens": 0}, r"max_tokens must be an integer in \[1, "),
        ({"max_tokens": -3}, r"max_tokens must be an integer in \[1, "),
        ({"min_p": 1.5}, r"min_p must be a finite number in \[0, 1\]"),
        ({"n": 0}, r"n must be an integer in \[1, 128\]"),
        ({"logprobs": 50}, r"logprobs must be an integer in \[0, 20\]"),
    ],
)
def test_invalid_sampling_params_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_plain_greedy_rows_sample_the_argmax_without_rows():
    """``Sampler.greedy`` gives plain greedy rows what ``__call__`` gives them; a request with any
    of penalties, min_tokens, logit bias, a grammar, logprobs or a temperature is not plain."""
    from flashserve.sampling_params import StructuredOutput

    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(3))
    rows = [row(temperature=0, max_tokens=5) for _ in range(6)]
    assert all(r.params.plain_greedy for r in rows)
    full, fast = sampler()(logits, rows), sampler().greedy(logits)
    assert ids(fast) == ids(full) == logits.argmax(dim=-1).tolist() and fast.logprobs is None
    for kw in (dict(temperature=0.7), dict(repetition_penalty=1.2), dict(presence_penalty=0.5),
               dict(frequency_penalty=0.5), dict(min_tokens=2), dict(logit_bias={3: 1.0}), dict(logprobs=0),
               dict(structured_output=StructuredOutput("regex", "[0-9]+"))):
        assert not SamplingParams(**{"temperature": 0, **kw}).plain_greedy, kw
