"""Prometheus metrics on a registry of Tollgate's own (one per running app).

Labels are bounded: tier and decision, error kind, reload result, a
configured limit's name; never a client id. The per-request series are plain ints and a bucket list, counted on
the event loop (the only writer, so no lock) and rendered by a collector at
scrape time: prometheus-client's Counter and Histogram take a lock and several
Python calls per update, a tenth of what a whole proxied request costs in
Python calls (bench/instructions.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .records import RequestRecord

disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series double the scrape and no dashboard reads them

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


class _RequestCollector(Collector):
    """The per-request series, from the counts `Metrics.observe` keeps."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        m = self._metrics
        requests = CounterMetricFamily("tollgate_requests", "Requests by tier and limiter decision.",
                                       labels=("tier", "decision"))
        for (tier, decision), count in sorted(m.requests.items()):
            requests.add_metric((tier, decision), count)
        yield requests
        errors = CounterMetricFamily("tollgate_upstream_errors", "Upstream failures by kind.", labels=("kind",))
        for kind, count in sorted(m.upstream_errors.items()):
            errors.add_metric((kind,), count)
        yield errors
        shadow = CounterMetricFamily("tollgate_shadow_refusals",
                                     "Requests a shadow limit would have refused, by tier and limit.",
                                     labels=("tier", "limit"))
        for (tier, limit), count in sorted(m.shadow_refusals.items()):
            shadow.add_metric((tier, limit), count)
        yield shadow
        refused = CounterMetricFamily("tollgate_websocket_messages_refused",
                                      "WebSocket messages over a routes[].messages limit, by tier.", labels=("tier",))
        for tier, count in sorted(m.websocket_refused.items()):
            refused.add_metric((tier,), count)
        yield refused
        cumulative, buckets = 0, []
        for bound, count in zip((*DURATION_BUCKETS, float("inf")), m.duration_counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
        yield HistogramMetricFamily("tollgate_request_duration_seconds",
                                    "Time from request to response headers, upstream included.",
                                    buckets=buckets, sum_value=m.duration_sum)


class Metrics:
    def __init__(self, *, storage_errors: Callable[[], int], storage_healthy: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.requests: dict[tuple[str, str], int] = {}
        self.upstream_errors: dict[str, int] = {}
        self.shadow_refusals: dict[tuple[str, str], int] = {}  # (tier, limit): configured names only
        self.websocket_refused: dict[str, int] = {}  # by tier: each closed its WebSocket
        self.duration_counts = [0] * (len(DURATION_BUCKETS) + 1)  # per bucket; the last is +Inf
        self.duration_sum = 0.0
        self.registry.register(_RequestCollector(self))
        self.reloads = Counter("tollgate_config_reloads", "Config reloads by result.", ("result",),
                               registry=self.registry)
        for result in ("success", "failure"):
            self.reloads.labels(result)
        self._storage_errors, self._storage_healthy = storage_errors, storage_healthy
        self.registry.register(_StorageCollector(lambda: self._storage_errors(), lambda: self._storage_healthy()))

    def dump(self) -> dict[str, Any]:
        """The per-request counts and the storage counters, as JSON, for a supervisor to sum."""
        return {"requests": [[tier, decision, n] for (tier, decision), n in self.requests.items()],
                "upstream_errors": self.upstream_errors, "duration_counts": self.duration_counts,
                "duration_sum": self.duration_sum, "storage_errors": self._storage_errors(),
                "storage_healthy": self._storage_healthy(), "websocket_refused": self.websocket_refused,
                "shadow_refusals": [[tier, limit, n] for (tier, limit), n in self.shadow_refusals.items()]}

    def load_sum(self, dumps: list[dict[str, Any]]) -> None:
        """Show the sum of other processes' `dump`s (a supervisor's /metrics): the per-request
        series and storage errors are summed, storage is healthy when every process finds it so."""
        self.requests, self.upstream_errors, self.websocket_refused = {}, {}, {}
        self.shadow_refusals = {}
        self.duration_counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        errors, healthy = 0, True
        for dump in dumps:
            for tier, decision, n in dump["requests"]:
                self.requests[(tier, decision)] = self.requests.get((tier, decision), 0) + n
            for kind, n in dump["upstream_errors"].items():
                self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + n
            for tier, n in dump["websocket_refused"].items():
                self.websocket_refused[tier] = self.websocket_refused.get(tier, 0) + n
            for tier, limit, n in dump["shadow_refusals"]:
                self.shadow_refusals[tier, limit] = self.shadow_refusals.get((tier, limit), 0) + n
            self.duration_counts = [a + b for a, b in zip(self.duration_counts, dump["duration_counts"])]
            self.duration_sum += dump["duration_sum"]
            errors += dump["storage_errors"]
            healthy = healthy and dump["storage_healthy"]
        self._storage_errors, self._storage_healthy = (lambda: errors), (lambda: healthy)

    def observe(self, record: RequestRecord) -> None:
        key = (record.tier, record.decision)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        if record.upstream_error:
            errors = self.upstream_errors
            errors[record.upstream_error] = errors.get(record.upstream_error, 0) + 1
        for limit in record.shadow:
            shadows = self.shadow_refusals
            shadows[record.tier, limit] = shadows.get((record.tier, limit), 0) + 1
        seconds = record.proxy_seconds + (record.upstream_seconds or 0.0)
        self.duration_counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1  # le: bound inclusive
        self.duration_sum += seconds
