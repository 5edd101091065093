"""The penalty box (`tiers.<name>.penalty`): strikes after each answer, bans
in the decision, and what the admin port shows of them.

A ban costs no extra store call: it is the first limit of the tier's
LimitSet (algorithm `Ban`), read in the same atomic decision as the limits,
never shown in the RateLimit headers. A strike is counted once the answer is
known (the request that reaches the count gets its own answer): a refusal by
Tollgate's limits, or an upstream answer whose status the penalty lists. A
ban's own 429s are no strikes: a ban lasts what its Retry-After promised.

Strikes are one store call each (`Store.strike`: count and ban atomically),
in the background with Redis: bounded in time and number, and never holding
a response. `/api/stats` lists the bans this instance set or refused a
request for, each checked with the store when listed, so a ban lifted by
another instance disappears: a bounded record, not a SCAN of a shared Redis
(whose cost would grow with every client's keys).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from .config import Config, Tier
from .limiter import Limiter
from .limits.memory import MemoryStore
from .limits.store import StorageUnavailable
from .problems import problem
from .ratelimit_headers import retry_after_header
from .records import RequestRecord

log = logging.getLogger("tollgate.penalty")

MAX_KEPT: Final = 1024  # bans remembered for /api/stats
MAX_LISTED: Final = 100  # bans checked with the store and listed per /api/stats
MAX_PENDING: Final = 1024  # strikes on their way to a shared store; more are dropped (logged once)


def banned(record: RequestRecord, seconds_left: float, lines: bytes) -> web.Response:
    """The 429 of a banned client: no upstream, no charge, Retry-After the seconds left."""
    record.decision = "blocked"
    record.limit = "banned"
    record.banned = seconds_left
    retry = retry_after_header(seconds_left)
    return problem(429, "banned", f"Too many refusals or errors: banned for {retry} more seconds.",
                   headers={"Retry-After": retry}, lines=lines, tier=record.tier,
                   retry_after_seconds=int(retry))


@dataclass(slots=True)
class Seen:
    client: str
    tier: str
    until: float  # epoch seconds, on the store's clock


def rfc3339(when: float) -> str:
    """Seconds since the epoch as the admin API writes times: RFC 3339, UTC, whole seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


