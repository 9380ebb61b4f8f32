"""The speculation off-switch (``flashserve.spec.controller``) fed step by step: plans, results,
device costs and a wall clock under the test's control.

The device-time fit alone says a verification step of 5 tokens costs about one decode step (the
fit's a + b T with a small b), so drafts accepted at 1.5 tokens per step look like a 1.5x gain.
When the wall clock says a speculative step takes 3.4x a plain one (the host's turn no longer
overlaps the device: the H200 SmolLM2 case), the request must go back to plain decoding, and new
requests must start plainly; when both clocks agree that speculation pays, it must stay on.
The draft length per request (``adapt_length``) follows step periods that depend on the rows
(blocks of 4, linear) and the per-draft acceptance; trees and a switched-off clock keep k.
"""

from __future__ import annotations

import pytest

from flashserve.config import SpeculativeConfig
from flashserve.request import Request
from flashserve.sampling_params import SamplingParams
from flashserve.sched.plan import SampledTokens, ScheduledRequest, SchedulerOutput, StepCost, WorkerOutput
from flashserve.spec.controller import MIN_STEPS, SpeculationController

K = 4
DEVICE_STEP = 1.0e-3  # device seconds of a one-token step; a verification step of 1 + K tokens costs 1.04x


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _request(rid: str) -> Request:
    """A request whose prompt ends in a repeat (prompt lookup finds drafts for it)."""
    return Request(rid, [1, 2, 3, 1, 2], SamplingParams(max_tokens=1000, ignore_eos=True), [0])


def _step(ctl: SpeculationController, clock: Clock, step: int, req: Request, accept: int, period: float) -> int:
    """One decode step of ``req`` (with the drafts the controller grants), ``period`` wall seconds
    after the previous one; ``accept`` drafts accepted. Returns the drafts granted."""
    k = ctl.num_spec_tokens(req)
    entry = ScheduledRequest(req.request_id, 10 + step, 1 + k, (), True, (), k)
    plan = SchedulerOutput(step, (entry,))
    clock.now += period
    if k:  # the Worker measures the cost of steps with draft slots only
        cost = StepCost(1 + k, 1, DEVICE_STEP * (1 + 0.01 * k), 0.0)
        result = WorkerOutput(step, {req.request_id: SampledTokens(tuple(range(1 + min(accept, k))), None, k)}, cost)
    else:
        result = WorkerOutput(step, {}, None, tokens=[7])
    ctl.observe(plan, result)
    return k


def _run(plain_period: float, spec_period: float, accept: int, steps: int = 120, adapt_length: bool = False):
    clock = Clock()
    ctl = SpeculationController(SpeculativeConfig("ngram", K, adapt_length=adapt_length), clock=clock)
    first, later = _request("first"), _request("later")
    granted = [_step(ctl, clock, i, first, accept, 0.0) for i in range(1)]
    for i in range(1, steps):
        k = ctl.num_spec_tokens(first)
        granted.append(_step(ctl, clock, i, first, accept, spec_period if k else plain_period))
    return ctl, granted, ctl.num_spec_tokens(later)


def test_device_time_alone_would_keep_speculating():
    """Without a wall-clock difference (both periods equal to the device's), acceptance 1.5 pays."""
    ctl, granted, later = _run(plain_period=DEVICE_STEP, spec_period=DEVICE_STEP * 1.04, accept=1)
    assert all(k == K for k in granted) and ctl.stats.num_switched_off == 0 and later == K
    assert ctl.estimated_speedup(2.0, K) == pytest.approx(2.0 / 1.04, rel=0.05)


def test_slow_speculative_steps_switch_off_and_new_requests_start_plainly():
    """Speculative steps at 3.4x the plain period with acceptance 2: off after MIN_STEPS, retried
    rarely (16, 32, 64 ... steps), and a new request starts plainly."""
    ctl, granted, later = _run(plain_period=DEVICE_STEP * 1.3, spec_period=DEVICE_STEP * 1.3 * 3.4, accept=1)
    assert granted[:MIN_STEPS] == [K] * MIN_STEPS and granted[MIN_STEPS] == 0
    assert sum(k > 0 for k in granted) <= 4 * MIN_STEPS  # a few retries over 120 steps
    assert ctl.estimated_speedup(2.0, K) == pytest.approx(2.0 / 3.4, rel=0.05)
    assert later == 0


