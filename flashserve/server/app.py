"""The FastAPI application: OpenAI-compatible completions and chat, models, health and metrics.

``build_app(engine, ...)`` wires an ``AsyncLLMEngine`` into routes. Handlers validate the body
(pydantic, then SamplingParams), admit every prompt with ``engine.add_request`` before a
response starts (so errors, 429 included, are plain JSON), then either stream SSE chunks or
collect the final outputs. A client that goes away cancels its generator, which aborts the
request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from flashserve.engine.async_engine import AsyncLLMEngine, EngineError, EngineOverloaded, EngineShutdown
from flashserve.request import RequestOutput
from flashserve.sampling_params import SamplingParams
from flashserve.server.auth import APIKeyMiddleware
from flashserve.server.errors import APIError, bad_request, error_body, install_error_handlers
from flashserve.server.metrics import ServerMetrics
from flashserve.server.protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger("flashserve")

Indexed = tuple[int, RequestOutput]


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    model_name: str
    metrics: ServerMetrics
    created: int


class SSEResponse(StreamingResponse):
    """A streaming response that stops (and closes its iterator) as soon as the client leaves.

    It listens for ``http.disconnect`` while sending, whatever ASGI spec version the server
    speaks, and always ``aclose``s the body iterator so its ``finally`` blocks run at once.
    ``on_close`` runs last, even if the iterator never started (a client gone before the first
    chunk), so admitted requests are always released."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return

        async def body() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                data = chunk if isinstance(chunk, bytes) else chunk.encode("utf-8")
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        body_task = asyncio.ensure_future(body())
        watch_task = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({body_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
            if body_task.done():
                body_task.result()
        except OSError:
            pass  # the client went away while we were writing
        finally:
            for task in (body_task, watch_task):
                task.cancel()
            await asyncio.gather(body_task, watch_task, return_exceptions=True)
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.on_close is not None:
                self.on_close()


def _chunk_maker(request_id: str, obj: str, created: int, model: str,
                 include_usage: bool) -> Callable[..., dict[str, Any]]:
    """Builds the response objects of one request: ``chunk(choices, usage=None)``."""

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": request_id, "object": obj, "created": created, "model": model,
                               "choices": choices}
        if usage is not None or include_usage:
            out["usage"] = usage
        return out

    return chunk


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def _engine_error(e: Exception) -> APIError:
    if isinstance(e, ValueError):
        return bad_request(e)
    if isinstance(e, EngineOverloaded):
        return APIError(429, str(e), code="overloaded", headers={"Retry-After": str(max(1, round(e.retry_after)))})
    if isinstance(e, EngineShutdown):
        return APIError(503, str(e), code="shutting_down", headers={"Retry-After": "1"})
    return APIError(500, f"generation failed: {e}")


async def _merge(engine: AsyncLLMEngine, admitted: list[tuple[str, Any]], metrics: ServerMetrics) -> AsyncIterator[Indexed]:
    """Interleave the outputs of several admitted requests as ``(prompt index, output)``.

    Records each finished request in ``metrics``, and the ones left unfinished (client gone,
    shutdown) as aborted."""
    done: set[int] = set()
    try:
        if len(admitted) == 1:
            rid, stream = admitted[0]
            async for out in engine.iterate(rid, stream):
                if out.finished:
                    done.add(0)
                    _observe(metrics, out)
                yield 0, out
            return
        async for i, out in _interleave(engine, admitted):
            if out.finished:
                done.add(i)
                _observe(metrics, out)
            yield i, out
    finally:
        for _ in range(len(admitted) - len(done)):
            metrics.observe_finished("abort", None, None, None)


async def _interleave(engine: AsyncLLMEngine, admitted: list[tuple[str, Any]]) -> AsyncIterator[Indexed]:
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, rid: str, stream: Any) -> None:
        try:
            async for out in engine.iterate(rid, stream):
                queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as e:
            queue.put_nowait((i, e))

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


class _Usage:
    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def add(self, out: RequestOutput) -> None:
        self.prompt_tokens += len(out.prompt_token_ids)
        self.completion_tokens += sum(len(c.token_ids) for c in out.outputs)

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


