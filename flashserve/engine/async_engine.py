"""An asyncio front for ``LLMEngine``: one background thread owns the engine, coroutines talk to it.

    engine = AsyncLLMEngine(LLMEngine(config), max_pending=64)
    async for out in engine.generate("req-1", "Hello", SamplingParams(max_tokens=8)):
        print(out.outputs[0].text_delta, end="")
    engine.shutdown()

``LLMEngine`` is not thread safe, so every call on it runs on the engine thread. Coroutines hand it
work through a command queue guarded by a condition variable; the thread loops ``step()`` while
there is work and sleeps on the condition otherwise. Only cheap work runs there: callers should
tokenize first (``add_request(..., prompt_token_ids=...)``; ``flashserve.server.frontend`` does it
on its own thread), since every running stream waits while the engine thread is busy.

Admission control counts sequences (a request with ``n`` choices is n sequences): at most
``max_num_seqs + max_pending`` are in flight. ``check_capacity`` tells a request that can never
fit (ValueError) from one that must wait (``EngineOverloaded``, with a retry delay).

Streams: the engine thread sends each request's progress as deltas (new text, new token ids, new
logprobs) to a bounded per-request buffer, a whole step's deltas in one event-loop callback (one
wake-up per step, not per request); ``iterate`` rebuilds the cumulative ``RequestOutput`` on the
reading side, so an unread stream costs memory linear in its length, not quadratic, and joins the
deltas that piled up while its reader was busy into one output. When a
reader falls ``max_stream_buffer`` outputs behind (a client that stopped reading), its request is
aborted, its stream ends with ``StreamOverflow`` and ``dropped`` is set. Leaving a stream early
(break, cancellation, a client that went away) aborts the request, which frees its KV blocks on
the next loop iteration.

This module needs neither FastAPI nor uvicorn.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flashserve.engine.llm_engine import EngineStats, LLMEngine
from flashserve.request import CompletionOutput, RequestOutput
from flashserve.sampling_params import SamplingParams
from flashserve.spec.beam import BeamSearchParams

logger = logging.getLogger("flashserve")

T = TypeVar("T")


class EngineOverloaded(RuntimeError):
    """Too many sequences are in flight; the caller should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineShutdown(RuntimeError):
    """The engine is shutting down or stopped and accepts no new work."""


class EngineError(RuntimeError):
    """The engine loop failed while running a request (a server-side bug, not the caller's)."""


class StreamOverflow(RuntimeError):
    """The reader of a stream fell too far behind; its request was aborted."""


