"""Prometheus text exposition for /metrics, without the prometheus_client dependency.

Gauges and counters are read from the engine's stats snapshot at scrape time; latency
histograms are observed by the server as requests finish.
"""

from __future__ import annotations

import threading

from flashserve.engine.llm_engine import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


def _fmt(value: float) -> str:
    value = float(value)
    if value == float("inf"):
        return "+Inf"
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


class Histogram:
    """A cumulative-bucket histogram (thread safe)."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name = name
        self.help = help_text
        self.buckets = tuple(sorted(buckets)) + (float("inf"),)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.sum += value
            self.count += 1
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1
                    break

    def render(self) -> list[str]:
        with self._lock:
            lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
            cumulative = 0
            for bound, n in zip(self.buckets, self.counts):
                cumulative += n
                lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {cumulative}')
            lines.append(f"{self.name}_sum {self.sum!r}")
            lines.append(f"{self.name}_count {self.count}")
        return lines


class ServerMetrics:
    """What /metrics reports."""

    def __init__(self, prefix: str = "flashserve") -> None:
        self.prefix = prefix
        self.ttft = Histogram(f"{prefix}_time_to_first_token_seconds", "Time from arrival to the first generated token.")
        self.tpot = Histogram(f"{prefix}_time_per_output_token_seconds", "Mean decode interval after the first token, per request.",
                              (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5))
        self.e2e = Histogram(f"{prefix}_e2e_request_latency_seconds", "Time from arrival to the last token.")
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}  # finish reason -> count
        self.rejected = 0

    def observe_finished(self, finish_reason: str, ttft: float | None, tpot: float | None, e2e: float | None) -> None:
        with self._lock:
            self.requests[finish_reason] = self.requests.get(finish_reason, 0) + 1
        if finish_reason == "abort":
            return
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
        if e2e is not None:
            self.e2e.observe(e2e)

    def count_rejected(self) -> None:
        with self._lock:
            self.rejected += 1

    def render(self, stats: EngineStats, in_flight: int) -> str:
        p = self.prefix
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: float) -> None:
            lines.extend([f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} {kind}", f"{p}_{name} {_fmt(value)}"])

        metric("num_requests_running", "gauge", "Requests in the running batch.", stats.num_running)
        metric("num_requests_waiting", "gauge", "Requests waiting to be scheduled.", stats.num_waiting)
        metric("num_requests_in_flight", "gauge", "Requests accepted by the server and not yet finished.", in_flight)
        metric("kv_cache_blocks_used", "gauge", "KV-cache blocks allocated.", stats.kv_blocks_used)
        metric("kv_cache_blocks_total", "gauge", "KV-cache blocks in the pool.", stats.kv_blocks_total)
        usage = stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
        metric("kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks allocated.", usage)
        metric("num_preemptions_total", "counter", "Requests preempted (recomputed later).", stats.num_preemptions)
        metric("prompt_tokens_total", "counter", "Prompt tokens accepted.", stats.prompt_tokens_total)
        metric("generation_tokens_total", "counter", "Tokens generated.", stats.generation_tokens_total)
        if stats.prefix_cache_queries:
            metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries)
            metric("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits)
            metric("prefix_cache_hit_rate", "gauge", "Prefix-cache hits / queries since start.",
                   stats.prefix_cache_hits / stats.prefix_cache_queries)
        if stats.spec is not None:  # speculative decoding, labelled by method
            label = f'{{method="{stats.spec.method}"}}'
            for name, kind, help_text, value in (
                ("spec_decode_num_steps_total", "counter", "Verification steps (a request with drafts).",
                 stats.spec.num_steps),
                ("spec_decode_num_draft_tokens_total", "counter", "Draft tokens verified.", stats.spec.num_draft_tokens),
                ("spec_decode_num_accepted_tokens_total", "counter", "Draft tokens accepted.",
                 stats.spec.num_accepted_tokens),
                ("spec_decode_acceptance_length", "gauge", "Tokens per verification step (accepted drafts + 1).",
                 stats.spec.acceptance_length),
                ("spec_decode_num_switched_off_total", "counter", "Requests sent back to plain decoding by the "
                 "off-switch.", stats.spec.num_switched_off)):
                lines.extend([f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} {kind}",
                              f"{p}_{name}{label} {_fmt(value)}"])
        with self._lock:
            finished = dict(self.requests)
            rejected = self.rejected
        lines.extend([f"# HELP {p}_request_success_total Finished requests by finish reason.",
                      f"# TYPE {p}_request_success_total counter"])
        for reason in sorted(set(finished) | {"stop", "length", "abort"}):
            lines.append(f'{p}_request_success_total{{finished_reason="{reason}"}} {finished.get(reason, 0)}')
        metric("requests_rejected_total", "counter", "Requests refused because the server was overloaded.", rejected)
        for hist in (self.ttft, self.tpot, self.e2e):
            lines.extend(hist.render())
        return "\n".join(lines) + "\n"
