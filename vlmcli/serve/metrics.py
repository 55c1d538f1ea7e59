"""The server's Prometheus metrics, in a registry of its own (not the process-wide one: each app,
as in tests, keeps its own counts)."""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from vlmcli.serve.workers import ModelPool

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, math.inf)


class _PoolCollector:
    """The workers' state, read from the pools at each scrape."""

    def __init__(self, pools: dict[str, ModelPool]):
        self.pools = pools

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily("vlm_queue_depth", "Requests waiting for a worker.", labels=["model"])
        busy = GaugeMetricFamily("vlm_workers_busy", "Workers running a request.", labels=["model"])
        restarts = CounterMetricFamily(
            "vlm_worker_restarts", "Worker processes restarted after dying.", labels=["model"]
        )
        passes = CounterMetricFamily(
            "vlm_encoder_passes",
            "Vision encoder passes of completed requests (SmolVLM2 tiles + overview, CLIP images).",
            labels=["model"],
        )
        for model, pool in self.pools.items():
            queue.add_metric([model], pool.queue_depth)
            busy.add_metric([model], pool.busy)
            restarts.add_metric([model], pool.restarts)
            passes.add_metric([model], pool.encoder_passes)
        yield from (queue, busy, restarts, passes)


class ServerMetrics:
    def __init__(self, pools: dict[str, ModelPool]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vlm_requests", "HTTP requests by route and status.", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "vlm_request_duration_seconds",
            "Request latency.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_PoolCollector(pools))

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
