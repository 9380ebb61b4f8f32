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
from flashserve.sched.scheduler import Scheduler
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

    def update(self, plan: SchedulerOutput, result: WorkerOutput) -> list[tuple[Request, int]]:
        """Apply a step's tokens. Returns (request, index of its first new output token) for every
        request that got tokens; those that hit a token-level stop are finished already."""
        if self.speculation is not None:
            self.speculation.observe(plan, result)
        progressed = self.scheduler.update(plan, result)
        check, finish, max_len = self.stop.check, self.scheduler.finish_request, self.stop.max_model_len
        for i, (request, n) in enumerate(progressed):
            outputs = request.output_token_ids
            first = len(outputs) - n
            # StopChecker.check's common case inlined: one token that stops nothing
            if n != 1 or outputs[-1] in request.stop_token_set or first + 1 >= request.max_output_tokens \
                    or request.num_prompt_tokens + first + 1 >= max_len:
                status = check(request, n)
                if status is not None:
                    finish(request.request_id, status)
            progressed[i] = (request, first)
        return progressed
