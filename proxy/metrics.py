"""Prometheus metrics on a registry of Tollgate's own (one per running app).

Labels are bounded: tier and decision, error kind, reload result; never a
client id. Label children are cached so the hot path does one dict lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .records import RequestRecord

disable_created_metrics()  # *_created series double the scrape and no dashboard reads them

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _StorageCollector(Collector):
    """Reads the limiter's own counters at scrape time: no coupling on the hot path."""

    def __init__(self, errors: Callable[[], int], healthy: Callable[[], bool]) -> None:
        self._errors = errors
        self._healthy = healthy

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield CounterMetricFamily("tollgate_storage_errors", "Storage calls that failed or timed out.",
                                  value=self._errors())
        yield GaugeMetricFamily("tollgate_storage_healthy", "1 while the limit store answers.",
                                value=1 if self._healthy() else 0)


class Metrics:
    def __init__(self, *, storage_errors: Callable[[], int], storage_healthy: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.requests = Counter("tollgate_requests", "Requests by tier and limiter decision.",
                                ("tier", "decision"), registry=self.registry)
        self.upstream_errors = Counter("tollgate_upstream_errors", "Upstream failures by kind.",
                                       ("kind",), registry=self.registry)
        self.duration = Histogram("tollgate_request_duration_seconds",
                                  "Time from request to response headers, upstream included.",
                                  buckets=DURATION_BUCKETS, registry=self.registry)
        self.reloads = Counter("tollgate_config_reloads", "Config reloads by result.", ("result",),
                               registry=self.registry)
        for result in ("success", "failure"):
            self.reloads.labels(result)
        self.registry.register(_StorageCollector(storage_errors, storage_healthy))
        self._children: dict[tuple[str, str], Counter] = {}

    def observe(self, record: RequestRecord) -> None:
        key = (record.tier, record.decision)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(*key)
        child.inc()
        if record.upstream_error:
            self.upstream_errors.labels(record.upstream_error).inc()
        self.duration.observe(record.proxy_seconds + (record.upstream_seconds or 0.0))
