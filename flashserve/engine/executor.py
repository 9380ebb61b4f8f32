"""Executors: how EngineCore's plans reach the Worker(s).

``InProcExecutor`` holds the Worker in this process; ``flashserve.distributed.ProcessExecutor``
runs it in a separate process and ships plans over torch.distributed. Both give ``execute(plan)``
a handle with ``result()``, so the engine's loop is the same for each. ``check_lora`` and
``set_lora`` reach every Worker (LoRA adapters loaded or removed while serving; ValueError where a
Worker refuses an adapter).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from flashserve.config import EngineConfig, ModelConfig
from flashserve.sched.plan import SchedulerOutput, WorkerOutput


class Handle(Protocol):
    wait_s: float  # seconds result() spent waiting for the device (or the Worker process)

    def result(self) -> WorkerOutput: ...


class PendingResult:
    """The handle of a step launched elsewhere (another process, other Workers): ``result()``
    calls ``fetch`` once, keeps what it returns and times the wait in ``wait_s``."""

    def __init__(self, fetch: Callable[[], Any]) -> None:
        self._fetch: Callable[[], Any] | None = fetch
        self._result: Any = None
        self.wait_s = 0.0

    def result(self) -> Any:
        if self._fetch is not None:
            t0 = time.perf_counter()
            self._result, self._fetch = self._fetch(), None
            self.wait_s = time.perf_counter() - t0
        return self._result


class InProcExecutor:
    """The Worker lives in this process."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int,
                 eos_token_ids: tuple[int, ...]) -> None:
        from flashserve.runner.worker import Worker

        self.worker = Worker(config, model_config, max_model_len, eos_token_ids)
        self.info = self.worker.info

    def execute(self, plan: SchedulerOutput) -> Handle:
        return self.worker.execute(plan)

    def score_chunk(self, token_ids: list[int], start_pos: int, block_ids: list[int]):
        return self.worker.score_chunk(token_ids, start_pos, block_ids)

    def check_lora(self, adapter) -> None:
        self.worker.check_lora(adapter)

    def set_lora(self, slot: int, adapter) -> None:
        self.worker.set_lora(slot, adapter)

    def shutdown(self) -> None:
        pass


def make_executor(config: EngineConfig, model_config: ModelConfig, max_model_len: int,
                  eos_token_ids: tuple[int, ...]):
    if config.disaggregated:
        from flashserve.distributed.disagg import DisaggregatedExecutor

        return DisaggregatedExecutor(config, model_config, max_model_len, eos_token_ids)
    if config.tensor_parallel_size * config.pipeline_parallel_size > 1:
        from flashserve.distributed.executor import DistributedExecutor

        return DistributedExecutor(config, model_config, max_model_len, eos_token_ids)
    if config.executor == "process":
        from flashserve.distributed.process_executor import ProcessExecutor

        return ProcessExecutor(config, model_config, max_model_len, eos_token_ids)
    return InProcExecutor(config, model_config, max_model_len, eos_token_ids)
