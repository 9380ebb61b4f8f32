"""A Worker in its own process, driven over torch.distributed (a gloo process group).

The engine process is rank 0 and the Worker process rank 1 of a two-rank gloo group built on a
TCPStore the engine opens on a free local port. Messages are pickled, length-prefixed uint8
tensors sent with the group's send/recv: the Worker's ``WorkerInfo`` once, then plans one way and
``WorkerOutput``s the other. The plan is the same immutable, incremental ``SchedulerOutput`` the
in-process Worker executes, so results are token-identical. LoRA adapters loaded or removed
while serving travel as ``LoRACall`` messages, each answered with a ``LoRAReply``.

Overlap works across the boundary too: the Worker answers step N only after it has launched
step N+1 (or when the engine asks with ``_FLUSH`` because it has nothing more to send).
A Worker that dies gives a clear error naming it (the gloo receive fails, the process's exit code
is reported); an exception inside the Worker comes back as the engine's RuntimeError with the
Worker's traceback.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import pickle
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flashserve.config import EngineConfig, ModelConfig
from flashserve.engine.executor import PendingResult
from flashserve.sched.plan import SchedulerOutput, WorkerOutput

_FLUSH = "flush"
_SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class _Score:
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]


@dataclass(frozen=True)
class _Failure:
    traceback: str


@dataclass(frozen=True)
class LoRACall:
    """Check a LoRA adapter (``slot`` None) or put it in ``slot`` (``adapter`` None: clear it):
    ``Worker.check_lora`` / ``set_lora`` in another process, answered with a ``LoRAReply``."""

    slot: int | None
    adapter: object


@dataclass(frozen=True)
class LoRAReply:
    error: str | None  # the Worker's ValueError, or None


def lora_round_trip(send, recv, call: LoRACall, flush: bool, outputs: dict) -> None:
    """``call`` to a ``PlanServer`` through ``send`` / ``recv``, after asking it (``flush``) for the
    result of its step in flight, which is kept in ``outputs`` by step id for its handle;
    ValueError where the Worker refuses the call."""
    if flush:
        send(_FLUSH)
    send(call)
    while not isinstance(reply := recv(), LoRAReply):
        outputs[reply.step_id] = reply
    if reply.error is not None:
        raise ValueError(reply.error)


class LoRACalls:
    """``check_lora`` / ``set_lora`` of an executor whose Workers live elsewhere: each becomes a
    ``LoRACall`` that the executor's ``_lora`` delivers."""

    def check_lora(self, adapter) -> None:
        self._lora(LoRACall(None, adapter))

    def set_lora(self, slot: int, adapter) -> None:
        self._lora(LoRACall(slot, adapter))


def run_lora_call(worker, call: LoRACall) -> LoRAReply:
    """What a Worker answers to ``call``: a refused adapter is a reply, not a failure."""
    try:
        if call.slot is None:
            worker.check_lora(call.adapter)
        else:
            worker.set_lora(call.slot, call.adapter)
    except ValueError as e:
        return LoRAReply(str(e))
    return LoRAReply(None)


