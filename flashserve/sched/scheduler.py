"""Iteration-level (continuous batching) scheduler. Pure Python, no torch.

Each step every scheduled request gets N new tokens: whatever separates its computed tokens
from its known tokens (a whole or chunked prompt, one decode token, a resumed request's prompt
plus outputs). One token budget (``max_num_batched_tokens``) is shared by everything in a step:

0. *Rank preemption*: if the best waiting/swapped request outranks (policy order) running ones
   and cannot get a seat (``max_num_seqs``) or memory, the lowest-ranked running requests that it
   outranks *and* that ``RankPreemptionRule`` lets go (ran long enough since admission; swapped,
   or cheap to recompute; a few per step) are preempted, if that makes room. Under FCFS new
   arrivals never outrank running requests, so this only matters for priority / SJF / MLFQ
   (FastServe-style preemption). Rank victims are swapped whenever the host has room and their
   context is at most one step's token budget.
1. *Decodes first*: running requests that need one token, in policy order. Piggybacking them
   on the prefill chunks keeps inter-token latency flat while long prompts arrive.
2. *Prefill work* in policy order: running requests still in (chunked) prefill, swapped
   requests (swapped back in) and waiting requests (admitted, reusing cached prefix blocks).
   With ``enable_chunked_prefill`` a prompt longer than the remaining budget gets a chunk.

When the pool runs dry for a running request, the lowest-ranked running request not yet served
this step (possibly the request itself) is preempted: its KV is swapped to host memory or
dropped for recompute, by ``preemption_mode`` ("recompute" | "swap" | "auto", see
``flashserve.sched.preemption``); swap falls back to recompute when the host space is full.
After such a preemption no new request is admitted in that step.
"""

from __future__ import annotations

import time

