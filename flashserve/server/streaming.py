"""Responses built from engine streams: SSE events, merged multi-prompt outputs, final outputs.

``SSEResponse`` streams an event iterator and stops as soon as the client leaves (or is dropped);
``stream_events`` turns admitted engine streams into OpenAI chunks ending in ``[DONE]`` (an
engine failure or shutdown becomes an error event first); ``final_outputs`` collects the last
output of each request for a non-streaming response. Both record finished (or aborted) requests
in the metrics and release every admitted request, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from flashserve.engine.async_engine import AsyncLLMEngine, EngineError, EngineOverloaded, EngineShutdown, StreamOverflow
from flashserve.request import CompletionOutput, RequestOutput
from flashserve.server.errors import APIError, bad_request, error_body
from flashserve.server.limits import ABORT_EXTENSION, BODY_EXTENSION, request_id_of
from flashserve.server.metrics import ServerMetrics

logger = logging.getLogger("flashserve")

Indexed = tuple[int, RequestOutput]
Admitted = list[tuple[str, Any]]  # (engine request id, stream)
_ENGINE_ERRORS = (EngineShutdown, EngineError, StreamOverflow)


class SSEResponse(StreamingResponse):
    """A streaming response that stops (and closes its iterator) as soon as the client leaves.

    It listens for ``http.disconnect`` while sending, whatever ASGI spec version the server
    speaks, and always ``aclose``s the body iterator so its ``finally`` blocks run at once.
    ``on_close`` runs last, even if the iterator never started (a client gone before the first
    chunk), so admitted requests are always released. If one of ``dropped`` is set (the client
    stopped reading and its request was aborted) the response is abandoned unfinished and the
    connection is reset (``ABORT_EXTENSION``, when the server offers it). Body pieces go through
    the server's ``BODY_EXTENSION`` writer when it offers one (one call per token instead of the
    middlewares' send chain and h11's events)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None] | None = None,
                 dropped: Sequence[asyncio.Event] = (), **kwargs: Any) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, **kwargs)
        self.on_close = on_close
        self.dropped = dropped

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return

        async def body() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            write = (scope.get("extensions") or {}).get(BODY_EXTENSION)
            if write is None:  # another server: each piece through the ASGI send
                async def write(data: bytes) -> None:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            async for chunk in self.body_iterator:
                await write(chunk if isinstance(chunk, bytes) else chunk.encode("utf-8"))
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        body_task = asyncio.ensure_future(body())
        tasks = {body_task, asyncio.ensure_future(watch()), *(asyncio.ensure_future(e.wait()) for e in self.dropped)}
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if body_task.done():
                body_task.result()
            elif any(e.is_set() for e in self.dropped):
                logger.warning("request %s: dropping a client that stopped reading", request_id_of(scope))
                abort = (scope.get("extensions") or {}).get(ABORT_EXTENSION)
                if abort is not None:  # reset: a graceful close would wait to flush to a client that never reads
                    abort()
        except OSError:
            pass  # the client went away while we were writing
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.on_close is not None:
                self.on_close()


