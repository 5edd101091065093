"""Build the store the config names; the one place that knows every backend."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from ..config import StorageConfig
from .memory import MemoryStore
from .store import Clock, Store, wall_clock


@contextlib.asynccontextmanager
async def open_store(storage: StorageConfig, clock: Clock = wall_clock) -> AsyncIterator[Store]:
    """The configured store, closed on exit (connections open later, in
    `Limiter.start`: a Redis that is down at start is not fatal)."""
    store: Store
    if storage.backend == "redis":
        from .redis import RedisStore

        store = RedisStore.from_config(storage)
    else:
        store = MemoryStore(clock)
    try:
        yield store
    finally:
        await store.close()
