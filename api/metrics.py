"""Prometheus metrics of the API: request count and latency by route template, jobs by status."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("api.metrics")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


class _JobsCollector(Collector):
    """Reads job counts by status from the database at scrape time (the DB is the source of truth)."""

    def __init__(self, count_by_status: Callable[[], dict[str, int]]) -> None:
        self.count_by_status = count_by_status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("minordpo_jobs", "Jobs by status", labels=["status"])
        try:
            counts = self.count_by_status()
        except Exception:  # a scrape must not fail because the database blinked
            log.warning("could not count jobs for /metrics", exc_info=True)
            counts = {}
        for status in sorted(set(JOB_STATUSES) | set(counts)):
            family.add_metric([status], float(counts.get(status, 0)))
        yield family


class ApiMetrics:
    """One registry per app, so several apps (tests) never collide in the global registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "minordpo_http_requests_total",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "minordpo_http_request_duration_seconds",
            "HTTP request latency by method and route template",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        # The labelled children per (method, route, status): `labels()` hashes and locks on every call.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one finished request."""
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(method, route, str(status)), self.latency.labels(method, route))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def track_jobs(self, count_by_status: Callable[[], dict[str, int]]) -> None:
        """Expose the `minordpo_jobs{status}` gauge, computed on each scrape."""
        self.registry.register(_JobsCollector(count_by_status))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
