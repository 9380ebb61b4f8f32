"""EngineCore: the scheduler, the block manager, the policies and the stop checks. No torch.

It plans steps (``schedule`` -> an immutable ``SchedulerOutput`` for the Worker) and applies
their results (``update``: sampled tokens appended, token-level stop conditions applied). Text
(detokenization, stop strings) is the caller's: it retires a request with ``finish_request``.
"""

from __future__ import annotations

from flashserve.cache.block_manager import BlockManager
from flashserve.config import SchedulerConfig
from flashserve.request import Request, RequestStatus
from flashserve.sched.plan import SchedulerOutput, WorkerOutput
from flashserve.sched.policy import make_policy
from flashserve.sched.preemption import PreemptionCostModel
from flashserve.sched.scheduler import Scheduler, StepTokens
from flashserve.sched.stop import StopChecker


class EngineCore:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int,
                 cost_model: PreemptionCostModel | None = None, speculation=None, micro_batches: int = 1) -> None:
        self.block_manager = block_manager
        self.speculation = speculation  # flashserve.spec.controller.SpeculationController, or None
        # micro_batches > 1: that many plans in flight on disjoint requests (pipeline stages)
        self.scheduler = Scheduler(config, block_manager, make_policy(config.policy), max_model_len, cost_model,
                                   speculation=speculation, micro_batches=micro_batches)
        self.stop = StopChecker(max_model_len)

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        return self.scheduler.finish_request(request_id, status)

    def fork(self, parent: Request, child: Request, share_partial: bool) -> None:
        self.scheduler.fork(parent, child, share_partial)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def schedule(self) -> SchedulerOutput:
        return self.scheduler.schedule()

    def update(self, plan: SchedulerOutput, result: WorkerOutput) -> StepTokens:
        """Apply a step's tokens and the token-level stop checks. Returns the requests that got
        tokens (``StepTokens``: in plan order, with the tokens each kept); those the checks
        stopped are finished already and listed in its ``finished``."""
        if self.speculation is not None:
            self.speculation.observe(plan, result)
        tokens = self.scheduler.update(plan, result)
        retire, finish = self.stop.retire, self.scheduler.finish_request
        requests, counts = tokens.requests, tokens.counts
        for i in tokens.maybe_stopped:  # the others stop nothing (StopChecker.check's shortcut)
            if counts is None:  # one token each: a stop keeps it
                retire(requests[i], 1, finish, tokens.finished)
            else:
                counts[i] = retire(requests[i], counts[i], finish, tokens.finished)
        return tokens
