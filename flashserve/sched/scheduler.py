"""Iteration-level (continuous batching) scheduler. Pure Python, no torch.

Each step every scheduled request gets N new tokens: whatever separates its computed tokens
from its known tokens (a whole or chunked prompt, one decode token, a resumed request's prompt
plus outputs). Running requests are served first, in policy order; when the KV pool runs dry the
lowest-ranked running request is preempted (its blocks freed, recomputed later). Waiting
requests are admitted while the token budget, the sequence limit and the pool allow.
"""

from __future__ import annotations

import time

from flashserve.cache.block_manager import BlockManager
from flashserve.config import SchedulerConfig
from flashserve.request import Request, RequestStatus
from flashserve.sched.plan import RunnerOutput, ScheduledRequest, SchedulerOutput
from flashserve.sched.policy import SchedulingPolicy


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        policy: SchedulingPolicy,
        max_model_len: int,
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.policy = policy
        self.max_model_len = max_model_len
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ----------------------------------------------------------------- queue operations
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Retire a request (finished, aborted or failed) and free its blocks at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.block_manager.free(request_id)
        request.status = status
        request.metrics.finished_time = time.monotonic()
        return request

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ----------------------------------------------------------------- one step
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        running = self.policy.order(self.running)
        kept: list[Request] = []
        while running and budget > 0:
            request = running.pop(0)
            num_new = self._num_new_tokens(request, budget)
            while self.block_manager.allocate_slots(request.request_id, request.num_computed_tokens + num_new) is None:
                victim = running.pop() if running else request
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.request_id in preempted:
                break
            kept.append(request)
            scheduled.append(self._plan_entry(request, num_new))
            budget -= num_new
        kept.extend(running)  # running requests that got no budget this step stay running
        self.running = kept

        # Admit waiting requests, unless memory was just short enough to preempt someone.
        if not preempted:
            for request in self.policy.order(self.waiting):
                if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                    break
                remaining = request.num_tokens - request.num_computed_tokens
                if remaining > budget and not self.config.enable_chunked_prefill:
                    break
                num_new = min(remaining, budget)
                table = self.block_manager.allocate_slots(request.request_id, request.num_computed_tokens + num_new)
                if table is None:
                    break
                self.waiting.remove(request)
                request.status = RequestStatus.RUNNING
                if request.metrics.first_scheduled_time is None:
                    request.metrics.first_scheduled_time = time.monotonic()
                self.running.append(request)
                scheduled.append(self._plan_entry(request, num_new))
                budget -= num_new

        for entry in scheduled:
            self.policy.on_scheduled(self.requests[entry.request_id], entry.num_new_tokens)
        return SchedulerOutput(requests=scheduled, preempted_ids=preempted)

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        return min(remaining, budget) if self.config.enable_chunked_prefill else remaining

    def _plan_entry(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        tokens = request.all_token_ids[start : start + num_new]
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=tokens,
            start_pos=start,
            block_ids=list(self.block_manager.block_table(request.request_id)),
            sample=start + num_new == request.num_tokens,
            params=request.params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
        )

    def _preempt(self, request: Request) -> None:
        """Recompute preemption: drop the request's KV and send it back to the waiting queue."""
        self.block_manager.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(request)

    # ----------------------------------------------------------------- results
    def update(self, plan: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Record computed tokens, append sampled ones, retire requests that hit a stop condition.

        Returns the requests that received a new token this step (finished ones included).
        """
        progressed: list[Request] = []
        now = time.monotonic()
        for entry in plan.requests:
            request = self.requests.get(entry.request_id)
            if request is None:  # aborted while the step ran
                continue
            request.num_computed_tokens += entry.num_new_tokens
            if not entry.sample:
                continue
            sampled = result.sampled[entry.request_id]
            request.output_token_ids.append(sampled.token_id)
            if sampled.logprob is not None:
                request.output_logprobs.append((sampled.logprob, sampled.top_logprobs or []))
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            progressed.append(request)
            status = self._stop_status(request, sampled.token_id)
            if status is not None:
                self.finish_request(request.request_id, status)
        return progressed

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        params = request.params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
