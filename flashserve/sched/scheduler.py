"""Iteration-level (continuous batching) scheduler. Pure Python, no torch.

Each step every scheduled request gets N new tokens: whatever separates its computed tokens
from its known tokens (a whole or chunked prompt, one decode token, a resumed request's prompt
plus outputs). One token budget (``max_num_batched_tokens``) is shared by everything in a step:

0. *Rank preemption*: if the best waiting/swapped request outranks (policy order) running ones
   and cannot get a seat (``max_num_seqs``) or memory, ``RankPreemptionRule.select`` names the
   running requests to preempt for it (FastServe-style; under FCFS it never fires).
1. *Decodes first*: running requests that need one token, in policy order. Piggybacking them
   on the prefill chunks keeps inter-token latency flat while long prompts arrive. When none of
   them can run the pool, the budget or the seats short, they are claimed at once
   (``_claim_decodes``: array work over their counts; the block manager is called only for the
   few whose step adds a block or commits one).
2. *Prefill work* in policy order: running requests still in (chunked) prefill, swapped
   requests (swapped back in) and waiting requests (admitted, reusing cached prefix blocks).
   With ``enable_chunked_prefill`` a prompt longer than the remaining budget gets a chunk.

When the pool runs dry for a running request, the lowest-ranked running request not yet served
this step (possibly the request itself) is preempted: its KV is swapped to host memory or
dropped for recompute, by ``preemption_mode`` ("recompute" | "swap" | "auto", see
``flashserve.sched.preemption``); swap falls back to recompute when the host space is full.
After such a preemption no new request is admitted in that step.

Overlap: ``schedule`` advances each request's ``num_computed_tokens`` at once and counts the
token a sampling step will produce as *pending*, so the next step can be planned before this
one's tokens come back (``update`` then fills them in).

Multi-step decoding (``num_scheduler_steps`` = n > 1): while nothing waits for a free seat and no
running request needs the host between its tokens (``_stepwise``: a grammar, say), the bulk
claim gives each decode n tokens at once (fewer where ``max_tokens`` or the context comes first):
one plan, one host turn of scheduling and outputs, n model steps on the Worker. A queued request
with a free seat (or a swapped one) brings single steps back at once, so it waits at most for the
plans in flight; while every seat is taken, a queue does not stop multi-step plans.

Micro-batches (``micro_batches`` > 1, pipeline stages): that many plans are in flight at once, on
disjoint requests: every request is ``synchronous`` (planned again only once its sampled token is
back; the chunks of a prompt that sample nothing still follow each other through the stages) and
a plan takes at most ``ceil(min(requests, max_num_seqs) / micro_batches)`` sequences, so the
first plan does not take every request and leave the others empty. Work past ``max_tokens`` or the context
is never planned. Prefix blocks are registered in the cache when a planned step fills them with
known tokens, so requests admitted in the same step (and ``n > 1`` siblings) share them.
"""

from __future__ import annotations

import time
from itertools import accumulate, chain, compress, repeat
from operator import attrgetter
from typing import Protocol

import numpy as np

from flashserve.cache.block_manager import BlockManager, consume
from flashserve.config import SchedulerConfig
from flashserve.request import Request, RequestStatus
from flashserve.sched.plan import (BlockCopy, DecodeBatch, NewRequest, SampledTokens, ScheduledRequest, SchedulerOutput,
                                   WorkerOutput)
from flashserve.sched.policy import SchedulingPolicy
from flashserve.sched.preemption import PreemptionCostModel, RankPreemptionRule

_request_id, _synchronous = attrgetter("request_id"), attrgetter("synchronous")
_computed, _num_pending = attrgetter("num_computed_tokens"), attrgetter("num_pending_tokens")
_num_prompt, _outputs = attrgetter("num_prompt_tokens"), attrgetter("output_token_ids")
_awaiting, _max_outputs = attrgetter("awaiting_result"), attrgetter("max_output_tokens")
_new_entry = tuple.__new__


def _stepwise(request: Request) -> bool:
    """A request multi-step plans leave out: its tokens need the host between model steps (a
    grammar's mask, a beam's group, a per-request attention option). Stop strings do not: the
    engine drops the tokens after the one that completes a stop string (min_tokens holding them
    back token by token, ``StopChecker.stop_strings_armed_from``); nor do logprobs, which every
    model step computes."""
    p = request.params
    return request.synchronous or p.structured_output is not None or p.attention is not None


