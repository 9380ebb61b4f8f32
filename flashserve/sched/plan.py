"""Plain-data contracts between the scheduler and the runner.

A step gives each scheduled request N new tokens to compute (a prompt chunk, one decode token,
or more). The plan holds only ints, lists and the request's SamplingParams, so it pickles
cheaply to tensor-parallel workers and the runner never reaches into scheduler state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flashserve.sampling_params import SamplingParams


@dataclass
class ScheduledRequest:
    """One request's work in one step."""

    request_id: str
    token_ids: list[int]  # the new tokens whose K/V this step computes
    start_pos: int  # position of token_ids[0] (= tokens already in the cache)
    block_ids: list[int]  # the request's whole block table after allocation
    sample: bool  # True when this step reaches the end of the known tokens: sample the next
    params: SamplingParams
    # Token history, needed only for penalties (references, not copies).
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seq_len(self) -> int:
        """Tokens in context after this step."""
        return self.start_pos + len(self.token_ids)


@dataclass
class BlockCopy:
    """Host <-> device block moves for swap preemption, executed by the runner before the step."""

    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block)
    copy: list[tuple[int, int]] = field(default_factory=list)  # (src device block, dst device block)

    def __bool__(self) -> bool:
        return bool(self.swap_out or self.swap_in or self.copy)


@dataclass
class SchedulerOutput:
    """Everything the runner needs for one step."""

    requests: list[ScheduledRequest]
    block_copies: BlockCopy = field(default_factory=BlockCopy)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(r.num_new_tokens for r in self.requests)

    @property
    def is_empty(self) -> bool:
        return not self.requests and not self.block_copies


@dataclass
class SampledToken:
    """The runner's answer for one request that sampled this step."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class RunnerOutput:
    """Sampled tokens keyed by request id (only requests with ``sample=True``)."""

    sampled: dict[str, SampledToken]
