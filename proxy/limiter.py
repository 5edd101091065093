"""The one place that decides: a tier's limits through the store, and
`storage.on_error` when the store cannot answer in time.

While the store is down the limiter does not pay a failed call per request:
it backs off (0.5 s doubling to 5 s) and applies the policy at once, then lets
one request probe. The outage is logged once, and so is the recovery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from .config import Tier
from .limits.algorithms import Outcome, new_tuple
from .limits.memory import MemoryStore
from .limits.store import Limit, StorageUnavailable, Store

log = logging.getLogger("tollgate.storage")

BACKOFF_START = 0.5
BACKOFF_MAX = 5.0


class Decision(NamedTuple):
    """What happens to a request: `outcomes` align with the tier's limits."""

    allowed: bool
    outcomes: Sequence[Outcome] = ()
    delay: float = 0.0
    unavailable: bool = False  # on_error: deny while the store is down -> 503
    degraded: bool = False  # decided without the shared store (allow or local)


UNLIMITED = Decision(allowed=True)
FAIL_OPEN = Decision(allowed=True, degraded=True)
FAIL_CLOSED = Decision(allowed=False, unavailable=True, degraded=True)


@dataclass(slots=True)
class Health:
    healthy: bool = True
    last_error: str | None = None
    down_since: float | None = None
    errors: int = 0
    retry_at: float = 0.0
    backoff: float = field(default=BACKOFF_START)


class Limiter:
    """Applies tiers through a store; `on_error` is applied here and nowhere else."""

    def __init__(
        self, store: Store, *, on_error: str = "allow", timeout: float = 0.05,
        fallback: MemoryStore | None = None, describe: str = "",
    ) -> None:
        self.store = store
        self.on_error = on_error
        self.timeout = timeout
        self.fallback = fallback if fallback is not None else MemoryStore()
        self.health = Health()
        self._describe = describe or store.backend
        self._memory = store if isinstance(store, MemoryStore) else None

    async def start(self) -> None:
        """Connect before traffic arrives. A store that is down is not fatal:
        the outage is logged once and `on_error` applies until it answers."""
        try:
            await self.store.warm()
        except StorageUnavailable as exc:
            self._failed(exc)

    def decide_now(self, identity: str, tier: Tier, cost: int) -> Decision | None:
        """The decision, when it needs no I/O (unlimited tier, memory store, a
        store in back-off); None: `await consult_store()`. Saves the proxy's
        hot path a coroutine per request."""
        if tier.unlimited:
            return UNLIMITED
        if self._memory is not None:  # in-process: cannot fail, needs no timeout
            return _decision(self._memory.acquire_now(identity, tier.limits, cost))
        if not self.health.healthy and time.monotonic() < self.health.retry_at:
            return self._on_error(identity, tier.limits, cost)
        return None

    async def decide(self, identity: str, tier: Tier, cost: int) -> Decision:
        decision = self.decide_now(identity, tier, cost)
        if decision is not None:
            return decision
        return await self.consult_store(identity, tier, cost)

    async def consult_store(self, identity: str, tier: Tier, cost: int) -> Decision:
        """The decision from the store, where `decide_now` said one is needed."""
        try:
            outcomes = await self.store.acquire(identity, tier.limits, cost, timeout=self.timeout)
        except (StorageUnavailable, TimeoutError) as exc:
            self._failed(exc)
            return self._on_error(identity, tier.limits, cost)
        if not self.health.healthy:
            self._recovered()
        return _decision(outcomes)

    def _on_error(self, identity: str, limits: Sequence[Limit], cost: int) -> Decision:
        if self.on_error == "deny":
            return FAIL_CLOSED
        if self.on_error == "local":
            outcomes = self.fallback.acquire_now(identity, limits, cost)
            return _decision(outcomes, degraded=True)
        return FAIL_OPEN

    def _failed(self, exc: BaseException) -> None:
        health = self.health
        health.errors += 1
        # A store's own message names its (masked) URL; a timeout says nothing.
        reason = str(exc) or f"{self._describe} did not answer within {self.timeout:g}s"
        health.last_error = reason
        now = time.monotonic()
        if health.healthy:
            health.healthy = False
            health.down_since = time.time()
            health.backoff = BACKOFF_START
            log.error("storage unavailable: %s; storage.on_error=%s is in force", reason, self.on_error)
        else:
            health.backoff = min(BACKOFF_MAX, health.backoff * 2)
        health.retry_at = now + health.backoff

    def _recovered(self) -> None:
        outage = time.time() - (self.health.down_since or time.time())
        log.warning("storage %s is back after %.1fs", self._describe, outage)
        self.health.healthy = True
        self.health.down_since = None
        self.health.backoff = BACKOFF_START

    async def peek(self, identity: str, tier: Tier) -> list[Outcome]:
        """A client's state now (admin API); raises StorageUnavailable."""
        try:
            async with asyncio.timeout(max(self.timeout, 1.0)):
                return await self.store.peek(identity, tier.limits)
        except TimeoutError as exc:
            raise StorageUnavailable(f"timed out after {max(self.timeout, 1.0):g}s") from exc

    async def reset(self, identity: str, tier: Tier) -> None:
        try:
            async with asyncio.timeout(max(self.timeout, 1.0)):
                await self.store.reset(identity, tier.limits)
        except TimeoutError as exc:
            raise StorageUnavailable(f"timed out after {max(self.timeout, 1.0):g}s") from exc
        await self.fallback.reset(identity, tier.limits)

    @property
    def ready(self) -> bool:
        """Can requests be served under the policy? (/readyz)"""
        return self.health.healthy or self.on_error != "deny"


def _decision(outcomes: list[Outcome], *, degraded: bool = False) -> Decision:
    if len(outcomes) == 1:  # the common tier: the outcome is the decision
        o = outcomes[0]  # a refused outcome has no delay
        return new_tuple(Decision, (o.allowed, outcomes, o.delay, False, degraded))
    delay = 0.0
    for o in outcomes:  # a plain loop: all() and max() over generators cost more per request
        if not o.allowed:
            return Decision(False, outcomes, 0.0, False, degraded)
        if o.delay > delay:
            delay = o.delay
    return new_tuple(Decision, (True, outcomes, delay, False, degraded))  # see Outcome on new_tuple
