"""Cascade inference: a small model answers first; a large one takes over when the small one is unsure.

    cascade = CascadeLLM(LLM(small_dir), LLM(), ConfidenceRule("mean_logprob", 0.6))
    out = cascade.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))[0]
    out.model, out.confidence, out.output.text          # "small" or "large", the small model's score
    cascade.counters.small, cascade.counters.large       # plain ints, for /metrics

The small model generates the whole answer with its token log-probabilities; a confidence in
[0, 1] is computed from them and the answer is kept when ``confidence >= threshold`` (FrugalGPT's
scorer-and-threshold cascade, with the small model's own probabilities as the scorer):

* ``mean_logprob``: ``exp(mean log p(token))``, the geometric-mean probability of the answer's tokens;
* ``min_margin``: the smallest gap ``p(top-1) - p(top-2)`` over the answer's tokens.

Threshold 0 keeps every small answer; threshold 1 sends every request to the large model (the
small one is then not run). ``CascadeLLM.fit_threshold`` picks the threshold on a calibration
set: the lowest one whose kept answers agree with the large model's on a target share.
Sampled answers work too (each model samples with the request's own parameters).

The server wiring is ``cascade_generate`` (one awaited call per request, on two
``AsyncLLMEngine``s) plus ``CascadeCounters`` for /metrics. A cascaded answer cannot be streamed
before the decision: the small model's answer must be complete to score it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flashserve.request import CompletionOutput, RequestOutput
from flashserve.sampling_params import SamplingParams

RULES = ("mean_logprob", "min_margin")


@dataclass(frozen=True)
class ConfidenceRule:
    """How sure the small model is of an answer, and the threshold that keeps it."""

    kind: str = "mean_logprob"
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in RULES:
            raise ValueError(f"cascade rule must be one of {', '.join(RULES)}, got {self.kind!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"cascade threshold must be in [0, 1] (0: always the small model, 1: always the large), got {self.threshold}")

    @property
    def logprobs_needed(self) -> int:
        """Top log-probabilities per token the small model must return."""
        return 2 if self.kind == "min_margin" else 0

    def confidence(self, completion: CompletionOutput) -> float:
        """The confidence in [0, 1] of one answer (its ``logprobs`` must have been asked for)."""
        entries = completion.logprobs or []
        if not entries:
            return 0.0  # no token: nothing to trust
        if self.kind == "mean_logprob":
            return min(1.0, math.exp(sum(lp for _, lp, _ in entries) / len(entries)))
        margins = []
        for _, _, top in entries:
            p1 = math.exp(top[0][1])
            p2 = math.exp(top[1][1]) if len(top) > 1 else 0.0
            margins.append(p1 - p2)
        return max(0.0, min(margins))

    def keeps(self, confidence: float) -> bool:
        """Whether the small model's answer stands."""
        return self.threshold < 1.0 and confidence >= self.threshold


@dataclass
class CascadeCounters:
    """Requests answered by each model, and tokens each computed (prompt + generated); plain ints."""

    small: int = 0
    large: int = 0
    small_tokens: int = 0
    large_tokens: int = 0


@dataclass
class CascadeOutput:
    """One request's answer and which model gave it."""

    output: RequestOutput  # the answer returned to the caller
    model: str  # "small" or "large"
    confidence: float | None  # the small model's confidence (None when it was not run)
    small_output: RequestOutput | None = None  # the small model's answer, kept or not


def _num_tokens(out: RequestOutput) -> int:
    return len(out.prompt_token_ids) + sum(len(c.token_ids) for c in out.outputs)


def small_params(params: SamplingParams, rule: ConfidenceRule) -> SamplingParams:
    """The request's parameters, asking the small model for the log-probabilities the rule reads."""
    if params.n != 1:
        raise ValueError(f"a cascade scores one answer per request; n must be 1, got {params.n}")
    want = max(params.logprobs or 0, rule.logprobs_needed)
    return dataclasses.replace(params, logprobs=want)


def as_asked(out: RequestOutput, params: SamplingParams) -> RequestOutput:
    """The small model's output with only the log-probabilities the caller asked for."""
    k = params.logprobs
    outputs = [dataclasses.replace(c, logprobs=None if k is None else [(t, lp, top[:k]) for t, lp, top in (c.logprobs or [])])
               for c in out.outputs]
    return dataclasses.replace(out, outputs=outputs)