async def _final_outputs(engine: AsyncLLMEngine, request: Request, admitted: list[tuple[str, Any]],
                         metrics: ServerMetrics) -> dict[int, RequestOutput]:
    """The final output of each admitted request (by prompt index) for a non-streaming response.
    A client that leaves aborts them; engine failures become API errors; all are released."""

    async def collect() -> dict[int, RequestOutput]:
        final: dict[int, RequestOutput] = {}
        async for i, out in _merge(engine, admitted, metrics):
            if out.finished:
                final[i] = out
        return final

    try:
        return await _until_disconnect(request, collect())
    except (EngineShutdown, EngineError) as e:
        raise _engine_error(e) from None
    finally:
        engine.release([rid for rid, _ in admitted])


async def _stream_events(
    engine: AsyncLLMEngine,
    admitted: list[tuple[str, Any]],
    metrics: ServerMetrics,
    n: int,
    want_lp: bool,
    chunk: Callable[..., dict[str, Any]],
    include_usage: bool,
    choice: Callable[[int, Any, list | None], Awaitable[dict[str, Any]]],
    prelude: Sequence[dict[str, Any]] = (),
) -> AsyncIterator[str]:
    """The SSE events of a streamed request: the prelude choices, then a chunk per choice that
    progressed (``choice(index, completion, new logprobs)`` builds its body), the usage chunk if
    asked for, and ``[DONE]``; an engine failure becomes an error event before ``[DONE]``."""
    usage = _Usage()
    sent_lp: dict[int, int] = {}
    finished: set[int] = set()
    try:
        for first in prelude:
            yield _sse(chunk([first]))
        async for i, out in _merge(engine, admitted, metrics):
            for c in out.outputs:
                idx = i * n + c.index
                if idx in finished:
                    continue
                if c.text_delta or c.finish_reason is not None or (c.num_new_tokens and want_lp):
                    new_lp = None
                    if want_lp and c.logprobs is not None:
                        new_lp = c.logprobs[sent_lp.get(idx, 0):]
                        sent_lp[idx] = len(c.logprobs)
                    yield _sse(chunk([await choice(idx, c, new_lp)]))
                if c.finish_reason is not None:
                    finished.add(idx)
            if out.finished:
                usage.add(out)
        if include_usage:
            yield _sse(chunk([], usage.as_dict()))
    except (EngineShutdown, EngineError) as e:
        err = _engine_error(e)
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