class PenaltyBox:
    """Counts strikes (an observer of every request record) and remembers bans."""

    def __init__(self, config: Callable[[], Config], limiter: Limiter, registry: CollectorRegistry) -> None:
        self._config = config
        self._limiter = limiter
        self.seen: dict[str, Seen] = {}  # by identity
        self.bans: dict[str, int] = {}  # bans this instance started, by tier
        self.refused: dict[str, int] = {}  # requests refused for a ban, by tier
        self._pending: set[asyncio.Task[None]] = set()
        self._dropping = False
        registry.register(_BanCollector(self))

    def observe(self, record: RequestRecord) -> None:
        tier = self._config().tiers.get(record.tier)
        if tier is None or tier.penalty is None or not record.identity:
            return
        if record.banned:
            self.refused[tier.name] = self.refused.get(tier.name, 0) + 1
            self._remember(record.identity, record.client, tier.name, self._limiter.store.now() + record.banned)
            return
        answered = (record.decision == "allowed" and record.upstream_error is None
                    and record.upstream_seconds is not None)
        if record.decision == "blocked" or (answered and record.status in tier.penalty.statuses):
            self._strike(record.identity, record.client, tier)

    def _strike(self, identity: str, client: str, tier: Tier) -> None:
        assert tier.penalty is not None
        store, penalty = self._limiter.store, tier.penalty
        if not self._limiter.healthy_for(identity):
            return  # a store in back-off: its limiter answers for it, strikes wait for its return
        if isinstance(store, MemoryStore):
            self._started(identity, client, tier.name, store.strike_now(identity, penalty.strikes, penalty.ban))
            return
        if len(self._pending) >= MAX_PENDING:
            if not self._dropping:
                log.warning("more than %d strikes pending on the store: dropping strikes", MAX_PENDING)
            self._dropping = True
            return
        self._dropping = False

        async def strike() -> None:
            try:
                async with asyncio.timeout(max(self._limiter.timeout, 1.0)):
                    until = await store.strike(identity, penalty.strikes, penalty.ban)
            except (StorageUnavailable, TimeoutError) as exc:
                log.warning("could not count a penalty strike: %s", exc)
                return
            self._started(identity, client, tier.name, until)

        task = asyncio.get_running_loop().create_task(strike())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _started(self, identity: str, client: str, tier: str, until: float | None) -> None:
        if until is None:
            return
        self.bans[tier] = self.bans.get(tier, 0) + 1
        self._remember(identity, client, tier, until)
        log.warning("client %s (tier %s) banned until %s", client, tier, rfc3339(until))

    def _remember(self, identity: str, client: str, tier: str, until: float) -> None:
        seen = self.seen
        seen.pop(identity, None)  # re-inserted last: the newest survive when full
        if len(seen) >= MAX_KEPT:
            now = self._limiter.store.now()
            for key in [k for k, s in seen.items() if s.until <= now] or list(seen)[: MAX_KEPT // 2]:
                del seen[key]
        seen[identity] = Seen(client, tier, until)

    async def settled(self) -> None:
        """Wait for the strikes on their way to the store (tests; each is bounded in time)."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def forget(self, identity: str) -> None:
        """A ban lifted here (DELETE /api/clients/{id})."""
        self.seen.pop(identity, None)

    async def listed(self) -> list[dict[str, Any]]:
        """The bans running now, newest end first, each checked with the store
        (one lifted elsewhere, or ended early, is forgotten)."""
        now = self._limiter.store.now()
        for identity in [k for k, s in self.seen.items() if s.until <= now]:
            del self.seen[identity]
        latest = sorted(self.seen.items(), key=lambda item: -item[1].until)[:MAX_LISTED]
        states = await asyncio.gather(*(self.state(self._config().tiers.get(s.tier), identity)
                                        for identity, s in latest), return_exceptions=True)
        out = []
        for (identity, seen), state in zip(latest, states):
            if isinstance(state, BaseException):
                out.append(self._row(seen, seen.until, seen.until - now))  # unverified: as last seen
            elif state is None:
                self.seen.pop(identity, None)
            else:
                out.append(self._row(seen, *state))
        return out

    @staticmethod
    def _row(seen: Seen, until: float, left: float) -> dict[str, Any]:
        return {"id": seen.client, "tier": seen.tier, "banned_until": rfc3339(until),
                "seconds_left": int(retry_after_header(left))}

    async def state(self, tier: Tier | None, identity: str) -> tuple[float, float] | None:
        """(ends, seconds left) of `identity`'s ban in `tier`, or None; raises StorageUnavailable."""
        if tier is None or tier.penalty is None:
            return None
        outcome = (await self._limiter.peek([identity], [tier.penalty.ban]))[0]
        if outcome.allowed:
            return None
        return self._limiter.store.now() + outcome.retry_after, outcome.retry_after

    async def client_body(self, tier: Tier, identity: str) -> dict[str, Any]:
        """`banned_until` and `ban_seconds_left` of /api/clients/{id}; raises StorageUnavailable."""
        state = await self.state(tier, identity)
        if state is None:
            return {"banned_until": None, "ban_seconds_left": None}
        return {"banned_until": rfc3339(state[0]), "ban_seconds_left": int(retry_after_header(state[1]))}

    async def lift(self, tier: Tier, identity: str) -> None:
        """Forget the client's ban and strikes; raises StorageUnavailable."""
        if tier.penalty is not None:
            await self._limiter.reset([identity, identity], [tier.penalty.strikes, tier.penalty.ban])
        self.forget(identity)


class _BanCollector(Collector):
    """tollgate_bans_total{tier} and tollgate_banned_requests_total{tier}, read at scrape time."""

    def __init__(self, box: PenaltyBox) -> None:
        self._box = box

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, doc, counts in (
            ("tollgate_bans", "Bans this instance started (tiers.<name>.penalty).", self._box.bans),
            ("tollgate_banned_requests", "Requests refused because their client is banned.", self._box.refused),
        ):
            family = CounterMetricFamily(name, doc, labels=("tier",))
            for tier, count in sorted(counts.items()):
                family.add_metric((tier,), count)
            yield family
