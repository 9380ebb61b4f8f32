"""Scheduling policies: the order in which requests get service, and who is preempted first.

A policy only ranks requests (lower ``sort_key`` = served first, preempted last). The scheduler
asks it for the running set's order (the lowest-ranked running request is the first preemption
victim), for the admission order of waiting and swapped requests, and whether a waiting
request outranks a running one (then the running one may be preempted to make room), so
``Scheduler.schedule`` itself has no policy branches. Stateful policies learn what happened
through three hooks: ``begin_step`` (once per step, with every unfinished request),
``on_scheduled`` (once per scheduled request per step) and ``on_finished``.

Policies
--------
* ``fcfs``: arrival order.
* ``priority``: ``SamplingParams.priority``, lower value served first (vLLM's convention), ties
  by arrival.
* ``sjf``: shortest predicted *remaining* job first (SRPT with ``max_tokens`` as the
  prediction): output tokens still to generate (``max_tokens`` minus those generated, one step
  each) plus the tokens still to prefill, weighted by ``prefill_weight`` steps per token (a
  prefill token is far cheaper than a decode step). Service only lowers a job's key, so a
  running job only moves up and a nearly finished one is never preempted for a newcomer; a
  recompute preemption raises it (its KV must be prefilled again). ``remaining=False``: the
  static total size. Ties by arrival.
* ``mlfq``: skip-join multi-level feedback queue after FastServe (Wu et al., 2023). Level ``i``
  has quantum ``base_quantum * 2**i`` service units; a step in which a request runs costs
  ``max(1, new_tokens / prefill_tokens_per_unit)`` units (a decode step is 1 unit, a prefill
  chunk is charged by its length). A new job *skips* to the first level whose quantum covers
  its first iteration (its prompt), instead of always entering the top level; it is demoted
  one level when it has used its level's quantum. Starvation guard: a request that has not
  been served for ``starvation_steps`` steps is promoted to the top level. Within a level:
  arrival order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from operator import attrgetter

from flashserve.request import Request


class SchedulingPolicy:
    """Ranks requests; lower sort key = served first, preempted last."""

    name = "abstract"

    def sort_key(self, request: Request) -> tuple:
        raise NotImplementedError

    def order(self, requests: list[Request]) -> list[Request]:
        """Requests in service order (a new list; Python's sort is stable, so ties keep their order)."""
        return sorted(requests, key=self.sort_key)

    def outranks(self, a: Request, b: Request) -> bool:
        """True when ``a`` should be served strictly before ``b``."""
        return self.sort_key(a) < self.sort_key(b)

    def begin_step(self, requests: Iterable[Request]) -> None:
        """Hook called once at the start of each step with every unfinished request (a view of the
        scheduler's requests: iterate it, keep no reference)."""

    def on_scheduled(self, request: Request, num_tokens: int) -> None:
        """Hook for stateful policies (e.g. MLFQ quanta); called once per request per step."""

    def on_scheduled_each(self, requests: list[Request], num_tokens: int) -> None:
        """``on_scheduled`` for each of ``requests`` (``num_tokens`` each); nothing when the
        policy does not override it (it keeps no per-request state)."""
        if type(self).on_scheduled is not SchedulingPolicy.on_scheduled:
            for request in requests:
                self.on_scheduled(request, num_tokens)

    def on_finished(self, request: Request) -> None:
        """Hook called when a request leaves the scheduler (to drop per-request state)."""


class FCFSPolicy(SchedulingPolicy):
    """First come, first served: by arrival time, then by id for exact ties."""

    name = "fcfs"

    # (arrival_time, request_id), the tuple each request keeps (``Request.arrival_key``): sorting
    # the running set each step calls no Python function and makes no tuple per request
    sort_key = staticmethod(attrgetter("arrival_key"))


class PriorityPolicy(SchedulingPolicy):
    """``SamplingParams.priority``: lower value first; ties by arrival, then id."""

    name = "priority"

    sort_key = staticmethod(attrgetter("params.priority", "arrival_time", "request_id"))


class SJFPolicy(SchedulingPolicy):
    """Shortest predicted job first (prediction: ``max_tokens`` plus weighted prompt length)."""

    name = "sjf"

    def __init__(self, prefill_weight: float = 1 / 64, default_max_tokens: int = 1 << 20,
                 remaining: bool = True) -> None:
        self.prefill_weight = prefill_weight
        self.default_max_tokens = default_max_tokens
        self.remaining = remaining

    def predicted_cost(self, request: Request) -> float:
        max_tokens = request.params.max_tokens or self.default_max_tokens
        if not self.remaining:
            return max_tokens + self.prefill_weight * request.num_prompt_tokens
        # Shortest *remaining* work: outputs still to generate plus tokens still to prefill.
        to_prefill = max(0, request.num_tokens - request.num_computed_tokens - 1)
        return max_tokens - request.num_output_tokens + self.prefill_weight * to_prefill

    def sort_key(self, request: Request) -> tuple:
        return (self.predicted_cost(request), request.arrival_time, request.request_id)


@dataclass
class MLFQState:
    """Per-request MLFQ bookkeeping."""

    level: int
    attained: float = 0.0  # service units used at the current level
    last_served: int = 0  # step number of the last service (or of arrival)


class MLFQPolicy(SchedulingPolicy):
    """Skip-join multi-level feedback queue with demotion and a starvation guard (FastServe)."""

    name = "mlfq"

    def __init__(self, num_levels: int = 6, base_quantum: float = 16.0, prefill_tokens_per_unit: int = 64,
                 starvation_steps: int = 64) -> None:
        self.num_levels = num_levels
        self.base_quantum = base_quantum
        self.prefill_tokens_per_unit = prefill_tokens_per_unit
        self.starvation_steps = starvation_steps
        self.step = 0
        self.states: dict[str, MLFQState] = {}
        self.num_promotions = 0

    def quantum(self, level: int) -> float:
        return self.base_quantum * (2**level)

    def cost(self, num_tokens: int) -> float:
        return max(1.0, num_tokens / self.prefill_tokens_per_unit)

    def entry_level(self, request: Request) -> int:
        """Skip-join: the first level whose quantum covers the first iteration (the prompt)."""
        first = self.cost(request.num_prompt_tokens)
        for level in range(self.num_levels):
            if first <= self.quantum(level):
                return level
        return self.num_levels - 1

    def state(self, request: Request) -> MLFQState:
        st = self.states.get(request.request_id)
        if st is None:
            st = self.states[request.request_id] = MLFQState(self.entry_level(request), last_served=self.step)
        return st

    def sort_key(self, request: Request) -> tuple:
        return (self.state(request).level, request.arrival_time, request.request_id)

    def begin_step(self, requests: Iterable[Request]) -> None:
        self.step += 1
        for request in requests:
            st = self.state(request)
            if st.level > 0 and self.step - st.last_served > self.starvation_steps:
                st.level, st.attained, st.last_served = 0, 0.0, self.step
                self.num_promotions += 1

    def on_scheduled(self, request: Request, num_tokens: int) -> None:
        st = self.state(request)
        st.last_served = self.step
        st.attained += self.cost(num_tokens)
        if st.attained >= self.quantum(st.level) and st.level < self.num_levels - 1:
            st.level += 1
            st.attained = 0.0

    def on_finished(self, request: Request) -> None:
        self.states.pop(request.request_id, None)


def make_policy(name: str, **options) -> SchedulingPolicy:
    """Policy by name, with optional keyword options for its constructor."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(**options)


POLICIES: dict[str, type[SchedulingPolicy]] = {
    "fcfs": FCFSPolicy,
    "priority": PriorityPolicy,
    "sjf": SJFPolicy,
    "mlfq": MLFQPolicy,
}
