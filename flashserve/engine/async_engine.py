"""An asyncio front for ``LLMEngine``: one background thread owns the engine, coroutines talk to it.

    engine = AsyncLLMEngine(LLMEngine(config), max_pending=64)
    async for out in engine.generate("req-1", "Hello", SamplingParams(max_tokens=8)):
        print(out.outputs[0].text_delta, end="")
    engine.shutdown()

``LLMEngine`` is not thread safe, so every call on it runs on the engine thread. Coroutines hand it
work through a command queue guarded by a condition variable; the thread loops ``step()`` while
there is work and sleeps on the condition otherwise. Outputs go back to each request's
``asyncio.Queue`` through ``loop.call_soon_threadsafe``.

Admission control: at most ``max_num_seqs + max_pending`` requests are in flight (so at most
``max_pending`` wait for a batch slot); beyond that ``generate`` raises ``EngineOverloaded``
before queueing anything. Leaving a ``generate`` iterator early (break, cancellation, a client
that went away) aborts the request, which frees its KV blocks on the next loop iteration.

This module needs neither FastAPI nor uvicorn.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flashserve.engine.llm_engine import EngineStats, LLMEngine
from flashserve.request import RequestOutput
from flashserve.sampling_params import SamplingParams
from flashserve.spec.beam import BeamSearchParams

logger = logging.getLogger("flashserve")

T = TypeVar("T")


class EngineOverloaded(RuntimeError):
    """Too many requests are waiting; the caller should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineShutdown(RuntimeError):
    """The engine is shutting down or stopped and accepts no new work."""


class EngineError(RuntimeError):
    """The engine loop failed while running a request (a server-side bug, not the caller's)."""


