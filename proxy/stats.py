"""Live statistics for /api/stats and the dashboard, O(1) per request.

Everything here is bounded: latency percentiles come from log-scale
histograms over the last minute (not a list of samples), the timeline is a
ring of 300 one-second slots, and per-client counters keep at most
`MAX_CLIENTS` clients (the least busy half is dropped when full, so the
busiest survive without a scan of every client ever seen).
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from .records import RequestRecord

TIMELINE_SECONDS: Final = 300
MAX_CLIENTS: Final = 1024
LATENCY_SLOT_SECONDS: Final = 10
LATENCY_SLOTS: Final = 6  # percentiles cover the last 50-60 s
# Log-scale buckets: 1 us to ~100 s in steps of 4 % (about 470 buckets).
BUCKET_GROWTH: Final = 1.04
BUCKET_BASE: Final = 1e-6
BUCKETS: Final = int(math.log(100 / BUCKET_BASE, BUCKET_GROWTH)) + 1


def bucket_upper(index: int) -> float:
    """The upper bound of a bucket: percentiles report it (never understate latency)."""
    return BUCKET_BASE * BUCKET_GROWTH**index


# Every bucket's upper bound but the last's, which takes everything above: a
# bucket is then one bisect (a C call), where a log, an int and a min were three.
_UPPERS: Final = tuple(bucket_upper(i) for i in range(BUCKETS - 1))


def bucket_of(seconds: float) -> int:
    """The first bucket whose upper bound is >= `seconds`."""
    return bisect.bisect_left(_UPPERS, seconds)


class LatencyWindow:
    """Histograms in slots of 10 s; percentiles merge the last minute's slots."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._slots: list[list[int]] = [[0] * BUCKETS for _ in range(LATENCY_SLOTS)]
        self._slot_ids = [-1] * LATENCY_SLOTS
        self._current_id = -1
        self._current = self._slots[0]

    def add(self, seconds: float, now: float | None = None) -> None:
        """Count one latency; `now` saves a clock read when the caller has one."""
        slot_id = int(self._clock() if now is None else now) // LATENCY_SLOT_SECONDS
        if slot_id != self._current_id:  # once per 10 s
            self._open(slot_id)
        self._current[bucket_of(seconds)] += 1

    def _open(self, slot_id: int) -> None:
        i = slot_id % LATENCY_SLOTS
        if self._slot_ids[i] != slot_id:
            self._slots[i] = [0] * BUCKETS
            self._slot_ids[i] = slot_id
        self._current_id, self._current = slot_id, self._slots[i]

    def recent(self) -> list[int]:
        """The last minute's counts per bucket."""
        current = int(self._clock()) // LATENCY_SLOT_SECONDS
        merged = [0] * BUCKETS
        for slot_id, counts in zip(self._slot_ids, self._slots):
            if current - slot_id < LATENCY_SLOTS:
                merged = [a + b for a, b in zip(merged, counts)]
        return merged

    def add_counts(self, counts: dict[int, int]) -> None:
        """Add another window's recent counts (by bucket) to the current slot."""
        self._open(int(self._clock()) // LATENCY_SLOT_SECONDS)
        for bucket, count in counts.items():
            self._current[bucket] += count

    def percentiles(self, *qs: float) -> dict[str, float | None]:
        merged = self.recent()
        total = sum(merged)
        out: dict[str, float | None] = {}
        for q in qs:
            key = f"p{q:g}"
            if not total:
                out[key] = None
                continue
            rank, seen = math.ceil(total * q / 100), 0
            for index, count in enumerate(merged):
                seen += count
                if seen >= rank:
                    out[key] = round(bucket_upper(index) * 1000, 3)
                    break
        return out


@dataclass(slots=True)
class Counts:
    allowed: int = 0
    blocked: int = 0
    shadow_blocked: int = 0  # requests some shadow limit would have refused (counted apart: not a decision)

    @property
    def requests(self) -> int:
        """Derived, not counted: one increment less per request."""
        return self.allowed + self.blocked


@dataclass(slots=True)
class ClientCounts(Counts):
    tier: str = ""
    identity: str = ""


@dataclass(slots=True)
class Stats:
    """Counters fed by RequestRecords (an observer) and read by /api/stats."""

    clock: Callable[[], float] = time.time
    started: float = field(default_factory=time.time)
    totals: dict[str, int] = field(default_factory=dict)
    tiers: dict[str, Counts] = field(default_factory=dict)
    clients: dict[str, ClientCounts] = field(default_factory=dict)
    timeline: list[list[int]] = field(default_factory=list)  # [second, allowed, blocked]
    proxy_latency: LatencyWindow = field(init=False)
    upstream_latency: LatencyWindow = field(init=False)
    # The timeline is closed once a second from the totals: the second being
    # counted, and totals' (allowed, blocked) when it began.
    _second: int = -1
    _base: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.totals = dict.fromkeys(
            ("requests", "allowed", "blocked", "unauthorized", "exempt", "unavailable", "rejected",
             "upstream_errors", "shadow_blocked", "websocket_messages_refused"), 0
        )
        self.tiers = {}
        self.clients = {}
        self.timeline = [[-1, 0, 0] for _ in range(TIMELINE_SECONDS)]
        self._second, self._base = -1, (0, 0)
        self.proxy_latency = LatencyWindow(self.clock)
        self.upstream_latency = LatencyWindow(self.clock)

    def observe(self, record: RequestRecord) -> None:
        now = self.clock()
        if int(now) != self._second:  # once a second
            self._close_second(int(now))
        totals = self.totals
        totals["requests"] += 1
        decision = record.decision
        totals[decision] = totals.get(decision, 0) + 1
        if record.upstream_error:
            totals["upstream_errors"] += 1
        self.proxy_latency.add(record.proxy_seconds, now)
        if record.upstream_seconds is not None and not record.upstream_error:
            self.upstream_latency.add(record.upstream_seconds, now)
        if decision != "allowed" and decision != "blocked":
            return
        tier = self.tiers.get(record.tier)
        if tier is None:
            tier = self.tiers[record.tier] = Counts()
        client = self.clients.get(record.client)
        if client is None:
            if len(self.clients) >= MAX_CLIENTS:
                self._drop_least_busy()
            client = self.clients[record.client] = ClientCounts(tier=record.tier, identity=record.identity)
        if record.shadow:
            totals["shadow_blocked"] += 1
            tier.shadow_blocked += 1
        if decision == "allowed":
            tier.allowed += 1
            client.allowed += 1
        else:
            tier.blocked += 1
            client.blocked += 1

    def _close_second(self, second: int) -> None:
        """Write the second that ended into the timeline (from the totals) and start `second`."""
        allowed, blocked = self.totals["allowed"], self.totals["blocked"]
        if self._second >= 0 and (allowed, blocked) != self._base:
            self.timeline[self._second % TIMELINE_SECONDS] = [
                self._second, allowed - self._base[0], blocked - self._base[1]]
        self._second, self._base = second, (allowed, blocked)

    def _drop_least_busy(self) -> None:
        """Keep the busier half: amortised O(1) per new client, bounded memory."""
        ranked = sorted(self.clients.items(), key=lambda kv: (kv[1].requests, kv[1].blocked), reverse=True)
        self.clients = dict(ranked[: MAX_CLIENTS // 2])

    def top(self, n: int, *, by: str) -> list[tuple[str, ClientCounts]]:
        candidates = [(cid, c) for cid, c in self.clients.items() if getattr(c, by) > 0]
        candidates.sort(key=lambda kv: (getattr(kv[1], by), kv[1].requests), reverse=True)
        return candidates[:n]

    def timeline_points(self) -> list[dict[str, int]]:
        now = int(self.clock())
        if now != self._second:
            self._close_second(now)
        slots = [*self.timeline, [self._second, self.totals["allowed"] - self._base[0],
                                  self.totals["blocked"] - self._base[1]]]  # the second under way
        points = [
            {"t": slot[0], "allowed": slot[1], "blocked": slot[2]}
            for slot in slots
            if slot[0] >= 0 and now - slot[0] < TIMELINE_SECONDS and (slot[1] or slot[2])
        ]
        points.sort(key=lambda p: p["t"])
        return points

    def dump(self) -> dict[str, Any]:
        """The summable counts, as JSON, for a supervisor to merge (`merged`)."""
        self.timeline_points()  # closes the second that ended
        timeline = [*self.timeline, [self._second, self.totals["allowed"] - self._base[0],
                                     self.totals["blocked"] - self._base[1]]]
        return {
            "totals": self.totals,
            "tiers": {name: [c.allowed, c.blocked, c.shadow_blocked] for name, c in self.tiers.items()},
            "clients": {cid: [c.tier, c.identity, c.allowed, c.blocked] for cid, c in self.clients.items()},
            "timeline": [slot for slot in timeline if slot[0] >= 0 and (slot[1] or slot[2])],
            "latency": {name: {i: n for i, n in enumerate(window.recent()) if n}
                        for name, window in (("proxy", self.proxy_latency), ("upstream", self.upstream_latency))},
        }

    @classmethod
    def merged(cls, dumps: list[dict[str, Any]], *, clock: Callable[[], float], started: float) -> Stats:
        """One Stats summing other processes' `dump`s: its snapshot has the single-process shape."""
        out = cls(clock=clock, started=started)
        out._second = int(clock())
        seconds: dict[int, list[int]] = {}
        for dump in dumps:
            for key, count in dump["totals"].items():
                out.totals[key] = out.totals.get(key, 0) + count
            for name, (allowed, blocked, shadow_blocked) in dump["tiers"].items():
                tier = out.tiers.setdefault(name, Counts())
                tier.allowed, tier.blocked = tier.allowed + allowed, tier.blocked + blocked
                tier.shadow_blocked += shadow_blocked
            for cid, (tier_name, identity, allowed, blocked) in dump["clients"].items():
                client = out.clients.setdefault(cid, ClientCounts(tier=tier_name, identity=identity))
                client.allowed, client.blocked = client.allowed + allowed, client.blocked + blocked
            for second, allowed, blocked in dump["timeline"]:
                slot = seconds.setdefault(second, [second, 0, 0])
                slot[1], slot[2] = slot[1] + allowed, slot[2] + blocked
            for name, window in (("proxy", out.proxy_latency), ("upstream", out.upstream_latency)):
                window.add_counts({int(i): n for i, n in dump["latency"][name].items()})
        now = seconds.pop(out._second, [out._second, 0, 0])
        for slot in seconds.values():
            out.timeline[slot[0] % TIMELINE_SECONDS] = slot
        out._base = (out.totals["allowed"] - now[1], out.totals["blocked"] - now[2])
        return out

    def snapshot(self) -> dict[str, Any]:
        """Everything but what needs the store or the config (see admin.stats_body)."""
        totals = dict(self.totals)
        requests = totals["requests"]
        success = 100.0 if not requests else round(100.0 * (requests - totals["blocked"]) / requests, 2)
        return {
            "uptime_seconds": round(self.clock() - self.started, 3),
            "totals": totals,
            "success_rate_percent": success,
            "latency_ms": {
                "proxy": self.proxy_latency.percentiles(50, 95, 99),
                "upstream": self.upstream_latency.percentiles(50, 95, 99),
            },
            "tiers": {name: {"requests": c.requests, "allowed": c.allowed, "blocked": c.blocked,
                             "shadow_blocked": c.shadow_blocked}
                      for name, c in sorted(self.tiers.items())},
            "timeline": self.timeline_points(),
        }
