"""The offline Python API, shaped like vLLM's ``LLM``.

    llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    outs = llm.chat([{"role": "user", "content": "Hi"}])
    for piece in llm.stream("Once upon a time"): print(piece, end="")
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from typing import Any

from flashserve.config import EngineArgs
from flashserve.engine.llm_engine import LLMEngine
from flashserve.request import RequestOutput
from flashserve.sampling_params import SamplingParams
from flashserve.spec.beam import BeamSearchParams

Messages = list[dict[str, Any]]


class LLM:
    """Owns one ``LLMEngine`` and runs it to completion for batches of prompts.

    Keywords are the fields of ``flashserve.config.EngineArgs`` (the same options as the CLI
    flags), e.g. ``LLM("model.gguf", max_num_seqs=64, device="cpu")``.
    """

    def __init__(self, model: str | None = None, *, verbose: bool = True, **engine_args: Any) -> None:
        args = EngineArgs.from_kwargs(model=model, **engine_args)
        self.engine = LLMEngine(args.engine_config(), verbose=verbose)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def _next_id(self) -> str:
        return f"llm-{next(self._ids)}"

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_special_tokens: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of ``prompts``.

        Every prompt is validated before any is queued: one bad prompt raises ValueError naming
        its index, and nothing runs.
        """
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
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and generate a reply."""
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
