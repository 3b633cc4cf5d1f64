"""Prometheus metrics of the example server (prometheus-client, one registry per app):
engine load read at scrape time, latency histograms and counters fed as requests end."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvpager.runtime.async_engine import AsyncEngine
from kvpager.runtime.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    def __init__(self, aengine: AsyncEngine) -> None:
        self.aengine = aengine
        self.registry = r = CollectorRegistry()
        self.running = Gauge("kvpager_requests_running", "requests in the decode batch", registry=r)
        self.waiting = Gauge("kvpager_requests_waiting", "requests queued for admission", registry=r)
        self.pages_used = Gauge("kvpager_kv_pages_used", "KV-cache pages in use", registry=r)
        self.pages_total = Gauge("kvpager_kv_pages_total", "KV-cache pages in the pool", registry=r)
        self.kv_usage = Gauge("kvpager_kv_usage_ratio", "pages in use / pages in the pool", registry=r)
        self.kv_tokens = Gauge("kvpager_kv_tokens", "tokens cached for running requests", registry=r)
        self.ttft = Histogram("kvpager_ttft_seconds", "time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("kvpager_tpot_seconds", "time per output token after the first",
                              registry=r, buckets=_LATENCY_BUCKETS)
        self.queue = Histogram("kvpager_queue_seconds", "arrival to admission", registry=r,
                               buckets=_LATENCY_BUCKETS)
        self.requests = Counter("kvpager_requests", "finished requests", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("kvpager_prompt_tokens", "prompt tokens of finished requests",
                                     registry=r)
        self.generation_tokens = Counter("kvpager_generation_tokens", "generated tokens", registry=r)

    def observe(self, output: RequestOutput) -> None:
        """Count a request that ended (any finish reason)."""
        t = output.timings
        for histogram, value in ((self.ttft, t.ttft), (self.tpot, t.tpot), (self.queue, t.queue)):
            if value is not None:
                histogram.observe(value)
        self.requests.labels(output.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(len(output.token_ids))

    def render(self) -> bytes:
        load = self.aengine.stats()
        self.running.set(load["running"])
        self.waiting.set(load["waiting"])
        self.pages_used.set(load["pages_used"])
        self.pages_total.set(load["pages_total"])
        self.kv_usage.set(load["pages_used"] / max(load["pages_total"], 1))
        self.kv_tokens.set(load["kv_tokens"])
        return generate_latest(self.registry)
