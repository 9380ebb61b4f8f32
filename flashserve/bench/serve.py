"""``flashserve bench serve``: load any OpenAI-compatible endpoint with streaming requests.

    flashserve bench serve --base-url http://127.0.0.1:8000/v1 --num-prompts 200 \\
        --request-rate 1 2 4 inf --input-len 128 --output-len 64 --output-json r.json --plot r.png

Requests arrive as a Poisson process at each ``--request-rate`` (``inf``: all at once), capped at
``--concurrency`` in flight if given. Every request streams; the client timestamps each content
chunk and reports, per rate, TTFT, TPOT (mean decode interval per request), ITL (gaps between
chunks) and end-to-end latency at mean/p50/p90/p99, plus request and output-token throughput.
Every loop is bounded: ``--num-prompts`` requests per rate, ``--timeout`` per request and
``--max-duration`` per rate.

Prompts are random words (``--input-len`` words each), one ``--prompt``, or with
``--prompt-token-ids`` random token ids of exactly ``--input-len`` tokens (completions only; ids
drawn from [100, vocabulary), the vocabulary taken from the model card or ``--vocab-size``), which
needs no tokenizer on the client and gives exact prompt lengths. Each run draws its own random
prompts (same lengths), so no run reuses another's prefix-cache entries. ``--response-format none json_schema`` runs each load once per format: json_schema constrains
every output to an array of at least 10,000 short strings, so each request still produces exactly
``--output-len`` tokens and the runs compare time per token with and without the grammar mask.
``--hostile`` runs each load twice, alone and next to the hostile clients of
``flashserve.bench.hostile`` (a 50 MB body, n = 10^6, a long prompt, a reader that stops), and
reports the well-behaved streams' ITL and failures side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import ssl
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
# A neutral vocabulary for random prompts; a word is usually one or two tokens.
WORDS = (
    "time year people way day man thing woman life child world school state family student group country problem "
    "hand part place case week company system program question work government number night point home water room "
    "mother area money story fact month lot right study book eye job word business issue side kind head house "
    "service friend father power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war history party result "
    "change morning reason research girl guy moment air teacher force education river mountain garden window light"
).split()


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int = 0  # words (or tokens when the server reports usage)
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def parse_rate(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"request rate must be > 0 (or inf), got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the API root, ending in /v1")
    p.add_argument("--model", default=None, help="model id (default: the first of GET /models)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY or $FLASHSERVE_API_KEY)")
    p.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    p.add_argument("--num-prompts", type=int, default=100, help="requests per rate")
    p.add_argument("--request-rate", type=parse_rate, nargs="+", default=[math.inf],
                   help="Poisson arrival rate(s) in requests/s; several values sweep; inf sends all at once")
    p.add_argument("--concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--input-len", type=int, default=32, help="words per random prompt (tokens with --prompt-token-ids)")
    p.add_argument("--output-len", type=int, default=32, help="max_tokens per request")
    p.add_argument("--prompt", default=None, help="a fixed prompt for every request instead of random words")
    p.add_argument("--prompt-token-ids", action="store_true",
                   help="send prompts as lists of random token ids, --input-len each (completions endpoint)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="token ids are drawn below this (default: the model card's vocab_size)")
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (outputs may end early)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--max-duration", type=float, default=1800.0, help="seconds per rate; unfinished requests count as failed")
    p.add_argument("--response-format", nargs="+", default=["none"], choices=["none", "json_object", "json_schema"],
                   help="run the load once per format (json_schema: a grammar that never ends before --output-len)")
    p.add_argument("--hostile", action="store_true", help="run each load alone and next to hostile clients")
    p.add_argument("--hostile-prompt-len", type=int, default=8000,
                   help="tokens of the hostile long prompt (capped to the model's context)")
    p.add_argument("--output-json", default=None, help="write the report here")
    p.add_argument("--plot", default=None, help="write a PNG of latency against offered load here")
    p.add_argument("--quiet", action="store_true")


# Never satisfied within a benchmark's output length: every request runs to max_tokens.
LONG_SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "minItems": 10000,
                                                          "items": {"type": "string", "maxLength": 24}}},
               "required": ["notes"], "additionalProperties": False}
RESPONSE_FORMATS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "json_object": {"type": "json_object"},
    "json_schema": {"type": "json_schema", "json_schema": {"name": "notes", "schema": LONG_SCHEMA}},
}


def random_prompts(n: int, words: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(max(1, words))) for _ in range(n)]


FIRST_PROMPT_ID = 100  # token-id prompts stay clear of the low ids, where tokenizers keep special tokens


def random_token_prompts(n: int, tokens: int, vocab_size: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(FIRST_PROMPT_ID, vocab_size) for _ in range(max(1, tokens))] for _ in range(n)]


class StreamClient:
    """POSTs streaming requests to one URL over plain asyncio connections, one per request.

    It parses only what a streamed response needs (status line, headers, chunked or
    length-delimited or close-delimited body), so the client's cost per streamed token stays far
    below the server's: through httpx (httpcore, anyio, h11) this 2-core Xeon spent about 100 us
    of client CPU per token, nearly a core at the 9,000 tok/s of 45 req/s x 200 tokens. Proxies
    from the environment are not used."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--base-url must be an http:// or https:// URL, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        fields = {"Host": parts.netloc.rsplit("@", 1)[-1], "Content-Type": "application/json",
                  "Accept": "text/event-stream", "Connection": "close", **headers}
        self._head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())

    async def post(self, body: dict[str, Any]) -> tuple[int, AsyncIterator[bytes], asyncio.StreamWriter]:
        """Send ``body``; (status, the response body's pieces, the connection to close)."""
        payload = json.dumps(body).encode()
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl)
        try:
            writer.write(f"{self._head}Content-Length: {len(payload)}\r\n\r\n".encode("latin-1") + payload)
            status_line = await reader.readline()
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
                raise ConnectionError(f"not an HTTP response: {status_line[:80]!r}")
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
        except BaseException:
            writer.close()
            raise
        return int(parts[1]), _body(reader, headers), writer


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The pieces of a response body, as framed by ``headers``."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("the connection closed inside the response")
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return
            yield (await reader.readexactly(size + 2))[:-2]
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining > 0:
            piece = await reader.read(min(remaining, 1 << 16))
            if not piece:
                raise ConnectionError("the connection closed inside the response")
            remaining -= len(piece)
            yield piece
    else:
        while piece := await reader.read(1 << 16):
            yield piece


