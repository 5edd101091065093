"""The one place that decides: a request's limits (its tier's, then its
route's) through the store, and `storage.on_error` when the store cannot
answer in time.

While the store is down the limiter does not pay a failed call per request:
it applies the policy at once and lets one request probe the store after
0.5 s, doubling per failed probe up to 5 s. Requests that were already in
flight when the store failed fail too, but do not lengthen the back-off: at
a high request rate a short stall would otherwise turn into seconds of
degraded answers. The outage is logged once, and so is the recovery.

Health is kept per shard (`Store.shard_of`): with Redis Cluster a failed or
stalled node puts only the clients whose keys live on it under on_error, each
node with its own back-off, and clients on the others keep exact limits. Only
failed shards have an entry, so while all is well the check is one empty-dict
test, and a store with one shard never asks `shard_of` at all.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .config import LimitSet
from .limits.algorithms import Outcome
from .limits.memory import MemoryStore
from .limits.store import WHOLE, Limit, StorageUnavailable, Store

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
    """A shard's state; the limiter keeps one per failed shard only."""

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
        self.errors = 0  # failed store calls, all shards, ever
        self.down: dict[Hashable, Health] = {}  # failed shards only
        self._sharded = store.sharded
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
            self._failed(exc, WHOLE)

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
        if self.down:
            health = self.down.get(self.store.shard_of(subjects[0]) if self._sharded else WHOLE)
            if health is not None:
                if health.probing or self.clock() < health.retry_at:
                    return self._on_error(limit_set, subjects, cost)
                health.probing = True  # this request probes its shard; consult_store ends the probe
        return None

    async def decide(self, limit_set: LimitSet, subjects: Sequence[str], cost: int, ticket: str = "") -> Decision:
        decision = self.decide_now(limit_set, subjects, cost, ticket)
        if decision is not None:
            return decision
        return await self.consult_store(limit_set, subjects, cost, ticket)

    async def consult_store(self, limit_set: LimitSet, subjects: Sequence[str], cost: int,
                            ticket: str = "") -> Decision:
        """The decision from the store, where `decide_now` said one is needed."""
        # The shard before the call: a failover may move the slot while it runs.
        shard = self.store.shard_of(subjects[0]) if self._sharded else WHOLE
        health = self.down.get(shard) if self.down else None
        try:
            outcomes = await self.store.acquire(subjects, limit_set.limits, cost, timeout=self.timeout,
                                                ticket=ticket)
        except (StorageUnavailable, TimeoutError) as exc:
            self._failed(exc, shard, probe=health is not None)
            return self._on_error(limit_set, subjects, cost)
        finally:
            if health is not None:
                health.probing = False  # answered, failed or cancelled: the next may probe
        if self.down and shard in self.down:  # one success restores a shard, probe or not
            self._recovered(shard)
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

    def _failed(self, exc: BaseException, shard: Hashable, *, probe: bool = False) -> None:
        """A call failed: the first failure starts the shard's back-off, a
        failed probe doubles it, and a request that was in flight before the
        outage changes nothing more."""
        self.errors += 1
        # A store's own message names its (masked) URL; a timeout says nothing.
        reason = str(exc) or f"{self._describe} did not answer within {self.timeout:g}s"
        health = self.down.get(shard)
        if health is None:
            health = self.down[shard] = Health(healthy=False, down_since=time.time())
            health.retry_at = self.clock() + health.backoff
            log.error("storage unavailable%s: %s; storage.on_error=%s is in force",
                      self._where(shard), reason, self.on_error)
        elif probe:
            health.backoff = min(BACKOFF_MAX, health.backoff * 2)
            health.retry_at = self.clock() + health.backoff
        health.errors += 1
        health.last_error = reason

    def _recovered(self, shard: Hashable) -> None:
        health = self.down.pop(shard)
        outage = time.time() - (health.down_since or time.time())
        log.warning("storage %s%s is back after %.1fs", self._describe, self._where(shard), outage)

    def _where(self, shard: Hashable) -> str:
        return f" (node {shard})" if self._sharded and shard != WHOLE else ""

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

    def failed_shards(self) -> dict[Hashable, Health]:
        """The shards down now. A failed shard that no longer serves (its
        Cluster slots failed over to a replica) is forgotten: nothing would
        ever probe it again."""
        if self.down and self._sharded:
            serving = self.store.shards()
            for shard in [s for s in self.down if s not in serving]:
                del self.down[shard]
        return self.down

    @property
    def health(self) -> Health:
        """The store's health as one: a failed shard's (the first), or healthy."""
        for health in self.failed_shards().values():
            return health
        return Health(errors=self.errors)

    @property
    def healthy(self) -> bool:
        return not self.failed_shards()

    def healthy_for(self, identity: str) -> bool:
        """Is the shard of `identity` up (as far as the limiter knows)?"""
        return not self.down or (self.store.shard_of(identity) if self._sharded else WHOLE) not in self.down

    @property
    def ready(self) -> bool:
        """Can requests be served under the policy? (/readyz) Under deny, while
        some shard still answers: its clients are served exactly, and taking
        every instance out of rotation would refuse them too."""
        if self.on_error != "deny":
            return True
        down = self.failed_shards()
        return not down or not set(self.store.shards()) <= set(down)


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