class _RunningColumns:
    """The running requests' counts as arrays, read by C-level maps (one pass per field)."""

    __slots__ = ("requests", "computed", "num_pending", "num_prompt", "num_tokens", "max_tokens", "claimed")

    def __init__(self, requests: list[Request]) -> None:
        n = len(requests)
        self.requests = requests
        self.computed = np.fromiter(map(_computed, requests), np.int64, n)
        self.num_pending = np.fromiter(map(_num_pending, requests), np.int64, n)
        self.num_prompt = np.fromiter(map(_num_prompt, requests), np.int64, n)
        self.num_tokens = self.num_prompt + np.fromiter(map(len, map(_outputs, requests)), np.int64, n) + self.num_pending
        self.max_tokens = np.fromiter(map(_max_outputs, requests), float, n)  # infinity: no limit
        self.claimed: np.ndarray | None = None  # the rows ``Scheduler._claim_decodes`` claimed


class _DecodeChecks:
    """What ``update`` must do for the decodes claimed at once when their tokens are back, worked
    out by array work when they are claimed. A decode at position ``start`` has ``start + 2``
    known tokens once its step's token is back (every token before it comes back first), so
    which tokens complete a block and which reach ``max_tokens`` or the context is known then;
    only a stop token must wait for the token itself."""

    __slots__ = ("commit_rows", "limit_rows", "stop_ids")

    def __init__(self, commit_rows: list[int], limit_rows: list[int], stop_ids: frozenset[int]) -> None:
        self.commit_rows = commit_rows  # decodes whose tokens complete a block of known tokens
        self.limit_rows = limit_rows  # decodes whose tokens reach max_tokens or the context
        self.stop_ids = stop_ids  # every stop id of the live requests (those of the decodes among them)


class _Step:
    """The plan ``schedule`` builds, as it claims each request's work."""

    __slots__ = ("decodes", "decode_requests", "decode_checks", "entries", "new_requests", "preempted", "sampling")

    def __init__(self) -> None:
        self.decodes: DecodeBatch | None = None  # the decodes claimed at once, ahead of the entries
        self.decode_requests: list[Request] = []  # their requests, in the batch's order
        self.decode_checks: _DecodeChecks | None = None  # what update does for them
        self.entries: list[ScheduledRequest] = []
        self.new_requests: list[NewRequest] = []
        self.preempted: list[str] = []  # request ids preempted this step
        self.sampling: dict[str, Request] = {}  # requests the entries sample for, by id


class Speculation(Protocol):
    """How many draft tokens a request may verify per step (``flashserve.spec.controller``)."""

    def num_spec_tokens(self, request: Request) -> int:
        """Draft slots for the request's next decode step; 0 decodes plainly (and overlapped)."""
        ...

    def on_finished(self, request: Request) -> None: ...


