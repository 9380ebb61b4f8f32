"""The FastAPI application: OpenAI-compatible completions and chat, models, health, metrics, a chat page.

``build_app(engine, options)`` wires an ``AsyncLLMEngine`` into routes. A request is refused
(4xx naming the field and the limit) before it costs the engine anything: pydantic types, then
``SamplingParams`` ranges, then capacity (``check_capacity``: 400 if it can never fit, 429 if
it must wait), then the grammar and the prompt, templated and tokenized on the front-end
thread (``flashserve.server.frontend``), never on the engine thread. Only then is it admitted,
so every error, 429 included, is plain JSON; the response either streams SSE chunks or
collects the final outputs. A client that goes away cancels its generator, which aborts the
request and frees its KV blocks; a client that stops reading is dropped when its stream buffer
fills (``AsyncLLMEngine``).

Shutdown (``ServerState.begin_shutdown``, called on the first SIGTERM/SIGINT): new requests get
503, running ones get ``shutdown_timeout`` seconds to finish; then they are aborted, so streams
end with an error event and ``[DONE]`` and non-streaming requests get a JSON 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from flashserve.engine.async_engine import AsyncLLMEngine, EngineError, EngineOverloaded, EngineShutdown, StreamOverflow
from flashserve.request import CompletionOutput, RequestOutput
from flashserve.sampling_params import SamplingParams
from flashserve.server.auth import APIKeyMiddleware
from flashserve.server.errors import APIError, bad_request, error_body, install_error_handlers
from flashserve.server.frontend import Frontend
from flashserve.server.limits import ABORT_EXTENSION, RequestGuard, request_id_of
from flashserve.server.metrics import ServerMetrics
from flashserve.server.protocol import ChatCompletionRequest, CompletionRequest
from flashserve.server.tools import ToolPlan, parse_tool_calls

logger = logging.getLogger("flashserve")

Indexed = tuple[int, RequestOutput]
Admitted = list[tuple[str, Any]]  # (engine request id, stream)
_ENGINE_ERRORS = (EngineShutdown, EngineError, StreamOverflow)


@dataclass(frozen=True)
class ServerOptions:
    """How the app guards itself (the ``flashserve serve`` flags of the same names)."""

    api_key: str | None = None
    metrics_require_key: bool = False  # /metrics behind the key too
    enable_openapi: bool = False  # /openapi.json (behind the key when there is one)
    shutdown_timeout: float = 10.0
    max_body_bytes: int = 8 << 20
    body_timeout: float = 30.0
    escape_special_tokens: bool = True
    health_stall_timeout: float = 120.0  # /health says 503 if one engine step takes longer


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    frontend: Frontend
    model_name: str
    metrics: ServerMetrics
    options: ServerOptions
    created: int
    shutting_down: bool = False
    _drain: asyncio.Task[None] | None = field(default=None, repr=False)

    def begin_shutdown(self) -> None:
        """Refuse new requests; abort what still runs after ``shutdown_timeout`` (event loop only)."""
        if self.shutting_down:
            return
        self.shutting_down = True
        self.engine.stop_accepting()
        timeout = self.options.shutdown_timeout
        logger.warning("flashserve: shutting down; %d requests in flight get %gs to finish", self.engine.num_in_flight,
                       timeout)

        async def drain() -> None:
            if not await self.engine.wait_idle(timeout):
                logger.warning("flashserve: aborting %d requests still running after %gs", self.engine.num_in_flight,
                               timeout)
                self.engine.abort_all(f"the server is shutting down; the request was aborted after {timeout:g}s")

        self._drain = asyncio.ensure_future(drain())


class SSEResponse(StreamingResponse):
    """A streaming response that stops (and closes its iterator) as soon as the client leaves.

    It listens for ``http.disconnect`` while sending, whatever ASGI spec version the server
    speaks, and always ``aclose``s the body iterator so its ``finally`` blocks run at once.
    ``on_close`` runs last, even if the iterator never started (a client gone before the first
    chunk), so admitted requests are always released. If one of ``dropped`` is set (the client
    stopped reading and its request was aborted) the response is abandoned unfinished, which
    makes the server close the connection."""

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
            async for chunk in self.body_iterator:
                data = chunk if isinstance(chunk, bytes) else chunk.encode("utf-8")
                await send({"type": "http.response.body", "body": data, "more_body": True})
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
    if isinstance(e, StreamOverflow):
        return APIError(503, str(e), code="client_too_slow")
    return APIError(500, f"generation failed: {e}")


async def _merge(engine: AsyncLLMEngine, admitted: Admitted, metrics: ServerMetrics) -> AsyncIterator[Indexed]:
    """Interleave the outputs of several admitted requests as ``(prompt index, output)``.

    Records each finished request in ``metrics``, and the ones left unfinished (client gone,
    shutdown) as aborted."""
    done: set[int] = set()
    try:
        rid, stream = admitted[0]
        source = _single(engine.iterate(rid, stream)) if len(admitted) == 1 else _interleave(engine, admitted)
        async with contextlib.aclosing(source) as outputs:  # closing us closes (and aborts) them at once
            async for i, out in outputs:
                if out.finished:
                    done.add(i)
                    _observe(metrics, out)
                yield i, out
    finally:
        for _ in range(len(admitted) - len(done)):
            metrics.observe_finished("abort", None, None, None)


async def _single(outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[Indexed]:
    async with contextlib.aclosing(outputs):  # type: ignore[type-var]
        async for out in outputs:
            yield 0, out


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


async def _final_outputs(engine: AsyncLLMEngine, request: Request, admitted: Admitted,
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
        raise _engine_error(e) from None
    finally:
        engine.release([rid for rid, _ in admitted])


ChoiceFn = Callable[[int, CompletionOutput, list | None], Awaitable[dict[str, Any] | None]]


async def _stream_events(
    engine: AsyncLLMEngine,
    admitted: Admitted,
    metrics: ServerMetrics,
    n: int,
    want_lp: bool,
    chunk: Callable[..., dict[str, Any]],
    include_usage: bool,
    choice: ChoiceFn,
    prelude: Sequence[dict[str, Any]] = (),
) -> AsyncIterator[str]:
    """The SSE events of a streamed request: the prelude choices, then a chunk per choice that
    progressed (``choice(index, completion, new logprobs)`` builds its body, or None to send
    nothing yet), the usage chunk if asked for, and ``[DONE]``; an engine failure or shutdown
    becomes an error event before ``[DONE]``."""
    usage = _Usage()
    sent_lp: dict[int, int] = {}
    finished: set[int] = set()
    try:
        for first in prelude:
            yield _sse(chunk([first]))
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
                            yield _sse(chunk([body]))
                    if c.finish_reason is not None:
                        finished.add(idx)
                if out.finished:
                    usage.add(out)
        if include_usage:
            yield _sse(chunk([], usage.as_dict()))
    except _ENGINE_ERRORS as e:
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


def _chat_page() -> str:
    return resources.files("flashserve.server").joinpath("static/chat.html").read_text(encoding="utf-8")


def build_app(engine: AsyncLLMEngine, served_model_name: str | None = None,
              options: ServerOptions | None = None) -> FastAPI:
    """The ASGI app serving ``engine`` under ``served_model_name`` (default: the engine's model)."""
    options = options or ServerOptions()
    frontend = Frontend(engine.engine.tokenizer, engine.max_model_len, options.escape_special_tokens)
    metrics = ServerMetrics(lambda: (engine.stats(), engine.num_in_flight, engine.num_dropped))
    state = ServerState(engine, frontend, served_model_name or engine.model_name, metrics, options, int(time.time()))
    page = _chat_page()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.begin_shutdown()
        engine.abort_all("the server is shutting down")
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        frontend.shutdown()

    app = FastAPI(title="flashserve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json" if options.enable_openapi else None)
    app.state.flashserve = state
    install_error_handlers(app)
    if options.api_key:
        protected = ("/v1",) + (("/metrics",) if options.metrics_require_key else ()) + (
            ("/openapi.json",) if options.enable_openapi else ())
        app.add_middleware(APIKeyMiddleware, api_key=options.api_key, protected=protected)
    app.add_middleware(RequestGuard, max_body_bytes=options.max_body_bytes, body_timeout=options.body_timeout)

    def check_model(model: str | None) -> None:
        if model is not None and model != state.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}",
                           param="model", code="model_not_found")

    def check_capacity(num_seqs: int) -> None:
        try:
            engine.check_capacity(num_seqs)
        except EngineOverloaded as e:
            metrics.count_rejected()
            raise _engine_error(e) from None
        except (ValueError, EngineShutdown) as e:
            raise _engine_error(e) from None

    async def admit(prefix: str, request: Request, prompts: list[tuple[str | list[int], list[int]]],
                    params: SamplingParams) -> tuple[str, Admitted]:
        """Queue every (prompt, token ids) with the engine; all or none."""
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        logger.debug("request %s is %s", request_id_of(request.scope), request_id)
        admitted: Admitted = []
        try:
            for i, (prompt, ids) in enumerate(prompts):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                admitted.append((rid, await engine.add_request(rid, prompt, params, prompt_token_ids=ids)))
        except (ValueError, EngineOverloaded, EngineShutdown, EngineError) as e:
            for rid, _ in admitted:
                await engine.abort(rid)
            if isinstance(e, EngineOverloaded):
                metrics.count_rejected()
            if isinstance(e, ValueError) and len(prompts) > 1:
                e = ValueError(f"prompt {len(admitted)}: {e}")
            raise _engine_error(e) from None
        return request_id, admitted

    async def check_structured(params: SamplingParams) -> None:
        if params.structured_output is not None:
            try:
                await frontend.check_structured(params.structured_output)
            except ValueError as e:
                raise APIError(400, str(e), param="response_format") from None

    async def completion_logprobs(entries: list[tuple[int, float, list[tuple[int, float]]]], offset: int) -> dict[str, Any]:
        ids = sorted({t for t, _, _ in entries} | {t for _, _, top in entries for t, _ in top})
        text = dict(zip(ids, await frontend.token_strings(ids)))
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
        text = dict(zip(ids, await frontend.token_strings(ids)))

        def item(t: int, lp: float) -> dict[str, Any]:
            return {"token": text[t], "logprob": lp, "bytes": list(text[t].encode("utf-8"))}

        return {"content": [{**item(t, lp), "top_logprobs": [item(a, b) for a, b in top]} for t, lp, top in entries]}

    def stream_response(events: AsyncIterator[str], admitted: Admitted) -> SSEResponse:
        return SSEResponse(events, on_close=lambda: engine.release([rid for rid, _ in admitted]),
                           dropped=[stream.dropped for _, stream in admitted])

    # ------------------------------------------------------------------ routes
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.shutting_down:
            return JSONResponse(error_body(503, "the server is shutting down"), status_code=503)
        if not engine.is_running:
            return JSONResponse(error_body(503, "the engine is not running"), status_code=503)
        stalled = engine.seconds_since_progress()
        if stalled > options.health_stall_timeout:
            return JSONResponse(error_body(503, f"the engine has been inside one step for {stalled:.0f}s "
                                                f"(limit {options.health_stall_timeout:g}s)"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

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
        try:
            params = body.sampling_params()
            prompts = body.prompts()
        except ValueError as e:
            raise bad_request(e) from None
        check_capacity(len(prompts) * params.n)
        await check_structured(params)
        encoded: list[tuple[str | list[int], list[int]]] = []
        for i, p in enumerate(prompts):
            try:
                encoded.append((p, await frontend.encode(p) if isinstance(p, str) else list(p)))
            except ValueError as e:
                raise bad_request(ValueError(f"prompt {i}: {e}") if len(prompts) > 1 else e) from None
        request_id, admitted = await admit("cmpl", request, encoded, params)
        created = int(time.time())
        n = params.n
        want_lp = params.logprobs is not None

        chunk = _chunk_maker(request_id, "text_completion", created, state.model_name, body.include_usage)

        if body.stream:
            text_pos: dict[int, int] = {}  # text offset of each choice's next chunk (for logprobs)

            async def choice(idx: int, c: CompletionOutput, new_lp: list | None) -> dict[str, Any]:
                lp = None if new_lp is None else await completion_logprobs(new_lp, text_pos.get(idx, 0))
                text_pos[idx] = len(c.text)
                return {"index": idx, "text": c.text_delta, "logprobs": lp, "finish_reason": c.finish_reason}

            events = _stream_events(engine, admitted, metrics, n, want_lp, chunk, body.include_usage, choice)
            return stream_response(events, admitted)

        final = await _final_outputs(engine, request, admitted, metrics)
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
            tool_plan = body.tool_plan()
            params = body.sampling_params(tool_plan)
            messages = body.template_messages()
        except ValueError as e:
            raise bad_request(e) from None
        check_capacity(params.n)
        await check_structured(params)
        try:
            prompt = await frontend.chat_prompt(messages, body.tools if tool_plan is not None else None)
            ids = await frontend.encode(prompt, add_special_tokens=False)
        except ValueError as e:
            raise bad_request(e) from None
        request_id, admitted = await admit("chatcmpl", request, [(prompt, ids)], params)
        created = int(time.time())
        want_lp = params.logprobs is not None and tool_plan is None

        chunk = _chunk_maker(request_id, "chat.completion.chunk", created, state.model_name, body.include_usage)

        if body.stream:
            async def choice(idx: int, c: CompletionOutput, new_lp: list | None) -> dict[str, Any] | None:
                if tool_plan is not None:  # calls are sent whole, once the JSON is complete
                    if c.finish_reason is None:
                        return None
                    message, finish = _tool_message(tool_plan, c)
                    if message.get("tool_calls"):
                        message["tool_calls"] = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
                    delta = {k: v for k, v in message.items() if k != "role" and v is not None}
                    return {"index": idx, "delta": delta, "logprobs": None, "finish_reason": finish}
                lp = None if new_lp is None else await chat_logprobs(new_lp)
                delta = {"content": c.text_delta} if c.text_delta else {}
                return {"index": idx, "delta": delta, "logprobs": lp, "finish_reason": c.finish_reason}

            roles = [{"index": idx, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for idx in range(params.n)]
            events = _stream_events(engine, admitted, metrics, params.n, want_lp, chunk, body.include_usage,
                                    choice, prelude=roles)
            return stream_response(events, admitted)

        outputs = await _final_outputs(engine, request, admitted, metrics)
        if 0 not in outputs:
            raise _engine_error(EngineError("the request ended without a final output"))
        final = outputs[0]
        usage = _Usage()
        usage.add(final)
        choices = []
        for c in final.outputs:
            if tool_plan is not None:
                message, finish = _tool_message(tool_plan, c)
                choices.append({"index": c.index, "message": message, "logprobs": None, "finish_reason": finish})
                continue
            lp = await chat_logprobs(c.logprobs) if want_lp and c.logprobs is not None else None
            choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": lp, "finish_reason": c.finish_reason})
        return JSONResponse({"id": request_id, "object": "chat.completion", "created": created, "model": state.model_name,
                             "choices": choices, "usage": usage.as_dict()})

    return app


def _tool_message(plan: ToolPlan, c: CompletionOutput) -> tuple[dict[str, Any], str | None]:
    """The assistant message and finish reason of a constrained tool-call choice: tool_calls and
    "tool_calls" when the JSON is complete, else the raw text and the engine's reason."""
    calls = parse_tool_calls(plan, c.text) if c.finish_reason == "stop" else None
    if calls is None:
        return {"role": "assistant", "content": c.text}, c.finish_reason
    return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
