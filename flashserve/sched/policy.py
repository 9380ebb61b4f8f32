"""Scheduling policies: the order in which requests get service, and who is preempted first.

A policy only ranks requests. The scheduler asks it for the waiting queue's admission order and
the running set's priority order (the last running request is the first preemption victim), so
``Scheduler.schedule`` itself has no policy branches.
"""

from __future__ import annotations

from flashserve.request import Request


class SchedulingPolicy:
    """Ranks requests; lower sort key = served first, preempted last."""

    name = "abstract"

    def sort_key(self, request: Request) -> tuple:
        raise NotImplementedError

    def order(self, requests: list[Request]) -> list[Request]:
        """Requests in service order (a new list; Python's sort is stable, so ties keep their order)."""
        return sorted(requests, key=self.sort_key)

    def on_scheduled(self, request: Request, num_tokens: int) -> None:
        """Hook for stateful policies (e.g. MLFQ quanta); called once per request per step."""


class FCFSPolicy(SchedulingPolicy):
    """First come, first served: by arrival time, then by id for exact ties."""

    name = "fcfs"

    def sort_key(self, request: Request) -> tuple:
        return (request.arrival_time, request.request_id)


def make_policy(name: str) -> SchedulingPolicy:
    """Policy by name. Further policies register in ``POLICIES``."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r}; choose one of {sorted(POLICIES)}") from None


POLICIES: dict[str, type[SchedulingPolicy]] = {"fcfs": FCFSPolicy}
