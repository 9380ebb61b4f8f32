"""A request's state inside the engine, and what the engine hands back to callers."""

from __future__ import annotations

import enum
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from flashserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """``status.finished``: a plain attribute of each member (read several times per request and
    step: an enum property with a set lookup cost ~0.2 ms a step at 256 running requests)."""

    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED_STOPPED = "stop"  # EOS, stop token id or stop string
    FINISHED_LENGTH = "length"  # max_tokens or the model's context
    FINISHED_ABORTED = "abort"

    finished: bool


for _status in RequestStatus:
    _status.finished = _status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                                   RequestStatus.FINISHED_ABORTED)


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic seconds) and the latency figures derived from them."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    def time_per_output_token(self, num_output_tokens: int) -> float | None:
        """Mean decode interval after the first token (None with fewer than two tokens)."""
        if self.first_token_time is None or self.finished_time is None or num_output_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (num_output_tokens - 1)

    @property
    def e2e_latency(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


class TokenView(Sequence):
    """Read-only concatenation of a prompt and an output list, without copying them."""

    __slots__ = ("prompt", "output")

    def __init__(self, prompt: list[int], output: list[int]) -> None:
        self.prompt = prompt
        self.output = output

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    def __getitem__(self, index):
        n = len(self.prompt)
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return (self.prompt + self.output)[index]
            if stop <= n:
                return self.prompt[start:stop]
            if start >= n:
                return self.output[start - n : stop - n]
            return self.prompt[start:] + self.output[: stop - n]
        if index < 0:
            index += len(self)
        return self.prompt[index] if index < n else self.output[index - n]


@functools.lru_cache(maxsize=64)
def _eos_set(eos: tuple[int, ...]) -> frozenset[int]:
    """One shared set per EOS tuple: a request without stop ids shares it with the others (the
    per-token stop check then reads one warm object instead of one set per request)."""
    return frozenset(eos)


@dataclass(eq=False)
class Request:
    """One sequence being generated. Token ids are the truth; text is derived by the detokenizer.
    Equal only to itself (``eq=False``): finding one in a queue is an identity scan, not a compare
    of every field with each request before it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: list[int]
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Per output token: (logprob of the sampled token, [(token id, logprob)] top-n) when asked.
    output_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    # Tokens whose K/V is in the cache or being computed by a step already planned.
    num_computed_tokens: int = 0
    # Tokens sampled by planned steps whose values have not come back yet (overlapped loop).
    num_pending_tokens: int = 0
    # The step in flight decides this request's next step (speculative drafts, beam forks): plan
    # nothing for it until its result is back. Set by the scheduler, cleared by its update.
    awaiting_result: bool = False
    # Every step waits for its result before the next is planned (beam search).
    synchronous: bool = False
    # Which load of its LoRA adapter (params.lora) this request uses (LLMEngine.add_lora): adapters
    # loaded again under a name share no cached K/V with the ones before
    lora_load: int = 0
    stop_reason: int | str | None = None
    metrics: RequestMetrics = field(init=False)
    # Token ids that end the sequence (EOS unless ignore_eos, and stop_token_ids), fixed at creation
    # so the stop check of each new token is one set lookup.
    stop_token_set: frozenset[int] = field(init=False, repr=False)
    # ``params.max_tokens``, infinity without one, and the prompt's length: fixed at creation, so
    # the per-step checks read them without touching the params or the prompt list.
    max_output_tokens: float = field(init=False, repr=False)
    num_prompt_tokens: int = field(init=False, repr=False)
    # (arrival_time, request_id), made once: first-come-first-served order sorts by it without
    # building a tuple per request per step
    arrival_key: tuple[float, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        eos = () if self.params.ignore_eos else tuple(self.eos_token_ids)
        stop_ids = self.params.stop_token_ids
        self.stop_token_set = frozenset(eos).union(stop_ids) if stop_ids else _eos_set(eos)
        max_tokens = self.params.max_tokens
        self.max_output_tokens = float("inf") if max_tokens is None else max_tokens
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.arrival_key = (self.arrival_time, self.request_id)

    @property
    def prefix_salt(self) -> list[int] | None:
        """Tokens that start this request's prefix-cache hash chain (its attention option's and its
        LoRA adapter's: both change its K/V), or None."""
        from flashserve.layers.request_attention import prefix_salt

        salt = prefix_salt(self.params.attention)
        if self.params.lora is not None:
            salt = (salt or []) + [-2000, self.lora_load, *self.params.lora.encode()]
        return salt

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt and output tokens whose values are known (pending ones excluded), as a new list."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def known_tokens(self) -> TokenView:
        """The same tokens as ``all_token_ids`` as a view: slicing copies only the slice."""
        return TokenView(self.prompt_token_ids, self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt, output and pending tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, pending ones included."""
        return len(self.output_token_ids) + self.num_pending_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished


@dataclass
class CompletionOutput:
    """One generated sequence (``n`` > 1 gives several per request)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None
    # Per token: (token id, logprob, [(top token id, logprob), ...]) when logprobs were asked for.
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    text_delta: str = ""  # text added since the previous output of a stream
    num_new_tokens: int = 0  # tokens added since the previous output of a stream
    cumulative_logprob: float | None = None  # beam search: the sequence's summed log-probability


@dataclass
class RequestOutput:
    """What ``LLM.generate`` returns per prompt, and what a stream yields per step."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
