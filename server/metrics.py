"""Prometheus metrics of the server: requests, latency, tokens, adapter cache, queue depth."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """One set of collectors per app (its own registry, so several apps in one process do not clash)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kmserve_http_requests_total", "HTTP requests.", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("kmserve_http_request_seconds", "HTTP request latency.", ["method", "route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("kmserve_tokens_total", "Tokens processed.", ["type"], registry=self.registry)
        self.adapter_loads = Gauge("kmserve_adapter_loads", "Adapter loads by the engine.", registry=self.registry)
        self.adapter_evictions = Gauge("kmserve_adapter_evictions", "Adapter evictions.", registry=self.registry)
        self.adapter_cache_hit_rate = Gauge("kmserve_adapter_cache_hit_rate", "Engine adapter cache hit rate.",
                                            registry=self.registry)
        self.adapters_loaded = Gauge("kmserve_adapters_loaded", "Adapters resident in the engine.",
                                     registry=self.registry)
        self.queue_depth = Gauge("kmserve_jobs", "Jobs by status.", ["status"], registry=self.registry)

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)


def route_template(request: Request) -> str:
    """The matched route's path template (bounded label cardinality), or 'unmatched'."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def install_metrics(app: FastAPI, metrics: ServerMetrics) -> None:
    """Count and time every request."""

    @app.middleware("http")
    async def _observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = route_template(request)
            metrics.requests.labels(request.method, route, str(status)).inc()
            metrics.latency.labels(request.method, route).observe(time.perf_counter() - start)
