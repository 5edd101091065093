"""The per-request series: counted in plain ints, rendered at scrape time."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics
from proxy.records import RequestRecord


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def record(tier: str, decision: str, seconds: float, error: str | None = None) -> RequestRecord:
    r = RequestRecord("GET", "/", "c", tier, decision, status=200, proxy_seconds=seconds / 2,
                      upstream_seconds=seconds / 2)
    r.upstream_error = error
    return r


def test_histogram_buckets_are_cumulative_and_bounds_inclusive():
    metrics = Metrics(storage_errors=lambda: 0, storage_healthy=lambda: True)
    for seconds in (0.0005, 0.0005, 0.003, 0.02, 100.0):
        metrics.observe(record("free", "allowed", seconds))
    s = scrape(metrics)
    bucket = "tollgate_request_duration_seconds_bucket"
    assert s[(bucket, (("le", "0.0005"),))] == 2  # exactly on a bound counts in it (le)
    assert s[(bucket, (("le", "0.001"),))] == 2
    assert s[(bucket, (("le", "0.005"),))] == 3
    assert s[(bucket, (("le", "0.025"),))] == 4
    assert s[(bucket, (("le", "30.0"),))] == 4
    assert s[(bucket, (("le", "+Inf"),))] == 5
    assert s[("tollgate_request_duration_seconds_count", ())] == 5
    assert abs(s[("tollgate_request_duration_seconds_sum", ())] - 100.024) < 1e-9


def test_counters_by_tier_decision_and_error_kind():
    metrics = Metrics(storage_errors=lambda: 3, storage_healthy=lambda: False)
    metrics.observe(record("free", "allowed", 0.001))
    metrics.observe(record("free", "allowed", 0.001, error="timeout"))
    metrics.observe(record("free", "blocked", 0.001))
    metrics.observe(record("-", "exempt", 0.001, error="connect"))
    s = scrape(metrics)
    assert s[("tollgate_requests_total", (("decision", "allowed"), ("tier", "free")))] == 2
    assert s[("tollgate_requests_total", (("decision", "blocked"), ("tier", "free")))] == 1
    assert s[("tollgate_requests_total", (("decision", "exempt"), ("tier", "-")))] == 1
    assert s[("tollgate_upstream_errors_total", (("kind", "timeout"),))] == 1
    assert s[("tollgate_upstream_errors_total", (("kind", "connect"),))] == 1
    assert s[("tollgate_storage_errors_total", ())] == 3
    assert s[("tollgate_storage_healthy", ())] == 0
