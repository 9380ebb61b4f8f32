"""The contract between EngineCore and a Worker: an immutable, incremental step plan.

A Worker keeps every running request's state (its tokens, block table, sampling settings and
penalty counts) from one step to the next, so a plan carries only what changed:

* ``NewRequest``: a request the Worker does not hold yet (first scheduled, or resumed after a
  preemption): its prompt, the tokens it generated before any preemption, its SamplingParams.
* ``ScheduledRequest``: per request per step, the position of its first new token
  (``start_pos``, = tokens whose K/V is already in the cache), how many tokens to compute
  (a prompt chunk, 1 decode token, or 1 + k speculative tokens, ``num_spec_tokens`` = k of them
  drafted by the Worker), the block ids appended to its table this step (the whole table for a
  new request), and whether to sample after them. The
  token ids themselves are never sent: the Worker knows the prompt and outputs, including the
  token it sampled in the step still in flight (overlapped scheduling).
* ``DecodeBatch``: the running requests that each decode one token, when the scheduler claims
  them at once: the same work as their ``ScheduledRequest``s, as columns (request ids, start
  positions, appended block ids), ahead of the per-request entries in the batch. A multi-step
  batch (``num_steps`` > 1) asks for that many model steps in a row, each decoding one token per
  row from the token the step before sampled, with no host turn in between.
* ``finished_ids``: requests that left the engine (stopped, aborted) or were preempted since the
  previous plan: the Worker drops their state.

Everything is immutable plain data (named tuples of ints, tuples, strings and SamplingParams;
named tuples because hundreds are built per step; a ``DecodeBatch``'s read-only numpy columns),
so a plan pickles in microseconds to a Worker in another process. The Worker answers with a
``WorkerOutput``: the tokens each sampling request got this step (a list, so speculation can
accept several), or for a plain step one token per sampling row, in plan order (for a multi-step
batch, each row's tokens in turn).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from flashserve.sampling_params import SamplingParams


class NewRequest(NamedTuple):
    """Everything the Worker keeps for a request, sent once when it (re)enters the running set."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]  # generated before a preemption; () for a fresh request
    params: SamplingParams


class ScheduledRequest(NamedTuple):
    """One request's work in one step."""

    request_id: str
    start_pos: int  # position of the first new token (= tokens already in the cache)
    num_new_tokens: int
    new_block_ids: tuple[int, ...]  # appended to the request's block table before the step
    sample: bool  # True when this step reaches the end of the known tokens: sample the next
    # Models with several groups of layers (flashserve.cache.kv_groups): the ids appended to the
    # tables of groups 1, 2, ... (group 0's are ``new_block_ids``); -1 marks a released block.
    group_block_ids: tuple[tuple[int, ...], ...] = ()
    # Of num_new_tokens, slots reserved for draft tokens the Worker proposes and verifies
    # (speculative decoding; the Worker may use fewer). 0 for a plain step.
    num_spec_tokens: int = 0

    @property
    def seq_len(self) -> int:
        """Tokens in context after this step."""
        return self.start_pos + self.num_new_tokens


