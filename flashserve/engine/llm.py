"""The offline Python API, shaped like vLLM's ``LLM``.

    llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    outs = llm.chat([{"role": "user", "content": "Hi"}])
    for piece in llm.stream("Once upon a time"): print(piece, end="")

    cascade = LLM(cascade="student-dir")          # small-then-large (flashserve.engine.cascade):
    out = cascade.generate(["Hi"])[0]             # a CascadeOutput: out.model is "small" or "large",
    out.output.outputs[0].text                    # out.output the RequestOutput of the model that answered
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from typing import Any

from flashserve.config import EngineArgs
from flashserve.engine.cascade import CascadeLLM, CascadeOutput, ConfidenceRule
from flashserve.engine.llm_engine import LLMEngine
from flashserve.request import RequestOutput
from flashserve.sampling_params import SamplingParams
from flashserve.spec.beam import BeamSearchParams

Messages = list[dict[str, Any]]


class LLM:
    """Owns one ``LLMEngine`` and runs it to completion for batches of prompts.

    Keywords are the fields of ``flashserve.config.EngineArgs`` (the same options as the CLI
    flags), e.g. ``LLM("model.gguf", max_num_seqs=64, device="cpu")``.

    ``cascade``: a small model that answers first, ``model`` being the large one
    (``LLM(large, cascade=small)``), or both as ``cascade=[small, large]``; ``cascade_rule`` (a
    ``ConfidenceRule``, default mean log-probability at 0.5) decides when the large model answers
    instead. Both engines are built with the same keywords. ``generate`` and ``chat`` then return
    ``CascadeOutput``s (``.model`` says which model answered, ``.output`` is its ``RequestOutput``)
    and ``stream`` refuses: the small answer must be complete before the rule can judge it.
    """

    def __init__(self, model: str | None = None, *, verbose: bool = True,
                 cascade: str | Sequence[str | None] | None = None, cascade_rule: ConfidenceRule | None = None,
                 **engine_args: Any) -> None:
        self.cascade: CascadeLLM | None = None
        if cascade is None:
            if cascade_rule is not None:
                raise ValueError("cascade_rule needs cascade (the small model that answers first)")
            args = EngineArgs.from_kwargs(model=model, **engine_args)
            self.engine = LLMEngine(args.engine_config(), verbose=verbose)
        else:
            small, large = cascade_models(model, cascade)
            if cascade_rule is not None and not isinstance(cascade_rule, ConfidenceRule):
                raise TypeError(f"cascade_rule must be a ConfidenceRule, got {type(cascade_rule).__name__}")
            self.cascade = CascadeLLM.from_models(small, large, cascade_rule, verbose=verbose, **engine_args)
            self.engine = self.cascade.large.engine  # the large model's: tokenizer, chat template, limits
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def _next_id(self) -> str:
        return f"llm-{next(self._ids)}"

    def add_lora(self, name: str, path: str) -> None:
        """Serve the PEFT LoRA adapter in folder ``path`` as ``name`` from now on (an engine started
        with ``max_loras``); ``SamplingParams(lora=name)`` picks it (``LLMEngine.add_lora``)."""
        self.engine.add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        """Stop serving LoRA adapter ``name`` and free its slot (``LLMEngine.remove_lora``)."""
        self.engine.remove_lora(name)

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_special_tokens: bool = True,
    ) -> list[RequestOutput] | list[CascadeOutput]:
        """Run every prompt to completion; outputs come back in the order of ``prompts``.

        Every prompt is validated before any is queued: one bad prompt raises ValueError naming
        its index, and nothing runs. With a cascade: ``CascadeOutput``s, one ``SamplingParams``.
        """
        if self.cascade is not None:
            return self.cascade.generate(prompts, self._one_params(sampling_params), use_tqdm, add_special_tokens)
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        encoded: list[list[int]] = []
        for i, (p, sp) in enumerate(zip(prompts, params_list)):
            try:
                sp.validate()
                if isinstance(p, str):
                    if not p:
                        raise ValueError("the prompt is empty; give at least one character")
                    ids = self.engine.encode(p, add_special_tokens)
                else:
                    ids = list(p)
                self.engine.validate_prompt(ids, sp)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
            encoded.append(ids)
        ids_in_order = []
        for p, ids, sp in zip(prompts, encoded, params_list):
            rid = self._next_id()
            self.engine.add_request(rid, p, sp, prompt_token_ids=ids, stream=False)
            ids_in_order.append(rid)
        finished = self._run(len(prompts), use_tqdm)
        return [finished[rid] for rid in ids_in_order]

    def beam_search(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]],
        params: BeamSearchParams,
        use_tqdm: bool = True,
        add_special_tokens: bool = True,
    ) -> list[RequestOutput]:
        """Beam search for every prompt (batched with each other); per prompt a RequestOutput
        whose ``outputs`` are the kept hypotheses, best first (``cumulative_logprob`` on each)."""
        if self.cascade is not None:
            raise ValueError("a cascade scores one answer per request; beam search keeps several, so it is not "
                             "available with cascade (use generate)")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        ids = []
        for i, p in enumerate(prompts):
            rid = self._next_id()
            try:
                self.engine.add_beam_request(rid, p, params, add_special_tokens)
            except ValueError as e:
                for done in ids:
                    self.engine.abort_request(done)
                raise ValueError(f"prompt {i}: {e}") from None
            ids.append(rid)
        finished = self._run(len(ids), use_tqdm)
        return [finished[rid] for rid in ids]

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput] | list[CascadeOutput]:
        """Apply the model's chat template to each conversation and generate a reply (with a
        cascade, each model applies its own template)."""
        if self.cascade is not None:
            return self.cascade.chat(messages, self._one_params(sampling_params), use_tqdm)
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.engine.apply_chat_template(conv) for conv in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm, add_special_tokens=False)

    def stream(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        add_special_tokens: bool = True,
    ) -> Iterator[str]:
        """Yield text increments of one request as they are produced."""
        if self.cascade is not None:
            raise ValueError("a cascade cannot stream: the small model's answer must be complete before the "
                             "confidence rule decides which model answers; use generate")
        rid = self._next_id()
        self.engine.add_request(rid, prompt, sampling_params, add_special_tokens)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        if out.outputs[0].text_delta:
                            yield out.outputs[0].text_delta
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)

    def stream_chat(self, messages: Messages, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        return self.stream(self.engine.apply_chat_template(messages), sampling_params, add_special_tokens=False)

    @staticmethod
    def _one_params(sampling_params: Any) -> SamplingParams | None:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            return sampling_params
        raise ValueError("a cascade takes one SamplingParams for all prompts (its confidence rule and counters are "
                         "per cascade), not a list")

    def _run(self, total: int, use_tqdm: bool) -> dict[str, RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="generate", unit="req", dynamic_ncols=True)
        start = time.perf_counter()
        gen_tokens = 0
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                gen_tokens += sum(c.num_new_tokens for c in out.outputs)
                if out.finished:
                    finished[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
            if bar is not None:
                elapsed = time.perf_counter() - start
                bar.set_postfix_str(f"{gen_tokens / max(elapsed, 1e-9):.1f} tok/s", refresh=False)
        if bar is not None:
            bar.close()
        return finished


def cascade_models(model: str | None, cascade: str | Sequence[str | None]) -> tuple[str | None, str | None]:
    """(small, large) from ``LLM``'s ``model`` and ``cascade`` keywords (None: the embedded model)."""
    if isinstance(cascade, str):
        return cascade, model
    if isinstance(cascade, Sequence) and len(cascade) == 2:
        if model is not None:
            raise ValueError("give the large model once: as model (with cascade=SMALL) or as cascade=[small, large]")
        return cascade[0], cascade[1]
    raise ValueError(f"cascade must be the small model (a path) or [small, large], got {cascade!r}")
