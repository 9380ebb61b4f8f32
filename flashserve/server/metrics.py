"""Prometheus metrics for /metrics, through ``prometheus_client`` (one registry per app).

Engine gauges and counters are read from the engine's stats snapshot at scrape time (a custom
collector); latency histograms and request counters are observed by the server as requests end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flashserve.engine.cascade import CascadeCounters
from flashserve.engine.llm_engine import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
FINISH_REASONS = ("stop", "length", "abort", "tool_calls", "error")


class _EngineCollector(Collector):
    """Engine state at scrape time: ``source()`` returns (stats snapshot, requests in flight,
    streams dropped because their client stopped reading)."""

    def __init__(self, prefix: str, source: Callable[[], tuple[EngineStats, int, int]]) -> None:
        self.prefix = prefix
        self.source = source

    def collect(self) -> Iterator[Metric]:
        stats, in_flight, dropped = self.source()
        p = self.prefix
        yield GaugeMetricFamily(f"{p}_num_requests_running", "Requests in the running batch.", value=stats.num_running)
        yield GaugeMetricFamily(f"{p}_num_requests_waiting", "Requests waiting to be scheduled.", value=stats.num_waiting)
        yield GaugeMetricFamily(f"{p}_num_requests_in_flight", "Requests accepted by the server and not yet finished.",
                                value=in_flight)
        yield GaugeMetricFamily(f"{p}_kv_cache_blocks_used", "KV-cache blocks allocated.", value=stats.kv_blocks_used)
        yield GaugeMetricFamily(f"{p}_kv_cache_blocks_total", "KV-cache blocks in the pool.", value=stats.kv_blocks_total)
        usage = stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
        yield GaugeMetricFamily(f"{p}_kv_cache_usage_ratio", "Fraction of KV-cache blocks allocated.", value=usage)
        yield CounterMetricFamily(f"{p}_num_preemptions", "Requests preempted.", value=stats.num_preemptions)
        yield CounterMetricFamily(f"{p}_requests_dropped", "Streams dropped because the client stopped reading.",
                                  value=dropped)
        yield CounterMetricFamily(f"{p}_prompt_tokens", "Prompt tokens accepted.", value=stats.prompt_tokens_total)
        yield CounterMetricFamily(f"{p}_generation_tokens", "Tokens generated.", value=stats.generation_tokens_total)
        if stats.prefix_cache_queries:
            yield CounterMetricFamily(f"{p}_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      value=stats.prefix_cache_queries)
            yield CounterMetricFamily(f"{p}_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                      value=stats.prefix_cache_hits)
            yield GaugeMetricFamily(f"{p}_prefix_cache_hit_rate", "Prefix-cache hits / queries since start.",
                                    value=stats.prefix_cache_hits / stats.prefix_cache_queries)
            yield CounterMetricFamily(f"{p}_prefix_cache_host_hits", "Of the prefix-cache hits, prompt tokens "
                                      "brought back from the host KV tier.",
                                      value=getattr(stats, "prefix_cache_host_hits", 0))
        spec = getattr(stats, "spec", None)
        if spec is not None:  # speculative decoding, labelled by method
            for name, family, help_text, value in (
                ("spec_decode_num_steps", CounterMetricFamily, "Verification steps (a request with drafts).",
                 spec.num_steps),
                ("spec_decode_num_draft_tokens", CounterMetricFamily, "Draft tokens verified.", spec.num_draft_tokens),
                ("spec_decode_num_accepted_tokens", CounterMetricFamily, "Draft tokens accepted.",
                 spec.num_accepted_tokens),
                ("spec_decode_acceptance_length", GaugeMetricFamily,
                 "Tokens per verification step (accepted drafts + 1).", spec.acceptance_length),
                ("spec_decode_num_switched_off", CounterMetricFamily,
                 "Requests sent back to plain decoding by the off-switch.", spec.num_switched_off)):
                metric = family(f"{p}_{name}", help_text, labels=["method"])
                metric.add_metric([spec.method], value)
                yield metric
        lora = getattr(stats, "lora", None)
        if lora is not None:  # LoRA adapters (flashserve.lora.registry)
            for name, help_text, value in (
                    ("lora_adapters", "LoRA adapters served.", lora.adapters),
                    ("lora_slots", "LoRA adapter slots in the model's layers (max_loras).", lora.slots),
                    ("lora_slots_used", "LoRA adapter slots holding an adapter.", lora.slots_used),
                    ("lora_requests_waiting", "Requests waiting for a slot for their LoRA adapter.", lora.waiting)):
                yield GaugeMetricFamily(f"{p}_{name}", help_text, value=value)


class _CascadeCollector(Collector):
    """Which model of a cascade answered, read from its plain-int counters at scrape time."""

    def __init__(self, prefix: str, counters: CascadeCounters) -> None:
        self.prefix = prefix
        self.counters = counters

    def collect(self) -> Iterator[Metric]:
        c, p = self.counters, self.prefix
        answers = CounterMetricFamily(f"{p}_cascade_answers", "Cascade requests answered, by the model that answered.",
                                      labels=["model"])
        tokens = CounterMetricFamily(f"{p}_cascade_tokens", "Tokens each cascade model computed (prompt + generated), "
                                     "kept or not.", labels=["model"])
        for model, n, t in (("small", c.small, c.small_tokens), ("large", c.large, c.large_tokens)):
            answers.add_metric([model], n)
            tokens.add_metric([model], t)
        yield answers
        yield tokens


class ServerMetrics:
    """What /metrics reports."""

    def __init__(self, source: Callable[[], tuple[EngineStats, int, int]], prefix: str = "flashserve") -> None:
        self.prefix = prefix
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(prefix, source))
        r = self.registry
        self.ttft = Histogram(f"{prefix}_time_to_first_token_seconds", "Time from arrival to the first generated token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(f"{prefix}_time_per_output_token_seconds",
                              "Mean decode interval after the first token, per request.", buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(f"{prefix}_e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.finished = Counter(f"{prefix}_request_success", "Finished requests by finish reason.", ["finished_reason"],
                                registry=r)
        for reason in FINISH_REASONS:
            self.finished.labels(reason)
        self.rejected = Counter(f"{prefix}_requests_rejected", "Requests refused because the server was overloaded.",
                                registry=r)

    def observe_finished(self, finish_reason: str, ttft: float | None, tpot: float | None, e2e: float | None) -> None:
        self.finished.labels(finish_reason).inc()
        if finish_reason == "abort":
            return
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
        if e2e is not None:
            self.e2e.observe(e2e)

    def add_cascade(self, counters: CascadeCounters) -> None:
        """Export a cascade's counters (``flashserve_cascade_answers_total{model="small"}`` ...)."""
        self.registry.register(_CascadeCollector(self.prefix, counters))

    def count_rejected(self) -> None:
        self.rejected.inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
