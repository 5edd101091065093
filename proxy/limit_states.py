"""What the admin API shows of limits: one limit's state, and `/api/stats`'
`limits` section (the limits beyond a client's own).

The section lists each route's limits and the live state of the limits
whose subject needs no request: `per: global` limits (one peek each, so
the cost is bounded by the config, not by traffic) and concurrency limits'
slots in flight. A concurrency limit counted per client (or per anything
but `global`) has one state per subject; the memory store sums them for
free, Redis would need a scan of every subject's key, so with Redis its
`in_flight` is null. While the store is down every live value is null:
/api/stats answers, it never waits on a store known to be failing.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from .limits.algorithms import Outcome
from .limits.memory import MemoryStore
from .limits.store import Limit, StorageUnavailable
from .ratelimit_headers import whole_seconds
from .selectors import GLOBAL, GLOBAL_SUBJECT

if TYPE_CHECKING:
    from .runtime import Runtime

def limit_body(limit: Limit, outcome: Outcome | None, in_flight: int | None = None) -> dict[str, Any]:
    """A limit as the admin API shows it; `remaining` is null where the
    subject depends on each request (a header, a query parameter...)."""
    body: dict[str, Any] = {"name": limit.name, "algorithm": limit.algorithm.name,
                            "limit": limit.algorithm.capacity, "per": list(limit.per), "shadow": limit.shadow,
                            "remaining": None if outcome is None else outcome.remaining,
                            "reset_seconds": None if outcome is None else whole_seconds(outcome.reset)}
    if limit.concurrent:
        if outcome is not None:
            in_flight = limit.algorithm.capacity - outcome.remaining
        body["in_flight"] = in_flight
    return body


def live(limit: Limit) -> bool:
    """Has this limit a state worth showing without a client: one shared state, or slots in flight?"""
    return limit.per == GLOBAL or limit.concurrent


async def limits_body(runtime: Runtime) -> dict[str, Any]:
    """`/api/stats` `limits`: `routes` (each route with limits) and `tiers`
    (each tier's global and concurrency limits), with their live state."""
    config = runtime.config
    tier_limits = {name: [limit for limit in tier.limits if live(limit)]
                   for name, tier in config.tiers.items() if not tier.unlimited}
    route_limits = [route for route in config.routes if route.limits]
    shared = {limit.key: limit for limits in tier_limits.values() for limit in limits if limit.per == GLOBAL}
    shared.update((limit.key, limit) for route in route_limits for limit in route.limits if limit.per == GLOBAL)
    outcomes = await _peek_global(runtime, list(shared.values()))

    def show(limit: Limit) -> dict[str, Any]:
        return limit_body(limit, outcomes.get(limit.key), _in_flight(runtime, limit))

    return {
        "routes": [{"path": route.path, "methods": None if route.methods is None else sorted(route.methods),
                    "limits": [show(limit) for limit in route.limits]} for route in route_limits],
        "tiers": {name: [show(limit) for limit in limits] for name, limits in tier_limits.items() if limits},
    }


async def _peek_global(runtime: Runtime, limits: list[Limit]) -> dict[str, Outcome]:
    """Each global limit's state by its key; none while the store is down.
    One peek per limit: their keys need not share a Redis Cluster slot."""
    limiter = runtime.limiter
    if not limits or not limiter.health.healthy:
        return {}
    answers = await asyncio.gather(*(limiter.peek([GLOBAL_SUBJECT], [limit]) for limit in limits),
                                   return_exceptions=True)
    out: dict[str, Outcome] = {}
    for limit, answer in zip(limits, answers):
        if isinstance(answer, StorageUnavailable):
            continue
        if isinstance(answer, BaseException):
            raise answer
        out[limit.key] = answer[0]
    return out


def _in_flight(runtime: Runtime, limit: Limit) -> int | None:
    """Slots held over all subjects of a concurrency limit, where that costs no scan (memory)."""
    store = runtime.limiter.store
    if not limit.concurrent or not isinstance(store, MemoryStore) or not runtime.limiter.health.healthy:
        return None
    return store.in_flight(limit)