@dataclass(frozen=True, slots=True, eq=False)
class DecodeBatch:
    """Running requests that each compute one token, at ``start_pos``, and sample the next,
    claimed at once (``Scheduler._claim_decodes``): their plan entries as columns, so neither side
    makes or reads an entry per request. They lead the step's batch, in this order, ahead of
    ``SchedulerOutput.requests``. ``block_rows`` (ascending) and ``block_ids``: the ids appended
    to their block tables, each with its request's index in ``request_ids``, in table order;
    ``group_block_ids``: the ids appended at the same columns of each other group's table
    (``flashserve.cache.kv_groups``; empty with one table).

    Multi-step (``num_steps`` > 1, the plan's only work): model step j decodes position
    ``start_pos + j`` of every row from the token step j - 1 sampled, for the first ``lens[i]``
    steps of row i (a row's tokens stop short at its ``max_tokens`` or the context); the Worker
    answers with each row's ``lens[i]`` tokens."""

    request_ids: tuple[str, ...]
    start_pos: np.ndarray  # [n] int64
    block_rows: np.ndarray  # [m] int64
    block_ids: np.ndarray  # [m] int64
    num_steps: int = 1
    lens: np.ndarray | None = None  # [n] int64 in [1, num_steps]: tokens each row decodes (multi-step only)
    group_block_ids: tuple[np.ndarray, ...] = ()  # per other group: [m] int64

    def __post_init__(self) -> None:
        if (self.lens is None) != (self.num_steps == 1):
            raise ValueError("a decode batch has lens exactly when it has several model steps")
        if any(len(ids) != len(self.block_ids) for ids in self.group_block_ids):
            raise ValueError("every group's new block ids pair with block_ids")
        for column in (self.start_pos, self.block_rows, self.block_ids, self.lens, *self.group_block_ids):
            if column is not None:
                column.flags.writeable = False

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens the batch computes over all its model steps."""
        return len(self.request_ids) if self.lens is None else int(self.lens.sum())

    def entries(self) -> tuple[ScheduledRequest, ...]:
        """The same work as one ``ScheduledRequest`` per request (a one-step batch's)."""
        if self.num_steps > 1:
            raise ValueError("a multi-step decode batch has no per-request entries")
        rows = self.block_rows.tolist()

        def per_request(ids: np.ndarray) -> list[tuple[int, ...]]:
            out: list[list[int]] = [[] for _ in self.request_ids]
            for row, block in zip(rows, ids.tolist()):
                out[row].append(block)
            return list(map(tuple, out))

        new_ids = per_request(self.block_ids)
        groups = list(zip(*map(per_request, self.group_block_ids))) if self.group_block_ids else [()] * len(new_ids)
        return tuple(ScheduledRequest(rid, start, 1, ids, True, group_block_ids=g)
                     for rid, start, ids, g in zip(self.request_ids, self.start_pos.tolist(), new_ids, groups))


@dataclass(frozen=True, slots=True)
class BlockCopy:
    """Block moves executed by the Worker before the step: saves of evicted prefix blocks to the
    host tier, device -> device copies of forked beams' last blocks, then host <-> device moves
    for swap preemption and host-tier prefix hits (``flashserve.cache.host_tier``)."""

    swap_out: tuple[tuple[int, int], ...] = ()  # (device block, host block)
    swap_in: tuple[tuple[int, int], ...] = ()  # (host block, device block)
    copy: tuple[tuple[int, int], ...] = ()  # (device block, device block)
    host_save: tuple[tuple[int, int], ...] = ()  # (device block, host block), before anything else

    def __bool__(self) -> bool:
        return bool(self.swap_out or self.swap_in or self.copy or self.host_save)


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """One step's plan."""

    step_id: int
    requests: tuple[ScheduledRequest, ...]  # in batch order
    new_requests: tuple[NewRequest, ...] = ()
    finished_ids: tuple[str, ...] = ()  # drop these requests' Worker state (before this step)
    preempted_ids: tuple[str, ...] = ()  # preempted this step (also listed in finished_ids)
    block_copies: BlockCopy = field(default_factory=BlockCopy)
    decodes: DecodeBatch | None = None  # decodes claimed at once: they come before ``requests``

    @property
    def num_seqs(self) -> int:
        return len(self.requests) + (len(self.decodes) if self.decodes is not None else 0)

    @property
    def num_tokens(self) -> int:
        return sum(r.num_new_tokens for r in self.requests) + (self.decodes.num_tokens if self.decodes is not None else 0)

    @property
    def entries(self) -> tuple[ScheduledRequest, ...]:
        """Every sequence's work as a ``ScheduledRequest``, in batch order (``decodes`` first)."""
        return self.requests if self.decodes is None else self.decodes.entries() + self.requests

    @property
    def is_empty(self) -> bool:
        return not self.requests and self.decodes is None and not self.block_copies and not self.finished_ids


class SampledTokens(NamedTuple):
    """What one sampling request got in one step."""

    token_ids: tuple[int, ...]
    # Per token, when logprobs were asked for: (logprob of the token, ((top id, logprob), ...)).
    logprobs: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] | None = None
    num_draft_tokens: int = 0  # drafts the Worker verified for it (token_ids - 1 of them were accepted)


class StepCost(NamedTuple):
    """Measured device time of one step (reported by a Worker that speculates, for the off-switch)."""

    num_tokens: int  # tokens the target computed
    num_seqs: int
    forward_s: float  # target forward, sampling and verification
    draft_s: float  # proposing drafts
    loaded_kernels: bool = False  # a kernel was compiled or loaded during the step: its times do not recur


@dataclass(frozen=True, slots=True)
class WorkerOutput:
    """The Worker's answer to one plan: sampled tokens keyed by request id, or, for a plain step
    (every sampling row took one token, without logprobs or drafts), ``tokens``: one token per
    sampling row in plan order (``sampled`` is empty then), so nothing is built per row; for a
    multi-step decode batch, row i's ``lens[i]`` tokens, row after row (and, when a row asked for
    logprobs, ``sampled`` too, for them)."""

    step_id: int
    sampled: dict[str, SampledTokens]
    cost: StepCost | None = None
    tokens: list[int] | None = None