def test_slow_speculative_steps_of_any_length_switch_off_after_each_length_was_tried():
    """The same with the draft length chosen: a shorter length, not measured yet, is taken to cost
    about a plain step, so each is tried once (the host's turn makes every one 3.4x), then off."""
    ctl, granted, later = _run(DEVICE_STEP * 1.3, DEVICE_STEP * 1.3 * 3.4, accept=1, adapt_length=True)
    assert granted[: K + 2] == [K, K, *range(K - 1, 0, -1), 0] and sum(k > 0 for k in granted) <= 4 * MIN_STEPS
    assert later == 0


def test_fast_speculative_steps_with_good_acceptance_stay_on():
    """Speculative steps at 1.2x the plain period, 3 drafts accepted of 4: speculation pays 3.3x."""
    ctl, granted, later = _run(plain_period=DEVICE_STEP * 1.3, spec_period=DEVICE_STEP * 1.3 * 1.2, accept=3)
    assert all(k == K for k in granted) and ctl.stats.num_switched_off == 0 and later == K


def test_idle_gaps_and_prefill_steps_are_not_periods():
    """A wait longer than a second between decode steps (no request running) and the period after
    a prompt step do not enter the wall-clock means."""
    clock = Clock()
    ctl = SpeculationController(SpeculativeConfig("ngram", K), clock=clock)
    req = _request("r")
    _step(ctl, clock, 0, req, 1, 0.0)
    _step(ctl, clock, 1, req, 1, 5.0)  # idle
    assert ctl.wall.spec == 0.0
    _step(ctl, clock, 2, req, 1, 0.002)
    assert ctl.wall.spec == pytest.approx(0.002)
    prompt = SchedulerOutput(3, (ScheduledRequest("p", 0, 40, (), True),))
    clock.now += 0.05
    ctl.observe(prompt, WorkerOutput(3, {}, None, tokens=[7]))
    _step(ctl, clock, 4, req, 1, 0.002)
    assert ctl.wall.plain == 0.0 and ctl.wall.spec == pytest.approx(0.002)


@pytest.mark.parametrize("flagged", [True, False])
def test_steps_that_loaded_kernels_do_not_teach_the_cost(flagged):
    """With an empty Triton cache the first verification steps compile kernels: 0.4 s each on the
    device and the wall clock. Flagged (``StepCost.loaded_kernels``), they are left out, and the
    request, whose drafts give 3 tokens per step at 1.2x a plain step's time, keeps speculating,
    as does a new request; unflagged (the control case), those seconds switch the request off and
    keep every new one plain."""
    clock = Clock()
    ctl = SpeculationController(SpeculativeConfig("ngram", K), clock=clock)
    req, later = _request("r"), _request("later")
    granted = []
    for i in range(60):
        k = ctl.num_spec_tokens(req) if i >= 3 else 0  # three plain steps first: the plain period
        compiling = 3 <= i <= 6
        period = 0.4 if compiling else DEVICE_STEP * (1.2 if k else 1.0)
        clock.now += period
        plan = SchedulerOutput(i, (ScheduledRequest(req.request_id, 10 + i, 1 + k, (), True, (), k),))
        if k:
            cost = StepCost(1 + k, 1, period if compiling else DEVICE_STEP * 1.04, 0.0, compiling and flagged)
            result = WorkerOutput(i, {req.request_id: SampledTokens((5, 6, 7), None, k)}, cost)
        else:
            result = WorkerOutput(i, {}, None, tokens=[7])
        ctl.observe(plan, result)
        granted.append(k)
    if flagged:
        assert all(k == K for k in granted[3:]) and ctl.stats.num_switched_off == 0
        assert ctl.num_spec_tokens(later) == K
        assert ctl.wall.spec == pytest.approx(DEVICE_STEP * 1.2) and ctl.fit.coefficients()[0] < 2 * DEVICE_STEP
    else:
        assert ctl.stats.num_switched_off >= 1 and ctl.num_spec_tokens(later) == 0


