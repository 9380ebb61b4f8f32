"""Per-request decoding settings, validated once when the request is created.

Every invalid value raises ``ValueError`` naming the field, the value and the allowed range, so
a caller's mistake never reaches the engine loop: floats must be finite, integers fit the
sampler's tensors, lists are capped (the limit is named in the message). What only the model
knows (vocabulary size, context length) is checked by ``validate_for_model`` when the engine
accepts the request. Everything here is plain, picklable data (plans travel to worker
processes); a grammar travels as its source text and is compiled on the sampling side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_N = 128  # sequences per request (OpenAI's limit)
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # entries
MAX_LOGIT_BIAS_VALUE = 100.0  # OpenAI's range: [-100, 100]
MAX_TEMPERATURE = 100.0
GREEDY_TEMPERATURE = 1e-5  # below this, logits / temperature overflows: treated as greedy
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_LOGPROBS = 20
MAX_INT = 2**31 - 1  # top_k, max_tokens, min_tokens, priority: int32 on the device
MAX_SEED = 2**63
MAX_GRAMMAR_CHARS = 100_000
STRUCTURED_KINDS = ("json", "regex", "lark")


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text, compiled into a token mask by the sampling side
    (``flashserve.layers.logits_processors``).

    kind "json": ``spec`` is a JSON schema as text (``{"type": "object"}`` for any object);
    "regex": a regular expression the whole output must match; "lark": a Lark grammar."""

    kind: str
    spec: str

    def validate(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured_output kind must be one of {', '.join(STRUCTURED_KINDS)}, got {self.kind!r}")
        if not isinstance(self.spec, str) or not self.spec:
            raise ValueError("structured_output spec must be a non-empty string")
        if len(self.spec) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"structured_output spec has {len(self.spec)} characters; at most {MAX_GRAMMAR_CHARS} are allowed")


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, for one request.

    temperature 0 (or below 1e-5) means greedy. top_k -1 (or 0) disables top-k; top_p 1 and
    min_p 0 disable those filters. Penalties follow the OpenAI / vLLM conventions: presence and
    frequency penalties subtract from logits of tokens already generated; the repetition penalty
    divides positive logits (multiplies negative ones) of tokens seen in the prompt or the output.
    ``logit_bias`` adds to the logits of the given token ids (OpenAI's semantics);
    ``structured_output`` constrains the text to a JSON schema, a regex or a grammar.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    structured_output: StructuredOutput | None = None
    # Scheduling hints (used by the priority / shortest-job policies).
    priority: int = 0
    # Speculative decoding for this request: None = the engine's setting, 0 = off, k = at most k drafts.
    num_speculative_tokens: int | None = None
    # Attention of the layers the engine runs with full attention, for this request: None (the
    # engine's), or {"kind": "window", "window": W[, "dilation": D]} / {"kind": "sinks", "window": W,
    # "sinks": N} / {"kind": "full"}; parsed into an AttentionSpec (flashserve.layers.request_attention).
    attention: Any = None
    # LoRA adapter for this request: the name of one the engine serves (EngineArgs.lora_modules), or
    # None for the base model.
    lora: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None:
            self.logit_bias = dict(self.logit_bias) or None
        from flashserve.layers.request_attention import parse_request_attention

        self.attention = parse_request_attention(self.attention)
        self.validate()
        if self.temperature < GREEDY_TEMPERATURE:
            self.temperature = 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and its allowed range."""
        _int("n", self.n, 1, MAX_N)
        _float("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if _is_int(self.top_k) and self.top_k in (-1, 0):
            pass
        else:
            _int("top_k", self.top_k, 1, MAX_INT, hint="-1 or 0 (disabled) or ")
        _float("min_p", self.min_p, 0.0, 1.0)
        _float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _float("repetition_penalty", self.repetition_penalty, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
        if self.seed is not None:
            _int("seed", self.seed, -MAX_SEED, MAX_SEED - 1)
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens, 1, MAX_INT)
        _int("min_tokens", self.min_tokens, 0, MAX_INT)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        _int("priority", self.priority, -MAX_INT, MAX_INT)
        if self.lora is not None and (not isinstance(self.lora, str) or not self.lora):
            raise ValueError(f"lora must be the name of a served LoRA adapter or None, got {self.lora!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError("stop strings must be non-empty strings")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop strings may have at most {MAX_STOP_STRING_CHARS} characters, got {len(s)}")
            check_text("stop", s)
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids has {len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed")
        for t in self.stop_token_ids:
            _int("stop_token_ids", t, 0, MAX_INT, item=True)
        if self.logit_bias is not None:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS} are allowed")
            for token, bias in self.logit_bias.items():
                _int("logit_bias", token, 0, MAX_INT, item=True)
                _float("logit_bias", bias, -MAX_LOGIT_BIAS_VALUE, MAX_LOGIT_BIAS_VALUE, item=True)
        if self.structured_output is not None:
            if not isinstance(self.structured_output, StructuredOutput):
                raise ValueError("structured_output must be a StructuredOutput")
            self.structured_output.validate()
            if self.ignore_eos:
                raise ValueError("ignore_eos cannot be combined with structured output (the grammar ends with EOS)")
            if self.min_tokens:
                raise ValueError("min_tokens cannot be combined with structured output (the grammar decides the length)")
        if self.num_speculative_tokens is not None and (
                not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 0):
            raise ValueError(f"num_speculative_tokens must be None (the engine's setting) or an integer >= 0, "
                             f"got {self.num_speculative_tokens!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalty(self) -> bool:
        """A repetition, presence or frequency penalty applies (the sampler keeps token counts)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def plain_greedy(self) -> bool:
        """Sampled by the argmax alone: greedy, without penalties, min_tokens, logit bias, grammar
        or logprobs (``Sampler.greedy`` gives such a row the token ``Sampler.__call__`` would)."""
        return (self.greedy and not self.has_penalty and self.min_tokens == 0 and not self.logit_bias
                and self.structured_output is None and self.logprobs is None)


def validate_for_model(params: SamplingParams, num_prompt_tokens: int, vocab_size: int, max_model_len: int) -> None:
    """What only the engine can check: token ids inside the vocabulary, and the prompt plus
    ``max_tokens`` (or ``min_tokens``) inside the context. Raises ValueError naming the numbers."""
    for t in params.stop_token_ids:
        if t >= vocab_size:
            raise ValueError(f"stop_token_ids: token id {t} is outside the vocabulary [0, {vocab_size})")
    for t in params.logit_bias or {}:
        if t >= vocab_size:
            raise ValueError(f"logit_bias: token id {t} is outside the vocabulary [0, {vocab_size})")
    for name, value in (("max_tokens", params.max_tokens), ("min_tokens", params.min_tokens)):
        if value and num_prompt_tokens + value > max_model_len:
            raise ValueError(
                f"{name}: the model's context is {max_model_len} tokens, but {num_prompt_tokens + value} were asked for "
                f"({num_prompt_tokens} in the prompt + {name} {value}); shorten the prompt or lower {name} "
                f"to at most {max(0, max_model_len - num_prompt_tokens)}"
            )


def check_text(name: str, text: str) -> None:
    """Refuse text that cannot be encoded (a lone UTF-16 surrogate such as ``"\\ud800"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} contains an invalid character at position {e.start} "
                         f"(a lone surrogate {text[e.start]!a}); send valid Unicode") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(name: str, value: object, low: int, high: int, hint: str = "", item: bool = False) -> None:
    what = f"{name} entries" if item else name
    if not _is_int(value) or not low <= value <= high:  # type: ignore[operator]
        raise ValueError(f"{what} must be {hint}an integer in [{low}, {high}], got {value!r}")


def _float(name: str, value: object, low: float, high: float, low_open: bool = False, item: bool = False) -> None:
    what = f"{name} values" if item else name
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (low < value if low_open else low <= value) and value <= high  # type: ignore[operator]
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{what} must be a finite number in {interval}, got {value!r}")
