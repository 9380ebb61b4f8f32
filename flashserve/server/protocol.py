"""Request bodies of the OpenAI-compatible API (pydantic models) and their mapping to SamplingParams.

A field either works or is refused: unknown fields are ignored (clients send extras freely), but
the OpenAI fields that would change the output and that this server does not implement
(``functions``, ``audio``, ``prediction``, ``best_of`` other than n, ...) get a 400 naming the
field. Type errors surface as pydantic validation errors (answered with 400); value errors
(ranges, list limits) come from ``SamplingParams.validate`` and name the field and the limit.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flashserve.sampling_params import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS, SamplingParams, StructuredOutput
from flashserve.spec.beam import BeamSearchParams
from flashserve.server.tools import ToolPlan, plan_tools

# Fields that would change the output but are not implemented here: refused, never ignored.
_UNSUPPORTED = ("functions", "function_call", "audio", "prediction", "web_search_options")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def structured(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutput("json", '{"type": "object"}')
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise ValueError("response_format: type 'json_schema' needs json_schema.schema")
        return StructuredOutput("json", json.dumps(self.json_schema.schema_))


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    response_format: ResponseFormat | None = None
    user: str | None = None
    # vLLM's extras: beam search (n beams, the best first) and speculation per request.
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    num_speculative_tokens: int | None = None
    # flashserve's extra: this request's attention, e.g. {"kind": "window", "window": 1024}
    # (flashserve.layers.request_attention; validated by SamplingParams)
    attention: dict[str, Any] | None = None

    def check_unsupported(self) -> None:
        """400 for fields this server would otherwise silently ignore."""
        extra = self.model_extra or {}
        for name in _UNSUPPORTED:
            if extra.get(name) is not None:
                raise ValueError(f"{name} is not supported by this server")
        modalities = extra.get("modalities")
        if modalities is not None and modalities != ["text"]:
            raise ValueError("modalities: only ['text'] is supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")

    def _logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        out: dict[int, float] = {}
        for key, value in self.logit_bias.items():
            try:
                out[int(key)] = value
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids (integers as strings), got {key!r}") from None
        return out

    def _params(self, max_tokens: int | None, logprobs: int | None,
                structured: StructuredOutput | None) -> SamplingParams | BeamSearchParams:
        """Build SamplingParams (BeamSearchParams with ``use_beam_search``); raises ValueError
        naming the bad field."""
        self.check_unsupported()
        if self.use_beam_search:
            if self.stream:
                raise ValueError("use_beam_search does not stream; set stream to false")
            if structured is not None or self.logit_bias or self.attention is not None:
                raise ValueError("use_beam_search cannot be combined with response_format, logit_bias or attention")
            return BeamSearchParams(beam_width=self.n, max_tokens=max_tokens or 16, length_penalty=self.length_penalty,
                                    early_stopping=self.early_stopping, ignore_eos=self.ignore_eos)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias=self._logit_bias(),
            structured_output=structured,
            num_speculative_tokens=self.num_speculative_tokens,
            attention=self.attention,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def sampling_params(self) -> SamplingParams:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of is not supported (only best_of == n, got best_of {self.best_of} and n {self.n})")
        structured = self.response_format.structured() if self.response_format is not None else None
        return self._params(self.max_tokens, self.logprobs, structured)

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: one string, several strings, token ids or lists of them."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt is empty; give a string, a list of strings or token ids")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def as_template_message(self, index: int) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages.{index}.content.{j}: only text parts are supported, "
                                     f"got type {part.get('type')!r}")
                texts.append(part["text"])
            content = "".join(texts)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def tool_plan(self) -> ToolPlan | None:
        if not self.tools:
            if self.tool_choice not in (None, "none"):
                raise ValueError("tool_choice needs tools")
            return None
        return plan_tools(self.tools, self.tool_choice, self.parallel_tool_calls)

    def sampling_params(self, tool_plan: ToolPlan | None = None) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        structured = self.response_format.structured() if self.response_format is not None else None
        if tool_plan is not None:
            if structured is not None:
                raise ValueError("response_format cannot be combined with tool calls (tool_choice 'required' or a function)")
            structured = tool_plan.structured
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None, structured)

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.as_template_message(i) for i, m in enumerate(self.messages)]


class LoadLoRAAdapterRequest(BaseModel):
    """``POST /v1/load_lora_adapter``: serve the PEFT adapter folder ``lora_path`` (on the server's
    machine) as the model ``lora_name``."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(BaseModel):
    """``POST /v1/unload_lora_adapter``: stop serving the adapter ``lora_name``."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=256)