class Scheduler:
    # running requests from which the decodes are claimed at once (``_decodes_first``)
    bulk_claim_min = 64

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        policy: SchedulingPolicy,
        max_model_len: int,
        cost_model: PreemptionCostModel | None = None,
        rank_rule: RankPreemptionRule | None = None,
        speculation: Speculation | None = None,
        micro_batches: int = 1,
    ) -> None:
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.config = config
        self.micro_batches = micro_batches
        self.speculation = speculation
        self.block_manager = block_manager
        self.policy = policy
        self.max_model_len = max_model_len
        self.cost_model = cost_model
        self.rank_rule = rank_rule or RankPreemptionRule()
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0  # forced by a full pool
        self.num_rank_preemptions = 0  # chosen because a queued request outranked the victim
        self.num_swap_outs = 0
        self.num_recomputes = 0
        self.step_count = 0
        self._admitted_at: dict[str, int] = {}  # step of each running request's last admission
        self._blocks_sent: dict[str, int] = {}  # block-table length the Worker holds per request
        self._dropped: list[str] = []  # left the running set since the last plan
        # Requests whose first token has not come back (``metrics.first_token_time`` is None), so
        # ``update`` reads no request's metrics but theirs.
        self._no_first_token: set[Request] = set()
        # Of the requests in the scheduler: how many are synchronous, and how many have each stop
        # set (``Request.stop_token_set``, usually one shared set), so a bulk claim reads neither
        # per request; ``_stop_ids`` is the union of those sets (None: to be made again).
        self._num_synchronous = 0
        # Of the requests in the scheduler: how many must decode one step per plan (``_stepwise``).
        self._num_stepwise = 0
        self._stop_sets: dict[frozenset[int], int] = {}
        self._stop_ids: frozenset[int] | None = frozenset()
        # step id -> the requests it samples for: its decodes claimed at once (with their checks),
        # then the others by id
        self._inflight: dict[int, tuple[list[Request], _DecodeChecks | None, dict[str, Request]]] = {}
        self._block_copies: list[tuple[int, int]] = []  # device copies for forks, sent with the next plan

    # ----------------------------------------------------------------- queue operations
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        if self.micro_batches > 1:  # plans in flight hold disjoint requests
            request.synchronous = True
        self._enter(request)
        self.waiting.append(request)

    def _enter(self, request: Request) -> None:
        """Count a request entering the scheduler (``_num_synchronous``, ``_stop_sets``) and note
        it if it has no first-token time yet."""
        if request.metrics.first_token_time is None:
            self._no_first_token.add(request)
        self._num_synchronous += request.synchronous
        self._num_stepwise += _stepwise(request)
        stops = request.stop_token_set
        n = self._stop_sets.get(stops, 0)
        self._stop_sets[stops] = n + 1
        if not n:
            self._stop_ids = None

    def _leave(self, request: Request) -> None:
        """Undo ``_enter`` for a request leaving the scheduler."""
        self._no_first_token.discard(request)
        self._num_synchronous -= request.synchronous
        self._num_stepwise -= _stepwise(request)
        stops = request.stop_token_set
        n = self._stop_sets.pop(stops) - 1
        if n:
            self._stop_sets[stops] = n
        else:
            self._stop_ids = None

    def _live_stop_ids(self) -> frozenset[int]:
        """Every stop id of the requests in the scheduler."""
        if self._stop_ids is None:
            self._stop_ids = frozenset().union(*self._stop_sets)
        return self._stop_ids

    def fork(self, parent: Request, child: Request, share_partial: bool) -> None:
        """Add ``child`` (beam search: the parent's tokens plus one) as a running request that
        shares the parent's computed K/V (``BlockManager.fork``; the copy of a partially filled
        block travels with the next plan). A parent that is not running (preempted), or a pool
        without a block for the copy, makes the child wait for admission instead (it recomputes,
        sharing what the prefix cache holds)."""
        if child.request_id in self.requests:
            raise ValueError(f"request id {child.request_id!r} is already in use")
        self.requests[child.request_id] = child
        self._enter(child)
        copies = None
        if parent.status == RequestStatus.RUNNING and parent.request_id in self._blocks_sent:
            copies = self.block_manager.fork(parent.request_id, child.request_id, parent.num_computed_tokens,
                                             share_partial)
        if copies is None:
            self.waiting.append(child)
            return
        self._block_copies.extend(copies)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = RequestStatus.RUNNING
        child.metrics.first_scheduled_time = parent.metrics.first_scheduled_time
        self.running.append(child)
        self._admitted_at[child.request_id] = self.step_count

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Retire a request (finished or aborted) and free its blocks at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for queue in (self.running, self.waiting, self.swapped):
            if request in queue:
                queue.remove(request)
                break
        self.block_manager.free(request_id)
        self._admitted_at.pop(request_id, None)
        if self._blocks_sent.pop(request_id, None) is not None:
            self._dropped.append(request_id)
        self.policy.on_finished(request)
        if self.speculation is not None:
            self.speculation.on_finished(request)
        request.status = status
        self._leave(request)
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
        self.policy.begin_step(self.requests.values())
        budget = self.config.max_num_batched_tokens
        # Sequences per plan: an even share of those that can run for each micro-batch (with one,
        # the bound is never reached: beam forks may run past max_num_seqs, nothing else can).
        seats = max(self.config.max_num_seqs, len(self.running))
        max_seqs = -(-min(len(self.requests), seats) // self.micro_batches)
        bm = self.block_manager
        step = _Step()
        swap_out: list[tuple[int, int]] = []
        swap_in: list[tuple[int, int]] = []

        self._rank_preemption(step.preempted, swap_out)

        ranked = self.policy.order(self.running)
        # pending: running, not yet served or preempted this step
        decodes, prefills, claimed, pending = self._decodes_first(step, ranked, budget, max_seqs)
        budget -= claimed
        work = decodes + self.policy.order(prefills + self.swapped + self.waiting)
        memory_short = False
        entries, chunked, speculation = step.entries, self.config.enable_chunked_prefill, self.speculation
        max_entries = max_seqs - len(step.decode_requests)
        for request in work:
            if budget == 0 or len(entries) == max_entries:
                break
            if request.awaiting_result:
                continue  # its step in flight decides what it does next
            num_spec = 0
            if request.status is RequestStatus.RUNNING:
                rid = request.request_id
                computed = request.num_computed_tokens
                num_tokens = len(request.prompt_token_ids) + len(request.output_token_ids) + request.num_pending_tokens
                if rid not in pending or (request.num_pending_tokens and self._at_limit(request, num_tokens)):
                    continue  # preempted as a victim earlier in this step, or done once its tokens arrive
                num_new = num_tokens - computed  # as _num_new_tokens, inlined
                if num_new > budget and chunked:
                    num_new = budget
                if num_new == 1 and speculation is not None:
                    num_spec = self._num_spec_tokens(request, budget)
                    num_new += num_spec
                # the common case (the table has room) first, without preemption's bookkeeping
                if bm.allocate_slots(rid, computed + num_new) is None:
                    before = len(step.preempted)
                    if not self._grow_running(request, num_new, ranked, pending, step.preempted, swap_out):
                        memory_short = True
                        continue
                    memory_short = memory_short or len(step.preempted) > before
                pending.discard(rid)
            else:
                if memory_short or len(self.running) >= self.config.max_num_seqs or request.request_id in step.preempted:
                    continue
                num_new = self._admit(request, budget, swap_in)
                if num_new == 0:
                    memory_short = True  # keep order: nothing behind it is admitted this step
                    continue
                num_tokens = request.num_tokens
            self._claim(step, request, num_tokens, num_new, num_spec)
            budget -= num_new
        copies = BlockCopy()
        saves, loads = bm.take_host_tier_moves()  # evicted prefix blocks to / from host
        if swap_out or swap_in or self._block_copies or saves or loads:
            copies = BlockCopy(tuple(swap_out), tuple(swap_in) + loads, tuple(self._block_copies), saves)
            self._block_copies.clear()
        dropped = tuple(self._dropped)
        self._dropped.clear()
        self._inflight[self.step_count] = (step.decode_requests, step.decode_checks, step.sampling)
        return SchedulerOutput(step_id=self.step_count, requests=tuple(step.entries),
                               new_requests=tuple(step.new_requests), finished_ids=dropped,
                               preempted_ids=tuple(step.preempted), block_copies=copies, decodes=step.decodes)

    def _claim(self, step: _Step, request: Request, num_tokens: int, num_new: int, num_spec: int = 0) -> None:
        """Advance a request whose slots are allocated by this step's work, register the blocks
        the step fills with known tokens in the prefix cache at once (so requests admitted later
        in this step share them: the step writes a block's K/V before any attention reads), and
        add its entry to the plan: the request in full if the Worker does not hold it, the block
        ids the Worker lacks (later work in the step never changes this request's tables).
        Of ``num_new``, ``num_spec`` slots are for drafts: they count as computed only once
        ``update`` learns how many were accepted. ``num_tokens``: the request's ``num_tokens``."""
        bm = self.block_manager
        rid = request.request_id
        start = request.num_computed_tokens
        bm.trim(rid, start)  # blocks out of every window (flashserve.cache.window)
        bm.assert_writable(rid, start, start + num_new)
        computed = start + num_new - num_spec
        sample = computed == num_tokens
        request.num_computed_tokens = computed
        if sample:
            request.num_pending_tokens += 1
            # A request that will speculate needs this step's tokens to draft its next one.
            request.awaiting_result = request.synchronous or (
                self.speculation is not None and self.speculation.num_spec_tokens(request) > 0)
            step.sampling[rid] = request
        bm.commit(request)
        self.policy.on_scheduled(request, num_new)
        sent = self._blocks_sent.get(rid)
        if sent is None:  # the Worker does not hold this request (new, or back from a preemption)
            step.new_requests.append(NewRequest(rid, tuple(request.prompt_token_ids), tuple(request.output_token_ids),
                                                request.params))
            sent = 0
        new_ids, group_ids, self._blocks_sent[rid] = bm.table_tail(rid, sent)
        # ScheduledRequest(...) made from C, without the named tuple's Python __new__
        step.entries.append(_new_entry(ScheduledRequest, (rid, start, num_new, new_ids, sample, group_ids, num_spec)))

    def _decodes_first(self, step: _Step, ranked: list[Request], budget: int,
                       max_seqs: int) -> tuple[list[Request], list[Request], int, set[str]]:
        """Split the ranked running requests into those that need one token (decodes) and the
        others, and claim the decodes at once (``_claim_decodes``) when there are at least
        ``bulk_claim_min`` running requests (below that the array work costs more than the
        loop), or any number with multi-step plans (which only the bulk claim makes). Returns
        the decodes left for the loop, the others, the tokens claimed, and the ids of the
        running requests not claimed."""
        if len(ranked) < self.bulk_claim_min and self.config.num_scheduler_steps == 1:
            decodes, prefills = [], []
            for r in ranked:
                # r.num_tokens - r.num_computed_tokens, inlined
                if len(r.prompt_token_ids) + len(r.output_token_ids) + r.num_pending_tokens - r.num_computed_tokens == 1:
                    decodes.append(r)
                else:
                    prefills.append(r)
            return decodes, prefills, 0, set(map(_request_id, ranked))
        running = _RunningColumns(ranked)
        is_decode = running.num_tokens - running.computed == 1
        claimed = self._claim_decodes(step, running, is_decode, budget, max_seqs)
        # (the rows by index: iterating a numpy mask boxes each element)
        prefills = list(map(ranked.__getitem__, np.flatnonzero(~is_decode).tolist()))
        if not claimed:
            return list(compress(ranked, is_decode.tolist())), prefills, 0, set(map(_request_id, ranked))
        left = np.ones(len(ranked), dtype=bool)
        left[running.claimed] = False
        return [], prefills, claimed, set(map(_request_id, map(ranked.__getitem__, np.flatnonzero(left).tolist())))

    def _claim_decodes(self, step: _Step, running: _RunningColumns, is_decode: np.ndarray, budget: int,
                       max_seqs: int) -> int:
        """Claim every running request that needs one token (in rank order) at once, as the
        per-request loop would, when none of them can run the pool short (each needs at most one
        new block) or the step's budget or seats out, and nothing is speculated (draft counts are
        per request). The block manager is called only for the requests whose step changes their
        tables or commits a block (``BlockManager.quiet_decodes``). A multi-step plan
        (``_num_steps``) gives each decode several tokens. Returns the tokens claimed (one per
        request: the step budget counts one model step's), and their rows in
        ``running.claimed``; 0 when the bulk claim does not apply (the loop then claims them)."""
        if self.speculation is not None or not is_decode.any():
            return 0
        bm = self.block_manager
        # skipped as in the loop: awaiting their step in flight, or done once their pending tokens arrive
        num_tokens = running.num_tokens
        end = np.minimum(running.num_prompt + running.max_tokens, self.max_model_len)  # tokens it may reach
        skip = (running.num_pending > 0) & (num_tokens >= end)
        if self._num_synchronous:  # without speculation only a synchronous request awaits its step's result
            skip |= np.fromiter(map(_awaiting, running.requests), bool, len(running.requests))
        sel = np.flatnonzero(is_decode & ~skip)
        count = len(sel)
        if count == 0 or count > budget or count > max_seqs:
            return 0
        steps = self._num_steps(is_decode)
        lens = np.minimum(end[sel] - num_tokens[sel], steps).astype(np.int64) if steps > 1 else None
        # every running request, in rank order, or those selected
        requests = list(running.requests) if count == len(running.requests) else \
            list(map(running.requests.__getitem__, sel.tolist()))
        rids = list(map(_request_id, requests))
        starts = running.computed[sel]
        sent = np.fromiter(map(self._blocks_sent.get, rids, repeat(-1)), np.int64, count)
        known = (running.num_tokens - running.num_pending)[sel]
        needs = bm.quiet_decodes(rids, starts, known, sent, lens)
        if needs is None or count - int((needs == 0).sum()) > bm.num_free_blocks:
            return 0
        n = 1 if lens is None else lens  # tokens each claimed decode computes
        consume(map(setattr, requests, repeat("num_computed_tokens"), (starts + n).tolist()))
        consume(map(setattr, requests, repeat("num_pending_tokens"), (running.num_pending[sel] + n).tolist()))
        if self._num_synchronous:
            for request in compress(requests, map(_synchronous, requests)):  # claimed ones were not awaiting
                request.awaiting_result = True
        group_ids: tuple[np.ndarray, ...] = ()
        if not (needs == 2).any():  # at most a fresh block each: allocated at once, in rank order
            rows = np.flatnonzero(needs)
            grow = rows.tolist()
            block_ids = np.array(bm.append_blocks([rids[i] for i in grow]), dtype=np.int64)
            sent_now = (sent[rows] + 1).tolist()
            for i, held in zip(grow, sent_now):
                self._blocks_sent[rids[i]] = held
        else:
            new_ids: list[tuple[int, ...]] = []
            new_group_ids: list[tuple[tuple[int, ...], ...]] = []  # per request: each other group's ids
            grow = []
            for i in np.flatnonzero(needs).tolist():  # what _claim does with the block manager, in rank order
                request, rid, start = requests[i], rids[i], int(starts[i])
                end_i = start + (1 if lens is None else int(lens[i]))
                allocated = bm.allocate_slots(rid, end_i)
                assert allocated is not None, "the pool had a block for every decode"
                bm.trim(rid, start)
                bm.assert_writable(rid, start, end_i)
                bm.commit(request)
                if sent[i] < 0:  # the Worker does not hold it (a forked beam)
                    step.new_requests.append(NewRequest(rid, tuple(request.prompt_token_ids),
                                                        tuple(request.output_token_ids), request.params))
                ids, others, self._blocks_sent[rid] = bm.table_tail(rid, max(int(sent[i]), 0))
                new_ids.append(ids)
                new_group_ids.append(others)
                grow.append(i)
            rows = np.repeat(np.array(grow, dtype=np.int64), list(map(len, new_ids)))
            block_ids = np.fromiter(chain.from_iterable(new_ids), np.int64, len(rows))
            if new_group_ids and new_group_ids[0]:  # one table per group of layers (kv_groups)
                group_ids = tuple(np.fromiter(chain.from_iterable(g), np.int64, len(rows)) for g in zip(*new_group_ids))
        self.policy.on_scheduled_each(requests, steps)
        running.claimed = sel
        step.decodes = DecodeBatch(tuple(rids), starts, rows, block_ids, steps, lens, group_ids)
        step.decode_requests = requests
        after = starts + 1 + n  # known tokens once the step's tokens are back
        bs = bm.block_size
        step.decode_checks = _DecodeChecks(np.flatnonzero(after // bs > (after - n) // bs).tolist(),
                                           np.flatnonzero(after >= end[sel]).tolist(), self._live_stop_ids())
        return count  # the step budget counts one model step's tokens

    def _num_steps(self, is_decode: np.ndarray) -> int:
        """Model steps for this plan's decodes: ``num_scheduler_steps`` when every running request
        decodes, may take them (``_stepwise``) and nothing waits for a free seat, else 1."""
        steps = self.config.num_scheduler_steps
        if steps == 1 or self.swapped or self._num_stepwise or self._block_copies or not is_decode.all() \
                or (self.waiting and len(self.running) < self.config.max_num_seqs):
            return 1
        return steps

    def _num_spec_tokens(self, request: Request, budget: int) -> int:
        """Draft slots for a decode step (0: a plain one): only when the request's last token is
        known (drafts continue it), never past ``max_tokens``, the context or the step budget."""
        if self.speculation is None or request.num_pending_tokens:
            return 0
        room = min(budget - 1, self.max_model_len - request.num_tokens - 1)
        if request.params.max_tokens is not None:
            room = min(room, request.params.max_tokens - request.num_output_tokens - 1)
        return max(0, min(room, self.speculation.num_spec_tokens(request)))

    def _at_limit(self, request: Request, num_tokens: int) -> bool:
        """True when a request with pending tokens (``num_tokens``: its ``num_tokens``) already
        reaches ``max_tokens`` or the context with them: it finishes when they arrive, so no
        more work is planned for it."""
        max_tokens = request.params.max_tokens
        return num_tokens >= self.max_model_len or (
            max_tokens is not None and num_tokens - len(request.prompt_token_ids) >= max_tokens)

    def _num_new_tokens(self, remaining: int, budget: int) -> int:
        """Tokens to compute this step of the ``remaining`` ones."""
        return remaining if remaining <= budget or not self.config.enable_chunked_prefill else budget

    def _grow_running(self, request: Request, num_new: int, ranked: list[Request], pending: set[str],
                      preempted: list[str], swap_out: list[tuple[int, int]]) -> bool:
        """Allocate the request's new slots, preempting the lowest-ranked pending running
        requests (possibly itself) while the pool is short. False if it was preempted."""
        bm = self.block_manager
        while bm.allocate_slots(request.request_id, request.num_computed_tokens + num_new) is None:
            victim = next(r for r in reversed(ranked) if r.request_id in pending)
            pending.discard(victim.request_id)
            self._preempt(victim, preempted, swap_out)
            self.num_preemptions += 1
            if victim is request:
                return False
        return True

    def _admit(self, request: Request, budget: int, swap_in: list[tuple[int, int]]) -> int:
        """Bring a waiting or swapped request into the running set with its first chunk of work;
        the number of new tokens, or 0 if it does not fit (nothing changes then)."""
        bm = self.block_manager
        if request.status == RequestStatus.SWAPPED:
            num_new = self._num_new_tokens(request.num_tokens - request.num_computed_tokens, budget)
            if num_new > budget:
                return 0
            if bm.blocks_needed(request.num_computed_tokens + num_new) > bm.num_free_blocks:
                return 0
            pairs = bm.swap_in(request.request_id)
            if pairs is None:
                return 0
            swap_in.extend(pairs)
            self.swapped.remove(request)
            bm.allocate_slots(request.request_id, request.num_computed_tokens + num_new)
        else:
            assert request.num_pending_tokens == 0, "a request is re-admitted before its tokens came back"
            tokens = request.all_token_ids
            hit = bm.lookup_prefix(request.request_id, tokens, request.prefix_salt)
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

    def _rank_preemption(self, preempted: list[str], swap_out: list[tuple[int, int]]) -> None:
        """Preempt the running requests that ``RankPreemptionRule`` picks for the best queued one."""
        queued = self.swapped + self.waiting
        if not queued or not self.running:
            return
        best = self.policy.order(queued)[0]
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens
        need = bm.blocks_needed(best.num_tokens if best.status == RequestStatus.SWAPPED
                                else min(best.num_tokens, budget))
        victims = self.rank_rule.select(
            need_blocks=need,
            free_seats=self.config.max_num_seqs - len(self.running),
            free_blocks=bm.num_free_blocks,
            host_free_blocks=bm.host.num_free if self.config.preemption_mode != "recompute" else 0,
            candidates=[(r, len(bm.block_table(r.request_id)), self.step_count - self._admitted_at.get(r.request_id, 0))
                        for r in reversed(self.policy.order(self.running)) if self.policy.outranks(best, r)],
            max_num_batched_tokens=budget,
        )
        for victim, swap in victims:
            self._preempt(victim, preempted, swap_out, swap)
            self.num_rank_preemptions += 1

    def _should_swap(self, request: Request) -> bool:
        mode = self.config.preemption_mode
        if mode == "swap":
            return True
        if mode == "auto" and self.cost_model is not None:
            return self.cost_model.prefer_swap(request.num_computed_tokens)
        return False

    def _preempt(self, request: Request, preempted: list[str], swap_out: list[tuple[int, int]],
                 swap: bool | None = None) -> None:
        """Swap the request's KV out to host memory, or drop it for recompute (``swap=None``:
        as ``preemption_mode`` decides); either way it leaves the running set and nothing it
        has generated is lost. The Worker drops its state (``finished_ids`` of the next plan)."""
        bm = self.block_manager
        rid = request.request_id
        if request in self.running:
            self.running.remove(request)
        self._admitted_at.pop(rid, None)
        if self._blocks_sent.pop(rid, None) is not None:
            self._dropped.append(rid)
        if swap is None:
            swap = self._should_swap(request)
        if swap and bm.block_table(rid) and bm.can_swap_out(rid):
            swap_out.extend(bm.swap_out(rid))
            request.status = RequestStatus.SWAPPED
            self.swapped.append(request)
            self.num_swap_outs += 1
        else:
            bm.free(rid)
            # Tokens still pending come back with the step that samples them; recompute then
            # restarts from the start of the known tokens.
            request.num_computed_tokens = 0
            request.status = RequestStatus.WAITING
            self.waiting.append(request)
            self.num_recomputes += 1
        request.metrics.num_preemptions += 1
        preempted.append(rid)

    # ----------------------------------------------------------------- results
    def update(self, plan: SchedulerOutput, result: WorkerOutput) -> StepTokens:
        """Fill in the tokens a planned step sampled.

        Returns the requests that received tokens, in plan order (``StepTokens``), with those whose
        new tokens may stop them marked. Stop conditions are the caller's
        (``flashserve.sched.stop``): it retires requests with ``finish_request``. Requests that
        left the engine while the step ran are skipped.
        """
        decodes, checks, sampling = self._inflight.pop(plan.step_id)
        if plan.decodes is not None and plan.decodes.lens is not None:
            return self._update_steps(decodes, checks, plan.decodes.lens.tolist(), result.tokens, result.sampled)
        if result.tokens is not None:
            return self._update_plain(decodes, checks, sampling, result.tokens)
        requests: list[Request] = []
        counts: list[int] = []
        now, no_first = time.monotonic(), self._no_first_token
        for rid, request in chain(zip(map(_request_id, decodes), decodes), sampling.items()):
            request.num_pending_tokens -= 1
            if not request.num_pending_tokens:  # the step it waits for is the last in flight
                request.awaiting_result = False
            if request.status.finished:
                continue
            sampled = result.sampled[rid]
            n = len(sampled.token_ids)
            if n > 1 and request.status != RequestStatus.WAITING:
                # Accepted drafts: their K/V is in the cache now (a recomputed request starts over).
                request.num_computed_tokens += n - 1
            request.output_token_ids.extend(sampled.token_ids)
            if sampled.logprobs is not None:
                request.output_logprobs.extend(sampled.logprobs)
            if request in no_first:
                no_first.discard(request)
                request.metrics.first_token_time = now
            if request.request_id in self._blocks_sent:  # still running: its blocks may be full now
                self.block_manager.commit(request)
            requests.append(request)
            counts.append(n)
        # drafts or logprobs (not the hot plain step): every request goes to the stop checks
        return StepTokens(requests, counts, list(range(len(requests))))

    def _update_plain(self, decodes: list[Request], checks: _DecodeChecks | None, sampling: dict[str, Request],
                      tokens: list[int]) -> StepTokens:
        """``update`` for a plain step (``WorkerOutput.tokens``): token i belongs to the i-th
        request the step samples for, in plan order (``decodes``, then ``sampling`` in the order
        it was filled in). The decodes' block commits and length stops were found when they were
        claimed (``checks``), so their loop only records the tokens."""
        k = len(decodes)
        if len(tokens) != k + len(sampling):
            raise ValueError(f"the Worker sent {len(tokens)} tokens for a step that samples "
                             f"{k + len(sampling)} requests")
        now, max_len = time.monotonic(), self.max_model_len
        running, commit, bs = self._blocks_sent, self.block_manager.commit, self.block_manager.block_size
        no_first = self._no_first_token
        gone = False
        for request, token in zip(decodes, tokens):
            request.num_pending_tokens -= 1
            if not request.num_pending_tokens:
                request.awaiting_result = False
            if request.status.finished:
                gone = True
                continue
            request.output_token_ids.append(token)
            if request in no_first:
                no_first.discard(request)
                request.metrics.first_token_time = now
        requests = list(decodes)
        maybe_stopped: list[int] = []
        if k:
            # the decodes that may stop: a stop id among their tokens, or max_tokens or the context reached
            stop_ids = checks.stop_ids
            hits = [i for i in compress(range(k), map(stop_ids.__contains__, tokens))
                    if tokens[i] in decodes[i].stop_token_set] if stop_ids else []
            maybe_stopped = sorted(set(checks.limit_rows).union(hits)) if hits else checks.limit_rows
            commit_rows = checks.commit_rows
            if gone:  # requests that left while the step ran got nothing: drop them, renumber the rest
                alive = [not r.status.finished for r in decodes]
                index = list(accumulate(alive, initial=-1))[1:]  # alive request i's index among those kept
                requests = list(compress(decodes, alive))
                maybe_stopped = [index[i] for i in maybe_stopped if alive[i]]
                commit_rows = [i for i in commit_rows if alive[i]]
            for i in commit_rows:  # still running: the block its token completed may be registered now
                request = decodes[i]
                if request.request_id in running:
                    commit(request)
        for request, token in zip(sampling.values(), tokens[k:]):
            request.num_pending_tokens -= 1
            if not request.num_pending_tokens:
                request.awaiting_result = False
            if request.status.finished:
                continue
            outputs = request.output_token_ids
            outputs.append(token)
            if request in no_first:
                no_first.discard(request)
                request.metrics.first_token_time = now
            known = request.num_prompt_tokens + len(outputs)
            # Still running, and this token completed a block of known tokens: the block may be
            # registered now (commit's other trigger, computed tokens, moves only in _claim).
            if not known % bs and request.request_id in running:
                commit(request)
            # StopChecker.check's shortcut: only these may stop
            if token in request.stop_token_set or len(outputs) >= request.max_output_tokens or known >= max_len:
                maybe_stopped.append(len(requests))
            requests.append(request)
        return StepTokens(requests, None, maybe_stopped)

    def _update_steps(self, decodes: list[Request], checks: _DecodeChecks, lens: list[int],
                      tokens: list[int] | None, sampled: dict[str, SampledTokens]) -> StepTokens:
        """``update`` for a multi-step plan (its decodes are its only work): decode i got
        ``lens[i]`` tokens (``DecodeBatch.lens``), which follow those of the decodes before it in
        ``tokens``; ``sampled`` holds the logprobs of the requests that asked for them."""
        if tokens is None or len(tokens) != sum(lens):
            raise ValueError(f"the Worker sent {'no token list' if tokens is None else f'{len(tokens)} tokens'} "
                             f"for a multi-step plan of {sum(lens)} tokens")
        now, no_first, stop_ids = time.monotonic(), self._no_first_token, checks.stop_ids
        limit_rows = set(checks.limit_rows)
        requests: list[Request] = []
        counts: list[int] = []
        maybe_stopped: list[int] = []
        end = 0
        for i, (request, n) in enumerate(zip(decodes, lens)):
            new, end = tokens[end : end + n], end + n
            request.num_pending_tokens -= n
            if not request.num_pending_tokens:
                request.awaiting_result = False
            if request.status.finished:
                continue
            request.output_token_ids.extend(new)
            if sampled and request.params.logprobs is not None:
                request.output_logprobs.extend(sampled[request.request_id].logprobs)
            if request in no_first:
                no_first.discard(request)
                request.metrics.first_token_time = now
            if i in limit_rows or (stop_ids and not request.stop_token_set.isdisjoint(new)):
                maybe_stopped.append(len(requests))
            requests.append(request)
            counts.append(n)
        running, commit = self._blocks_sent, self.block_manager.commit
        for i in checks.commit_rows:  # still running: the blocks its tokens completed may be registered now
            request = decodes[i]
            if not request.status.finished and request.request_id in running:
                commit(request)
        return StepTokens(requests, counts, maybe_stopped)


class StepTokens:
    """Where one step's tokens went: ``requests``, those that got tokens, in plan order;
    ``counts``, how many each got (None: one each, a plain step); ``maybe_stopped``, the indices
    of those whose new tokens may end them (a stop token among them, or max_tokens or the context
    reached; the stop checks decide), and ``finished``, those the stop checks retired
    (``EngineCore.update`` fills it in). Iterates as (request, tokens it got) pairs."""

    __slots__ = ("requests", "counts", "maybe_stopped", "finished")

    def __init__(self, requests: list[Request], counts: list[int] | None, maybe_stopped: list[int]) -> None:
        self.requests = requests
        self.counts = counts
        self.maybe_stopped = maybe_stopped
        self.finished: list[Request] = []

    def __iter__(self):
        return zip(self.requests, repeat(1) if self.counts is None else self.counts)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def num_tokens(self) -> int:
        """Tokens the requests got in all."""
        return len(self.requests) if self.counts is None else sum(self.counts)
