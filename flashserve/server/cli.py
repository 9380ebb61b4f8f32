"""``flashserve serve``: load the model, start the engine thread and run uvicorn until a signal.

SIGTERM/SIGINT: uvicorn stops accepting, lets in-flight requests finish for up to
``--shutdown-timeout`` seconds (then cancels them, which aborts their engine requests), the app's
lifespan stops the engine thread, and the process exits with code 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from types import FrameType


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flashserve.cli import add_engine_arguments

    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (default: $FLASHSERVE_API_KEY)")
    parser.add_argument("--served-model-name", default=None, help="the model id clients must send (default: the model's name)")
    parser.add_argument("--max-pending", type=int, default=256,
                        help="requests allowed to wait for a batch slot beyond --max-num-seqs; more get 429")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0,
                        help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads on CPU (default: torch's)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("flashserve serve needs the server extra: pip install 'flashserve[server]'", file=sys.stderr)
        return 2
    from flashserve.cli import llm_kwargs
    from flashserve.engine.async_engine import AsyncLLMEngine
    from flashserve.engine.llm import LLM
    from flashserve.server.app import build_app

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(message)s")
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    if args.max_pending < 0:
        print(f"flashserve serve: --max-pending must be >= 0, got {args.max_pending}", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get("FLASHSERVE_API_KEY") or None
    try:
        llm = LLM(**llm_kwargs(args), verbose=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"flashserve serve: error: {e}", file=sys.stderr)
        return 2
    engine = AsyncLLMEngine(llm.engine, max_pending=args.max_pending)
    app = build_app(engine, args.served_model_name, api_key, shutdown_timeout=args.shutdown_timeout)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout, access_log=args.log_level == "debug")
    server = _make_server(config)
    try:
        server.run()
    finally:
        engine.shutdown()
    return 0 if server.started or server.should_exit else 1


def _make_server(config: "uvicorn.Config") -> "uvicorn.Server":  # noqa: F821
    """A uvicorn.Server that exits normally (code 0) after a SIGTERM/SIGINT graceful shutdown.

    Recent uvicorn re-raises the captured signal once it has shut down, which would kill the
    process with that signal; this subclass forgets the signal after starting the shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    return Server(config)