class ChunkEncoder:
    """The SSE events of one streamed response: ``event(choices, usage=None)``. The fields every
    chunk repeats (id, object, created, model) are encoded once, not per token; the bytes are
    those of ``json.dumps`` of the whole chunk."""

    def __init__(self, request_id: str, obj: str, created: int, model: str, include_usage: bool) -> None:
        head = json.dumps({"id": request_id, "object": obj, "created": created, "model": model}, ensure_ascii=False)
        self._head = f"data: {head[:-1]}, \"choices\": "
        self._tail = ", \"usage\": null}\n\n" if include_usage else "}\n\n"

    def event(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        tail = self._tail if usage is None else f", \"usage\": {json.dumps(usage)}}}\n\n"
        return self._head + _encode(choices) + tail


_encode = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(x, ensure_ascii=False) without a new encoder per call


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def engine_error(e: Exception) -> APIError:
    if isinstance(e, ValueError):
        return bad_request(e)
    if isinstance(e, EngineOverloaded):
        return APIError(429, str(e), code="overloaded", headers={"Retry-After": str(max(1, round(e.retry_after)))})
    if isinstance(e, EngineShutdown):
        return APIError(503, str(e), code="shutting_down", headers={"Retry-After": "1"})
    if isinstance(e, StreamOverflow):
        return APIError(503, str(e), code="client_too_slow")
    return APIError(500, f"generation failed: {e}")


async def _merge(engine: AsyncLLMEngine, admitted: Admitted, metrics: ServerMetrics) -> AsyncIterator[Indexed]:
    """Interleave the outputs of several admitted requests as ``(prompt index, output)``.

    Records each finished request in ``metrics``, and the ones left unfinished (client gone,
    shutdown) as aborted."""
    done: set[int] = set()
    try:
        # one request: its stream itself, without a generator layer per event to add the index
        single = len(admitted) == 1
        source = engine.iterate(*admitted[0]) if single else _interleave(engine, admitted)
        async with contextlib.aclosing(source) as outputs:  # closing us closes (and aborts) them at once
            async for item in outputs:
                i, out = (0, item) if single else item
                if out.finished:
                    done.add(i)
                    _observe(metrics, out)
                yield i, out
    finally:
        for _ in range(len(admitted) - len(done)):
            metrics.observe_finished("abort", None, None, None)


async def _interleave(engine: AsyncLLMEngine, admitted: Admitted) -> AsyncIterator[Indexed]:
    # Bounded, so a reader that stops makes the pumps stop, and the streams' own bounds apply.
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue(maxsize=len(admitted) * 4)

    async def pump(i: int, rid: str, stream: Any) -> None:
        try:
            async for out in engine.iterate(rid, stream):
                await queue.put((i, out))
            await queue.put((i, None))
        except Exception as e:
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, rid, s)) for i, (rid, s) in enumerate(admitted)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_disconnect(request: Request, work: Awaitable[Any], poll_s: float = 0.2) -> Any:
    """Await ``work`` but cancel it (aborting its requests) if the client disconnects."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "client disconnected")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class Usage:
    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def add(self, out: RequestOutput) -> None:
        self.prompt_tokens += len(out.prompt_token_ids)
        self.completion_tokens += sum(len(c.token_ids) for c in out.outputs)

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


async def final_outputs(engine: AsyncLLMEngine, request: Request, admitted: Admitted,
                         metrics: ServerMetrics) -> dict[int, RequestOutput]:
    """The final output of each admitted request (by prompt index) for a non-streaming response.
    A client that leaves aborts them; engine failures become API errors; all are released."""

    async def collect() -> dict[int, RequestOutput]:
        final: dict[int, RequestOutput] = {}
        async with contextlib.aclosing(_merge(engine, admitted, metrics)) as outputs:
            async for i, out in outputs:
                if out.finished:
                    final[i] = out
        return final

    try:
        return await _until_disconnect(request, collect())
    except _ENGINE_ERRORS as e:
        raise engine_error(e) from None
    finally:
        engine.release([rid for rid, _ in admitted])


ChoiceFn = Callable[[int, CompletionOutput, list | None], Awaitable[dict[str, Any] | None]]


async def stream_events(
    engine: AsyncLLMEngine,
    admitted: Admitted,
    metrics: ServerMetrics,
    n: int,
    want_lp: bool,
    chunks: ChunkEncoder,
    include_usage: bool,
    choice: ChoiceFn,
    prelude: Sequence[dict[str, Any]] = (),
) -> AsyncIterator[str]:
    """The SSE events of a streamed request: the prelude choices, then a chunk per choice that
    progressed (``choice(index, completion, new logprobs)`` builds its body, or None to send
    nothing yet), the usage chunk if asked for, and ``[DONE]``; an engine failure or shutdown
    becomes an error event before ``[DONE]``."""
    usage = Usage()
    sent_lp: dict[int, int] = {}
    finished: set[int] = set()
    try:
        for first in prelude:
            yield chunks.event([first])
        async with contextlib.aclosing(_merge(engine, admitted, metrics)) as merged:
            async for i, out in merged:
                for c in out.outputs:
                    idx = i * n + c.index
                    if idx in finished:
                        continue
                    if c.text_delta or c.finish_reason is not None or (c.num_new_tokens and want_lp):
                        new_lp = None
                        if want_lp and c.logprobs is not None:
                            new_lp = c.logprobs[sent_lp.get(idx, 0):]
                            sent_lp[idx] = len(c.logprobs)
                        body = await choice(idx, c, new_lp)
                        if body is not None:
                            yield chunks.event([body])
                    if c.finish_reason is not None:
                        finished.add(idx)
                if out.finished:
                    usage.add(out)
        if include_usage:
            yield chunks.event([], usage.as_dict())
    except _ENGINE_ERRORS as e:
        err = engine_error(e)
        yield _sse(error_body(err.status, err.message, code=err.code))
    yield _sse("[DONE]")


def _observe(metrics: ServerMetrics, out: RequestOutput) -> None:
    m = out.metrics
    reason = out.outputs[0].finish_reason or "abort"
    if m is None:
        metrics.observe_finished(reason, None, None, None)
        return
    metrics.observe_finished(reason, m.time_to_first_token, m.time_per_output_token(len(out.outputs[0].token_ids)),
                             m.e2e_latency)


