"""The rate-limit header lines and their per-tier cache (proxy.ratelimit_headers).

Over HTTP the headers are tested in test_limiting.py and on the wire in
test_forward.py; here, that a cached line is always the one a fresh tier
would build, whatever order states come in.
"""

from __future__ import annotations

from proxy import ratelimit_headers
from proxy.config import LimitSet, from_text
from proxy.limits.algorithms import Outcome
from proxy.ratelimit_headers import rate_limit_lines

TWO_LIMITS = """
tiers:
  anonymous:
    limits:
      - {name: burst, algorithm: token_bucket, capacity: 20, refill_rate: 2}
      - {name: daily, algorithm: fixed_window, limit: 1000, window: 86400}
"""


def fresh(tier):
    return LimitSet(tier.limits)


def parsed(lines: bytes) -> dict[str, str]:
    assert lines.endswith(b"\r\n")
    return dict(line.split(": ", 1) for line in lines.decode().split("\r\n")[:-1])


def test_lines_name_the_tightest_limit_even_when_whole_seconds_tie():
    """Two limits at the same remaining and the same whole seconds to reset: the
    tie goes to the one freeing last by the exact reset, so a cached line for
    one order must not answer the other."""
    tier = from_text(TWO_LIMITS).tiers["anonymous"].limit_set
    burst_last = [Outcome(True, 5, 2.9), Outcome(True, 5, 2.1)]
    daily_last = [Outcome(True, 5, 2.1), Outcome(True, 5, 2.9)]
    first, second = rate_limit_lines(tier, burst_last), rate_limit_lines(tier, daily_last)
    assert parsed(first)["X-RateLimit-Limit"] == "20" and parsed(second)["X-RateLimit-Limit"] == "1000"
    assert parsed(first)["RateLimit"] == '"burst";r=5;t=3, "daily";r=5;t=3'
    assert rate_limit_lines(tier, burst_last) is first  # from the cache
    assert rate_limit_lines(fresh(tier), daily_last) == second


def test_cached_lines_equal_fresh_ones_over_many_states():
    tier = from_text(TWO_LIMITS).tiers["anonymous"].limit_set
    states = [[Outcome(True, r % 7, r * 0.37), Outcome(True, (r * 3) % 5, 86400 - r)] for r in range(300)]
    for outcomes in states + states[::-1]:
        assert rate_limit_lines(tier, outcomes) == rate_limit_lines(fresh(tier), outcomes)


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(ratelimit_headers, "MAX_LINES_PER_TIER", 10)
    tier = from_text(TWO_LIMITS).tiers["anonymous"].limit_set
    for remaining in range(25):
        rate_limit_lines(tier, [Outcome(True, remaining, 1.0)] * 2)
        assert len(tier.header_lines) <= 10
    assert parsed(rate_limit_lines(tier, [Outcome(True, 3, 1.0)] * 2))["X-RateLimit-Remaining"] == "3"
