"""Prometheus metrics of the API: request count and latency by route template, jobs by status."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("api.metrics")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The folder of prometheus_client's multiprocess mode, when this process runs in it.

    prometheus_client reads the variable once, at import: every API worker of `minordpo serve
    --api-workers N` gets it from the parent before it starts.
    """
    return os.environ.get(MULTIPROC_DIR_ENV) or None


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
    """One registry per app, so several apps (tests) never collide in the global registry.

    With several API processes (prometheus_client's multiprocess mode) each process writes its request
    counts into the shared folder and a scrape of any one of them sums every process's.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        shared = multiprocess_dir()
        # In multiprocess mode the values live in the folder's files, read by MultiProcessCollector;
        # registering the metrics themselves as well would report this process's share twice.
        own = None if shared else self.registry
        if shared:
            Path(shared).mkdir(parents=True, exist_ok=True)
            multiprocess.MultiProcessCollector(self.registry, path=shared)
        self.requests = Counter(
            "minordpo_http_requests_total",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=own,
        )
        self.latency = Histogram(
            "minordpo_http_request_duration_seconds",
            "HTTP request latency by method and route template",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=own,
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
