"""``flashserve serve``: load the model, warm it up, start the engine thread and run uvicorn until a signal.

Warm start: on a GPU, before the port opens (so /health cannot answer before the server is
ready), the engine runs its warm-up steps (``LLMEngine.warm_up``): every Triton kernel variant
and sampler path a request can hit is compiled, and CUDA graphs were captured when the engine was
built, so the first requests do not pay JIT compiles. The log says how long it took and whether
Triton's kernel cache was cold. On CPU there is nothing to compile (torch kernels), so the
server starts at once.

First SIGTERM/SIGINT: the listening socket closes, new requests on open connections get 503,
and running requests get ``--shutdown-timeout`` seconds to finish; then they are aborted (streams
end with an error event and ``[DONE]``, non-streaming requests get a JSON 503), the engine
thread stops and the process exits with code 0. A second signal exits at once (code 128 + signal).

Connection limits (uvicorn and ``flashserve.server.limits``): request bodies up to
``--max-body-bytes`` (413 beyond) that must arrive within ``--body-timeout`` s (408); request heads
up to 16 KiB (h11's limit) within ``--header-timeout`` s (the connection is closed); idle
keep-alive connections closed after ``--keep-alive-timeout`` s; at most ``--max-connections``
open connections (503 beyond); ``--send-buffer-bytes`` caps each connection's kernel send buffer.

Cascade (``--cascade SMALL``, flashserve.server.cascade): SMALL answers each request first and
``--model`` re-answers when ``--cascade-rule`` scores the small answer below
``--cascade-threshold``. Both engines get the same engine flags (two KV pools: size them with
``--kv-cache-bytes``). Non-streaming only, one prompt and n = 1 per request; the two models must
share a vocabulary.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from types import FrameType
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flashserve.cli import add_engine_arguments
    from flashserve.engine.cascade import RULES

    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (default: $FLASHSERVE_API_KEY)")
    parser.add_argument("--metrics-require-key", action="store_true", help="require the API key on /metrics too")
    parser.add_argument("--enable-openapi", action="store_true", help="serve /openapi.json (behind the API key if one is set)")
    parser.add_argument("--allow-runtime-lora-updates", action="store_true",
                        help="answer POST /v1/load_lora_adapter and /v1/unload_lora_adapter (adapters from folders on this "
                             "machine, into the --max-loras slots; behind the API key if one is set)")
    parser.add_argument("--served-model-name", default=None, help="the model id clients must send (default: the model's name)")
    parser.add_argument("--max-pending", type=int, default=256,
                        help="sequences allowed to wait for a batch slot beyond --max-num-seqs; more get 429")
    parser.add_argument("--max-stream-buffer", type=int, default=1024,
                        help="outputs a stream may have waiting for its client; a client that falls further behind is dropped")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0,
                        help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    parser.add_argument("--max-body-bytes", type=int, default=8 << 20, help="largest request body (413 beyond)")
    parser.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request body may take to arrive (408 beyond)")
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds a request head may take to arrive before the connection is closed")
    parser.add_argument("--keep-alive-timeout", type=int, default=5, help="seconds an idle keep-alive connection stays open")
    parser.add_argument("--send-buffer-bytes", type=int, default=None,
                        help="kernel send buffer per connection (default: the kernel's, which grows to MBs for a client "
                             "that stops reading)")
    parser.add_argument("--max-connections", type=int, default=1024, help="open connections at most (503 beyond)")
    parser.add_argument("--health-stall-timeout", type=float, default=120.0,
                        help="/health answers 503 while one engine step has run longer than this")
    parser.add_argument("--allow-special-tokens-in-messages", action="store_true",
                        help="let special-token strings in chat messages become special tokens (default: escaped)")
    parser.add_argument("--cascade", default=None, metavar="SMALL_MODEL",
                        help="answer each request with this small model first and with --model only when the small "
                             "answer's confidence is below --cascade-threshold (non-streaming requests only)")
    parser.add_argument("--cascade-rule", default="mean_logprob", choices=RULES,
                        help="the small answer's confidence: geometric-mean token probability, or the smallest "
                             "top-1 minus top-2 probability")
    parser.add_argument("--cascade-threshold", type=float, default=0.5,
                        help="keep the small answer when its confidence is at least this (0: always small, 1: always large)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads on CPU (default: torch's)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_arguments(parser)


def _check(args: argparse.Namespace) -> str | None:
    """The first invalid server option, as a message."""
    for name in ("max_pending",):
        if getattr(args, name) < 0:
            return f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}"
    for name in ("max_stream_buffer", "max_body_bytes", "keep_alive_timeout", "max_connections", "send_buffer_bytes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    for name in ("shutdown_timeout", "body_timeout", "header_timeout", "health_stall_timeout"):
        if not getattr(args, name) > 0:
            return f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}"
    return None


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("flashserve serve needs the server extra: pip install 'flashserve[server]'", file=sys.stderr)
        return 2
    from flashserve.cli import llm_kwargs
    from flashserve.engine.async_engine import AsyncLLMEngine
    from flashserve.engine.cascade import ConfidenceRule
    from flashserve.engine.llm import LLM
    from flashserve.server.app import ServerOptions, build_app
    from flashserve.server.cascade import ServedCascade
    from flashserve.server.limits import guarded_protocol

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(message)s")
    problem = _check(args)
    if problem:
        print(f"flashserve serve: {problem}", file=sys.stderr)
        return 2
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    api_key = args.api_key or os.environ.get("FLASHSERVE_API_KEY") or None
    try:
        cascade_kwargs = {} if args.cascade is None else {
            "cascade": args.cascade, "cascade_rule": ConfidenceRule(args.cascade_rule, args.cascade_threshold)}
        llm = LLM(**llm_kwargs(args), verbose=True, **cascade_kwargs)
        if llm.cascade is not None and not llm.cascade.shared_tokenizer:
            raise ValueError(f"--cascade {args.cascade}: the small and large models have different vocabularies; the "
                             "server tokenizes each prompt once, so a cascade needs models that share a tokenizer")
    except (ValueError, FileNotFoundError) as e:
        print(f"flashserve serve: error: {e}", file=sys.stderr)
        return 2
    warm_up(llm.engine)
    engine = AsyncLLMEngine(llm.engine, max_pending=args.max_pending, max_stream_buffer=args.max_stream_buffer)
    cascade = None
    if llm.cascade is not None:
        warm_up(llm.cascade.small.engine)
        small = AsyncLLMEngine(llm.cascade.small.engine, max_pending=args.max_pending,
                               max_stream_buffer=args.max_stream_buffer)
        cascade = ServedCascade(small, llm.cascade.rule)
    options = ServerOptions(api_key=api_key, metrics_require_key=args.metrics_require_key,
                            enable_openapi=args.enable_openapi, shutdown_timeout=args.shutdown_timeout,
                            max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout,
                            escape_special_tokens=not args.allow_special_tokens_in_messages,
                            health_stall_timeout=args.health_stall_timeout,
                            runtime_lora_updates=args.allow_runtime_lora_updates)
    app = build_app(engine, args.served_model_name, options, cascade)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            http=guarded_protocol(args.header_timeout, args.send_buffer_bytes),
                            timeout_keep_alive=args.keep_alive_timeout, limit_concurrency=args.max_connections,
                            # The app aborts what still runs at --shutdown-timeout; the margin lets it
                            # write those endings before uvicorn cancels the connections' tasks.
                            timeout_graceful_shutdown=args.shutdown_timeout + 5,  # type: ignore[arg-type]
                            access_log=args.log_level == "debug")
    server = _make_server(config, app.state.flashserve)
    freeze_startup_heap()
    try:
        server.run()
    finally:
        engine.shutdown()
        if cascade is not None:
            cascade.small.shutdown()
    return 0 if server.started or server.should_exit else 1


def freeze_startup_heap() -> None:
    """Collect once, then put every object alive now (models, tokenizers, compiled kernels, the
    app) out of the cyclic garbage collector's reach (``gc.freeze``). A full collection walks the
    whole heap while it holds the interpreter lock: ~0.1 s on the CPU proxy, a stall of the engine
    thread and of every stream at once, every time one comes due. Done once, by the server only: a
    frozen object that later becomes cyclic garbage is never collected, which a process that
    keeps its engine for its lifetime does not mind (tests and scripts that build many do)."""
    gc.collect()
    gc.freeze()
    logging.getLogger("flashserve").info("flashserve: %d objects of the startup heap frozen out of the cyclic GC",
                                         gc.get_freeze_count())


def warm_up(engine: Any) -> None:
    """Compile what the first requests would otherwise wait for (see the module docstring)."""
    from flashserve.engine.warm_up import triton_cache_state

    log = logging.getLogger("flashserve")
    if engine.device.type != "cuda":
        log.warning("flashserve: nothing to compile on %s; serving", engine.device.type)
        return
    cache = triton_cache_state()
    seconds = engine.warm_up()
    log.warning("flashserve: warmed up in %.1fs (Triton cache was %s); serving", seconds, cache)


def _make_server(config: Any, state: Any) -> Any:
    """A uvicorn.Server whose first SIGTERM/SIGINT starts the app's graceful shutdown (and exits
    with code 0 afterwards) and whose second one exits the process at once."""
    import uvicorn

    class Server(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.should_exit:
                logging.getLogger("flashserve").warning("flashserve: second signal %d: exiting now", sig)
                logging.shutdown()
                os._exit(128 + sig)
            super().handle_exit(sig, frame)
            # Recent uvicorn re-raises the captured signal once it has shut down, which would kill
            # the process with that signal; a graceful shutdown exits normally instead.
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()
            if self.loop is not None:
                self.loop.call_soon_threadsafe(state.begin_shutdown)

    return Server(config)
