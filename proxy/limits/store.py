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

    `key` derives from the tier, name, algorithm and parameters, so a reload
    that leaves a limit unchanged keeps every client's state and a changed
    limit starts fresh.
    """

    name: str
    algorithm: Algorithm
    key: str


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
    async def acquire(self, identity: str, limits: Sequence[Limit], cost: int,
                      timeout: float | None = None) -> list[Outcome]:
        """Check every limit and charge them all only if all allow.

        Answers or raises (StorageUnavailable, TimeoutError) within `timeout`
        seconds: the store bounds its own wait, which it can do for a whole
        pipeline with one timer instead of a timer per decision.
        """

    @abstractmethod
    async def peek(self, identity: str, limits: Sequence[Limit]) -> list[Outcome]:
        """Each limit's state for `identity`, charging nothing."""

    @abstractmethod
    async def reset(self, identity: str, limits: Sequence[Limit]) -> None:
        """Forget `identity`'s state in these limits: it starts full."""

    async def ping(self) -> None:
        """Raise StorageUnavailable unless the store answers (health checks)."""

    async def warm(self) -> None:
        """Open what the store needs before traffic arrives; raise StorageUnavailable."""

    async def close(self) -> None:
        """Release connections and background tasks."""
