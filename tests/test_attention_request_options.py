"""Per-request attention options (``SamplingParams.attention``, the OpenAI body's ``attention``):
requests with different options batched in one engine give the tokens an engine with that option
for every request gives; prefix caching never shares K/V across options; bad options are clear
errors."""

from __future__ import annotations

import pytest

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from test_engine import prompts

WINDOW = {"kind": "window", "window": 6}
SINKS = {"kind": "sinks", "window": 6, "sinks": 2}
DILATED = {"kind": "window", "window": 4, "dilation": 2}
PER_ENGINE = {None: {}, "window": dict(attention="sliding", attention_window=6),
              "sinks": dict(attention="sinks", attention_window=6, attention_sinks=2),
              "dilated": dict(attention="sliding", attention_window=4, attention_dilation=2)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama_req_attention")
    make_tiny_checkpoint("llama3_gqa", folder, seed=5)
    return str(folder)


def _engine(folder, **kw) -> LLM:
    return LLM(model=folder, device="cpu", block_size=4, max_model_len=256, kv_cache_bytes=8 << 20, verbose=False, **kw)


def _params(attention=None, n=20) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, attention=attention)


def test_requests_with_different_options_batch_together(tiny):
    batch = prompts(4, seed=11, lo=14, hi=30)
    options = [(None, None), ("window", WINDOW), ("sinks", SINKS), ("dilated", DILATED)]
    llm = _engine(tiny)
    mixed = llm.generate(batch, [_params(a) for _, a in options], use_tqdm=False)
    for prompt, out, (name, _) in zip(batch, mixed, options):
        alone = _engine(tiny, **PER_ENGINE[name]).generate([prompt], _params(), use_tqdm=False)[0]
        assert out.token_ids == alone.token_ids, name
    full = _engine(tiny).generate(batch[1:2], _params(), use_tqdm=False)[0]
    assert full.token_ids != mixed[1].token_ids  # a 6-token window changes this model's tokens


def test_prefix_cache_shares_blocks_only_within_one_option(tiny):
    llm = _engine(tiny)
    prompt = prompts(1, seed=12, lo=30, hi=30)[0]
    full = llm.generate([prompt], _params(), use_tqdm=False)[0]
    windowed = llm.generate([prompt], _params(WINDOW), use_tqdm=False)[0]
    again = llm.generate([prompt], _params(WINDOW), use_tqdm=False)[0]
    assert windowed.num_cached_tokens == 0  # the full request's blocks hold other K/V
    assert again.num_cached_tokens > 0 and again.token_ids == windowed.token_ids
    assert windowed.token_ids == _engine(tiny, **PER_ENGINE["window"]).generate([prompt], _params(), use_tqdm=False)[0].token_ids
    assert llm.generate([prompt], _params(), use_tqdm=False)[0].num_cached_tokens > 0
    assert full.token_ids != windowed.token_ids


@pytest.mark.parametrize("attention,message", [
    ({"kind": "h2o", "kv_budget": 0.2}, "per-engine option"),
    ({"kind": "quest"}, "per-engine option"),
    ({"kind": "window"}, "needs 'window'"),
    ({"kind": "window", "window": 0}, "window must be >= 1"),
    ({"kind": "window", "window": 8, "dilation": 0}, "dilation must be >= 1"),
    ({"kind": "sinks", "window": 8, "sinks": 0}, "sinks >= 1"),
    ({"kind": "window", "window": 8, "sink": 2}, "unknown: sink"),
    ({"kind": "window", "window": "8"}, "must be an integer"),
    ({"kind": "ring"}, "unknown request attention kind"),
    ("window", "must be an object"),
])
def test_bad_request_options_are_clear_errors(attention, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(attention=attention)


def test_openai_body_extension_reaches_sampling_params():
    pytest.importorskip("pydantic")
    from flashserve.server.protocol import CompletionRequest

    req = CompletionRequest(prompt="hi", attention=SINKS)
    params = req._params(8, None, None)
    assert params.attention.kind == "sliding" and params.attention.num_sinks == 2
    with pytest.raises(ValueError, match="per-engine option"):
        CompletionRequest(prompt="hi", attention={"kind": "lsh"})._params(8, None, None)
