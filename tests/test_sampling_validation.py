"""SamplingParams refuses every out-of-range value once, naming the field and the limit; the engine
adds what only the model knows (vocabulary, context). Pure Python, no model."""

from __future__ import annotations

import math

import pytest

from flashserve.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_N,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
    StructuredOutput,
    check_text,
    validate_for_model,
)

BAD = [
    ({"top_k": 2**63}, r"top_k must be -1 or 0 \(disabled\) or an integer in \[1, 2147483647\], got 9223372036854775808"),
    ({"top_k": 1.5}, "top_k must be"),
    ({"n": MAX_N + 1}, r"n must be an integer in \[1, 128\], got 129"),
    ({"n": 10**6}, r"n must be an integer in \[1, 128\]"),
    ({"temperature": math.nan}, r"temperature must be a finite number in \[0, 100\], got nan"),
    ({"temperature": math.inf}, r"temperature must be a finite number in \[0, 100\], got inf"),
    ({"temperature": 1e6}, r"temperature must be a finite number in \[0, 100\]"),
    ({"repetition_penalty": math.nan}, r"repetition_penalty must be a finite number in \[0.01, 100\]"),
    ({"repetition_penalty": 1e-45}, r"repetition_penalty must be a finite number in \[0.01, 100\]"),
    ({"top_p": math.nan}, r"top_p must be a finite number in \(0, 1\]"),
    ({"min_p": -math.inf}, r"min_p must be a finite number in \[0, 1\]"),
    ({"presence_penalty": math.nan}, r"presence_penalty must be a finite number in \[-2, 2\]"),
    ({"frequency_penalty": math.inf}, r"frequency_penalty must be a finite number in \[-2, 2\]"),
    ({"seed": 2**64}, r"seed must be an integer in \["),
    ({"max_tokens": 2**40}, r"max_tokens must be an integer in \[1, 2147483647\]"),
    ({"min_tokens": -1}, r"min_tokens must be an integer in \[0, "),
    ({"priority": 2**40}, r"priority must be an integer in \["),
    ({"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, r"stop_token_ids has 1025 ids; at most 1024 are allowed"),
    ({"stop_token_ids": [-1]}, r"stop_token_ids entries must be an integer in \[0, "),
    ({"stop": ["x"] * 17}, "stop has 17 strings; at most 16 are allowed"),
    ({"stop": ["x" * 257]}, "stop strings may have at most 256 characters, got 257"),
    ({"stop": ["bad \ud800"]}, "stop contains an invalid character at position 4"),
    ({"logit_bias": {5: 101.0}}, r"logit_bias values must be a finite number in \[-100, 100\], got 101.0"),
    ({"logit_bias": {5: math.nan}}, r"logit_bias values must be a finite number in \[-100, 100\]"),
    ({"logit_bias": {-1: 1.0}}, r"logit_bias entries must be an integer in \[0, "),
    ({"logit_bias": {i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias has 1025 entries; at most 1024 are allowed"),
    ({"structured_output": StructuredOutput("xml", "<a/>")}, "structured_output kind must be one of json, regex, lark"),
    ({"structured_output": StructuredOutput("json", "")}, "structured_output spec must be a non-empty string"),
    ({"structured_output": StructuredOutput("json", "{}"), "ignore_eos": True}, "ignore_eos cannot be combined"),
    ({"structured_output": StructuredOutput("json", "{}"), "min_tokens": 2}, "min_tokens cannot be combined"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_out_of_range_values_are_refused_with_the_limit(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_tiny_temperatures_are_greedy_and_limits_are_inclusive():
    assert SamplingParams(temperature=1e-39).temperature == 0.0
    assert SamplingParams(temperature=1e-39).greedy
    assert SamplingParams(temperature=1e-5).temperature == 1e-5 and not SamplingParams(temperature=1e-5).greedy
    SamplingParams(n=MAX_N, top_k=2**31 - 1, temperature=100.0, repetition_penalty=0.01, seed=-(2**63),
                   stop_token_ids=list(range(MAX_STOP_TOKEN_IDS)), logit_bias={0: -100.0, 1: 100.0})
    assert SamplingParams(logit_bias={}).logit_bias is None


def test_validate_for_model_names_both_numbers():
    params = SamplingParams(max_tokens=500, stop_token_ids=[3], logit_bias={7: 1.0})
    validate_for_model(params, 100, vocab_size=10, max_model_len=600)
    with pytest.raises(ValueError, match=r"max_tokens: the model's context is 8192 tokens, but 8500 were asked for "
                                         r"\(8000 in the prompt \+ max_tokens 500\).*at most 192"):
        validate_for_model(params, 8000, vocab_size=10, max_model_len=8192)
    with pytest.raises(ValueError, match=r"min_tokens: the model's context is 50 tokens"):
        validate_for_model(SamplingParams(max_tokens=None, min_tokens=60), 1, vocab_size=10, max_model_len=50)
    with pytest.raises(ValueError, match=r"stop_token_ids: token id 10 is outside the vocabulary \[0, 10\)"):
        validate_for_model(SamplingParams(stop_token_ids=[10], min_tokens=1), 1, vocab_size=10, max_model_len=50)
    with pytest.raises(ValueError, match=r"logit_bias: token id 12 is outside the vocabulary \[0, 10\)"):
        validate_for_model(SamplingParams(logit_bias={12: 1.0}), 1, vocab_size=10, max_model_len=50)


def test_check_text_refuses_lone_surrogates():
    check_text("prompt", "fine \u00e9\U0001f600")
    with pytest.raises(ValueError, match=r"prompt contains an invalid character at position 3 \(a lone surrogate '\\udc00'\)"):
        check_text("prompt", "Hi \udc00")