def test_kernel_loads_are_counted_through_tritons_hook():
    """``flashserve.kernels.loads`` counts what Triton's load hook reports (one per kernel loaded)."""
    import triton

    from flashserve.kernels import loads

    before = loads.count()
    triton.knobs.runtime.kernel_load_end_hook(None, None, "kernel", {}, "hash")
    assert loads.count() == before + 1


def _length_run(period_of_rows, acceptance: float, steps: int = 200, k: int = 8, **config) -> list[int]:
    """Drafts granted per step to one request whose drafts are each accepted with probability
    ``acceptance`` (given the ones before), a step of T verified rows taking ``period_of_rows(T)``
    wall seconds; one plain step first (the plain period)."""
    import random

    rng = random.Random(0)
    clock = Clock()
    ctl = SpeculationController(SpeculativeConfig("ngram", k, **{"adapt_length": True, **config}), clock=clock)
    req = _request("r")
    granted = []
    for i in range(steps):
        j = ctl.num_spec_tokens(req) if i else 0
        plan = SchedulerOutput(i, (ScheduledRequest(req.request_id, 10 + i, 1 + j, (), True, (), j),))
        clock.now += period_of_rows(1 + j)
        if j:
            accepted = next((a for a in range(j) if rng.random() >= acceptance), j)
            sampled = {req.request_id: SampledTokens(tuple(range(1 + accepted)), None, j)}
            result = WorkerOutput(i, sampled, StepCost(1 + j, 1, DEVICE_STEP * (1 + 0.01 * j), 0.0))
        else:
            result = WorkerOutput(i, {}, None, tokens=[7])
        ctl.observe(plan, result)
        granted.append(j)
    return granted