def decide(rule: ConfidenceRule, small_out: RequestOutput, params: SamplingParams) -> CascadeOutput:
    """Score the small model's answer; a CascadeOutput keeping it, or marked ``large`` to defer."""
    conf = rule.confidence(small_out.outputs[0])
    kept = as_asked(small_out, params)
    return CascadeOutput(kept, "small" if rule.keeps(conf) else "large", conf, kept)


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers map text to the same ids (same vocabulary)."""
    if a is None or b is None:
        return a is b
    return a is b or a.get_vocab() == b.get_vocab()


class CascadeLLM:
    """Two ``LLM`` engines and a confidence rule. ``counters`` tally which model answered."""

    def __init__(self, small: Any, large: Any, rule: ConfidenceRule | None = None) -> None:
        self.small, self.large = small, large
        self.rule = rule or ConfidenceRule()
        self.counters = CascadeCounters()
        self.shared_tokenizer = same_tokenizer(small.tokenizer, large.tokenizer)

    @classmethod
    def from_models(cls, small: str | None, large: str | None, rule: ConfidenceRule | None = None,
                    **llm_kwargs: Any) -> CascadeLLM:
        """Build both engines with the same ``LLM`` options (the wiring of ``LLM(cascade=[small, large])``).
        On one GPU, give ``kv_cache_memory_fraction`` so the first engine leaves room for the second."""
        from flashserve.engine.llm import LLM

        return cls(LLM(small, **llm_kwargs), LLM(large, **llm_kwargs), rule)

    def _check_prompts(self, prompts: Sequence[Any]) -> None:
        if not self.shared_tokenizer and any(not isinstance(p, str) for p in prompts):
            raise ValueError("the cascade's models have different tokenizers, so token-id prompts would mean different "
                             "text to each; give text prompts")

    def generate(self, prompts: str | Sequence[str] | Sequence[list[int]], sampling_params: SamplingParams | None = None,
                 use_tqdm: bool = False, add_special_tokens: bool = True,
                 large_prompts: Sequence[Any] | None = None) -> list[CascadeOutput]:
        """Answer every prompt with the small model, re-answer the unsure ones with the large one.

        ``large_prompts`` (used by ``chat``) are the same requests in the large model's format."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        self._check_prompts(prompts)
        params = sampling_params or SamplingParams()
        params.validate()
        large_prompts = list(large_prompts) if large_prompts is not None else prompts
        if self.rule.threshold >= 1.0:
            results: list[CascadeOutput | None] = [None] * len(prompts)
        else:
            small_outs = self.small.generate(prompts, small_params(params, self.rule), use_tqdm, add_special_tokens)
            results = [decide(self.rule, o, params) for o in small_outs]
            self.counters.small_tokens += sum(_num_tokens(o) for o in small_outs)
        todo = [i for i, r in enumerate(results) if r is None or r.model == "large"]
        if todo:
            large_outs = self.large.generate([large_prompts[i] for i in todo], params, use_tqdm, add_special_tokens)
            self.counters.large_tokens += sum(_num_tokens(o) for o in large_outs)
            for i, out in zip(todo, large_outs):
                prev = results[i]
                results[i] = CascadeOutput(out, "large", prev.confidence if prev else None, prev.small_output if prev else None)
        final = [r for r in results if r is not None]
        self.counters.large += len(todo)
        self.counters.small += len(final) - len(todo)
        return final

    def chat(self, messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = False) -> list[CascadeOutput]:
        """Each model applies its own chat template to each conversation."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        small = [self.small.engine.apply_chat_template(c) for c in conversations]  # type: ignore[arg-type]
        large = [self.large.engine.apply_chat_template(c) for c in conversations]  # type: ignore[arg-type]
        return self.generate(small, sampling_params, use_tqdm, add_special_tokens=False, large_prompts=large)

    def fit_threshold(self, prompts: Sequence[Any], sampling_params: SamplingParams | None = None,
                      target_agreement: float = 0.9, add_special_tokens: bool = True) -> float:
        """Set (and return) the lowest threshold whose kept small answers agree with the large
        model's (same token ids) on at least ``target_agreement`` of the calibration prompts kept.
        Needs greedy decoding (so an answer is a function of the prompt) and a shared tokenizer."""
        params = sampling_params or SamplingParams(temperature=0.0, max_tokens=32)
        if not params.greedy:
            raise ValueError("fit the threshold with greedy decoding (temperature 0): sampled answers vary from run to run")
        if not self.shared_tokenizer:
            raise ValueError("fitting compares the two models' token ids, but the cascade's models have different tokenizers")
        if not 0.0 < target_agreement <= 1.0:
            raise ValueError(f"target_agreement must be in (0, 1], got {target_agreement}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("fit_threshold needs calibration prompts")
        small = self.small.generate(prompts, small_params(params, self.rule), False, add_special_tokens)
        large = self.large.generate(prompts, params, False, add_special_tokens)
        scored = sorted(((self.rule.confidence(s.outputs[0]), s.token_ids == g.token_ids) for s, g in zip(small, large)),
                        reverse=True)
        threshold, agree = 1.0, 0
        for n, (conf, same) in enumerate(scored, 1):  # keep the n most confident answers
            agree += same
            if agree / n >= target_agreement and (n == len(scored) or scored[n][0] < conf):
                threshold = conf
        self.rule = dataclasses.replace(self.rule, threshold=threshold)
        return threshold


async def cascade_generate(small: Any, large: Any, request_id: str, prompt: str | list[int], params: SamplingParams,
                           rule: ConfidenceRule, counters: CascadeCounters, add_special_tokens: bool = True) -> CascadeOutput:
    """Server side: answer one request through two ``AsyncLLMEngine``s (same tokenizer when the
    prompt is token ids). Raises what ``AsyncLLMEngine.generate`` raises."""
    result: CascadeOutput | None = None
    if rule.threshold < 1.0:
        final = None
        async for out in small.generate(f"{request_id}-small", prompt, small_params(params, rule), add_special_tokens):
            final = out
        assert final is not None and final.finished
        counters.small_tokens += _num_tokens(final)
        result = decide(rule, final, params)
        if result.model == "small":
            counters.small += 1
            return result
    final = None
    async for out in large.generate(f"{request_id}-large", prompt, params, add_special_tokens):
        final = out
    assert final is not None and final.finished
    counters.large_tokens += _num_tokens(final)
    counters.large += 1
    return CascadeOutput(final, "large", result.confidence if result else None, result.small_output if result else None)