def build_app(engine: AsyncLLMEngine, served_model_name: str | None = None, api_key: str | None = None,
              shutdown_timeout: float = 5.0) -> FastAPI:
    """The ASGI app serving ``engine`` under ``served_model_name`` (default: the engine's model)."""
    state = ServerState(engine, served_model_name or engine.model_name, ServerMetrics(), int(time.time()))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.stop_accepting()
        await engine.wait_idle(shutdown_timeout)
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="flashserve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.flashserve = state
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, protected_prefix="/v1")

    def check_model(model: str | None) -> None:
        if model is not None and model != state.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}",
                           param="model", code="model_not_found")

    async def admit(prefix: str, prompts: list[str | list[int]], params: SamplingParams,
                    add_special_tokens: bool) -> tuple[str, list[tuple[str, Any]]]:
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        admitted: list[tuple[str, Any]] = []
        try:
            for i, prompt in enumerate(prompts):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                admitted.append((rid, await engine.add_request(rid, prompt, params, add_special_tokens)))
        except (ValueError, EngineOverloaded, EngineShutdown, EngineError) as e:
            for rid, _ in admitted:
                await engine.abort(rid)
            if isinstance(e, EngineOverloaded):
                state.metrics.count_rejected()
            if isinstance(e, ValueError) and len(prompts) > 1:
                e = ValueError(f"prompt {len(admitted)}: {e}")
            raise _engine_error(e) from None
        return request_id, admitted

    async def token_strings(ids: list[int]) -> list[str]:
        if not ids:
            return []
        return await engine.call(lambda e: [e.tokenizer.decode([i]) for i in ids])

    async def completion_logprobs(entries: list[tuple[int, float, list[tuple[int, float]]]], offset: int) -> dict[str, Any]:
        ids = sorted({t for t, _, _ in entries} | {t for _, _, top in entries for t, _ in top})
        text = dict(zip(ids, await token_strings(ids)))
        tokens = [text[t] for t, _, _ in entries]
        offsets, pos = [], offset
        for tok in tokens:
            offsets.append(pos)
            pos += len(tok)
        return {
            "tokens": tokens,
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{text[t]: lp for t, lp in top} for _, _, top in entries],
            "text_offset": offsets,
        }

    async def chat_logprobs(entries: list[tuple[int, float, list[tuple[int, float]]]]) -> dict[str, Any]:
        ids = sorted({t for t, _, _ in entries} | {t for _, _, top in entries for t, _ in top})
        text = dict(zip(ids, await token_strings(ids)))

        def item(t: int, lp: float) -> dict[str, Any]:
            return {"token": text[t], "logprob": lp, "bytes": list(text[t].encode("utf-8"))}

        return {"content": [{**item(t, lp), "top_logprobs": [item(a, b) for a, b in top]} for t, lp, top in entries]}

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.is_running:
            return JSONResponse(error_body(503, "the engine is not running"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = state.metrics.render(engine.stats(), engine.num_in_flight)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "flashserve",
                "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        check_model(model)
        return model_card()

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        check_model(body.model)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        try:
            params = body.sampling_params()
            prompts = body.prompts()
        except ValueError as e:
            raise bad_request(e) from None
        request_id, admitted = await admit("cmpl", prompts, params, True)
        created = int(time.time())
        n = params.n
        want_lp = params.logprobs is not None

        chunk = _chunk_maker(request_id, "text_completion", created, state.model_name, body.include_usage)

        if body.stream:
            text_pos: dict[int, int] = {}  # text offset of each choice's next chunk (for logprobs)

            async def choice(idx: int, c: Any, new_lp: list | None) -> dict[str, Any]:
                lp = None if new_lp is None else await completion_logprobs(new_lp, text_pos.get(idx, 0))
                text_pos[idx] = len(c.text)
                return {"index": idx, "text": c.text_delta, "logprobs": lp, "finish_reason": c.finish_reason}

            events = _stream_events(engine, admitted, state.metrics, n, want_lp, chunk, body.include_usage, choice)
            return SSEResponse(events, on_close=lambda: engine.release([rid for rid, _ in admitted]))

        final = await _final_outputs(engine, request, admitted, state.metrics)
        usage = _Usage()
        choices = []
        for i in sorted(final):
            usage.add(final[i])
            for c in final[i].outputs:
                lp = await completion_logprobs(c.logprobs, 0) if want_lp and c.logprobs is not None else None
                choices.append({"index": i * n + c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        return JSONResponse({"id": request_id, "object": "text_completion", "created": created, "model": state.model_name,
                             "choices": choices, "usage": usage.as_dict()})

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        check_model(body.model)
        try:
            params = body.sampling_params()
        except ValueError as e:
            raise bad_request(e) from None
        messages = [m.as_template_message() for m in body.messages]
        try:
            prompt = await engine.call(lambda e: e.apply_chat_template(messages))
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        request_id, admitted = await admit("chatcmpl", [prompt], params, False)
        created = int(time.time())
        want_lp = params.logprobs is not None

        chunk = _chunk_maker(request_id, "chat.completion.chunk", created, state.model_name, body.include_usage)

        if body.stream:
            async def choice(idx: int, c: Any, new_lp: list | None) -> dict[str, Any]:
                lp = None if new_lp is None else await chat_logprobs(new_lp)
                delta = {"content": c.text_delta} if c.text_delta else {}
                return {"index": idx, "delta": delta, "logprobs": lp, "finish_reason": c.finish_reason}

            roles = [{"index": idx, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for idx in range(params.n)]
            events = _stream_events(engine, admitted, state.metrics, params.n, want_lp, chunk, body.include_usage,
                                    choice, prelude=roles)
            return SSEResponse(events, on_close=lambda: engine.release([rid for rid, _ in admitted]))

        outputs = await _final_outputs(engine, request, admitted, state.metrics)
        if 0 not in outputs:
            raise _engine_error(EngineError("the request ended without a final output"))
        final = outputs[0]
        usage = _Usage()
        usage.add(final)
        choices = []
        for c in final.outputs:
            lp = await chat_logprobs(c.logprobs) if want_lp and c.logprobs is not None else None
            choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": lp, "finish_reason": c.finish_reason})
        return JSONResponse({"id": request_id, "object": "chat.completion", "created": created, "model": state.model_name,
                             "choices": choices, "usage": usage.as_dict()})

    return app