def test_draft_length_moves_below_a_step_in_the_cost():
    """Rows cost in blocks of 4 (the CPU int4 product): 5-8 rows take twice 1-4. With 80 % of
    the drafts accepted, 3 drafts (2.95 tokens a period) beat 4 (3.36 tokens in two periods), and
    the request settles there; with a flat cost (a memory-bound device) it keeps all k."""
    blocks = _length_run(lambda t: DEVICE_STEP * -(-t // 4), 0.8, k=4)
    assert blocks[1] == 4 and blocks[-100:].count(3) >= 95, blocks
    flat = _length_run(lambda t: DEVICE_STEP, 0.8, k=4)
    assert flat[-100:].count(4) >= 95, flat
    pinned = _length_run(lambda t: DEVICE_STEP * -(-t // 4), 0.8, k=4, adapt_length=False, disable_by_cost=False)
    assert pinned[1:].count(4) == len(pinned) - 1


def test_draft_length_follows_the_acceptance_when_rows_cost():
    """Each row adds a quarter of a step: at 70 % acceptance two or three drafts pay most (2.19
    tokens in 1.5 periods, 2.53 in 1.75; eight: 3.2 in 3), at 95 % all eight (6.7 in 3). Trees
    keep their k nodes."""
    linear = lambda t: DEVICE_STEP * (1 + 0.25 * (t - 1))  # noqa: E731
    low = _length_run(linear, 0.7)[-100:]
    assert all(low) and 2 <= sum(low) / len(low) <= 3.5, low
    high = _length_run(linear, 0.95)[-100:]
    assert sum(high) / len(high) >= 7, high
    tree = _length_run(linear, 0.7, tree_width=2)
    assert set(tree[1:]) <= {0, 8}, tree
    fixed = _length_run(linear, 0.7, disable_by_cost=False)  # every step k drafts, whatever the clock says
    assert fixed[1:].count(8) == len(fixed) - 1


def test_draft_length_counts_the_other_requests_rows():
    """In a batch the step's rows are every request's: with 4 other rows in the last step, a
    request at 80 % acceptance gets 3 drafts when 9 rows cost twice 8, and 4 when every length
    is past the step already (rows cost twice from 5 on: 4 + 1 + 1 are 6)."""
    from flashserve.spec.controller import _RequestStats

    ctl = SpeculationController(SpeculativeConfig("ngram", K), clock=Clock())
    ctl.wall.plain, ctl._batch = 1.0, 2
    ctl._rows, ctl._tokens = 4 + 1 + 4, 3 + 5  # the last step: others 4 rows / 3 tokens, this one 1 + 4 / 5
    st = _RequestStats(hits=0.8, misses=0.2, last_drafts=4, last_tokens=5, limit=K)
    ctl.wall.by_rows.update({r: 1.0 if r <= 8 else 2.0 for r in range(2, 10)})
    assert ctl._best_length(st)[0] == 3
    ctl.wall.by_rows.update({r: 1.0 if r <= 4 else 2.0 for r in range(2, 10)})
    ctl._periods.clear()  # periods are kept for the step
    assert ctl._best_length(st)[0] == 4


def test_unmeasured_row_counts_are_taken_at_the_nearest_smaller_measured_cost():
    """Optimistic: an unmeasured row count costs what the nearest smaller measured one does (the
    plain period below the smallest) plus the device fit's seconds per row, at most the nearest
    larger measured one."""
    ctl = SpeculationController(SpeculativeConfig("ngram", K), clock=Clock())
    ctl.wall.by_rows.update({3: 3.0, 7: 5.0})
    assert ctl.period(2) == 3.0  # neither a plain period nor a device fit: the smallest measured one
    ctl.wall.plain, ctl._batch = 1.0, 1
    assert ctl.period(3) == 3.0 and ctl.period(5) == 3.0 and ctl.period(2) == 1.0 and ctl.period(9) == 5.0
    for t in range(1, 11):  # device: 1 ms + 0.1 ms per row
        ctl.fit.add(t, 1e-3 + 1e-4 * t, 0.0, 0)
    assert ctl.period(5) == pytest.approx(3.0 + 2e-4, rel=1e-3) and ctl.period(9) == pytest.approx(5.0 + 2e-4, rel=1e-3)
    ctl.wall.by_rows[4] = 4.5
    assert ctl.period(6) == pytest.approx(4.5 + 2e-4, rel=1e-3)
    ctl.wall.plain = 0.0  # no plain period yet: the device fit's plain step (1.1 ms) in its place
    assert ctl.period(2) == pytest.approx(1.1e-3 + 1e-4, rel=1e-2)


def test_row_counts_not_measured_for_a_while_are_forgotten():
    """A length measured once at a slow moment is not avoided for ever: after STALE_PERIODS
    speculative steps at other row counts, its period is dropped (and tried again)."""
    from flashserve.spec.controller import STALE_PERIODS, _WallClock

    wall = _WallClock()
    now = 0.0
    for rows in [5] * 3 + [4] * (STALE_PERIODS + STALE_PERIODS // 4):
        now += 0.01
        wall.tick(now, True, True, rows)
    assert set(wall.by_rows) == {4} and set(wall.seen) == {4}


def test_shadow_acceptance_replays_the_ngram_proposer():
    """Outputs that copy the prompt would be accepted k + 1 at a time; outputs that never repeat
    anything, one token per step."""
    import numpy as np

    from flashserve.spec.controller import shadow_acceptance

    prompt = list(range(100, 160))
    copying = np.array(prompt + prompt[:40], dtype=np.int64)
    assert shadow_acceptance(copying, 40, K, 1, 4) == pytest.approx(K + 1, rel=0.25)
    fresh = np.array(prompt + list(range(1000, 1040)), dtype=np.int64)
    assert shadow_acceptance(fresh, 40, K, 1, 4) == 1.0
    assert shadow_acceptance(fresh, 5, K, 1, 4) is None  # too few outputs to judge
    for width in (2, 4):  # trees of K nodes: the copying branch is among them
        assert shadow_acceptance(copying, 40, K, 1, 4, width) == pytest.approx(K + 1, rel=0.25)
        assert shadow_acceptance(fresh, 40, K, 1, 4, width) == 1.0


def test_tree_accepted_walks_the_matching_branch():
    from flashserve.spec.tree import TokenTree

    tree = TokenTree.from_chains(0, [[1, 2, 3], [1, 5, 6], [7]], 6)  # 1 -> {2 -> 3, 5 -> 6}, 7
    assert tree.accepted([1, 5, 6, 9]) == 3 and tree.accepted([1, 2, 9]) == 2 and tree.accepted([7, 7]) == 1
    assert tree.accepted([8]) == 0 and tree.accepted([]) == 0
    assert TokenTree.chain(0, [4, 4]).accepted([4, 4, 4]) == 2


def test_shadow_acceptance_of_trees_finds_an_older_branch():
    """The replayed outputs follow a key token (7) the way an older occurrence did, not the most
    recent one, whose continuation is short ([400, 7]: it reaches the context's end): chains
    (width 1) miss the first step, a tree of width 2 and 6 nodes holds both continuations."""
    import numpy as np

    from flashserve.spec.controller import shadow_acceptance

    a = list(range(300, 316))
    tokens = np.array(list(range(10, 50)) + [7] + a + [60, 61, 7, 400, 7] + a, dtype=np.int64)
    # 16 outputs: chains 1 + 7 + 7 + 1 tokens in 4 steps; the tree 5 (4 drafts of a) + 7 + 4 in 3
    assert shadow_acceptance(tokens, 16, 6, 1, 1, 1) == pytest.approx(16 / 4)
    assert shadow_acceptance(tokens, 16, 6, 1, 1, 2) == pytest.approx(16 / 3)


def _screened_run(steps: int, copies, width: int = 1) -> list[int]:
    """Drafts granted per step to an n-gram request (chains, or trees of ``width``) whose
    speculative steps take 3.4x the plain period (acceptance 2); its output at step i copies its
    prompt when ``copies(i)`` or in its first MIN_STEPS steps, else is new."""
    clock = Clock()
    ctl = SpeculationController(SpeculativeConfig("ngram", K, tree_width=width, adapt_length=False), clock=clock)
    prompt = list(range(100, 160)) + [100]
    req = Request("r", prompt, SamplingParams(max_tokens=1000, ignore_eos=True), [0])
    plain, spec = DEVICE_STEP * 1.3, DEVICE_STEP * 1.3 * 3.4
    granted = []
    for i in range(steps):
        granted.append(_step(ctl, clock, i, req, 1, spec if ctl.num_spec_tokens(req) else plain))
        req.output_token_ids.append(prompt[1 + i % 59] if copies(i) or i < MIN_STEPS else 5000 + i)
    return granted


@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("copying", [False, True])
def test_retries_are_screened_by_the_shadow_acceptance(copying, width):
    """After the switch-off (speculative steps at 3.4x the plain period), an n-gram request (chains
    or trees) whose recent outputs the proposer would not have predicted is not retried at all; one
    whose outputs copy its prompt (shadow acceptance ~5, 5 / 3.4 > 1.05) is."""
    granted = _screened_run(100, lambda i: copying, width)
    assert granted[:MIN_STEPS] == [K] * MIN_STEPS and granted[MIN_STEPS] == 0
    retries = sum(k > 0 for k in granted[MIN_STEPS:])
    assert retries > 0 if copying else retries == 0


def test_a_switched_off_request_that_starts_copying_is_retried_soon():
    """Screened-out retries do not double the wait: a request whose outputs start copying its prompt
    after 50 plain steps is retried within SHADOW_TOKENS + SHADOW_EVERY steps (doubling waits of
    16, 32, 64 would put the first retry past step 110)."""
    from flashserve.spec.controller import SHADOW_EVERY, SHADOW_TOKENS

    granted = _screened_run(120, lambda i: i >= 50)
    assert granted[:MIN_STEPS] == [K] * MIN_STEPS and not any(granted[MIN_STEPS:50])
    first = next(i for i in range(50, 120) if granted[i])
    assert first <= 50 + SHADOW_TOKENS + SHADOW_EVERY, first


def test_a_request_that_turns_speculative_waits_for_its_step_in_flight():
    """In the overlapped loop a plain request is planned while its previous step is in flight.
    When the controller grants drafts again (its off-switch wait is over), the request must wait
    for the step in flight (drafts continue its token) and then get them; its await used to end
    with the older step's result, so it stayed plain and asked the controller every step."""
    from sched_testing import fake_output

    from flashserve.cache.block_manager import BlockManager
    from flashserve.config import SchedulerConfig
    from flashserve.engine.core import EngineCore
    from flashserve.spec.controller import _RequestStats

    ctl = SpeculationController(SpeculativeConfig("ngram", K, disable_by_cost=False))
    core = EngineCore(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), BlockManager(64, 4),
                      max_model_len=256, speculation=ctl)
    core.add_request(_request("r"))
    ctl._requests["r"] = _RequestStats(off_until=6, times_off=1)  # switched off until controller step 6
    granted, inflight = [], None
    for _ in range(16):
        plan = core.schedule()  # planned before the previous step's tokens are back, as LLMEngine.step
        if inflight is not None:
            core.update(inflight, fake_output(inflight))
        inflight = None if plan.is_empty else plan
        granted += [e.num_spec_tokens for e in plan.requests]
    assert granted[:6] == [0] * 6  # the prompt step and plain, overlapped steps while switched off
    assert K in granted[6:9], granted  # then drafts, once the step in flight is back


def test_nothing_to_copy_decodes_plainly_in_the_overlapped_loop():
    """An n-gram request whose tokens do not end in a repeat gets no draft slots and is planned
    while its step is in flight, as in a plain engine (no wait for a step that would verify
    nothing); once its tokens copy the prompt, its next step waits and drafts."""
    from flashserve.cache.block_manager import BlockManager
    from flashserve.config import SchedulerConfig
    from flashserve.engine.core import EngineCore

    ctl = SpeculationController(SpeculativeConfig("ngram", K, disable_by_cost=False))
    core = EngineCore(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), BlockManager(64, 4),
                      max_model_len=256, speculation=ctl)
    core.add_request(Request("r", list(range(1, 9)), SamplingParams(max_tokens=1000, ignore_eos=True), [0]))
    sampled = iter([100, 101, 102, 103, 104, 105] + list(range(3, 9)) * 20)  # then copies the prompt
    granted, overlapped, inflight = [], [], None
    for _ in range(14):
        plan = core.schedule()
        overlapped.append(inflight is not None and bool(plan.requests))
        if inflight is not None:
            out = {e.request_id: SampledTokens((next(sampled),)) for e in inflight.entries if e.sample}
            core.update(inflight, WorkerOutput(inflight.step_id, out))
        inflight = None if plan.is_empty else plan
        granted.append(sum(e.num_spec_tokens for e in plan.requests) if plan.requests else None)
    first = granted.index(K)
    assert granted[:6] == [0] * 6 and all(overlapped[1:6]), (granted, overlapped)  # plain, overlapped
    assert granted[first - 1] is None and not overlapped[first]  # waited for the repeat, then drafted
    # the copy's first token comes from plan 6 and is known when plan 8 is made (plain, overlapped,
    # now awaiting); plan 9's turn waits for plan 8's token, and plan 10 drafts
    assert first == 10, granted


@pytest.mark.parametrize("min_n", [1, 2, 3])
def test_lookup_check_agrees_with_the_proposer(min_n):
    """The controller's incremental n-gram index says "drafts" exactly when the proposer's match
    search finds an earlier occurrence, on random token streams read as they grow."""
    import numpy as np

    from flashserve.spec.ngram import _matches

    rng = np.random.default_rng(min_n)
    ctl = SpeculationController(SpeculativeConfig("ngram", K, prompt_lookup_min=min_n, prompt_lookup_max=4))
    for trial in range(20):
        tokens = rng.integers(0, 6, size=300).tolist()
        req = Request(f"r{trial}", tokens[:5], SamplingParams(max_tokens=1000, ignore_eos=True), [0])
        for end in range(5, 300, 1 + trial % 3):  # tokens arrive one or several at a time
            req.output_token_ids[:] = tokens[5:end]
            want = len(_matches(np.asarray(tokens[:end]), min_n, 4)[0]) > 0
            assert (ctl.num_spec_tokens(req) > 0) == want, (trial, end)


def test_a_stale_estimate_is_renewed_by_a_try():
    """Verification steps that took 20x a plain one (a one-time cost) switch the request off, and
    new requests start plainly; nothing would ever measure a speculative step again. After
    STALE_STEPS steps without one, a new request speculates, and its steps (now 1.2x a plain one,
    4 drafts accepted of 4) bring speculation back for good."""
    from flashserve.spec.controller import STALE_STEPS

    clock = Clock()
    ctl = SpeculationController(SpeculativeConfig("ngram", K), clock=clock)
    first = _request("first")
    for i in range(8):
        k = ctl.num_spec_tokens(first) if i >= 2 else 0
        _step(ctl, clock, i, first, K, DEVICE_STEP * (20 if k else 1))
    assert ctl.stats.num_switched_off >= 1
    assert ctl.num_spec_tokens(_request("early")) == 0  # starts plainly on the old estimate
    step = 8
    for _ in range(STALE_STEPS):  # plain decoding of other requests: no verification step
        clock.now += DEVICE_STEP
        ctl.observe(SchedulerOutput(step, (ScheduledRequest("p", 10 + step, 1, (), True),)),
                    WorkerOutput(step, {}, None, tokens=[7]))
        step += 1
    late = _request("late")
    granted = []
    for i in range(40):
        k = ctl.num_spec_tokens(late)
        granted.append(_step(ctl, clock, step + i, late, K, DEVICE_STEP * (1.2 if k else 1)))
    assert granted[0] == K and all(k == K for k in granted[MIN_STEPS:])


def test_without_overlap_nothing_to_copy_still_drafts():
    """Where a step computes inside its launch (the CPU), plain steps hide nothing, so the
    nothing-to-copy rule is off: a request without a repeat still gets its draft slots."""
    req = Request("r", list(range(1, 9)), SamplingParams(max_tokens=1000, ignore_eos=True), [0])
    assert SpeculationController(SpeculativeConfig("ngram", K)).num_spec_tokens(req) == 0
    assert SpeculationController(SpeculativeConfig("ngram", K), host_overlaps=False).num_spec_tokens(req) == K


@pytest.mark.parametrize("timed_plain", [True, False])
def test_timed_plain_steps_anchor_the_cost_fit(timed_plain):
    """A product that works in blocks of 4 rows (the CPU's int4 kernel): 1-4 rows cost one block,
    5 rows two. When only steps with drafts (2-5 rows) teach the fit, it reads the block step as a
    steep line through zero, so one draft looks dear and 2 tokens per step of 2 drafts do not pay;
    the timed plain steps (one row) put the fit's a near the block's cost, and they pay."""
    import math

    ctl = SpeculationController(SpeculativeConfig("ngram", K), clock=Clock())  # stands still: device times only

    def cost(rows: int) -> float:
        return 0.03 * math.ceil(rows / 4)

    for i in range(40):
        rows = 2 + i % 4
        entry = ScheduledRequest("r", 10 + i, rows, (), True, (), rows - 1)
        sampled = {"r": SampledTokens((5, 6), None, rows - 1)}
        ctl.observe(SchedulerOutput(2 * i, (entry,)), WorkerOutput(2 * i, sampled, StepCost(rows, 1, cost(rows), 0.0)))
        plain = ScheduledRequest("r", 10 + i, 1, (), True)
        ctl.observe(SchedulerOutput(2 * i + 1, (plain,)),
                    WorkerOutput(2 * i + 1, {}, StepCost(1, 1, cost(1), 0.0) if timed_plain else None, tokens=[7]))
    a, b = ctl.fit.coefficients()
    if timed_plain:
        assert a > 0.6 * cost(1) and ctl.estimated_speedup(2.0, 2) > 1.3
    else:
        assert a < 0.3 * cost(1) and ctl.estimated_speedup(2.0, 2) < 1.0
