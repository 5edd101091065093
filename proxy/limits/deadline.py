"""Deadlines on Redis's clock, so a decision that runs after its caller gave
up (a stalled Redis working through its backlog) charges nothing.

acquire.lua compares its deadline with `TIME`, the server's clock, which is
not ours. The offset between the two is learned from below: a `TIME` reply
read the moment it arrives gives redis_now - local_now, smaller than the true
offset by the reply's transit, so a deadline computed with it falls early,
never late. A small margin more covers the reply's way back: a script that
starts just before the deadline must still answer before the caller's timer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

from .algorithms import to_micros
from .store import Clock, StorageUnavailable

log = logging.getLogger("tollgate.storage")

MARGIN_MAX: Final = 0.005  # s taken off every deadline for the reply's way back
MARGIN_SHARE: Final = 0.2  # ... or this share of the timeout, when that is less
REFRESH: Final = 60.0  # s between offset measurements: the clocks may drift or be stepped
NO_DEADLINE: Final = 0


def deadline_us(now: float, timeout: float, offset: float) -> int:
    """The last instant, in microseconds on the server's clock, at which a
    decision started at local `now` with `timeout` may still be applied."""
    margin = min(MARGIN_MAX, timeout * MARGIN_SHARE)
    return to_micros(now + offset + timeout - margin)


class ServerClock:
    """Where the server's clock stands against ours; see the module docstring.

    `fetch` returns the server's time in seconds (a `TIME` round trip). Until
    the first answer the offset is unknown and decisions carry no deadline.
    """

    def __init__(self, fetch: Callable[[], Awaitable[float]], *, clock: Clock = time.time) -> None:
        self._fetch = fetch
        self._clock = clock
        self.offset: float | None = None
        self._refresh_at = 0.0
        self._task: asyncio.Task[None] | None = None

    def deadline(self, timeout: float) -> int:
        """`deadline_us` for a decision starting now; NO_DEADLINE while the offset is unknown."""
        now = self._clock()
        if now >= self._refresh_at:
            self._refresh_at = now + REFRESH
            self._task = asyncio.get_running_loop().create_task(self.learn())
        if self.offset is None:
            return NO_DEADLINE
        return deadline_us(now, timeout, self.offset)

    async def learn(self) -> None:
        """Measure the offset once; a failure keeps the last one (the store is
        down, and the limiter hears of that from the decisions themselves)."""
        try:
            server_now = await self._fetch()
        except (StorageUnavailable, TimeoutError) as exc:
            log.debug("cannot read the server's clock: %s", exc)
            return
        self.observed(server_now)

    def observed(self, server_now: float) -> None:
        """A server time just received (a TIME reply, or a LATE decision's
        `now`): server_now - local_now is a lower bound of the offset."""
        self.offset = server_now - self._clock()
