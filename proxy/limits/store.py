"""What every store offers the limiter, and the one error they all raise.

A store keeps state and applies a tier's limits as one atomic step; it never
decides policy (what to do when storage fails lives in `proxy.limiter`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

from .algorithms import Algorithm, Outcome

Clock = Callable[[], float]  # seconds since the Unix epoch, as time.time()


wall_clock: Clock = time.time  # the real clock (the default); tests inject a fake

WHOLE: Final = "*"
"""The one shard of a store that is not sharded, and of a sharded one whose
layout is not known yet."""


@dataclass(frozen=True, slots=True)
class Limit:
    """A configured limit: its public name, its arithmetic and its state key.

    `key` derives from the owner (tier or route), name, algorithm, parameters
    and `per`, so a reload that leaves a limit unchanged keeps every state
    and a changed limit starts fresh. What the limit counts (`per`) is a
    tuple of selectors, `("client",)` by default (proxy.selectors); the
    store sees only each request's subject, already hashed where needed.
    """

    name: str
    algorithm: Algorithm
    key: str
    per: tuple[str, ...] = ("client",)
    shadow: bool = False  # evaluated and charged, never refuses (counted instead)
    lease: float | None = None  # concurrency with Redis: seconds a slot outlives a dead instance

    @property
    def concurrent(self) -> bool:
        return self.algorithm.short == "cc"


class StorageUnavailable(Exception):
    """The store could not answer in time; `storage.on_error` decides what follows."""


class Store(ABC):
    """State of every (client, limit); `acquire` is all-or-nothing across limits."""

    backend: ClassVar[str]
    sharded: bool = False  # True: shard_of() tells nodes apart, each failing on its own

    def shard_of(self, identity: str) -> Hashable:
        """Where `identity`'s state lives: the unit that fails and recovers as
        one (a Redis Cluster node). Called only when `sharded`."""
        return WHOLE

    def shards(self) -> Collection[Hashable]:
        """The shards serving now; a failed shard that left (a failed-over
        Cluster master) no longer counts against the store's health."""
        return (WHOLE,)

    @abstractmethod
    async def acquire(self, subjects: Sequence[str], limits: Sequence[Limit], cost: int,
                      timeout: float | None = None, ticket: str = "") -> list[Outcome]:
        """Check every limit (limit i counts `subjects[i]`) and charge them all
        only if every enforced one allows (shadow limits never refuse).

        Answers or raises (StorageUnavailable, TimeoutError) within `timeout`
        seconds: the store bounds its own wait, which it can do for a whole
        pipeline with one timer instead of a timer per decision. `ticket`
        names this request's concurrency slots, for `release` and `renew`.
        """

    @abstractmethod
    async def peek(self, subjects: Sequence[str], limits: Sequence[Limit]) -> list[Outcome]:
        """Each limit's state for its subject, charging nothing."""

    @abstractmethod
    async def reset(self, subjects: Sequence[str], limits: Sequence[Limit]) -> None:
        """Forget these subjects' state in these limits: they start full."""

    @abstractmethod
    async def release(self, subjects: Sequence[str], limits: Sequence[Limit], ticket: str) -> None:
        """Give back the concurrency slots `acquire` took for `ticket`."""

    async def strike(self, subject: str, strikes: Limit, ban: Limit) -> float | None:
        """Count one strike of a tier's penalty against `subject` (`strikes`
        counts them in its sliding window) and, atomically, ban it (`ban`'s
        state) when the count reaches `after`. Returns when the ban it started
        ends (epoch seconds), or None (no ban, or one already running)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no penalties")

    def now(self) -> float:
        """The store's clock (epoch seconds): what a ban's end is shown against."""
        return wall_clock()

    async def renew(self, subjects: Sequence[str], limits: Sequence[Limit], ticket: str) -> None:
        """Keep `ticket`'s slots alive for another lease (stores with leases)."""

    async def ping(self) -> None:
        """Raise StorageUnavailable unless the store answers (health checks)."""

    async def warm(self) -> None:
        """Open what the store needs before traffic arrives; raise StorageUnavailable."""

    async def close(self) -> None:
        """Release connections and background tasks."""
