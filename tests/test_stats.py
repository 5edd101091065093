"""Stats' bounded structures, with an injected clock: exact and instant."""

from __future__ import annotations

import pytest
from helpers import FakeClock

from proxy.records import RequestRecord
from proxy.stats import BUCKETS, LatencyWindow, Stats, bucket_of, bucket_upper


@pytest.mark.parametrize("index", [0, 1, 57, BUCKETS - 2])
def test_a_latency_on_a_bucket_bound_counts_in_that_bucket(index):
    upper = bucket_upper(index)
    assert bucket_of(upper) == index
    assert bucket_of(upper * 1.0001) == index + 1
    assert bucket_of(bucket_upper(index - 1) * 1.0001 if index else 0.0) == index


def test_latencies_past_the_last_bound_land_in_the_last_bucket():
    assert bucket_of(1e9) == BUCKETS - 1


def test_percentiles_cover_the_last_minute_only():
    clock = FakeClock(1000.0)
    window = LatencyWindow(clock)
    for _ in range(99):
        window.add(0.001)
    window.add(0.5)
    p = window.percentiles(50, 99, 100)
    assert p["p50"] == pytest.approx(1.0, rel=0.04) and p["p50"] >= 1.0  # ms, never understated
    assert p["p100"] == pytest.approx(500, rel=0.04)
    clock.advance(30)
    window.add(0.002, clock())  # a caller's own clock reading, the hot path's form
    assert window.percentiles(100)["p100"] == pytest.approx(500, rel=0.04)
    clock.advance(45)  # the first slot is now over a minute old
    assert window.percentiles(100)["p100"] == pytest.approx(2.0, rel=0.04)
    clock.advance(60)
    assert window.percentiles(50) == {"p50": None}


def test_observe_counts_totals_tiers_clients_and_the_timeline():
    clock = FakeClock(5000.0)
    stats = Stats(clock=clock, started=clock())
    for decision in ("allowed", "allowed", "blocked", "exempt"):
        stats.observe(RequestRecord("GET", "/", "alice", "free" if decision != "exempt" else "-", decision,
                                    "k:1", status=200, upstream_seconds=0.01))
    clock.advance(1)
    stats.observe(RequestRecord("GET", "/", "bob", "free", "blocked", "k:2", status=429))
    snap = stats.snapshot()
    assert snap["totals"]["requests"] == 5 and snap["totals"]["blocked"] == 2
    assert snap["tiers"] == {"free": {"requests": 4, "allowed": 2, "blocked": 2, "shadow_blocked": 0}}
    assert (stats.clients["alice"].allowed, stats.clients["alice"].blocked) == (2, 1)
    assert snap["timeline"] == [{"t": 5000, "allowed": 2, "blocked": 1}, {"t": 5001, "allowed": 0, "blocked": 1}]


def test_a_shadow_refusal_counts_once_per_request_whatever_the_decision():
    stats = Stats(clock=FakeClock(5000.0))
    for decision, shadow in (("allowed", ("trial",)), ("allowed", ("trial", "night")), ("blocked", ("trial",)),
                             ("allowed", ())):
        stats.observe(RequestRecord("GET", "/", "alice", "free", decision, "k:1", status=200, shadow=shadow))
    snap = stats.snapshot()
    assert snap["totals"]["shadow_blocked"] == 3 and snap["totals"]["blocked"] == 1
    assert snap["tiers"]["free"]["shadow_blocked"] == 3
    assert snap["success_rate_percent"] == 75.0  # a shadow refusal is no refusal


def test_the_timeline_closes_each_second_from_the_totals_and_forgets_after_300_s():
    clock = FakeClock(7000.0)
    stats = Stats(clock=clock, started=clock())

    def send(decision: str, n: int = 1) -> None:
        for _ in range(n):
            stats.observe(RequestRecord("GET", "/", "alice", "free", decision, "k:1", status=200))

    send("allowed", 3)
    clock.advance(2)  # 7001 saw nothing
    send("exempt")  # counted in totals, not in the timeline
    clock.advance(1)
    send("blocked", 2)
    send("allowed")
    live = stats.timeline_points()
    assert live == stats.timeline_points()  # reading closes nothing twice
    assert live == [{"t": 7000, "allowed": 3, "blocked": 0}, {"t": 7003, "allowed": 1, "blocked": 2}]
    clock.advance(299.5)  # 7302.5: 7000 is 302 s old, 7003 299 s
    assert stats.timeline_points() == [{"t": 7003, "allowed": 1, "blocked": 2}]
    send("allowed")
    clock.advance(301)  # the ring wrapped: every slot is stale
    assert stats.timeline_points() == []
