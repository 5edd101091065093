"""The one place that decides: a request's limits (its tier's, then its
route's) through the store, and `storage.on_error` when the store cannot
answer in time.

While the store is down the limiter does not pay a failed call per request:
it applies the policy at once and lets one request probe the store after
0.5 s, doubling per failed probe up to 5 s. Requests that were already in
flight when the store failed fail too, but do not lengthen the back-off: at
a high request rate a short stall would otherwise turn into seconds of
degraded answers. The outage is logged once, and so is the recovery.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .config import LimitSet
from .limits.algorithms import Outcome
from .limits.memory import MemoryStore
from .limits.store import Limit, StorageUnavailable, Store

log = logging.getLogger("tollgate.storage")

BACKOFF_START = 0.5
BACKOFF_MAX = 5.0


class Verdict(NamedTuple):
    """What happens to a request: allowed (after `delay`), refused, or refused
    because the store is down (on_error: deny -> 503)."""

    allowed: bool
    delay: float = 0.0
    unavailable: bool = False
    degraded: bool = False  # decided without the shared store (allow or local)


Decision = tuple[Verdict, Sequence[Outcome]]
"""A verdict and the outcomes it came from, aligned with the LimitSet's limits. A
pair rather than one NamedTuple: the usual verdicts are the constants below,
so deciding builds a plain tuple, where a NamedTuple per request cost 1.4k
instructions (bench/README.md)."""

ALLOW = Verdict(True)
REFUSE = Verdict(False)
ALLOW_DEGRADED = Verdict(True, degraded=True)
REFUSE_DEGRADED = Verdict(False, degraded=True)
UNLIMITED: Decision = (ALLOW, ())
FAIL_OPEN: Decision = (ALLOW_DEGRADED, ())
FAIL_CLOSED: Decision = (Verdict(False, unavailable=True, degraded=True), ())


@dataclass(slots=True)
class Health:
    healthy: bool = True
    last_error: str | None = None
    down_since: float | None = None
    errors: int = 0
    retry_at: float = 0.0
    backoff: float = field(default=BACKOFF_START)
    probing: bool = False  # one request is probing the store now; the others get on_error


class Limiter:
    """Applies tiers through a store; `on_error` is applied here and nowhere else."""

    def __init__(
        self, store: Store, *, on_error: str = "allow", timeout: float = 0.05,
        fallback: MemoryStore | None = None, describe: str = "", clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.clock = clock
        self.on_error = on_error
        self.timeout = timeout
        self.fallback = fallback if fallback is not None else MemoryStore()
        self.health = Health()
        self._describe = describe or store.backend
        self._memory = store if isinstance(store, MemoryStore) else None
        self._tickets = itertools.count(1)
        self._instance = secrets.token_hex(6)  # tickets of two instances never collide in one Redis
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Connect before traffic arrives. A store that is down is not fatal:
        the outage is logged once and `on_error` applies until it answers."""
        try:
            await self.store.warm()
        except StorageUnavailable as exc:
            self._failed(exc)

    @property
    def leases(self) -> bool:
        """Do concurrency slots expire unless renewed (a shared store)?"""
        return self._memory is None

    def ticket(self, limit_set: LimitSet) -> str:
        """A name for the slots a request may take ("" when it takes none)."""
        return f"{self._instance}:{next(self._tickets)}" if limit_set.concurrent else ""

    def decide_now(self, limit_set: LimitSet, subjects: Sequence[str], cost: int,
                   ticket: str = "") -> Decision | None:
        """The decision, when it needs no I/O (no limits, memory store, a store
        in back-off); None: `await consult_store()`. Saves the proxy's hot
        path a coroutine per request."""
        limits = limit_set.limits
        if not limits:
            return UNLIMITED
        if self._memory is not None:  # in-process: cannot fail, needs no timeout
            outcomes = self._memory.acquire_now(subjects, limits, cost)
            if len(outcomes) == 1 and not limit_set.shadow:  # the common tier, without a call to _decision
                o = outcomes[0]
                if o.delay:  # a refused outcome has none
                    return Verdict(True, o.delay), outcomes
                return (ALLOW if o.allowed else REFUSE), outcomes
            return _decision(limit_set, outcomes)
        health = self.health
        if not health.healthy:
            if health.probing or self.clock() < health.retry_at:
                return self._on_error(limit_set, subjects, cost)
            health.probing = True  # this request probes; consult_store ends the probe
        return None

    async def decide(self, limit_set: LimitSet, subjects: Sequence[str], cost: int, ticket: str = "") -> Decision:
        decision = self.decide_now(limit_set, subjects, cost, ticket)
        if decision is not None:
            return decision
        return await self.consult_store(limit_set, subjects, cost, ticket)

    async def consult_store(self, limit_set: LimitSet, subjects: Sequence[str], cost: int,
                            ticket: str = "") -> Decision:
        """The decision from the store, where `decide_now` said one is needed."""
        probe = not self.health.healthy
        try:
            outcomes = await self.store.acquire(subjects, limit_set.limits, cost, timeout=self.timeout,
                                                ticket=ticket)
        except (StorageUnavailable, TimeoutError) as exc:
            self._failed(exc, probe=probe)
            return self._on_error(limit_set, subjects, cost)
        finally:
            if probe:
                self.health.probing = False  # answered, failed or cancelled: the next may probe
        if not self.health.healthy:
            self._recovered()
        return _decision(limit_set, outcomes)

    def release(self, limit_set: LimitSet, subjects: Sequence[str], ticket: str, verdict: Verdict) -> None:
        """Give back the concurrency slots an allowed request took, at the end
        of its exchange. Never raises and never waits: with Redis the release
        runs in the background, and a slot it cannot free ends with its lease."""
        if not limit_set.concurrent or not verdict.allowed:
            return
        limits = [limit_set.limits[i] for i in limit_set.concurrent]
        held = [subjects[i] for i in limit_set.concurrent]
        if verdict.degraded:  # decided without the store: only the local fallback holds slots
            if self.on_error == "local":
                self.fallback.release_now(held, limits)
            return
        if self._memory is not None:
            self._memory.release_now(held, limits)
            return
        self._in_background(self.store.release(held, limits, ticket))

    async def renew(self, limit_set: LimitSet, subjects: Sequence[str], ticket: str) -> None:
        """Extend the leases of an upgraded connection's slots (Redis); failures wait for the next turn."""
        if not limit_set.concurrent or self._memory is not None:
            return
        limits = [limit_set.limits[i] for i in limit_set.concurrent]
        held = [subjects[i] for i in limit_set.concurrent]
        try:
            async with asyncio.timeout(max(self.timeout, 1.0)):
                await self.store.renew(held, limits, ticket)
        except (StorageUnavailable, TimeoutError) as exc:
            log.warning("could not renew a concurrency lease: %s", exc)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        async def bounded() -> None:
            try:
                async with asyncio.timeout(max(self.timeout, 1.0)):
                    await work
            except (StorageUnavailable, TimeoutError) as exc:
                log.warning("could not release a concurrency slot (its lease will): %s", exc)

        task = asyncio.get_running_loop().create_task(bounded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_error(self, limit_set: LimitSet, subjects: Sequence[str], cost: int) -> Decision:
        if self.on_error == "deny":
            return FAIL_CLOSED
        if self.on_error == "local":
            outcomes = self.fallback.acquire_now(subjects, limit_set.limits, cost)
            return _decision(limit_set, outcomes, degraded=True)
        return FAIL_OPEN

    def _failed(self, exc: BaseException, *, probe: bool = False) -> None:
        """A call failed: the first failure starts the back-off, a failed probe
        doubles it, and a request that was in flight before the outage changes
        nothing more."""
        health = self.health
        health.errors += 1
        # A store's own message names its (masked) URL; a timeout says nothing.
        reason = str(exc) or f"{self._describe} did not answer within {self.timeout:g}s"
        health.last_error = reason
        if health.healthy:
            health.healthy = False
            health.down_since = time.time()
            health.backoff = BACKOFF_START
            health.retry_at = self.clock() + health.backoff
            log.error("storage unavailable: %s; storage.on_error=%s is in force", reason, self.on_error)
        elif probe:
            health.backoff = min(BACKOFF_MAX, health.backoff * 2)
            health.retry_at = self.clock() + health.backoff

    def _recovered(self) -> None:
        outage = time.time() - (self.health.down_since or time.time())
        log.warning("storage %s is back after %.1fs", self._describe, outage)
        self.health.healthy = True
        self.health.down_since = None
        self.health.backoff = BACKOFF_START

    async def peek(self, subjects: Sequence[str], limits: Sequence[Limit]) -> list[Outcome]:
        """Each limit's state for its subject now (admin API); raises StorageUnavailable."""
        try:
            async with asyncio.timeout(max(self.timeout, 1.0)):
                return await self.store.peek(subjects, limits)
        except TimeoutError as exc:
            raise StorageUnavailable(f"timed out after {max(self.timeout, 1.0):g}s") from exc

    async def reset(self, subjects: Sequence[str], limits: Sequence[Limit]) -> None:
        quotas = [(s, limit) for s, limit in zip(subjects, limits) if not limit.concurrent]  # slots end with requests
        subjects, limits = [s for s, _ in quotas], [limit for _, limit in quotas]
        try:
            async with asyncio.timeout(max(self.timeout, 1.0)):
                await self.store.reset(subjects, limits)
        except TimeoutError as exc:
            raise StorageUnavailable(f"timed out after {max(self.timeout, 1.0):g}s") from exc
        await self.fallback.reset(subjects, limits)

    @property
    def ready(self) -> bool:
        """Can requests be served under the policy? (/readyz)"""
        return self.health.healthy or self.on_error != "deny"


def _decision(limit_set: LimitSet, outcomes: Sequence[Outcome], *, degraded: bool = False) -> Decision:
    delay = 0.0
    limits = limit_set.limits
    for i, o in enumerate(outcomes):  # a plain loop: all() and max() over generators cost more per request
        if not o.allowed and not limits[i].shadow:
            return (REFUSE_DEGRADED if degraded else REFUSE), outcomes
        if o.delay > delay:
            delay = o.delay
    if delay:
        return Verdict(True, delay, degraded=degraded), outcomes
    return (ALLOW_DEGRADED if degraded else ALLOW), outcomes
