"""EngineCore's side of speculative decoding: how many drafts each request gets, the automatic
off-switch, and the acceptance statistics. Pure Python (no torch), like the scheduler.

The scheduler asks ``num_spec_tokens(request)`` before a decode step; a request that gets k > 0
has its steps planned only after the previous step's tokens are back (``Request.awaiting_result``),
since drafts continue the last accepted token. Requests with 0 stay in the overlapped loop.

Off-switch. Each step with draft slots the Worker reports its measured cost (``StepCost``:
target forward + verification seconds for T tokens, drafting seconds); steps without draft slots
run as in a plain engine, and one plain decode step in 8 reports its cost too (T = its
sequences: without them the fit would see only steps that found drafts). The controller fits the
forward time as ``a + b * T`` (least squares with exponential forgetting, a weak prior on b) and keeps per
request the mean tokens per verification step L (acceptance length; exponential average) and
the mean drafts per step k. Drafting request i lengthens the step by ``(b + d) * k_i``
(d: drafting seconds per draft token) and saves ``L_i - 1`` tokens, each worth the step's time
per request ``(a + b * B) / B`` of plain decoding at batch B. When the saving falls below the
cost (with a 5 % margin), the request decodes plainly; it is tried again after 16, 32, 64 ...
steps (its acceptance may have changed: a summary starts copying its source). A step during
which a kernel was compiled or loaded (``StepCost.loaded_kernels``) teaches neither the fit nor
the wall clock: with an empty Triton cache the first verification steps cost up to a second each.

The device times miss what speculation costs on the host: a speculating request's step is
planned only after the previous step's tokens are back, so the host's turn (scheduling, drafting,
launching, reading the tokens) adds to the device's time instead of overlapping it. The controller
therefore also times the wall clock from one decode step's tokens to the next's, for steps with
and without drafts (``_WallClock``), and takes the smaller of the two estimates: the device-time
one, and ``L * plain period / speculative period``. Before any plain step was seen, the plain
period is the fit's device time (a lower bound, so the estimate errs towards switching off). A
new request starts plainly when that estimate at the mean acceptance so far says speculation
does not pay (H200, SmolLM2 at batch 1: a speculative step took 3.4x a plain one, so n-gram drafts
accepted at 1.4-1.7 tokens per step ran at 0.44-0.56x).

Draft length (``adapt_length``, opt-in, chain methods). The wall-clock periods of speculative steps are
also kept per verified row count T (the step's sequences + the drafts it verified), and each
request's per-draft acceptance rate a as the proposer's drafts fare against the target (drafts
accepted, and one rejection unless all were; exponential averages). A step with j drafts then
yields ``(1 - a^(j+1)) / (1 - a)`` tokens, and the request gets the longest j in 1..k whose tokens
per second (with the other requests' rows and tokens of the last step beside it) are within 5 %
of the highest (on the H200 the periods' noise made shorter lengths win by chance). A T not
measured yet is taken to cost what the nearest smaller measured one does (the plain period at the
batch size below the smallest) plus the device fit's seconds per row: optimistic, so it is tried
once and then its measure decides; a row count not measured again within ``STALE_PERIODS``
speculative steps is forgotten, so a length measured at a slow moment is tried again. On a CPU
whose int4 product works in blocks of 4 rows, 5 rows cost about twice 4, and a request given
k = 4 moves to 3.

Nothing to copy. A speculating request's step waits for its predecessor's tokens, drafts or
not, so a step on which prompt lookup finds nothing costs a plain step plus the host's turn. For
n-gram chains the controller therefore grants drafts only when the request's known tokens end
with ``prompt_lookup_min`` tokens seen earlier in them (then the proposer drafts something);
otherwise the request decodes plainly in the overlapped loop, and the first step at which its
tokens (one behind, its step in flight) end in a repeat makes its next step wait and draft.
H200, Gemma 3 270M, chains of 12, two calls: summarize / chat / code 1.40x / 1.84x / 1.23x ->
1.59x / 1.94x / 1.36x, and 1.38x / 1.74x / 1.22x -> 1.40x / 1.95x / 1.36x. Trees keep drafting
every step: with the same rule, 16-node trees went from 1.16x / 1.65x / 1.20x to no verification
step at all (every request switched off from its start). On the CPU nothing overlaps (a step
computes inside its launch), so there is nothing to win, and the rule is off. Forced on there
(Gemma, k = 4, 2-core AMD EPYC), it showed the likely reason trees stalled on the H200: without
the drafting steps that found nothing (one row each), the device fit ``a + b T`` saw rows 2-5
only, whose costs rise steeply (the int4 product's 4-row blocks), fitted a = 0, b = 31 ms,
priced a draft like a plain step, and every request switched off from its start (chains and
trees alike). With one plain decode step in 8 timed for the fit (its one-row samples), forced
on, chains went from 0.99x / 1.03x / 0.97x (chat / summarize / code, 0 / 3 / 12 verification
steps) to 1.17x / 1.05x / 1.03x (90 / 54 / 51), trees from no verification on chat to 58 steps.
Trees still draft every step until a device run says the rule pays for them.

Stale estimates. With every request decoding plainly, nothing measures a speculative step, and
new requests and screened retries would both keep reading the estimate the last verification
steps left, however unlucky those were (one-time costs, a noisy moment). After ``STALE_STEPS``
controller steps without a verification step, a new request starts speculating and a
switched-off one is retried unscreened (once its wait is over), so their steps renew the estimate.

A retry costs verification steps. For n-gram drafts (chains and trees), which cost nothing to
propose, the controller first replays the proposer over the request's last ``SHADOW_TOKENS``
outputs (the drafts it would have made, checked against the tokens that came) and retries only
when that acceptance would pay; otherwise the request is screened again ``SHADOW_EVERY`` steps
later (a retry that fails after verification still doubles the wait). Screening often catches an
answer that starts copying its source: on the H200, Gemma 3 270M's summaries (n-gram chains pay
1.1-1.7x there) saw no retry within 96 tokens while screened-out waits doubled (16, 32, 64
steps). Only at small batches: the replay is host work (0.1-0.4 ms over a 1000-token context on
the 2-core VM this project's CI runs on, every ``SHADOW_EVERY`` steps at most), and it stops as
soon as the answer is known to be too low to pay.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from flashserve.config import SpeculativeConfig
from flashserve.request import Request
from flashserve.sched.plan import SchedulerOutput, WorkerOutput
from flashserve.spec.ngram import NgramProposer

EMA = 0.3  # weight of the newest step in a request's acceptance average
DRAFT_EMA = 0.1  # the same for its per-draft acceptance rate (which sets its draft length)
MIN_STEPS = 3  # verification steps before a request can be switched off
MARGIN = 1.05  # the estimated speedup must exceed this to keep speculating
LENGTH_MARGIN = 1.05  # a shorter draft length must be this much faster per second to be chosen
FORGET = 0.97  # per-step forgetting of the step-time fit
WALL_EMA = 0.2  # weight of the newest period in the wall-clock averages
MAX_GAP_S = 1.0  # a longer wait between two decode steps' tokens is idleness, not a step
STALE_PERIODS = 256  # a row count's period not measured again within this many speculative steps is forgotten
STALE_STEPS = 1024  # steps without any verification step after which the estimates are renewed by a try
SHADOW_TOKENS = 16  # n-gram: recent outputs the proposer is replayed over before a retry
SHADOW_MAX_BATCH = 4  # above, retries are not screened (the replay is host work per request)
SHADOW_EVERY = 8  # steps between two screenings of a switched-off n-gram request


@dataclass
class _RequestStats:
    accept_len: float = 0.0  # mean tokens per verification step
    drafts: float = 0.0  # mean drafts per step
    steps: int = 0  # verification steps since the last (re)start
    off_until: int = -1  # controller step until which the request decodes plainly
    times_off: int = 0
    hits: float = 0.0  # mean drafts accepted per verification step
    misses: float = 0.0  # mean rejections per verification step (0 or 1)
    last_drafts: int = 0  # drafts and tokens of its last step
    last_tokens: int = 0
    limit: int = 0  # the most drafts it may get (the config's k, or its own lower setting)
    grams: set = field(default_factory=set)  # n-gram chains: its n-grams ending before ``grams_upto``
    grams_upto: int = 0

    @property
    def draft_acceptance(self) -> float | None:
        """Per-draft acceptance rate (None before a draft was verified)."""
        seen = self.hits + self.misses
        return self.hits / seen if seen else None


@dataclass
class SpecStats:
    """Totals since start (for /metrics and benchmarks)."""

    method: str
    num_steps: int = 0  # verification steps (a request with >= 1 draft in a step)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0  # drafts accepted
    num_switched_off: int = 0  # times the off-switch sent a request back to plain decoding

    @property
    def acceptance_length(self) -> float:
        """Tokens per verification step (accepted drafts + the target's own token)."""
        return (self.num_accepted_tokens + self.num_steps) / self.num_steps if self.num_steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def as_dict(self) -> dict:
        """The counters and the acceptance length / rate, for benchmark JSON."""
        return {"method": self.method, "verify_steps": self.num_steps, "draft_tokens": self.num_draft_tokens,
                "accepted_tokens": self.num_accepted_tokens, "switched_off": self.num_switched_off,
                "acceptance_length": self.acceptance_length, "acceptance_rate": self.acceptance_rate}


@dataclass
class _CostFit:
    """Least-squares fit of forward seconds = a + b * tokens, with exponential forgetting."""

    s1: float = 0.0
    st: float = 0.0
    stt: float = 0.0
    sy: float = 0.0
    sty: float = 0.0
    draft_s: float = 0.0  # forgetting sums of drafting seconds and draft tokens
    draft_n: float = 0.0

    def add(self, tokens: int, seconds: float, draft_s: float, drafts: int) -> None:
        for name in ("s1", "st", "stt", "sy", "sty", "draft_s", "draft_n"):
            setattr(self, name, getattr(self, name) * FORGET)
        self.s1 += 1
        self.st += tokens
        self.stt += tokens * tokens
        self.sy += seconds
        self.sty += tokens * seconds
        if drafts:
            self.draft_s += draft_s
            self.draft_n += drafts

    def coefficients(self) -> tuple[float, float]:
        """(a, b); b has a weak prior of a / 64 (a verified token costs little on a memory-bound device)."""
        if self.s1 == 0:
            return 0.0, 0.0
        mean_t, mean_y = self.st / self.s1, self.sy / self.s1
        var_t = self.stt / self.s1 - mean_t**2
        cov = self.sty / self.s1 - mean_t * mean_y
        a0 = mean_y / (1 + mean_t / 64)
        prior_w = 1.0  # in units of tokens^2 of spread
        b = (cov * self.s1 + prior_w * a0 / 64) / (var_t * self.s1 + prior_w)
        b = max(b, 0.0)
        return max(mean_y - b * mean_t, 1e-9), b

    @property
    def per_draft(self) -> float:
        return self.draft_s / self.draft_n if self.draft_n else 0.0


@dataclass
class _WallClock:
    """Mean wall seconds from a decode step's tokens to the next decode step's, for steps planned
    with draft slots (``spec``) and steps without (``plain``); 0 until seen."""

    plain: float = 0.0
    spec: float = 0.0
    by_rows: dict[int, float] = field(default_factory=dict)  # speculative steps' mean by verified rows
    seen: dict[int, int] = field(default_factory=dict)  # the speculative period count when each was last seen
    count: int = 0  # speculative periods measured
    last: float | None = None  # when the previous decode step's tokens arrived

    def tick(self, now: float, decode: bool, drafted: bool, rows: int = 0, skip: bool = False) -> None:
        """A decode step's tokens arrived at ``now``; ``skip``: the period is not representative."""
        last, self.last = self.last, (now if decode else None)
        if last is None or not decode or skip or now - last > MAX_GAP_S:
            return
        dt = now - last
        if drafted:
            self.spec = _ema(self.spec, dt)
            self.by_rows[rows] = _ema(self.by_rows.get(rows, 0.0), dt)
            self.count += 1
            self.seen[rows] = self.count
            if self.count % (STALE_PERIODS // 4) == 0:  # forget row counts not seen for a while: tried again
                for r in [r for r, c in self.seen.items() if self.count - c >= STALE_PERIODS]:
                    del self.by_rows[r], self.seen[r]
        else:
            self.plain = _ema(self.plain, dt)


def _ema(mean: float, value: float) -> float:
    """The wall-clock average with a new period (0: none yet)."""
    return value if mean == 0.0 else (1 - WALL_EMA) * mean + WALL_EMA * value


@dataclass
class SpeculationController:
    config: SpeculativeConfig
    clock: Callable[[], float] = time.perf_counter
    host_overlaps: bool = True  # plain steps hide the host's turn (CUDA); on the CPU a step computes in its launch
    stats: SpecStats = field(init=False)
    fit: _CostFit = field(default_factory=_CostFit)
    wall: _WallClock = field(default_factory=_WallClock)
    _requests: dict[str, _RequestStats] = field(default_factory=dict)
    _step: int = 0
    _batch: int = 1
    _rows: int = 1  # verified rows and tokens out of the last step with draft slots
    _tokens: int = 1
    _periods: dict[tuple[int, int], list[float]] = field(default_factory=dict)  # this step's, by (rows, k)
    _overall: _RequestStats = field(default_factory=_RequestStats)  # every request's drafts together
    _last_verified: int = 0  # the controller step of the last verification step

    def __post_init__(self) -> None:
        self.stats = SpecStats(self.config.method)

    def num_spec_tokens(self, request: Request) -> int:
        if request.synchronous:  # beam search hypotheses never speculate
            return 0
        k = self.config.num_speculative_tokens
        if request.params.num_speculative_tokens is not None:
            k = min(k, request.params.num_speculative_tokens)
        st = self._requests.get(request.request_id)
        if st is None:  # a new request: the engine's acceptance so far is its prior
            st = self._requests[request.request_id] = _RequestStats(hits=self._overall.hits,
                                                                    misses=self._overall.misses, limit=k)
            if self.config.disable_by_cost and self.stats.num_steps and not self._starts(st):
                self._switch_off(st)  # starts plainly
        else:
            st.limit = k
        if st.off_until > self._step:
            return 0
        if st.times_off and not st.steps and not self._stale() and self._shadow_says_no(request, k):
            st.off_until = self._step + SHADOW_EVERY  # stays plain, screened again soon
            return 0
        if self._gated() and not self._lookup_finds(request, st):
            return 0  # nothing to copy: a plain step, which need not wait for the one in flight
        return self._best_length(st)[0] if self._adapts(st) else k

    def _gated(self) -> bool:
        """Whether the nothing-to-copy rule applies (module docstring): n-gram chains, where plain
        steps overlap the host's turn."""
        cfg = self.config
        return cfg.method == "ngram" and cfg.tree_width == 1 and self.host_overlaps

    def _lookup_finds(self, request: Request, st: _RequestStats) -> bool:
        """n-gram drafts: whether the request's known tokens end with ``prompt_lookup_min`` tokens
        that occurred earlier in them, i.e. whether prompt lookup would draft anything (module
        docstring, "Nothing to copy"). The n-grams (tokens for n = 1, else their tuples' hashes)
        are indexed as the tokens arrive: ~1 us per request and call."""
        n = self.config.prompt_lookup_min
        out = request.output_token_ids
        end = request.num_known_tokens
        if end <= n:
            return False
        if n == 1 and st.grams_upto == end - 2 and len(out) >= 2:  # one new token, the usual step
            st.grams.add(out[-2])
            st.grams_upto = end - 1
        elif st.grams_upto < end - 1:  # index the n-grams ending at grams_upto .. end - 2
            start = max(st.grams_upto, n - 1)
            window = request.known_tokens[start - n + 1 : end - 1]
            st.grams.update(window if n == 1 else map(hash, zip(*(window[i:] for i in range(n)))))
            st.grams_upto = end - 1
        last = out[-n:] if len(out) >= n else request.known_tokens[end - n : end]
        return (last[0] if n == 1 else hash(tuple(last))) in st.grams

    def _stale(self) -> bool:
        """No verification step for ``STALE_STEPS`` steps: the estimates are as old as that."""
        return self._step - self._last_verified >= STALE_STEPS

    def _starts(self, st: _RequestStats) -> bool:
        """Whether a new request speculates: at its best length with the engine's acceptance, or
        at k with the engine's acceptance length, the estimate exceeds the margin; or the
        estimate is stale (``_stale``: one more try refreshes it)."""
        if self._stale():
            return True
        if self._adapts(st):
            return self._best_length(st)[1] > MARGIN
        return self.estimated_speedup(self.stats.acceptance_length, st.limit) > MARGIN

    def _adapts(self, st: _RequestStats) -> bool:
        """Whether the request's draft length is chosen (``adapt_length`` with the off-switch on,
        chains, data to do it). Both follow the wall clock, so with either off a step's drafts,
        and with them a seeded request's random draws, do not depend on timing."""
        cfg = self.config
        return (cfg.adapt_length and cfg.disable_by_cost and cfg.tree_width == 1 and st.limit > 1
                and st.draft_acceptance is not None and bool(self.wall.by_rows))

    def _best_length(self, st: _RequestStats) -> tuple[int, float]:
        """The drafts in 1..``st.limit`` that give about the most tokens per second of step (module
        docstring), and the request's estimated speedup at that length against plain decoding."""
        acceptance = st.draft_acceptance
        other_rows = max(self._rows - 1 - st.last_drafts, 0)
        other_tokens = max(self._tokens - st.last_tokens, 0)
        periods = self._periods.get((other_rows, st.limit))
        if periods is None:
            periods = self._periods[other_rows, st.limit] = [self.period(other_rows + 1 + j)
                                                             for j in range(1, st.limit + 1)]
        yields, tokens, power = [], 1.0, 1.0
        for _ in range(st.limit):  # tokens: (1 - a^(j+2)) / (1 - a), summed as it goes
            power *= acceptance
            tokens += power
            yields.append(tokens)
        rates = [(other_tokens + t) / p for t, p in zip(yields, periods)]
        top = max(rates)  # the longest length within LENGTH_MARGIN of the best: periods are noisy
        best = max(j for j, rate in enumerate(rates) if rate * LENGTH_MARGIN >= top)
        return best + 1, yields[best] * self._plain_period() / periods[best]

    def _plain_period(self) -> float:
        """Wall seconds of a plain step at the last batch size; before one was seen, the device
        fit's time (a lower bound: a speedup estimate errs towards plain decoding with it, and an
        unmeasured period that starts from it towards trying the length)."""
        if self.wall.plain:
            return self.wall.plain
        a, b = self.fit.coefficients()
        return a + b * self._batch

    def period(self, rows: int) -> float:
        """Wall seconds of a speculative step verifying ``rows`` rows: measured, or else
        optimistically the nearest measured smaller count's (below the smallest, the plain
        period at the last batch size, ``_plain_period``) plus the device fit's seconds per row,
        at most the nearest larger count's. Optimism makes an unmeasured length be tried once,
        then its measure decides."""
        table = self.wall.by_rows
        if rows in table:
            return table[rows]
        below = max((r for r in table if r < rows), default=None)
        above = min((r for r in table if r > rows), default=None)
        plain = self._plain_period()
        low = (below, table[below]) if below is not None else \
            (self._batch, plain) if self._batch < rows and plain > 0 else None
        if low is None:
            return table[above]
        _, b = self.fit.coefficients()
        estimate = low[1] + (b + self.fit.per_draft) * (rows - low[0])
        return estimate if above is None else min(estimate, table[above])

    def _shadow_says_no(self, request: Request, k: int) -> bool:
        """n-gram only (chains and trees), at small batches: True when the drafts the proposer
        would have made over the request's last outputs were accepted too rarely to pay."""
        cfg = self.config
        if cfg.method != "ngram" or not cfg.disable_by_cost or self._batch > SHADOW_MAX_BATCH:
            return False
        # the speedup estimate is proportional to the acceptance: below ``need`` it does not pay
        need = MARGIN / self.estimated_speedup(1.0, k)
        accept = shadow_acceptance(np.asarray(request.all_token_ids, dtype=np.int64),
                                   len(request.output_token_ids), k, cfg.prompt_lookup_min, cfg.prompt_lookup_max,
                                   cfg.tree_width, need)
        return accept is not None and self.estimated_speedup(accept, k) <= MARGIN

    def on_finished(self, request: Request) -> None:
        self._requests.pop(request.request_id, None)

    def observe(self, plan: SchedulerOutput, result: WorkerOutput) -> None:
        """Learn from a finished step: acceptance per request, the step's cost, the off-switch."""
        self._step += 1
        self._periods.clear()
        cost = result.cost
        drafts_total = tokens_total = 0
        planned = {e.request_id for e in plan.requests if e.num_spec_tokens}
        spec_slots = sum(e.num_spec_tokens for e in plan.requests)
        for rid, sampled in result.sampled.items():
            n = sampled.num_draft_tokens
            tokens = len(sampled.token_ids)
            drafts_total += n
            tokens_total += tokens
            if rid not in planned:
                continue
            if n:
                self._last_verified = self._step
            st = self._requests.get(rid)
            if st is None:
                st = self._requests[rid] = _RequestStats()
            first = st.steps == 0
            st.accept_len = tokens if first else (1 - EMA) * st.accept_len + EMA * tokens
            st.drafts = n if first else (1 - EMA) * st.drafts + EMA * n
            st.steps += 1
            st.last_drafts, st.last_tokens = n, tokens
            if n:
                for acc in (st, self._overall):
                    acc.hits = (1 - DRAFT_EMA) * acc.hits + DRAFT_EMA * (tokens - 1)
                    acc.misses = (1 - DRAFT_EMA) * acc.misses + DRAFT_EMA * (tokens - 1 < n)
                self.stats.num_steps += 1
                self.stats.num_draft_tokens += n
                self.stats.num_accepted_tokens += tokens - 1
        # a step with draft slots waited for its predecessor's tokens, drafts found or not
        rows = plan.num_seqs + drafts_total
        loaded = cost is not None and cost.loaded_kernels  # paid for a compile: its times do not recur
        self.wall.tick(self.clock(), plan.num_tokens == plan.num_seqs + spec_slots, spec_slots > 0, rows, loaded)
        self._batch = max(1, plan.num_seqs)
        if spec_slots:
            self._rows, self._tokens = rows, tokens_total
        if cost is not None and not loaded:
            self.fit.add(cost.num_tokens, cost.forward_s, cost.draft_s, drafts_total)
        if self.config.disable_by_cost and cost is not None:
            for rid in result.sampled:
                st = self._requests.get(rid)
                if st is not None and st.steps >= MIN_STEPS and st.off_until <= self._step and not self.worth_it(st):
                    self._switch_off(st)

    def _switch_off(self, st: _RequestStats) -> _RequestStats:
        """Plain decoding for 16, 32, 64 ... steps (doubling each time, up to 1024)."""
        st.times_off += 1
        st.off_until = self._step + 16 * 2 ** min(st.times_off - 1, 6)
        st.steps = 0
        self.stats.num_switched_off += 1
        return st

    def estimated_speedup(self, accept_len: float, drafts: float, batch: int | None = None) -> float:
        """Tokens per second of a request with this acceptance, relative to plain decoding."""
        a, b = self.fit.coefficients()
        if a <= 0:
            return float("inf")  # nothing measured yet
        batch = batch or self._batch
        per_token = (a + b * batch) / batch  # the step's time per request, plain decoding
        cost = (b + self.fit.per_draft) * drafts
        device = accept_len * per_token / (per_token + cost)
        if self.wall.spec == 0.0:
            return device
        plain = self.wall.plain or a + b * batch  # not seen yet: the device time alone (a lower bound)
        return min(device, accept_len * plain / self.wall.spec)

    def worth_it(self, st: _RequestStats) -> bool:
        if self._adapts(st):
            return self._best_length(st)[1] > MARGIN
        return self.estimated_speedup(st.accept_len, st.drafts) > MARGIN


def shadow_acceptance(tokens: np.ndarray, num_outputs: int, k: int, min_n: int, max_n: int,
                      width: int = 1, need: float = 0.0) -> float | None:
    """Tokens per verification step that n-gram drafts (chains of ``k``, or with ``width`` > 1
    trees of ``k`` nodes, as ``NgramProposer`` makes them) would have given over the last
    ``SHADOW_TOKENS`` of ``num_outputs`` outputs at the end of ``tokens`` (steps walk forward by
    the accepted drafts + 1, as speculation would); None with too few outputs. With ``need``, the
    replay stops once the answer cannot exceed it (no step walks more than k + 1 tokens) and
    returns that bound, below ``need`` like the answer."""
    span = min(SHADOW_TOKENS, num_outputs)
    if span < 8:
        return None
    proposer = NgramProposer(min_n, max_n, width)
    end = len(tokens)
    pos, steps = end - span, 0
    while pos < end:
        bound = span / (steps + -(-(end - pos) // (k + 1)))
        if bound < need:
            return bound
        tree = proposer.propose_one(tokens[:pos], k)
        pos += tree.accepted(tokens[pos : pos + tree.num_drafts].tolist()) + 1
        steps += 1
    return span / steps