class _Channel:
    """Pickled objects over one peer of a gloo process group."""

    def __init__(self, group: dist.ProcessGroup, peer: int) -> None:
        self.group = group
        self.peer = peer
        self._pending: list = []  # sends posted with wait=False and not seen complete yet

    def send(self, obj: object, wait: bool = True) -> None:
        """Send ``obj``; ``wait=False`` returns before the peer has taken it (a gloo send completes
        only once the peer posts its receive), so the sender goes on while the peer is busy.
        Messages arrive in the order they were sent either way."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        works = [self.group.send([torch.tensor([len(data)], dtype=torch.int64)], self.peer, 0),
                 self.group.send([torch.frombuffer(bytearray(data), dtype=torch.uint8)], self.peer, 1)]
        if wait:
            for work in works:
                work.wait()
        else:  # the works keep their tensors alive until the transfer is done
            self._pending = [w for w in self._pending if not w.is_completed()] + works

    def recv(self) -> object:
        size = torch.empty(1, dtype=torch.int64)
        self.group.recv([size], self.peer, 0).wait()
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        self.group.recv([data], self.peer, 1).wait()
        return pickle.loads(data.numpy().tobytes())


class PlanServer:
    """The Worker's end of the engine's channel: it executes each plan and answers step N only
    once step N+1 is launched (or when ``_FLUSH`` asks), scores chunks (``_Score``) and checks or
    places LoRA adapters (``LoRACall``). Serves the Worker process here and each side of a
    disaggregated engine (``flashserve.distributed.disagg``)."""

    def __init__(self, worker, chan: _Channel) -> None:
        self.worker = worker
        self.chan = chan
        self._prev = None  # the launched step whose result is not sent yet

    def handle(self, msg: object) -> bool:
        """Act on one message from the engine; False when it says to shut down."""
        if msg == _SHUTDOWN:
            return False
        if msg == _FLUSH:
            self._answer(None)
        elif isinstance(msg, _Score):
            self.chan.send(self.worker.score_chunk(msg.token_ids, msg.start_pos, msg.block_ids).cpu())
        elif isinstance(msg, LoRACall):
            self.chan.send(run_lora_call(self.worker, msg))
        else:
            self._answer(self.worker.execute(msg))
        return True

    def _answer(self, launched) -> None:
        """Send the result of the step in flight, if any; ``launched`` is in flight now."""
        if self._prev is not None:
            self.chan.send(self._prev.result())
        self._prev = launched


def _worker_main(port: int, timeout_s: float, config: EngineConfig, model_config: ModelConfig, max_model_len: int,
                 eos_token_ids: tuple[int, ...]) -> None:
    """Entry point of the Worker process."""
    from flashserve.runner.worker import Worker

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, 2, False, timeout=timeout)
    chan = _Channel(dist.ProcessGroupGloo(store, 1, 2, timeout), 0)
    try:
        worker = Worker(config, model_config, max_model_len, eos_token_ids)
    except Exception:
        chan.send(_Failure(traceback.format_exc()))
        return
    chan.send(worker.info)
    server = PlanServer(worker, chan)
    while True:
        msg = chan.recv()
        try:
            if not server.handle(msg):
                return
        except Exception:
            chan.send(_Failure(traceback.format_exc()))
            return


class ProcessExecutor(LoRACalls):
    """Starts the Worker process and talks to it (see the module docstring)."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int,
                 eos_token_ids: tuple[int, ...], timeout_s: float = 600.0) -> None:
        timeout = datetime.timedelta(seconds=timeout_s)
        self._store = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=timeout, wait_for_workers=False)
        ctx = mp.get_context("spawn")
        self.process = ctx.Process(target=_worker_main, name="flashserve-worker", daemon=True,
                                   args=(self._store.port, timeout_s, config, model_config, max_model_len,
                                         eos_token_ids))
        self.process.start()
        self._chan = _Channel(dist.ProcessGroupGloo(self._store, 0, 2, timeout), 1)
        self._last_sent: int | None = None  # step id of the newest plan the Worker has not answered
        self._outputs: dict[int, WorkerOutput] = {}
        self._closed = False
        self.info = self._recv()

    def _dead(self, cause: BaseException | None) -> RuntimeError:
        self.process.join(timeout=5)
        code = self.process.exitcode
        self._closed = True
        state = f"exited with code {code}" if code is not None else "stopped answering"
        return RuntimeError(f"the flashserve worker process (pid {self.process.pid}) {state}"
                            + (f" ({cause})" if cause else ""))

    def _recv(self) -> object:
        if self._closed:
            raise RuntimeError("the flashserve worker process is gone; start a new engine")
        try:
            msg = self._chan.recv()
        except RuntimeError as e:
            raise self._dead(e) from None
        if isinstance(msg, _Failure):
            self._closed = True
            raise RuntimeError(f"the flashserve worker process failed:\n{msg.traceback}")
        return msg

    def _send(self, obj: object) -> None:
        if self._closed:
            raise RuntimeError("the flashserve worker process is gone; start a new engine")
        try:
            self._chan.send(obj)
        except RuntimeError as e:
            raise self._dead(e) from None

    def execute(self, plan: SchedulerOutput) -> PendingResult:
        self._send(plan)
        self._last_sent = step_id = plan.step_id
        return PendingResult(lambda: self._result(step_id))

    def _result(self, step_id: int) -> WorkerOutput:
        if self._last_sent == step_id:  # no newer plan will make the Worker answer: ask
            self._send(_FLUSH)
            self._last_sent = None
        while step_id not in self._outputs:
            out = self._recv()
            self._outputs[out.step_id] = out
        return self._outputs.pop(step_id)

    def score_chunk(self, token_ids: list[int], start_pos: int, block_ids: list[int]) -> torch.Tensor:
        if self._last_sent is not None:
            self._result(self._last_sent)
        self._send(_Score(list(token_ids), start_pos, list(block_ids)))
        return self._recv()

    def _lora(self, call: LoRACall) -> None:
        flush, self._last_sent = self._last_sent is not None, None
        lora_round_trip(self._send, self._recv, call, flush, self._outputs)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._chan.send(_SHUTDOWN)
        except RuntimeError:
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
