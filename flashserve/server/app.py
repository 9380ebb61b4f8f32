"""The FastAPI application: OpenAI-compatible completions and chat, models, health, metrics, a chat page.

``build_app(engine, options)`` wires an ``AsyncLLMEngine`` into routes. A request is refused
(4xx naming the field and the limit) before it costs the engine anything: pydantic types, then
``SamplingParams`` ranges, then capacity (``check_capacity``: 400 if it can never fit, 429 if
it must wait), then the grammar and the prompt, templated and tokenized on the front-end
thread (``flashserve.server.frontend``), never on the engine thread. Only then is it admitted,
so every error, 429 included, is plain JSON; the response either streams SSE chunks or
collects the final outputs. A client that goes away cancels its generator, which aborts the
request and frees its KV blocks; a client that stops reading is dropped when its stream buffer
fills (``AsyncLLMEngine``). The responses themselves are built in ``flashserve.server.streaming``.

Shutdown (``ServerState.begin_shutdown``, called on the first SIGTERM/SIGINT): new requests get
503, running ones get ``shutdown_timeout`` seconds to finish; then they are aborted, so streams
end with an error event and ``[DONE]`` and non-streaming requests get a JSON 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from flashserve.engine.async_engine import AsyncLLMEngine, EngineError, EngineOverloaded, EngineShutdown
from flashserve.request import CompletionOutput, RequestOutput
from flashserve.sampling_params import SamplingParams
from flashserve.server.auth import APIKeyMiddleware
from flashserve.server.cascade import ServedCascade
from flashserve.server.errors import APIError, bad_request, error_body, install_error_handlers
from flashserve.server.frontend import Frontend
from flashserve.server.limits import RequestGuard, request_id_of
from flashserve.server.metrics import ServerMetrics
from flashserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
)
from flashserve.server.streaming import (
    Admitted,
    ChunkEncoder,
    SSEResponse,
    Usage,
    engine_error,
    final_outputs,
    stream_events,
)
from flashserve.server.tools import ToolPlan, parse_tool_calls

logger = logging.getLogger("flashserve")


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
    runtime_lora_updates: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter answer


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    frontend: Frontend
    model_name: str
    metrics: ServerMetrics
    options: ServerOptions
    created: int
    cascade: ServedCascade | None = None  # flashserve serve --cascade: the small model answers first
    shutting_down: bool = False
    _drain: asyncio.Task[None] | None = field(default=None, repr=False)

    def begin_shutdown(self) -> None:
        """Refuse new requests; abort what still runs after ``shutdown_timeout`` (event loop only)."""
        if self.shutting_down:
            return
        self.shutting_down = True
        engines = [self.engine] + ([self.cascade.small] if self.cascade is not None else [])
        for e in engines:
            e.stop_accepting()
        timeout = self.options.shutdown_timeout
        logger.warning("flashserve: shutting down; %d requests in flight get %gs to finish", self.engine.num_in_flight,
                       timeout)

        async def drain() -> None:
            idle = await asyncio.gather(*(e.wait_idle(timeout) for e in engines))
            if not all(idle):
                logger.warning("flashserve: aborting %d requests still running after %gs",
                               sum(e.num_in_flight for e in engines), timeout)
                for e in engines:
                    e.abort_all(f"the server is shutting down; the request was aborted after {timeout:g}s")

        self._drain = asyncio.ensure_future(drain())


def _chat_page() -> str:
    return resources.files("flashserve.server").joinpath("static/chat.html").read_text(encoding="utf-8")


def build_app(engine: AsyncLLMEngine, served_model_name: str | None = None,
              options: ServerOptions | None = None, cascade: ServedCascade | None = None) -> FastAPI:
    """The ASGI app serving ``engine`` under ``served_model_name`` (default: the engine's model);
    with ``cascade``, ``engine`` is the large model and completions go through the cascade
    (flashserve.server.cascade)."""
    options = options or ServerOptions()
    frontend = Frontend(engine.engine.tokenizer, engine.max_model_len, options.escape_special_tokens)
    metrics = ServerMetrics(lambda: (engine.stats(), engine.num_in_flight, engine.num_dropped))
    if cascade is not None:
        metrics.add_cascade(cascade.counters)
    state = ServerState(engine, frontend, served_model_name or engine.model_name, metrics, options, int(time.time()),
                        cascade)
    page = _chat_page()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.begin_shutdown()
        engine.abort_all("the server is shutting down")
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        if cascade is not None:
            cascade.small.abort_all("the server is shutting down")
            await asyncio.get_running_loop().run_in_executor(None, cascade.small.shutdown)
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

    def check_model(model: str | None) -> str | None:
        """The LoRA adapter a request's ``model`` names (None: the base model); 404 for another name.
        LoRA adapters are models of their own name."""
        if model is None or model == state.model_name:
            return None
        adapters = engine.engine.lora_names
        if model in adapters:
            return model
        served = ", ".join(map(repr, (state.model_name, *adapters)))
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served}",
                       param="model", code="model_not_found")

    def check_capacity(num_seqs: int) -> None:
        try:
            engine.check_capacity(num_seqs)
        except EngineOverloaded as e:
            metrics.count_rejected()
            raise engine_error(e) from None
        except (ValueError, EngineShutdown) as e:
            raise engine_error(e) from None

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
            raise engine_error(e) from None
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
            return JSONResponse(error_body(503, engine.dead_reason or "the engine is not running"), status_code=503)
        if cascade is not None and not cascade.small.is_running:
            return JSONResponse(error_body(503, cascade.small.dead_reason or "the cascade's small engine is not running"),
                                status_code=503)
        stalled = engine.seconds_since_progress()
        if stalled > options.health_stall_timeout:
            return JSONResponse(error_body(503, f"the engine has been inside one step for {stalled:.0f}s "
                                                f"(limit {options.health_stall_timeout:g}s)"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def model_card(adapter: str | None = None) -> dict[str, Any]:
        """The base model's card, or an adapter's (``parent``: the base model)."""
        card = {"id": adapter or state.model_name, "object": "model", "created": state.created,
                "owned_by": "flashserve", "max_model_len": engine.max_model_len,
                "vocab_size": engine.engine.model_config.vocab_size}
        return card if adapter is None else {**card, "parent": state.model_name}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(), *map(model_card, engine.engine.lora_names)]}

    def check_lora_updates() -> None:
        if not options.runtime_lora_updates:
            raise APIError(403, "loading and unloading LoRA adapters while serving is off; start flashserve serve "
                                "with --allow-runtime-lora-updates", code="lora_updates_disabled")

    async def update_lora(name: str, fn: Callable[[Any], None]) -> dict[str, Any]:
        """Run a LoRA load or unload on the engine thread; 404 for a missing adapter folder, 400 for
        the engine's other refusals (it keeps serving)."""
        try:
            await engine.call(fn)
        except FileNotFoundError as e:
            raise APIError(404, str(e), param="lora_path", code="lora_not_found") from None
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_lora") from None
        return {"object": "lora_adapter", "id": name}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> dict[str, Any]:
        check_lora_updates()
        if body.lora_name == state.model_name:
            raise APIError(400, f"{body.lora_name!r} is the base model's name; give the adapter another",
                           param="lora_name", code="invalid_lora")
        result = await update_lora(body.lora_name, lambda e: e.add_lora(body.lora_name, body.lora_path))
        return {**result, "status": "loaded"}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> dict[str, Any]:
        check_lora_updates()
        result = await update_lora(body.lora_name, lambda e: e.remove_lora(body.lora_name))
        return {**result, "status": "unloaded"}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        return model_card(check_model(model))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        adapter = check_model(body.model)
        try:
            params = replace(body.sampling_params(), lora=adapter)
            prompts = body.prompts()
        except ValueError as e:
            raise bad_request(e) from None
        model_name = adapter or state.model_name
        if cascade is not None:
            cascade.check(body.stream, len(prompts), params.n)
        check_capacity(len(prompts) * params.n)
        await check_structured(params)
        encoded: list[tuple[str | list[int], list[int]]] = []
        for i, p in enumerate(prompts):
            try:
                encoded.append((p, await frontend.encode(p) if isinstance(p, str) else list(p)))
            except ValueError as e:
                raise bad_request(ValueError(f"prompt {i}: {e}") if len(prompts) > 1 else e) from None
        created = int(time.time())
        n = params.n
        want_lp = params.logprobs is not None
        if cascade is not None:
            request_id, final, model_name, extra = await cascaded("cmpl", request, encoded[0][1], params)
            return JSONResponse({"id": request_id, "object": "text_completion", "created": created, "model": model_name,
                                 "choices": await completion_choices(final, n, want_lp), "usage": usage_of(final),
                                 **extra})
        request_id, admitted = await admit("cmpl", request, encoded, params)

        chunks = ChunkEncoder(request_id, "text_completion", created, model_name, body.include_usage)

        if body.stream:
            text_pos: dict[int, int] = {}  # text offset of each choice's next chunk (for logprobs)

            async def choice(idx: int, c: CompletionOutput, new_lp: list | None) -> dict[str, Any]:
                lp = None if new_lp is None else await completion_logprobs(new_lp, text_pos.get(idx, 0))
                text_pos[idx] = len(c.text)
                return {"index": idx, "text": c.text_delta, "logprobs": lp, "finish_reason": c.finish_reason}

            events = stream_events(engine, admitted, metrics, n, want_lp, chunks, body.include_usage, choice)
            return stream_response(events, admitted)

        final = await final_outputs(engine, request, admitted, metrics)
        return JSONResponse({"id": request_id, "object": "text_completion", "created": created, "model": model_name,
                             "choices": await completion_choices(final, n, want_lp), "usage": usage_of(final)})

    async def completion_choices(final: dict[int, RequestOutput], n: int, want_lp: bool) -> list[dict[str, Any]]:
        choices = []
        for i in sorted(final):
            for c in final[i].outputs:
                lp = await completion_logprobs(c.logprobs, 0) if want_lp and c.logprobs is not None else None
                choices.append({"index": i * n + c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        return choices

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        adapter = check_model(body.model)
        try:
            tool_plan = body.tool_plan()
            params = replace(body.sampling_params(tool_plan), lora=adapter)
            messages = body.template_messages()
        except ValueError as e:
            raise bad_request(e) from None
        model_name = adapter or state.model_name
        if cascade is not None:
            cascade.check(body.stream, 1, params.n)
        check_capacity(params.n)
        await check_structured(params)
        try:
            prompt = await frontend.chat_prompt(messages, body.tools if tool_plan is not None else None)
            ids = await frontend.encode(prompt, add_special_tokens=False)
        except ValueError as e:
            raise bad_request(e) from None
        created = int(time.time())
        want_lp = params.logprobs is not None and tool_plan is None
        if cascade is not None:
            request_id, outputs, model_name, extra = await cascaded("chatcmpl", request, ids, params)
            return JSONResponse({"id": request_id, "object": "chat.completion", "created": created, "model": model_name,
                                 "choices": await chat_choices(outputs[0], tool_plan, want_lp),
                                 "usage": usage_of(outputs), **extra})
        request_id, admitted = await admit("chatcmpl", request, [(prompt, ids)], params)

        chunks = ChunkEncoder(request_id, "chat.completion.chunk", created, model_name, body.include_usage)

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
            events = stream_events(engine, admitted, metrics, params.n, want_lp, chunks, body.include_usage,
                                    choice, prelude=roles)
            return stream_response(events, admitted)

        outputs = await final_outputs(engine, request, admitted, metrics)
        if 0 not in outputs:
            raise engine_error(EngineError("the request ended without a final output"))
        return JSONResponse({"id": request_id, "object": "chat.completion", "created": created, "model": model_name,
                             "choices": await chat_choices(outputs[0], tool_plan, want_lp), "usage": usage_of(outputs)})

    async def chat_choices(final: RequestOutput, tool_plan: ToolPlan | None, want_lp: bool) -> list[dict[str, Any]]:
        choices = []
        for c in final.outputs:
            if tool_plan is not None:
                message, finish = _tool_message(tool_plan, c)
                choices.append({"index": c.index, "message": message, "logprobs": None, "finish_reason": finish})
                continue
            lp = await chat_logprobs(c.logprobs) if want_lp and c.logprobs is not None else None
            choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": lp, "finish_reason": c.finish_reason})
        return choices

    async def cascaded(prefix: str, request: Request, ids: list[int],
                       params: SamplingParams) -> tuple[str, dict[int, RequestOutput], str, dict[str, Any]]:
        """(request id, {0: the answer}, the answering model's name, the response's ``cascade`` entry)."""
        assert cascade is not None
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        logger.debug("request %s is %s", request_id_of(request.scope), request_id)
        out = await cascade.answer(engine, request, request_id, ids, params, metrics)
        model_name, info = cascade.describe(out, state.model_name)
        return request_id, {0: out.output}, model_name, {"cascade": info}

    return app


def usage_of(final: dict[int, RequestOutput]) -> dict[str, int]:
    usage = Usage()
    for out in final.values():
        usage.add(out)
    return usage.as_dict()


def _tool_message(plan: ToolPlan, c: CompletionOutput) -> tuple[dict[str, Any], str | None]:
    """The assistant message and finish reason of a constrained tool-call choice: tool_calls and
    "tool_calls" when the JSON is complete, else the raw text and the engine's reason."""
    calls = parse_tool_calls(plan, c.text) if c.finish_reason == "stop" else None
    if calls is None:
        return {"role": "assistant", "content": c.text}, c.finish_reason
    return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
