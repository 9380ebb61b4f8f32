"""The scheduler's bulk paths (decodes claimed at once, a plain step's tokens recorded at once)
against its per-request loops (and the per-request answer, ``WorkerOutput.sampled``): the same
plans, tokens and finish reasons, step by step."""

import random

import pytest

from flashserve.cache.block_manager import BlockManager
from flashserve.cache.kv_groups import GroupedBlockManager, KVGroup, KVLayout
from flashserve.cache.window import WindowedBlockManager
from flashserve.config import SchedulerConfig
from flashserve.request import Request, RequestStatus
from flashserve.sampling_params import SamplingParams
from flashserve.sched.policy import make_policy
from flashserve.sched.scheduler import Scheduler
from sched_testing import apply_sampled


def _manager(kind: str) -> BlockManager:
    """48 blocks of 4 tokens: one table, a 6-token window on every layer, or a windowed and a
    full group of layers (a table each, one pool)."""
    if kind == "windowed":
        return WindowedBlockManager(48, 4, enable_prefix_caching=True, num_host_blocks=16, sinks=0, span=6)
    if kind == "grouped":
        layout = KVLayout((KVGroup((0,), span=6), KVGroup((1,))), 1, (0, 1), (0, 0))
        return GroupedBlockManager(48, 4, True, 16, layout)
    return BlockManager(48, 4, enable_prefix_caching=True, num_host_blocks=16)


def _drive(bulk: bool, monkeypatch, seed: int, preemption_mode: str = "recompute", policy: str = "fcfs",
           manager: str = "plain"):
    """A random workload: prompts sharing prefixes, EOS or not, a pool small enough to preempt,
    chunked prompts, two plans in flight, synchronous requests, aborts, a forked request. Returns every plan and
    every request's end state; with ``bulk`` False the per-request loops do all the work and the
    tokens come keyed by request (``update``'s general path)."""
    calls = {"bulk": 0}
    monkeypatch.setattr(Scheduler, "bulk_claim_min", 1)  # the workload runs at most 12 requests
    if not bulk:
        monkeypatch.setattr(Scheduler, "_claim_decodes", lambda *a: 0)
    else:
        claim = Scheduler._claim_decodes

        def counted(*a):
            n = claim(*a)
            calls["bulk"] += n > 0
            return n

        monkeypatch.setattr(Scheduler, "_claim_decodes", counted)
    rng = random.Random(seed)
    cfg = SchedulerConfig(max_num_seqs=12, max_num_batched_tokens=40, enable_chunked_prefill=True,
                          preemption_mode=preemption_mode)
    bm = _manager(manager)
    s = Scheduler(cfg, bm, make_policy(policy), max_model_len=96)
    shared = [rng.randrange(1, 50) for _ in range(12)]
    requests = {}
    for i in range(24):
        prompt = (shared[: rng.choice([0, 4, 8, 12])] + [rng.randrange(1, 50) for _ in range(rng.randint(1, 20))])
        params = SamplingParams(temperature=0, max_tokens=rng.randint(1, 30), ignore_eos=rng.random() < 0.5)
        # a third are synchronous (as beams are): planned only once their token is back
        r = Request(f"r{i}", prompt, params, eos_token_ids=[0], arrival_time=float(i), synchronous=i % 3 == 0)
        requests[r.request_id] = r
    pending_adds = list(requests.values())
    plans, inflight, forked = [], [], False
    for step in range(400):
        for _ in range(rng.randint(0, 3)):
            if pending_adds:
                s.add_request(pending_adds.pop(0))
        if not (s.has_unfinished() or inflight or pending_adds):
            break
        if step % 17 == 5:  # an abort while steps are in flight
            live = sorted(s.requests)
            if live:
                s.finish_request(live[rng.randrange(len(live))], RequestStatus.FINISHED_ABORTED)
        if not forked:
            parent = next((r for r in s.running if r.num_pending_tokens == 0 and r.output_token_ids
                           and not r.awaiting_result), None)
            if parent is not None:
                child = Request("fork", list(parent.prompt_token_ids), parent.params, eos_token_ids=[0],
                                arrival_time=parent.arrival_time, synchronous=True)
                child.output_token_ids = list(parent.output_token_ids)
                requests["fork"] = child
                s.fork(parent, child, share_partial=False)
                forked = True
        plan = s.schedule()
        plans.append((plan.entries, plan.new_requests, plan.finished_ids, plan.preempted_ids, plan.block_copies))
        inflight.append(plan)
        if len(inflight) == 2 or not plan.num_seqs:
            apply_sampled(s, inflight.pop(0), lambda n: [rng.randrange(0, 5) if rng.random() < 0.1
                                                         else rng.randrange(5, 50) for _ in range(n)], bulk)
        bm.pool.check_invariants()
    assert not s.has_unfinished() and not pending_adds
    ends = {rid: (r.status, list(r.output_token_ids), r.metrics.num_preemptions, r.metrics.first_token_time is None,
                  r.num_computed_tokens, r.num_pending_tokens) for rid, r in requests.items()}
    assert forked
    return plans, ends, calls["bulk"], s.num_preemptions


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("policy", ["fcfs", "mlfq"])  # MLFQ keeps per-request state (on_scheduled)
def test_bulk_decode_claims_plan_as_the_loop_does(monkeypatch, seed, mode, policy):
    with monkeypatch.context() as m:
        loop = _drive(False, m, seed, mode, policy)
    with monkeypatch.context() as m:
        bulk = _drive(True, m, seed, mode, policy)
    assert bulk[0] == loop[0]  # every plan: entries, new requests, dropped, preempted, block moves
    assert bulk[1] == loop[1]  # tokens, finish reasons, preemptions per request
    assert bulk[2] > 0  # the bulk path ran


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("manager", ["windowed", "grouped"])
def test_windowed_and_grouped_bulk_claims_plan_as_the_loop_does(monkeypatch, seed, manager):
    """Managers that trim per request take the bulk claim with per-request calls: the same plans
    (every group's new block ids included) as the loop's."""
    with monkeypatch.context() as m:
        loop = _drive(False, m, seed, "swap", manager=manager)
    with monkeypatch.context() as m:
        bulk = _drive(True, m, seed, "swap", manager=manager)
    assert bulk[0] == loop[0]
    assert bulk[1] == loop[1]
    assert bulk[2] > 0
    if manager == "grouped":
        assert any(e.group_block_ids and e.new_block_ids for entries, *_ in bulk[0] for e in entries)


def test_workload_preempts_and_stops_on_eos(monkeypatch):
    """The workload above covers what the bulk paths must leave unchanged."""
    plans, ends, _, preemptions = _drive(True, monkeypatch, 0)
    assert preemptions > 0
    statuses = {end[0] for end in ends.values()}
    assert {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_LENGTH} <= statuses