def _split_sse(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Split the ``data:`` payloads of complete events off the front of an SSE buffer."""
    if b"\r" in buffer:
        buffer = buffer.replace(b"\r\n", b"\n")
    *events, rest = buffer.split(b"\n\n")
    payloads = []
    for event in events:
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                payloads.append(line[5:].strip())
    return payloads, rest


async def send_request(client: StreamClient, body: dict[str, Any], chat: bool, timeout: float) -> RequestResult:
    """POST one streaming request; timestamp each content chunk."""
    start = time.perf_counter()
    result = RequestResult(ok=False)
    chunks = 0
    usage_tokens: int | None = None
    last = start
    writer = None
    try:
        async with asyncio.timeout(timeout):
            status, pieces, writer = await client.post(body)
            async with contextlib.aclosing(pieces):
                if status != 200:
                    text = b"".join([piece async for piece in pieces]).decode(errors="replace")
                    result.error = f"HTTP {status}: {text[:200]}"
                    return result
                buffer = b""
                async for piece in pieces:
                    events, buffer = _split_sse(buffer + piece)
                    for data in events:
                        if data == b"[DONE]":
                            continue
                        payload = json.loads(data)
                        if "error" in payload:
                            result.error = str(payload["error"].get("message"))
                            return result
                        if payload.get("usage"):
                            usage_tokens = payload["usage"].get("completion_tokens")
                            result.prompt_len = payload["usage"].get("prompt_tokens", 0)
                        for choice in payload.get("choices", []):
                            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                            if not text:
                                continue
                            now = time.perf_counter()
                            if result.ttft is None:
                                result.ttft = now - start
                            else:
                                result.itl.append(now - last)
                            last = now
                            chunks += 1
        result.e2e = time.perf_counter() - start
        result.output_tokens = usage_tokens if usage_tokens is not None else chunks
        result.ok = result.ttft is not None
        if not result.ok:
            result.error = "no content was streamed"
    except TimeoutError:
        result.error = f"timed out after {timeout}s"
    except Exception as e:  # network errors and malformed streams are results, not crashes
        result.error = f"{type(e).__name__}: {e}"
    finally:
        if writer is not None:
            writer.close()
    return result


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]

    def stats_ms(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
        arr = np.asarray(values) * 1000.0
        return {"mean": float(arr.mean()), **{f"p{q}": float(np.percentile(arr, q)) for q in PERCENTILES}}

    out_tokens = sum(r.output_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = (r.error or "unknown")[:120]
            errors[key] = errors.get(key, 0) + 1
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_token_throughput": out_tokens / duration if duration > 0 else 0.0,
        "total_output_tokens": out_tokens,
        "total_prompt_tokens": sum(r.prompt_len for r in ok),
        "ttft_ms": stats_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": stats_ms([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": stats_ms([x for r in ok for x in r.itl]),
        "e2e_ms": stats_ms([r.e2e for r in ok if r.e2e is not None]),
        "errors": errors,
    }


async def run_load(client: StreamClient, bodies: list[dict[str, Any]], chat: bool, rate: float,
                   concurrency: int | None, timeout: float, max_duration: float, rng: random.Random) -> dict[str, Any]:
    """Send ``bodies`` as a Poisson stream at ``rate`` (at most ``concurrency`` in flight)."""
    semaphore = asyncio.Semaphore(concurrency) if concurrency else None

    async def one(body: dict[str, Any]) -> RequestResult:
        if semaphore is None:
            return await send_request(client, body, chat, timeout)
        async with semaphore:
            return await send_request(client, body, chat, timeout)

    start = time.perf_counter()
    tasks: list[asyncio.Task[RequestResult]] = []

    async def launch() -> None:
        for body in bodies:
            tasks.append(asyncio.create_task(one(body)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))

    launcher = asyncio.create_task(launch())
    try:
        await asyncio.wait_for(asyncio.shield(launcher), max_duration)
        remaining = max(0.0, max_duration - (time.perf_counter() - start))
        if tasks:
            await asyncio.wait(tasks, timeout=remaining)
    except TimeoutError:
        pass
    launcher.cancel()
    results = []
    for task in tasks:
        if task.done() and not task.cancelled():
            results.append(task.result())
        else:
            task.cancel()
            results.append(RequestResult(ok=False, error=f"unfinished after --max-duration {max_duration}s"))
    await asyncio.gather(*tasks, return_exceptions=True)
    results += [RequestResult(ok=False, error="never sent (--max-duration)")] * (len(bodies) - len(tasks))
    duration = time.perf_counter() - start
    summary = summarize(results, duration)
    summary["request_rate"] = rate if math.isfinite(rate) else "inf"
    summary["concurrency"] = concurrency
    return summary


def format_table(runs: list[dict[str, Any]]) -> str:
    header = f"{'run':<12} {'rate':>6} {'conc':>5} {'ok':>5} {'fail':>5} {'req/s':>7} {'tok/s':>8} | " + " | ".join(
        f"{name:^27}" for name in ("TTFT ms mean/p50/p90/p99", "TPOT ms", "ITL ms", "E2E ms"))
    lines = [header, "-" * len(header)]
    for run in runs:
        cells = []
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            s = run[key]
            cells.append("/".join("-" if s[k] is None else f"{s[k]:.0f}" for k in ("mean", "p50", "p90", "p99")).center(27))
        conc = "-" if run["concurrency"] is None else str(run["concurrency"])
        lines.append(f"{run.get('label', '-'):<12} {str(run['request_rate']):>6} {conc:>5} {run['completed']:>5} {run['failed']:>5} "
                      f"{run['request_throughput']:>7.2f} {run['output_token_throughput']:>8.1f} | " + " | ".join(cells))
    return "\n".join(lines)


def plot_positions(runs: list[dict[str, Any]]) -> tuple[list[float], float | None]:
    """x of each run in the plot: its offered rate, or for a run at rate inf (no offered rate: all
    requests at once) one shared position right of the sweep, behind a break (None if no run is
    at inf). Drawing inf at its achieved throughput would put it inside the sweep and make the
    lines zig-zag."""
    finite = [float(r["request_rate"]) for r in runs if r["request_rate"] != "inf"]
    if not any(r["request_rate"] == "inf" for r in runs):
        return finite, None
    x_inf = 1.3 * max(finite) if finite else 1.0
    return [x_inf if r["request_rate"] == "inf" else float(r["request_rate"]) for r in runs], x_inf


def plot(runs: list[dict[str, Any]], path: str) -> None:
    """Latency (mean, p50, p99) against the offered request rate, one colour per run label (format,
    hostile); the unbounded-rate runs are points apart, labelled with the rate they achieved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, x_inf = plot_positions(runs)
    labels = list(dict.fromkeys(r.get("label", "-") for r in runs))
    finite = sorted({x for x, r in zip(xs, runs) if r["request_rate"] != "inf"})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms"), ("time to first token", "time per output token",
                                                                       "end-to-end latency")):
        for c, label in enumerate(labels):
            mine = [(x, r) for x, r in zip(xs, runs) if r.get("label", "-") == label]
            sweep = sorted((x, r) for x, r in mine if r["request_rate"] != "inf")
            for stat, style in (("mean", "o-"), ("p50", "s--"), ("p99", "^:")):
                pts = [(x, r[key][stat]) for x, r in sweep if r[key][stat] is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{c}", label=f"{label} {stat}")
                for x, r in mine:
                    if r["request_rate"] == "inf" and r[key][stat] is not None:
                        ax.plot([x], [r[key][stat]], style[0], color=f"C{c}", markersize=9,
                                label=None if sweep else f"{label} {stat}")
            for x, r in mine:
                if r["request_rate"] == "inf" and r[key]["p50"] is not None:
                    ax.annotate(f"{r['request_throughput']:.2f} req/s", (x, r[key]["p50"]), textcoords="offset points",
                                xytext=(6, 4 + 10 * c), fontsize=7, color=f"C{c}")
        if x_inf is not None:
            if finite:
                ax.axvline((finite[-1] + x_inf) / 2, color="grey", linestyle="--", linewidth=0.8)
            ax.set_xticks(finite + [x_inf], [f"{x:g}" for x in finite] + ["inf\n(all at once)"])
        ax.set_title(title)
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_bodies(args: argparse.Namespace, model: str, chat: bool, fmt: str, rng: random.Random,
                 vocab_size: int | None = None) -> list[dict[str, Any]]:
    prompts: list[Any]
    if args.prompt_token_ids:
        assert vocab_size is not None
        prompts = random_token_prompts(args.num_prompts, args.input_len, vocab_size, rng)
    elif args.prompt:
        prompts = [args.prompt] * args.num_prompts
    else:
        prompts = random_prompts(args.num_prompts, args.input_len, rng)
    bodies = []
    for prompt in prompts:
        body: dict[str, Any] = {"model": model, "max_tokens": args.output_len, "temperature": args.temperature,
                                "stream": True, "stream_options": {"include_usage": True}}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if RESPONSE_FORMATS[fmt] is not None:
            body["response_format"] = RESPONSE_FORMATS[fmt]  # the grammar ends the output, not ignore_eos
        elif not args.no_ignore_eos:
            body["ignore_eos"] = True
        bodies.append(body)
    return bodies


async def _hostile(client: Any, base: str, model: str, headers: dict[str, str], prompt_len: int,
                   args: argparse.Namespace) -> list[str]:
    from flashserve.bench.hostile import run_all

    await asyncio.sleep(1.0)  # let the well-behaved streams start first
    return await run_all(client, base, model, headers, prompt_len, duration_s=min(60.0, args.max_duration / 2))


def ratios(runs: list[dict[str, Any]]) -> list[str]:
    """Each run against the plain run of the same rate: TPOT mean, ITL p99, output tok/s."""
    lines = []
    for run in runs:
        base = next((r for r in runs if r.get("label") == "none" and r["request_rate"] == run["request_rate"]), None)
        if base is None or run is base:
            continue
        parts = []
        for key, stat in (("tpot_ms", "mean"), ("itl_ms", "p99")):
            a, b = run[key][stat], base[key][stat]
            parts.append(f"{key.split('_')[0].upper()} {stat} x{a / b:.2f}" if a and b else f"{key} {stat} -")
        if base["output_token_throughput"]:
            parts.append(f"tok/s x{run['output_token_throughput'] / base['output_token_throughput']:.2f}")
        lines.append(f"{run['label']} vs none at rate {run['request_rate']}: " + ", ".join(parts)
                     + f"; failed {run['failed']} (none: {base['failed']})")
    return lines


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("FLASHSERVE_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = args.base_url.rstrip("/")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        model = args.model
        if model is None:
            response = await client.get(f"{base}/models")
            response.raise_for_status()
            model = response.json()["data"][0]["id"]
        chat = args.endpoint == "chat"
        streams = StreamClient(f"{base}/chat/completions" if chat else f"{base}/completions", headers)
        prompt_len = args.hostile_prompt_len
        vocab_size = args.vocab_size
        if args.hostile or (args.prompt_token_ids and vocab_size is None):
            cards = (await client.get(f"{base}/models")).json()["data"]
            card = next((c for c in cards if c["id"] == model), {})
            context = card.get("max_model_len")
            prompt_len = min(prompt_len, context - 16) if context else prompt_len
            vocab_size = vocab_size or card.get("vocab_size")
            if args.prompt_token_ids and not vocab_size:
                raise ValueError(f"the model card of {model!r} gives no vocab_size; pass --vocab-size")
        runs = []
        for rate in args.request_rate:
            for fmt in args.response_format:
                for hostile in ([False, True] if args.hostile else [False]):
                    # Fresh prompts per run: a run must not find the previous run's prompts in the
                    # server's prefix cache (that would make later runs look faster).
                    rng = random.Random(args.seed * 1000 + len(runs))
                    bodies = build_bodies(args, model, chat, fmt, rng, vocab_size)
                    label = fmt + ("+hostile" if hostile else "")
                    load = run_load(streams, bodies, chat, rate, args.concurrency, args.timeout, args.max_duration, rng)
                    if hostile:
                        attack = _hostile(client, base, model, headers, prompt_len, args)
                        summary, outcomes = await asyncio.gather(load, attack)
                        summary["hostile"] = outcomes
                    else:
                        summary = await load
                    summary["label"] = label
                    runs.append(summary)
                    if not args.quiet:
                        print(f"{label} rate {summary['request_rate']}: {summary['completed']} ok, {summary['failed']} failed "
                              f"in {summary['duration_s']:.1f}s", file=sys.stderr)
                        for line in summary.get("hostile", []):
                            print(f"  {line}", file=sys.stderr)
    return {"base_url": args.base_url, "model": model, "endpoint": args.endpoint, "num_prompts": args.num_prompts,
            "prompt_token_ids": args.prompt_token_ids, "input_len": args.input_len, "output_len": args.output_len, "ignore_eos": not args.no_ignore_eos, "runs": runs}


def run(args: argparse.Namespace) -> int:
    if args.num_prompts < 1:
        print("flashserve bench serve: --num-prompts must be >= 1", file=sys.stderr)
        return 2
    if args.concurrency is not None and args.concurrency < 1:
        print("flashserve bench serve: --concurrency must be >= 1", file=sys.stderr)
        return 2
    if args.prompt_token_ids and (args.endpoint == "chat" or args.prompt):
        print("flashserve bench serve: --prompt-token-ids needs --endpoint completions and no --prompt", file=sys.stderr)
        return 2
    if args.vocab_size is not None and args.vocab_size <= FIRST_PROMPT_ID:
        print(f"flashserve bench serve: --vocab-size must be > {FIRST_PROMPT_ID}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(_main(args))
    except Exception as e:  # e.g. the server is not there
        print(f"flashserve bench serve: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(format_table(report["runs"]))
    for line in ratios(report["runs"]):
        print(line)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        plot(report["runs"], args.plot)
    return 0 if all(r["completed"] for r in report["runs"]) else 1


__all__ = ["add_arguments", "run", "summarize", "format_table", "plot", "plot_positions", "RequestResult"]
