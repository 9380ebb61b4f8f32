"""Serving a cascade (``flashserve serve --cascade SMALL``): the small model answers each request
first, and the large one (``--model``) re-answers when the confidence rule rejects the small answer
(flashserve.engine.cascade).

Limits, each refused with a 400 naming it: no streaming (the small answer must be complete before
the rule can judge it, so there is nothing to stream early), one prompt and one choice (``n = 1``)
per request (the rule scores one answer). The two models must share a vocabulary (checked at
start): the prompt is tokenized and templated once, with the large model's tokenizer, on the
front-end thread. The response's ``model`` names the model that answered and an extra
``cascade`` object gives the small model's confidence; /metrics counts both models' answers and
tokens (``ServerMetrics.add_cascade``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from flashserve.engine.async_engine import AsyncLLMEngine, EngineOverloaded
from flashserve.engine.cascade import CascadeCounters, CascadeOutput, ConfidenceRule, cascade_generate
from flashserve.sampling_params import SamplingParams
from flashserve.server.errors import APIError
from flashserve.server.metrics import ServerMetrics
from flashserve.server.streaming import _ENGINE_ERRORS, _until_disconnect, engine_error


@dataclass
class ServedCascade:
    """The small model's engine, the rule, and the counters /metrics reads."""

    small: AsyncLLMEngine
    rule: ConfidenceRule
    counters: CascadeCounters = field(default_factory=CascadeCounters)

    @property
    def small_name(self) -> str:
        return self.small.model_name

    def check(self, stream: bool, num_prompts: int, n: int) -> None:
        """Refuse what a cascade cannot answer (400 naming the limit)."""
        if stream:
            raise APIError(400, "stream is not supported by this server's cascade: the small model's answer must be "
                                "complete before the confidence rule decides which model answers; send stream=false",
                           param="stream")
        if num_prompts != 1:
            raise APIError(400, f"this server's cascade answers one prompt per request, got {num_prompts}", param="prompt")
        if n != 1:
            raise APIError(400, f"this server's cascade scores one answer per request; n must be 1, got {n}", param="n")

    async def answer(self, large: AsyncLLMEngine, request: Request, request_id: str, prompt_ids: list[int],
                     params: SamplingParams, metrics: ServerMetrics) -> CascadeOutput:
        """One request through both engines; a client that leaves aborts the model running."""
        t0 = time.monotonic()
        try:
            out: CascadeOutput = await _until_disconnect(request, cascade_generate(
                self.small, large, request_id, prompt_ids, params, self.rule, self.counters, add_special_tokens=False))
        except (ValueError, EngineOverloaded, *_ENGINE_ERRORS) as e:
            if isinstance(e, EngineOverloaded):
                metrics.count_rejected()
            raise engine_error(e) from None
        except APIError:
            metrics.observe_finished("abort", None, None, None)
            raise
        metrics.observe_finished(out.output.outputs[0].finish_reason or "stop", None, None, time.monotonic() - t0)
        return out

    def describe(self, out: CascadeOutput, large_name: str) -> tuple[str, dict[str, Any]]:
        """The response's ``model`` field and its ``cascade`` object."""
        name = self.small_name if out.model == "small" else large_name
        return name, {"model": out.model, "confidence": out.confidence, "rule": self.rule.kind,
                      "threshold": self.rule.threshold}