from flashserve.cache.block_manager import BlockManager
from flashserve.config import SchedulerConfig
from flashserve.request import Request, RequestStatus
from flashserve.sched.plan import BlockCopy, RunnerOutput, ScheduledRequest, SchedulerOutput
from flashserve.sched.policy import SchedulingPolicy
from flashserve.sched.preemption import PreemptionCostModel, RankPreemptionRule


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        policy: SchedulingPolicy,
        max_model_len: int,
        cost_model: PreemptionCostModel | None = None,
        rank_rule: RankPreemptionRule | None = None,
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.policy = policy
        self.max_model_len = max_model_len
        self.cost_model = cost_model
        self.rank_rule = rank_rule or RankPreemptionRule()
        self.preemption_mode = getattr(config, "preemption_mode", "recompute")
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_swap_outs = 0
        self.num_recomputes = 0
        self.num_rank_preemptions = 0
        self.step_count = 0
        self._admitted_at: dict[str, int] = {}  # step of each running request's last admission

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
        for queue in (self.running, self.waiting, self.swapped):
            if request in queue:
                queue.remove(request)
                break
        self.block_manager.free(request_id)
        self._admitted_at.pop(request_id, None)
        self.policy.on_finished(request)
        request.status = status
        request.metrics.finished_time = time.monotonic()
        return request

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.swapped)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ----------------------------------------------------------------- one step
    def schedule(self) -> SchedulerOutput:
        self.step_count += 1
        self.block_manager.host.begin_step()
        self.policy.begin_step(list(self.requests.values()))
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        copies = BlockCopy()

        self._rank_preemption(preempted, copies)

        ranked = self.policy.order(self.running)
        pending = {r.request_id for r in ranked}  # running, not yet served or preempted this step
        decodes = [r for r in ranked if r.num_tokens - r.num_computed_tokens == 1]
        prefills = [r for r in ranked if r.num_tokens - r.num_computed_tokens != 1]
        work = decodes + self.policy.order(prefills + self.swapped + self.waiting)
        memory_short = False
        for request in work:
            if budget == 0:
                break
            if request.status == RequestStatus.RUNNING:
                if request.request_id not in pending:
                    continue  # preempted as a victim earlier in this step
                num_new = self._num_new_tokens(request, budget)
                before = len(preempted)
                if not self._grow_running(request, num_new, ranked, pending, preempted, copies):
                    memory_short = True
                    continue
                memory_short = memory_short or len(preempted) > before
                pending.discard(request.request_id)
            else:
                if memory_short or len(self.running) >= self.config.max_num_seqs or request.request_id in preempted:
                    continue
                num_new = self._admit(request, budget, copies)
                if num_new == 0:
                    memory_short = True  # keep order: nothing behind it is admitted this step
                    continue
            scheduled.append(self._plan_entry(request, num_new))
            budget -= num_new

        bm = self.block_manager
        for entry in scheduled:
            bm.assert_writable(entry.request_id, entry.start_pos, entry.seq_len)
            self.policy.on_scheduled(self.requests[entry.request_id], entry.num_new_tokens)
        return SchedulerOutput(requests=scheduled, block_copies=copies, preempted_ids=preempted)

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        return min(remaining, budget) if self.config.enable_chunked_prefill else remaining

    def _grow_running(self, request: Request, num_new: int, ranked: list[Request], pending: set[str],
                      preempted: list[str], copies: BlockCopy) -> bool:
        """Allocate the request's new slots, preempting the lowest-ranked pending running
        requests (possibly itself) while the pool is short. False if it was preempted."""
        bm = self.block_manager
        while bm.allocate_slots(request.request_id, request.num_computed_tokens + num_new) is None:
            victim = next(r for r in reversed(ranked) if r.request_id in pending)
            pending.discard(victim.request_id)
            self._preempt(victim, preempted, copies)
            if victim is request:
                return False
        return True

    def _admit(self, request: Request, budget: int, copies: BlockCopy) -> int:
        """Bring a waiting or swapped request into the running set with its first chunk of work;
        the number of new tokens, or 0 if it does not fit (nothing changes then)."""
        bm = self.block_manager
        if request.status == RequestStatus.SWAPPED:
            num_new = self._num_new_tokens(request, budget)
            if num_new > budget:
                return 0
            if bm.blocks_needed(request.num_computed_tokens + num_new) > bm.num_free_blocks:
                return 0
            pairs = bm.swap_in(request.request_id)
            if pairs is None:
                return 0
            copies.swap_in.extend(pairs)
            self.swapped.remove(request)
            bm.allocate_slots(request.request_id, request.num_computed_tokens + num_new)
        else:
            tokens = request.all_token_ids
            hit = bm.lookup_prefix(request.request_id, tokens)
            remaining = request.num_tokens - hit.num_tokens
            if remaining > budget and not self.config.enable_chunked_prefill:
                return 0
            num_new = min(remaining, budget)
            if bm.allocate_slots(request.request_id, hit.num_tokens + num_new, hit) is None:
                return 0
            bm.record_query(request.num_tokens)
            request.num_computed_tokens = hit.num_tokens
            request.metrics.num_cached_prompt_tokens = max(request.metrics.num_cached_prompt_tokens,
                                                           min(hit.num_tokens, request.num_prompt_tokens))
            self.waiting.remove(request)
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.monotonic()
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self._admitted_at[request.request_id] = self.step_count
        return num_new

    def _rank_preemption(self, preempted: list[str], copies: BlockCopy) -> None:
        """Preempt running requests that the best waiting/swapped request outranks, when it cannot
        otherwise get a seat or the blocks for its next chunk, the rank rule lets them go, and
        together they make room for it. Victims: lowest-ranked eligible running requests."""
        queued = self.swapped + self.waiting
        if not queued or not self.running:
            return
        best = self.policy.order(queued)[0]
        bm = self.block_manager
        if best.status == RequestStatus.SWAPPED:
            need = bm.blocks_needed(best.num_tokens)
        else:
            need = bm.blocks_needed(min(best.num_tokens, self.config.max_num_batched_tokens))
        seats, free = self.config.max_num_seqs - len(self.running), bm.num_free_blocks
        if seats > 0 and need <= free:
            return
        rule = self.rank_rule
        host_free = bm.host.num_free if self.preemption_mode != "recompute" else 0
        recompute_limit = rule.recompute_limit(self.config.max_num_batched_tokens)
        swap_limit = rule.swap_limit(self.config.max_num_batched_tokens)
        victims: list[tuple[Request, bool]] = []  # (victim, swap it)
        for victim in reversed(self.policy.order(self.running)):
            if len(victims) >= rule.max_per_step or not self.policy.outranks(best, victim):
                return  # no room can be made without breaking the rule: preempt nobody
            if not rule.may_preempt(victim.metrics.num_preemptions,
                                    self.step_count - self._admitted_at.get(victim.request_id, 0)):
                continue  # (re)admitted too recently: let it run, no thrash
            blocks = len(bm.block_table(victim.request_id))  # shared prefix blocks: an upper bound
            swap = 0 < blocks <= host_free and victim.num_computed_tokens <= swap_limit
            if not swap and victim.num_computed_tokens > recompute_limit:
                continue  # would destroy too much work
            host_free -= blocks if swap else 0
            victims.append((victim, swap))
            seats, free = seats + 1, free + blocks
            if seats > 0 and need <= free:
                break
        else:
            return
        for victim, swap in victims:
            self._preempt(victim, preempted, copies, swap)
            self.num_rank_preemptions += 1

    def _should_swap(self, request: Request) -> bool:
        mode = self.preemption_mode
        if mode == "swap":
            return True
        if mode == "auto" and self.cost_model is not None:
            return self.cost_model.prefer_swap(request.num_computed_tokens)
        return False

    def _preempt(self, request: Request, preempted: list[str], copies: BlockCopy, swap: bool | None = None) -> None:
        """Swap the request's KV out to host memory, or drop it for recompute (``swap=None``:
        as ``preemption_mode`` decides); either way it leaves the running set and nothing it
        has generated is lost."""
        bm = self.block_manager
        if request in self.running:
            self.running.remove(request)
        self._admitted_at.pop(request.request_id, None)
        if swap is None:
            swap = self._should_swap(request)
        if swap and bm.block_table(request.request_id) and bm.can_swap_out(request.request_id):
            copies.swap_out.extend(bm.swap_out(request.request_id))
            request.status = RequestStatus.SWAPPED
            self.swapped.append(request)
            self.num_swap_outs += 1
        else:
            bm.free(request.request_id)
            request.num_computed_tokens = 0
            request.status = RequestStatus.WAITING
            self.waiting.append(request)
            self.num_recomputes += 1
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        preempted.append(request.request_id)

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

    # ----------------------------------------------------------------- results
    def update(self, plan: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Record computed tokens, append sampled ones, retire requests that hit a stop condition.

        Returns the requests that received a new token this step (finished ones included).
        """
        progressed: list[Request] = []
        now = time.monotonic()
        bs = self.block_manager.block_size
        for entry in plan.requests:
            request = self.requests.get(entry.request_id)
            if request is None:  # aborted while the step ran
                continue
            before = request.num_computed_tokens
            request.num_computed_tokens += entry.num_new_tokens
            if request.num_computed_tokens // bs > before // bs:  # a block just filled up
                self.block_manager.commit(request.request_id, request.all_token_ids, request.num_computed_tokens)
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