class _Stream:
    """Where the engine thread sends one request's outputs (as deltas), bounded by ``limit``.

    The engine thread counts each item it sends (``reserve``) and hands the event loop a whole
    step's items in one callback (``_deliver``, from ``AsyncLLMEngine._run``), not one wake-up per
    request; the reader takes everything buffered at once (``take``)."""

    __slots__ = ("loop", "limit", "items", "dropped", "sent", "taken", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.loop = loop
        self.limit = limit
        self.items: collections.deque[RequestOutput | BaseException] = collections.deque()  # event loop only
        self.dropped = asyncio.Event()
        # Each counter has one writer, so no lock: the engine thread may read ``taken`` late, which
        # only makes the buffer look fuller than it is.
        self.sent = 0  # items the engine thread sent (engine thread only)
        self.taken = 0  # items the reader took (event loop only)
        self.waiter: asyncio.Future[None] | None = None  # the reader, waiting for an item

    def reserve(self, error: bool = False) -> bool:
        """Engine thread: count one more item in flight; False when the buffer is full (errors
        always fit)."""
        if not error and self.sent - self.taken >= self.limit:
            return False
        self.sent += 1
        return True

    def deliver(self, item: RequestOutput | BaseException) -> None:
        """Event loop: buffer an item that ``reserve`` counted and wake the reader."""
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def put(self, item: RequestOutput | BaseException) -> bool:
        """Called from the engine thread for a single item; False (nothing queued) when the buffer is full."""
        if not self.reserve(isinstance(item, BaseException)):
            return False
        try:
            self.loop.call_soon_threadsafe(self.deliver, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass
        return True

    def drop(self, error: BaseException) -> None:
        """Engine thread: end the stream with ``error`` and flag it as dropped."""
        self.put(error)
        try:
            self.loop.call_soon_threadsafe(self.dropped.set)
        except RuntimeError:
            pass

    async def take(self) -> list[RequestOutput | BaseException]:
        """Every buffered item, in order, once there is at least one."""
        while not self.items:
            self.waiter = self.loop.create_future()
            await self.waiter
        items = list(self.items)
        self.items.clear()
        self.taken += len(items)
        return items


@dataclass
class _Call:
    """A function to run on the engine thread, and the future that receives its result."""

    fn: Callable[[LLMEngine], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]

    def resolve(self, engine: LLMEngine, after: Callable[[], None] = lambda: None) -> None:
        """Run ``fn``, then ``after`` (before the caller sees the result), then hand the result over."""
        try:
            result, error = self.fn(engine), None
        except BaseException as e:  # handed to the caller, never kills the loop
            result, error = None, e
        after()
        self.loop.call_soon_threadsafe(self._set, result, error)

    def _set(self, result: Any, error: BaseException | None) -> None:
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


class _Accumulator:
    """Rebuilds cumulative outputs from deltas on the reading side; several deltas that arrived
    together become one output (their text and tokens joined). The yielded outputs share their
    ``token_ids`` / ``logprobs`` lists with later ones (they keep growing); copy to keep."""

    def __init__(self) -> None:
        self.choices: dict[int, CompletionOutput] = {}  # index -> text, token ids, logprobs so far

    def _fold(self, d: CompletionOutput) -> CompletionOutput:
        """Add one choice's delta to what that choice has so far."""
        acc = self.choices.get(d.index)
        if acc is None:
            acc = self.choices[d.index] = CompletionOutput(d.index, "", [], None,
                                                           logprobs=None if d.logprobs is None else [])
        if d.text_delta:
            acc.text += d.text_delta
        acc.token_ids.extend(d.token_ids)
        if acc.logprobs is not None and d.logprobs:
            acc.logprobs.extend(d.logprobs)
        return acc

    def add(self, deltas: list[RequestOutput]) -> RequestOutput:
        """One cumulative output for ``deltas`` (in order, at least one), made from the last one
        (the deltas are the reader's own: the engine hands each output over, ``delta=True``)."""
        last = deltas[-1]
        if len(deltas) == 1:  # the usual case: the reader keeps up
            for d in last.outputs:
                acc = self._fold(d)
                d.text, d.token_ids, d.logprobs = acc.text, acc.token_ids, acc.logprobs
            return last
        texts: dict[int, str] = {}
        counts: dict[int, int] = {}
        for delta in deltas:
            for d in delta.outputs:
                self._fold(d)
                texts[d.index] = texts.get(d.index, "") + d.text_delta
                counts[d.index] = counts.get(d.index, 0) + d.num_new_tokens
        for d in last.outputs:
            acc = self.choices[d.index]
            d.text, d.token_ids, d.logprobs = acc.text, acc.token_ids, acc.logprobs
            d.text_delta, d.num_new_tokens = texts[d.index], counts[d.index]
        return last


def _deliver(batch: list[tuple[_Stream, RequestOutput]]) -> None:
    """Event loop: hand a step's outputs to their streams."""
    for stream, out in batch:
        stream.deliver(out)


class AsyncLLMEngine:
    """Runs an ``LLMEngine`` on a background thread and exposes it to asyncio code."""

    def __init__(self, engine: LLMEngine, max_pending: int = 256, retry_after: float = 1.0,
                 max_stream_buffer: int = 1024) -> None:
        if max_pending < 0:
            raise ValueError(f"max_pending must be >= 0, got {max_pending}")
        if max_stream_buffer < 1:
            raise ValueError(f"max_stream_buffer must be >= 1, got {max_stream_buffer}")
        self.engine = engine
        self.max_pending = max_pending
        self.retry_after = retry_after
        self.max_stream_buffer = max_stream_buffer
        self.max_in_flight = engine.scheduler.config.max_num_seqs + max_pending  # sequences
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self._cond = threading.Condition()
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._in_flight: dict[str, int] = {}  # event-loop side: request id -> sequences
        self._accepting = True
        self._stop = False
        self.dead_reason: str | None = None  # why the engine stopped on its own (a distributed rank died)
        self._stats = engine.stats()
        self._steps = 0
        self.num_dropped = 0  # streams dropped because their reader fell behind
        self._busy = False  # the engine thread has work (for the stall check)
        self._last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="flashserve-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public API
    @property
    def num_in_flight(self) -> int:
        """Requests admitted and not finished."""
        return len(self._in_flight)

    @property
    def num_seqs_in_flight(self) -> int:
        return sum(self._in_flight.values())

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stop

    def seconds_since_progress(self) -> float:
        """How long the engine thread has been inside one step or command batch while it has
        work (0 when idle); a large value means the loop is stuck or starved."""
        return time.monotonic() - self._last_progress if self._busy else 0.0

    def stats(self) -> EngineStats:
        """The snapshot the engine thread took after its latest step (never blocks)."""
        return self._stats

    def check_capacity(self, num_seqs: int) -> None:
        """Raise ValueError if ``num_seqs`` sequences can never be in flight at once, or
        ``EngineOverloaded`` if they cannot be now; ``EngineShutdown`` when not accepting."""
        if self.dead_reason is not None:
            raise EngineShutdown(f"the engine is down: {self.dead_reason}")
        if not self._accepting or self._stop:
            raise EngineShutdown("the server is shutting down")
        if num_seqs > self.max_in_flight:
            raise ValueError(
                f"n: the request needs {num_seqs} sequences (prompts x n), but this server holds at most "
                f"{self.max_in_flight} in flight (max_num_seqs + max_pending); send fewer prompts or a smaller n")
        in_flight = self.num_seqs_in_flight
        if in_flight + num_seqs > self.max_in_flight:
            raise EngineOverloaded(
                f"the server is overloaded: {in_flight} sequences in flight, {num_seqs} more asked for, "
                f"at most {self.max_in_flight}; retry later", self.retry_after)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between steps and return its result (the stats
        snapshot taken again after it: ``fn`` may change what it counts, e.g. LoRA adapters)."""
        if self._stop:
            raise EngineShutdown("the engine has stopped")
        loop = asyncio.get_running_loop()
        call = _Call(fn, loop, loop.create_future())
        self._submit(lambda: call.resolve(self.engine, lambda: setattr(self, "_stats", self.engine.stats())))
        return await call.future

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        add_special_tokens: bool = True,
        prompt_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield a ``RequestOutput`` each time the request progresses, the last one ``finished``.

        Raises ``ValueError`` (bad input, before anything is yielded), ``EngineOverloaded``,
        ``EngineShutdown``, ``EngineError`` or ``StreamOverflow``. Closing the iterator early
        aborts the request.
        """
        stream = await self.add_request(request_id, prompt, params, add_special_tokens, prompt_token_ids)
        async with contextlib.aclosing(self.iterate(request_id, stream)) as outputs:  # closed with us: aborts at once
            async for out in outputs:
                yield out

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        add_special_tokens: bool = True,
        prompt_token_ids: list[int] | None = None,
    ) -> _Stream:
        """Admit and queue a request; returns once the engine has accepted it (or raised).

        ``prompt_token_ids`` is the text prompt already tokenized (so the engine thread does not
        tokenize). Pair with ``iterate(request_id, stream)``, which aborts the request if left
        early. Split from ``generate`` so that a server can answer an error before a stream starts."""
        if request_id in self._in_flight:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_capacity(params.n)
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, self.max_stream_buffer)
        self._in_flight[request_id] = params.n
        try:
            await self.call(lambda engine: self._add(engine, request_id, prompt, params, add_special_tokens,
                                                     prompt_token_ids, stream))
        except BaseException as e:
            self._in_flight.pop(request_id, None)
            if not isinstance(e, ValueError):  # e.g. cancelled after the engine had taken it
                self.abort_nowait(request_id)
            raise
        return stream

    async def iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        """The request's cumulative outputs; the deltas a slow reader let pile up come as one."""
        finished = False
        acc = _Accumulator()
        try:
            while not finished:
                outputs: list[RequestOutput] = []
                error: BaseException | None = None
                for item in await stream.take():
                    if isinstance(item, BaseException):
                        error = item
                        break
                    outputs.append(item)
                    if item.finished:
                        break
                finished = error is not None or outputs[-1].finished
                if outputs:
                    yield acc.add(outputs)
                if error is not None:
                    raise error
        finally:
            self._in_flight.pop(request_id, None)
            if not finished:
                self.abort_nowait(request_id)

    async def abort(self, request_id: str) -> bool:
        """Abort a request and free its KV blocks; False if it was unknown or already done."""
        self._in_flight.pop(request_id, None)
        if self._stop:
            return False
        return await self.call(lambda engine: self._abort(engine, request_id))

    def abort_nowait(self, request_id: str) -> None:
        """Queue an abort without waiting (safe from finally blocks and any thread)."""
        if not self._stop:
            self._submit(lambda: self._abort(self.engine, request_id))

    def abort_all(self, message: str) -> None:
        """End every running request now: its stream raises ``EngineShutdown(message)``."""
        if not self._stop:
            self._submit(lambda: self._abort_all(self.engine, message))

    def release(self, request_ids: list[str]) -> None:
        """Abort any of ``request_ids`` still in flight (for streams that were never iterated)."""
        for request_id in request_ids:
            if request_id in self._in_flight:
                self._in_flight.pop(request_id, None)
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
        """Stop the loop: abort what is still running (streams raise ``EngineShutdown``) and join
        the engine thread. Safe to call twice and from any thread."""
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
             add_special_tokens: bool, prompt_token_ids: list[int] | None, stream: _Stream) -> None:
        if isinstance(params, BeamSearchParams):
            engine.add_beam_request(request_id, prompt, params, add_special_tokens, prompt_token_ids=prompt_token_ids)
        else:
            engine.add_request(request_id, prompt, params, add_special_tokens, prompt_token_ids=prompt_token_ids,
                               delta=True)
        self._streams[request_id] = stream
        self._stats = engine.stats()

    def _abort(self, engine: LLMEngine, request_id: str, message: str | None = None) -> bool:
        stream = self._streams.pop(request_id, None)
        aborted = engine.abort_request(request_id)
        self._stats = engine.stats()
        if stream is not None:
            stream.put(EngineShutdown(message or f"request {request_id!r} was aborted"))
        return aborted

    def _run(self) -> None:
        engine = self.engine
        while True:
            self._last_progress = time.monotonic()
            with self._cond:
                self._busy = False
                while not self._commands and not self._stop and not engine.has_unfinished_requests():
                    self._cond.wait()
                self._busy, self._last_progress = True, time.monotonic()
                commands = list(self._commands)
                self._commands.clear()
                stop = self._stop
            for command in commands:
                command()
            if stop:
                self._abort_all(engine, "the server shut down before the request finished")
                return
            if not engine.has_unfinished_requests():
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # a bug in the engine must not take the server down
                reason = getattr(engine.executor, "dead_reason", None)
                if reason is not None:  # a rank is gone: the engine cannot run again
                    logger.error("flashserve: %s", reason)
                    self.dead_reason = reason
                    self._stop = True
                    self._fail_all(engine, EngineShutdown(f"the engine is down: {reason}"))
                    return
                logger.exception("flashserve: engine step failed; failing the requests in flight")
                self._fail_all(engine, EngineError(f"engine step failed: {e}"))
                continue
            self._steps += 1
            batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if out.finished:
                    self._streams.pop(out.request_id, None)
                if stream is None:
                    continue
                if stream.reserve():
                    batches.setdefault(stream.loop, []).append((stream, out))
                else:
                    self._drop(engine, out.request_id, stream)
            self._stats = engine.stats()
            for loop, batch in batches.items():
                try:  # one wake-up of the event loop per step, whatever the number of streams
                    loop.call_soon_threadsafe(_deliver, batch)
                except RuntimeError:  # the event loop is closed: nobody is listening any more
                    pass

    def _drop(self, engine: LLMEngine, request_id: str, stream: _Stream) -> None:
        """A reader fell ``max_stream_buffer`` outputs behind: abort its request, end its stream."""
        logger.warning("flashserve: request %s: the client stopped reading (%d outputs buffered); aborting it",
                       request_id, stream.limit)
        self._streams.pop(request_id, None)
        engine.abort_request(request_id)
        self.num_dropped += 1
        stream.drop(StreamOverflow(f"request {request_id!r} was aborted: the client read too slowly "
                                   f"({stream.limit} outputs were waiting)"))

    def _abort_all(self, engine: LLMEngine, message: str) -> None:
        for request_id in list(self._streams):
            self._abort(engine, request_id, message)
        self._stats = engine.stats()

    def _fail_all(self, engine: LLMEngine, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            engine.abort_request(request_id)
            stream.put(error)
        self._streams.clear()
        self._stats = engine.stats()
