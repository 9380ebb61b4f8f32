"""``flashserve bench serve`` against a real server: JSON report and PNG plot, structured-output and
hostile-client runs; summary maths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flashserve.bench.serve import (
    RequestResult,
    StreamClient,
    add_arguments,
    build_bodies,
    format_table,
    plot_positions,
    send_request,
    summarize,
)


def test_summarize_percentiles_and_throughput():
    results = [RequestResult(ok=True, output_tokens=5, ttft=0.1 * i, e2e=1.0 + 0.1 * i, itl=[0.2] * 4) for i in range(1, 11)]
    results.append(RequestResult(ok=False, error="HTTP 429: busy"))
    s = summarize(results, duration=2.0)
    assert s["completed"] == 10 and s["failed"] == 1 and s["errors"] == {"HTTP 429: busy": 1}
    assert s["request_throughput"] == pytest.approx(5.0)
    assert s["output_token_throughput"] == pytest.approx(25.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(550.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(550.0)
    assert s["itl_ms"]["p99"] == pytest.approx(200.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(250.0)  # (e2e - ttft) / (5 - 1) = 1.0 / 4
    s.update(request_rate="inf", concurrency=None)
    assert "550" in format_table([s])


def test_unbounded_rate_is_plotted_apart_from_the_sweep():
    runs = [{"request_rate": rate, "request_throughput": thr, "label": label}
            for label in ("none", "json_schema") for rate, thr in ((1.0, 0.9), ("inf", 2.5), (4.0, 3.1))]
    xs, x_inf = plot_positions(runs)
    assert xs[:3] == [1.0, x_inf, 4.0] and xs[3:] == xs[:3]
    assert x_inf > 4.0  # right of every offered rate, not at its achieved 2.5 req/s inside the sweep
    assert plot_positions([{"request_rate": 2.0}]) == ([2.0], None)


def test_stream_client_reads_each_framing():
    """The bench's own HTTP client: chunks split anywhere (CRLF event ends), a length-delimited
    error, a close-delimited stream; against a scripted asyncio server."""
    import asyncio

    def chunked(body: bytes, cut: int) -> bytes:
        parts = [body[i : i + cut] for i in range(0, len(body), cut)]
        return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"

    events = b"".join(b'data: {"choices": [{"index": 0, "text": "%s"}]}\r\n\r\n' % t for t in (b"a", b"b", b"c"))
    events += b'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}\n\ndata: [DONE]\n\n'
    error = b'{"error": {"message": "busy"}}'
    replies = [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunked(events, 7),
               b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: %d\r\n\r\n%s" % (len(error), error),
               b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n" + events]
    bodies: list[dict] = []

    async def main() -> list[RequestResult]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            bodies.append(json.loads(await reader.readexactly(length)))
            writer.write(replies[len(bodies) - 1])
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = StreamClient(f"http://127.0.0.1:{port}/v1/completions", {"Authorization": "Bearer k"})
        async with server:
            return [await send_request(client, {"prompt": "hi", "n": i}, False, 10.0) for i in range(3)]

    ok, refused, closed = asyncio.run(main())
    assert [b["n"] for b in bodies] == [0, 1, 2]
    for r in (ok, closed):
        assert r.ok and r.error is None and r.output_tokens == 3 and r.prompt_len == 4 and len(r.itl) == 2, r
    assert not refused.ok and refused.error == f"HTTP 429: {error.decode()}"
    with pytest.raises(ValueError, match="http"):
        StreamClient("ftp://x/v1", {})


def test_token_id_prompts_have_exact_lengths():
    import argparse
    import random

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--prompt-token-ids", "--input-len", "7", "--num-prompts", "3"])
    bodies = build_bodies(args, "m", False, "none", random.Random(0), vocab_size=500)
    assert [len(b["prompt"]) for b in bodies] == [7, 7, 7]
    assert all(100 <= t < 500 for b in bodies for t in b["prompt"])
    assert len({tuple(b["prompt"]) for b in bodies}) == 3


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_bench_serve_against_server(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("matplotlib")
    from flashserve.server.testing import ServerProcess

    report, png = tmp_path / "report.json", tmp_path / "plot.png"
    hostile_report, ids_report = tmp_path / "hostile.json", tmp_path / "ids.json"
    with ServerProcess(["--max-model-len", "512", "--kv-cache-bytes", str(50_000_000), "--max-num-seqs", "8",
                        "--max-stream-buffer", "8", "--send-buffer-bytes", "16384", "--log-level", "warning"]) as server:
        cmd = [sys.executable, "-m", "flashserve.cli", "bench", "serve", "--base-url", server.url("/v1"),
               "--num-prompts", "4", "--request-rate", "4", "inf", "--input-len", "8", "--output-len", "6",
               "--concurrency", "4", "--timeout", "60", "--max-duration", "120", "--response-format", "none", "json_schema",
               "--output-json", str(report), "--plot", str(png)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        ids = subprocess.run([sys.executable, "-m", "flashserve.cli", "bench", "serve", "--base-url", server.url("/v1"),
                              "--num-prompts", "2", "--prompt-token-ids", "--input-len", "10", "--output-len", "3",
                              "--max-duration", "60", "--output-json", str(ids_report)], capture_output=True, text=True,
                             timeout=120)
        hostile = subprocess.run([sys.executable, "-m", "flashserve.cli", "bench", "serve", "--base-url", server.url("/v1"),
                                  "--num-prompts", "4", "--input-len", "8", "--output-len", "16", "--concurrency", "2",
                                  "--hostile", "--hostile-prompt-len", "300", "--max-duration", "120",
                                  "--output-json", str(hostile_report)], capture_output=True, text=True, timeout=180)
    assert server.returncode == 0 and server.orphans() == []
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "TTFT" in proc.stdout and "json_schema vs none at rate 4.0: TPOT mean x" in proc.stdout
    data = json.loads(report.read_text())
    assert data["model"] == "SmolLM2-135M-Instruct"
    assert [(r["label"], r["request_rate"]) for r in data["runs"]] == [("none", 4.0), ("json_schema", 4.0),
                                                                      ("none", "inf"), ("json_schema", "inf")]
    for run in data["runs"]:
        assert run["completed"] == 4 and run["failed"] == 0
        assert run["total_output_tokens"] == 4 * 6
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert run[key]["mean"] > 0 and run[key]["p99"] >= run[key]["p50"]
        assert run["e2e_ms"]["p50"] >= run["ttft_ms"]["p50"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Token-id prompts (the vocabulary from the model card): the server counts exactly --input-len.
    assert ids.returncode == 0, ids.stderr + ids.stdout
    ids_run = json.loads(ids_report.read_text())["runs"][0]
    assert ids_run["completed"] == 2 and ids_run["total_prompt_tokens"] == 2 * 10
    # Hostile clients next to the load: each is refused or dropped, and no well-behaved request fails.
    assert hostile.returncode == 0, hostile.stderr + hostile.stdout
    runs = json.loads(hostile_report.read_text())["runs"]
    outcomes = runs[1]["hostile"]
    assert [r["label"] for r in runs] == ["none", "none+hostile"] and all(r["failed"] == 0 for r in runs), runs
    assert outcomes[0].startswith("50 MB body: HTTP/1.1 413") and outcomes[1].startswith("n=10^6: HTTP 400"), outcomes
    assert outcomes[2].startswith("300-token prompt: HTTP 200") and outcomes[3].startswith("stalled reader: dropped"), outcomes
