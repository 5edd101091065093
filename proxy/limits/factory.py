"""Build the store the config names; the one place that knows every backend."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from ..config import StorageConfig
from .memory import MemoryStore
from .store import Clock, StorageUnavailable, Store, wall_clock

log = logging.getLogger("tollgate.storage")


@contextlib.asynccontextmanager
async def open_store(storage: StorageConfig, clock: Clock = wall_clock) -> AsyncIterator[Store]:
    """The configured store, closed on exit. A Redis that is down at start is
    not fatal: `storage.on_error` applies until it answers."""
    store: Store
    if storage.backend == "redis":
        from .redis import RedisStore

        redis_store = RedisStore.from_config(storage)
        try:
            await redis_store.warm()
        except StorageUnavailable as exc:
            log.error("%s; storage.on_error=%s is in force until it answers", exc, storage.on_error)
        store = redis_store
    else:
        store = MemoryStore(clock)
    try:
        yield store
    finally:
        await store.close()
