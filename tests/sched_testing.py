"""Drive a Scheduler without a model: fake Worker outputs and the engine's stop checks.

Import from tests as ``from sched_testing import run_step, apply_tokens``.
"""

from collections.abc import Callable

from flashserve.sched.plan import SampledTokens, SchedulerOutput, WorkerOutput
from flashserve.sched.scheduler import Scheduler
from flashserve.sched.stop import StopChecker


def fake_output(plan: SchedulerOutput, token: int = 7) -> WorkerOutput:
    """Every sampling request of the plan gets ``token``."""
    return WorkerOutput(plan.step_id, {r.request_id: SampledTokens((token,)) for r in plan.entries if r.sample})


def apply_tokens(s: Scheduler, plan: SchedulerOutput, token: int = 7) -> None:
    """Feed a plan's fake tokens back and retire requests that stop, as EngineCore does."""
    stop = StopChecker(s.max_model_len)
    for req, n in s.update(plan, fake_output(plan, token)):
        status = stop.check(req, n)
        if status is not None:
            s.finish_request(req.request_id, status)


def apply_sampled(s: Scheduler, plan: SchedulerOutput, tokens_for: Callable[[int], list[int]],
                  plain: bool) -> None:
    """Feed a plan's sampling rows the tokens ``tokens_for(rows)`` gives, as a plain step's token
    list (``plain``) or keyed by request (``update``'s general path); retire those that stop."""
    rows = [r.request_id for r in plan.entries if r.sample]
    tokens = tokens_for(len(rows))
    out = WorkerOutput(plan.step_id, {}, tokens=tokens) if plain else \
        WorkerOutput(plan.step_id, {rid: SampledTokens((t,)) for rid, t in zip(rows, tokens)})
    stop = StopChecker(s.max_model_len)
    for req, n in s.update(plan, out):
        status = stop.check(req, n)
        if status is not None:
            s.finish_request(req.request_id, status)


def run_step(s: Scheduler, token: int = 7) -> SchedulerOutput:
    """One serial step: schedule, then apply the tokens."""
    plan = s.schedule()
    apply_tokens(s, plan, token)
    return plan
