"""EngineCore's side of speculative decoding: how many drafts each request gets, the automatic
off-switch, and the acceptance statistics. Pure Python (no torch), like the scheduler.

The scheduler asks ``num_spec_tokens(request)`` before a decode step; a request that gets k > 0
has its steps planned only after the previous step's tokens are back (``Request.awaiting_result``),
since drafts continue the last accepted token. Requests with 0 stay in the overlapped loop.

Off-switch. Each step the Worker reports its measured cost (``StepCost``: target forward +
verification seconds for T tokens, drafting seconds). The controller fits the forward time as
``a + b * T`` (least squares with exponential forgetting, a weak prior on b) and keeps per
request the mean tokens per verification step L (acceptance length; exponential average) and
the mean drafts per step k. Drafting request i lengthens the step by ``(b + d) * k_i``
(d: drafting seconds per draft token) and saves ``L_i - 1`` tokens, each worth the step's time
per request ``(a + b * B) / B`` of plain decoding at batch B. When the saving falls below the
cost (with a 5 % margin), the request decodes plainly; it is tried again after 16, 32, 64 ...
steps (its acceptance may have changed: a summary starts copying its source).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flashserve.config import SpeculativeConfig
from flashserve.request import Request
from flashserve.sched.plan import SchedulerOutput, WorkerOutput

EMA = 0.3  # weight of the newest step in a request's acceptance average
MIN_STEPS = 3  # verification steps before a request can be switched off
MARGIN = 1.05  # the estimated speedup must exceed this to keep speculating
FORGET = 0.97  # per-step forgetting of the step-time fit


@dataclass
class _RequestStats:
    accept_len: float = 0.0  # mean tokens per verification step
    drafts: float = 0.0  # mean drafts per step
    steps: int = 0  # verification steps since the last (re)start
    off_until: int = -1  # controller step until which the request decodes plainly
    times_off: int = 0


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
class SpeculationController:
    config: SpeculativeConfig
    stats: SpecStats = field(init=False)
    fit: _CostFit = field(default_factory=_CostFit)
    _requests: dict[str, _RequestStats] = field(default_factory=dict)
    _step: int = 0
    _batch: int = 1

    def __post_init__(self) -> None:
        self.stats = SpecStats(self.config.method)

    def num_spec_tokens(self, request: Request) -> int:
        if request.synchronous:  # beam search hypotheses never speculate
            return 0
        k = self.config.num_speculative_tokens
        if request.params.num_speculative_tokens is not None:
            k = min(k, request.params.num_speculative_tokens)
        st = self._requests.get(request.request_id)
        if st is not None and st.off_until > self._step:
            return 0
        return k

    def on_finished(self, request: Request) -> None:
        self._requests.pop(request.request_id, None)

    def observe(self, plan: SchedulerOutput, result: WorkerOutput) -> None:
        """Learn from a finished step: acceptance per request, the step's cost, the off-switch."""
        self._step += 1
        cost = result.cost
        drafts_total = 0
        planned = {e.request_id for e in plan.requests if e.num_spec_tokens}
        for rid, sampled in result.sampled.items():
            n = sampled.num_draft_tokens
            drafts_total += n
            if rid not in planned:
                continue
            st = self._requests.get(rid)
            if st is None:
                st = self._requests[rid] = _RequestStats()
            tokens = len(sampled.token_ids)
            first = st.steps == 0
            st.accept_len = tokens if first else (1 - EMA) * st.accept_len + EMA * tokens
            st.drafts = n if first else (1 - EMA) * st.drafts + EMA * n
            st.steps += 1
            if n:
                self.stats.num_steps += 1
                self.stats.num_draft_tokens += n
                self.stats.num_accepted_tokens += tokens - 1
        if cost is not None:
            self.fit.add(cost.num_tokens, cost.forward_s, cost.draft_s, drafts_total)
            self._batch = max(1, cost.num_seqs)
        if self.config.disable_by_cost and cost is not None:
            for rid in result.sampled:
                st = self._requests.get(rid)
                if st is not None and st.steps >= MIN_STEPS and st.off_until <= self._step and not self.worth_it(st):
                    st.times_off += 1
                    st.off_until = self._step + 16 * 2 ** min(st.times_off - 1, 6)
                    st.steps = 0
                    self.stats.num_switched_off += 1

    def estimated_speedup(self, accept_len: float, drafts: float, batch: int | None = None) -> float:
        """Tokens per second of a request with this acceptance, relative to plain decoding."""
        a, b = self.fit.coefficients()
        if a <= 0:
            return float("inf")  # nothing measured yet
        batch = batch or self._batch
        per_token = (a + b * batch) / batch  # the step's time per request, plain decoding
        cost = (b + self.fit.per_draft) * drafts
        return accept_len * per_token / (per_token + cost)

    def worth_it(self, st: _RequestStats) -> bool:
        return self.estimated_speedup(st.accept_len, st.drafts) > MARGIN
