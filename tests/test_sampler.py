"""Sampler: exact masks, seeded reproducibility, the distribution of temperature sampling, penalties."""

import math

import pytest
import torch
from scipy.stats import chisquare

from flashserve.layers.sampler import Sampler, SamplingRow, apply_penalties, top_k_top_p_min_p_mask
from flashserve.sampling_params import SamplingParams

CPU = torch.device("cpu")


def row(output=(), prompt=(), eos=(99,), **kw):
    return SamplingRow(SamplingParams(**kw), list(prompt), list(output), list(eos))


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
    out = Sampler(CPU)(logits, [row(temperature=0.0, seed=s) for s in range(4)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_seeded_sampling_reproducible_across_batches_and_runs():
    torch.manual_seed(0)
    logits = torch.randn(1, 1000)
    a = Sampler(CPU, seed=1)(logits, [row(temperature=1.0, seed=42)]).token_ids[0]
    other = torch.randn(3, 1000)
    batch = torch.cat([other[:2], logits, other[2:]])
    rows = [row(temperature=1.0), row(temperature=0.7), row(temperature=1.0, seed=42), row(temperature=1.0)]
    b = Sampler(CPU, seed=2)(batch, rows).token_ids[2]
    assert a == b
    # Different output positions draw different noise, so a long run is not one repeated token.
    draws = {Sampler(CPU)(logits, [row(output=[5] * i, temperature=1.0, seed=42)]).token_ids[0] for i in range(20)}
    assert len(draws) > 5


def test_temperature_sampling_matches_softmax_chi_square():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0]])
    temperature = 0.8
    n = 20000
    sampler = Sampler(CPU, seed=123)
    tokens = sampler(logits.repeat(n, 1), [row(temperature=temperature)] * n).token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=6).double()
    expected = torch.softmax(logits[0].double() / temperature, -1) * n
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def test_top_p_sampling_never_leaves_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    tokens = Sampler(CPU)(logits, [row(temperature=1.0, top_p=0.75)] * 2000).token_ids
    assert set(tokens) == {0, 1}


def test_penalties_change_logits_as_specified():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_penalties(logits.clone(), [row(output=[0, 0, 2], prompt=[1], repetition_penalty=2.0,
                                              presence_penalty=0.5, frequency_penalty=0.25)])
    # token 0: seen -> 2/2 = 1, minus freq 0.25*2 and presence 0.5 -> 0.0
    # token 1: in the prompt only -> -2*2 = -4, no presence/frequency (output only)
    # token 2: 1/2 = 0.5, minus 0.25 and 0.5 -> -0.25 ; token 3 untouched
    assert torch.allclose(out, torch.tensor([[0.0, -4.0, -0.25, 0.5]]))


def test_min_tokens_masks_eos_and_logprobs_are_log_softmax():
    logits = torch.tensor([[0.0, 0.0, 10.0]])
    s = Sampler(CPU)
    out = s(logits, [row(eos=(2,), temperature=0.0, min_tokens=2, output=[1], logprobs=2)])
    assert out.token_ids == [0] or out.token_ids == [1]
    ref = torch.log_softmax(logits[0], -1)
    assert math.isclose(out.logprobs[0], ref[out.token_ids[0]].item(), rel_tol=1e-6)
    assert out.top_logprobs[0][0][0] == 2 and math.isclose(out.top_logprobs[0][0][1], ref[2].item(), rel_tol=1e-6)
    out = s(logits, [row(eos=(2,), temperature=0.0, min_tokens=1, output=[1])])
    assert out.token_ids == [2] and out.logprobs == [None]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -2}, "top_k must be -1"),
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"max_tokens": -3}, "max_tokens must be a positive integer"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
        ({"n": 0}, "n must be an integer >= 1"),
        ({"logprobs": 50}, r"logprobs must be in \[0, 20\]"),
    ],
)
def test_invalid_sampling_params_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
