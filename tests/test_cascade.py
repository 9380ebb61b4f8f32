"""Cascade inference with two real models of different depth that share a vocabulary: the
confidence rules against an independent computation, the thresholds' extremes, fitting, the
server-side call, bad input."""

import asyncio
import math
import random

import pytest
import torch

from compress_models import tiny_smollm_vocab
from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from flashserve.compress.distill import make_student
from flashserve.compress.model_io import hf_state_dict, load_source, write_model_dir
from flashserve.compress.packed import packed_logits
from flashserve.engine.cascade import CascadeCounters, CascadeLLM, ConfidenceRule, cascade_generate
from flashserve.spec.beam import BeamSearchParams

ENGINE = dict(device="cpu", max_model_len=128, kv_cache_bytes=8 << 20, verbose=False)
PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(small dir, large dir, small torch model): the large model and its 1-layer student."""
    large = tmp_path_factory.mktemp("large")
    make_tiny_checkpoint("llama_mha_tied", large, seed=4)
    src = load_source(str(large))
    student = make_student(src.model, [1]).eval()
    small = tmp_path_factory.mktemp("small")
    write_model_dir(small, hf_state_dict(student), {**src.config_json, "num_hidden_layers": 1}, None)
    return str(small), str(large), student


@pytest.fixture(scope="module")
def llms(models):
    return LLM(models[0], **ENGINE), LLM(models[1], **ENGINE)


PROMPTS = [[random.Random(i).randrange(3, 512) for _ in range(6)] for i in range(10)]


def _own(llm, prompts=PROMPTS):
    return [o.token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)]


def test_threshold_zero_is_the_small_model_and_one_the_large(llms):
    small, large = llms
    for threshold, model, expected in ((0.0, "small", _own(small)), (1.0, "large", _own(large))):
        cascade = CascadeLLM(small, large, ConfidenceRule("mean_logprob", threshold))
        outs = cascade.generate(PROMPTS, PARAMS)
        assert [o.model for o in outs] == [model] * len(PROMPTS)
        assert [o.output.token_ids for o in outs] == expected
        c = cascade.counters
        assert (c.small, c.large) == ((10, 0) if model == "small" else (0, 10))
        assert (c.small_tokens == 0) == (model == "large") and (c.large_tokens == 0) == (model == "small")
    assert _own(small) != _own(large)  # two different models


@pytest.mark.parametrize("kind", ["mean_logprob", "min_margin"])
def test_confidence_matches_an_independent_forward_pass(models, llms, kind):
    small, large = llms
    probe = CascadeLLM(small, large, ConfidenceRule(kind, 0.0)).generate(PROMPTS, PARAMS)
    student = models[2]
    for p, o in zip(PROMPTS, probe):
        seq = p + o.output.token_ids
        with torch.no_grad():
            logp = packed_logits(student, [seq]).log_softmax(-1)[len(p) - 1 : -1]  # rows predicting the answer
        if kind == "mean_logprob":
            expected = math.exp(logp.gather(1, torch.tensor(o.output.token_ids)[:, None]).mean().item())
        else:
            top = logp.exp().topk(2, dim=-1).values
            expected = (top[:, 0] - top[:, 1]).min().item()
        assert o.confidence == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert o.output.outputs[0].logprobs is None  # only what the caller asked for
    threshold = sorted(o.confidence for o in probe)[len(probe) // 2]
    cascade = CascadeLLM(small, large, ConfidenceRule(kind, threshold))
    outs = cascade.generate(PROMPTS, PARAMS)
    small_own, large_own = _own(small), _own(large)
    for i, (o, p) in enumerate(zip(outs, probe)):
        keep = p.confidence >= threshold
        assert o.model == ("small" if keep else "large")
        assert o.output.token_ids == (small_own[i] if keep else large_own[i])
    assert 0 < cascade.counters.small < len(PROMPTS) and cascade.counters.small + cascade.counters.large == len(PROMPTS)


def test_fit_threshold_reaches_the_target_on_its_calibration_set(llms):
    small, large = llms
    cascade = CascadeLLM(small, large, ConfidenceRule("mean_logprob", 0.0))
    t = cascade.fit_threshold(PROMPTS, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), target_agreement=0.5)
    assert cascade.rule.threshold == t
    outs = cascade.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    ref = [o.token_ids for o in large.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)]
    kept = [o.output.token_ids == r for o, r in zip(outs, ref) if o.model == "small"]
    assert t == 1.0 or sum(kept) / len(kept) >= 0.5
    with pytest.raises(ValueError, match="greedy"):
        cascade.fit_threshold(PROMPTS, SamplingParams(temperature=1.0))


def test_server_call_on_two_async_engines(llms):
    from flashserve.engine.async_engine import AsyncLLMEngine

    small, large = (AsyncLLMEngine(llm.engine) for llm in llms)
    counters = CascadeCounters()

    async def ask(threshold: float, rid: str):
        return await cascade_generate(small, large, rid, PROMPTS[0], PARAMS, ConfidenceRule("min_margin", threshold), counters)

    try:
        a, b = asyncio.run(ask(0.0, "a")), asyncio.run(ask(1.0, "b"))
    finally:
        small.shutdown()
        large.shutdown()
    assert (a.model, b.model) == ("small", "large") and a.confidence is not None and b.confidence is None
    assert a.output.token_ids == _own(llms[0], PROMPTS[:1])[0] and b.output.token_ids == _own(llms[1], PROMPTS[:1])[0]
    assert (counters.small, counters.large) == (1, 1) and counters.small_tokens == counters.large_tokens == 16


def test_bad_input(models, llms, tmp_path):
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        ConfidenceRule("mean_logprob", 1.5)
    with pytest.raises(ValueError, match="rule must be one of"):
        ConfidenceRule("entropy", 0.5)
    cascade = CascadeLLM(*llms)
    with pytest.raises(ValueError, match="n must be 1"):
        cascade.generate(PROMPTS[:1], SamplingParams(n=2))
    # A small model with SmolLM2's tokenizer, a large one without: token ids would not mean the same text.
    tiny_smollm_vocab(tmp_path / "with_tokenizer", layers=1)
    mixed = CascadeLLM(LLM(str(tmp_path / "with_tokenizer"), **ENGINE), llms[1])
    assert not mixed.shared_tokenizer
    with pytest.raises(ValueError, match="different tokenizers"):
        mixed.generate(PROMPTS[:1], PARAMS)
    with pytest.raises(ValueError, match="different tokenizers"):
        mixed.fit_threshold(PROMPTS[:2])


def test_llm_cascade_keyword_delegates_to_the_cascade(models, llms):
    small_dir, large_dir, _ = models
    small, large = llms
    for threshold, model, own in ((0.0, "small", small), (1.0, "large", large)):
        llm = LLM(large_dir, cascade=small_dir, cascade_rule=ConfidenceRule("min_margin", threshold), **ENGINE)
        outs = llm.generate(PROMPTS[:4], PARAMS)
        assert [o.model for o in outs] == [model] * 4
        assert [o.output.token_ids for o in outs] == _own(own, PROMPTS[:4])
        assert (llm.cascade.counters.small, llm.cascade.counters.large) == ((4, 0) if model == "small" else (0, 4))
        assert llm.engine is llm.cascade.large.engine
    both = LLM(cascade=[small_dir, large_dir], **ENGINE)  # the shape; default rule
    assert both.cascade.rule == ConfidenceRule() and both.engine.model_name == large_dir
    with pytest.raises(ValueError, match="cannot stream"):
        next(both.stream(PROMPTS[0], PARAMS))
    with pytest.raises(ValueError, match="one SamplingParams"):
        both.generate(PROMPTS[:2], [PARAMS, PARAMS])
    with pytest.raises(ValueError, match="beam search keeps several"):
        both.beam_search(PROMPTS[:1], BeamSearchParams(beam_width=2, max_tokens=4))


def test_llm_cascade_keyword_bad_input(models):
    small_dir, large_dir, _ = models
    with pytest.raises(ValueError, match="cascade_rule needs cascade"):
        LLM(large_dir, cascade_rule=ConfidenceRule(), **ENGINE)
    with pytest.raises(ValueError, match="give the large model once"):
        LLM(large_dir, cascade=[small_dir, large_dir], **ENGINE)
    with pytest.raises(ValueError, match=r"small model \(a path\) or \[small, large\]"):
        LLM(large_dir, cascade=[small_dir], **ENGINE)
    with pytest.raises(TypeError, match="must be a ConfidenceRule"):
        LLM(large_dir, cascade=small_dir, cascade_rule="min_margin", **ENGINE)
    with pytest.raises(TypeError, match="unknown engine option"):
        LLM(large_dir, cascade=small_dir, max_num_seq=4, **ENGINE)