@dataclass
class _Stream:
    """Where the engine thread sends one request's outputs."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called from the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


@dataclass
class _Call:
    """A function to run on the engine thread, and the future that receives its result."""

    fn: Callable[[LLMEngine], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]

    def resolve(self, engine: LLMEngine) -> None:
        try:
            result, error = self.fn(engine), None
        except BaseException as e:  # handed to the caller, never kills the loop
            result, error = None, e
        self.loop.call_soon_threadsafe(self._set, result, error)

    def _set(self, result: Any, error: BaseException | None) -> None:
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


class AsyncLLMEngine:
    """Runs an ``LLMEngine`` on a background thread and exposes it to asyncio code."""

    def __init__(self, engine: LLMEngine, max_pending: int = 256, retry_after: float = 1.0) -> None:
        if max_pending < 0:
            raise ValueError(f"max_pending must be >= 0, got {max_pending}")
        self.engine = engine
        self.max_pending = max_pending
        self.retry_after = retry_after
        self.max_in_flight = engine.scheduler.config.max_num_seqs + max_pending
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self._cond = threading.Condition()
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._in_flight: set[str] = set()  # event-loop side
        self._accepting = True
        self._stop = False
        self._stats = engine.stats()
        self._steps = 0
        self._thread = threading.Thread(target=self._run, name="flashserve-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public API
    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stop

    def stats(self) -> EngineStats:
        """The snapshot the engine thread took after its latest step (never blocks)."""
        return self._stats

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between steps and return its result."""
        if self._stop:
            raise EngineShutdown("the engine has stopped")
        loop = asyncio.get_running_loop()
        call = _Call(fn, loop, loop.create_future())
        self._submit(lambda: call.resolve(self.engine))
        return await call.future

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        add_special_tokens: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Yield a ``RequestOutput`` each time the request progresses, the last one ``finished``.

        Raises ``ValueError`` (bad input, before anything is yielded), ``EngineOverloaded``,
        ``EngineShutdown`` or ``EngineError``. Closing the iterator early aborts the request.
        """
        stream = await self.add_request(request_id, prompt, params, add_special_tokens)
        async for out in self.iterate(request_id, stream):
            yield out

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        add_special_tokens: bool = True,
    ) -> _Stream:
        """Admit and queue a request; returns once the engine has accepted it (or raised).

        Pair with ``iterate(request_id, stream)``, which aborts the request if left early. Split
        from ``generate`` so that a server can answer an error before a stream starts."""
        if not self._accepting or self._stop:
            raise EngineShutdown("the server is shutting down")
        if request_id in self._in_flight:
            raise ValueError(f"request id {request_id!r} is already in use")
        if len(self._in_flight) >= self.max_in_flight:
            raise EngineOverloaded(
                f"the server is overloaded: {len(self._in_flight)} requests in flight "
                f"(at most {self.max_pending} may wait for a slot); retry later",
                self.retry_after,
            )
        loop = asyncio.get_running_loop()
        stream = _Stream(loop)
        self._in_flight.add(request_id)
        try:
            await self.call(lambda engine: self._add(engine, request_id, prompt, params, add_special_tokens, stream))
        except BaseException as e:
            self._in_flight.discard(request_id)
            if not isinstance(e, ValueError):  # e.g. cancelled after the engine had taken it
                self.abort_nowait(request_id)
            raise
        return stream

    async def iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            self._in_flight.discard(request_id)
            if not finished:
                self.abort_nowait(request_id)

    async def abort(self, request_id: str) -> bool:
        """Abort a request and free its KV blocks; False if it was unknown or already done."""
        self._in_flight.discard(request_id)
        if self._stop:
            return False
        return await self.call(lambda engine: self._abort(engine, request_id))

    def abort_nowait(self, request_id: str) -> None:
        """Queue an abort without waiting (safe from finally blocks and any thread)."""
        if not self._stop:
            self._submit(lambda: self._abort(self.engine, request_id))

    def release(self, request_ids: list[str]) -> None:
        """Abort any of ``request_ids`` still in flight (for streams that were never iterated)."""
        for request_id in request_ids:
            if request_id in self._in_flight:
                self._in_flight.discard(request_id)
                self.abort_nowait(request_id)

    def stop_accepting(self) -> None:
        self._accepting = False

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._in_flight

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop: abort what is still running (streams end with finish_reason "abort")
        and join the engine thread. Safe to call twice and from any thread."""
        self._accepting = False
        if self._thread.is_alive():
            with self._cond:
                self._stop = True
                self._cond.notify_all()
            self._thread.join(timeout)
        self._stop = True

    # ------------------------------------------------------------ engine thread
    def _submit(self, command: Callable[[], None]) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify_all()

    def _add(self, engine: LLMEngine, request_id: str, prompt: str | list[int], params: SamplingParams,
             add_special_tokens: bool, stream: _Stream) -> None:
        if isinstance(params, BeamSearchParams):
            engine.add_beam_request(request_id, prompt, params, add_special_tokens)
        else:
            engine.add_request(request_id, prompt, params, add_special_tokens)
        self._streams[request_id] = stream
        self._stats = engine.stats()

    def _abort(self, engine: LLMEngine, request_id: str) -> bool:
        stream = self._streams.pop(request_id, None)
        aborted = engine.abort_request(request_id)
        self._stats = engine.stats()
        if stream is not None:
            stream.put(EngineShutdown(f"request {request_id!r} was aborted"))
        return aborted

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._commands and not self._stop and not engine.has_unfinished_requests():
                    self._cond.wait()
                commands = list(self._commands)
                self._commands.clear()
                stop = self._stop
            for command in commands:
                command()
            if stop:
                self._abort_all(engine)
                return
            if not engine.has_unfinished_requests():
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # a bug in the engine must not take the server down
                logger.exception("flashserve: engine step failed; failing the requests in flight")
                self._fail_all(engine, EngineError(f"engine step failed: {e}"))
                continue
            self._steps += 1
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if out.finished:
                    self._streams.pop(out.request_id, None)
                if stream is not None:
                    stream.put(out)
            self._stats = engine.stats()

    def _abort_all(self, engine: LLMEngine) -> None:
        for request_id in list(self._streams):
            self._abort(engine, request_id)
        self._stats = engine.stats()

    def _fail_all(self, engine: LLMEngine, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            engine.abort_request(request_id)
            stream.put(error)
        self._streams.clear()
        self._stats = engine.stats()
