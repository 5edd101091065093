"""Background loops tied to a `with` block, so they stop with what owns them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

log = logging.getLogger("tollgate")


@contextlib.asynccontextmanager
async def every(interval: float, step: Callable[[], Awaitable[None]], *, name: str) -> AsyncIterator[None]:
    """Run `step` every `interval` seconds until the block exits.

    A failing step is logged and the loop goes on: a sweep or a file check
    that fails once must not stop for the life of the process.
    """

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await step()
            except Exception:
                log.exception("%s failed; it runs again in %gs", name, interval)

    task = asyncio.create_task(loop(), name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
