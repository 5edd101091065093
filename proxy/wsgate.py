"""Per-message limits on a WebSocket (`routes[].messages`): a gate on the
client->upstream pump of a tunnel.

Each message the client sends is one decision on the route's message
LimitSet, through the same Limiter as requests (memory or Redis, with
`storage.on_error`). The bytes are still relayed as they came: the gate only
cuts a chunk where a message's final frame begins, decides, and writes on.
A decision that needs no I/O is taken inline; one that waits for the store
holds every later byte behind it, so nothing overtakes a pending decision.

A refused message ends the tunnel: its final frame is not forwarded, the
upstream gets a (masked) close 1008 `rate limited` in its place (so its
application sees why, not an abnormal closure), the client gets an unmasked
close 1008 `rate limited` after the rest of the upstream frame under way
(a frame cannot be put inside another; if the upstream does not finish it
within `tunnel.FRAME_GRACE`, the client's connection closes without one), and
both connections close without waiting for the close handshake. Malformed
client framing is answered likewise with 1002 to the client, and the upstream
connection is simply closed (the bad frame may have begun in bytes it already
has). With `on_error: deny` and the store down, the close is 1013 `try again
later`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Protocol

from .config import LimitSet
from .limiter import Limiter
from .ratelimit_headers import refusing_limit
from .wsframes import FrameScanner, close_frame

RATE_LIMITED: Final = (1008, "rate limited")
PROTOCOL_ERROR: Final = (1002, "protocol error")
UNAVAILABLE: Final = (1013, "try again later")


class Sink(Protocol):
    def write(self, data: bytes | memoryview) -> None: ...


@dataclass(frozen=True, slots=True)
class MessageLimits:
    """What one WebSocket's messages are decided on: the route's message
    limits and the upgrade request's subject for each."""

    limiter: Limiter
    limit_set: LimitSet
    subjects: tuple[str, ...]


class GateClosed(Exception):
    """The gate ended the tunnel: `why` (rate_limited, malformed, unavailable),
    the close `code` and `reason` the client gets, and the refusing `limit`."""

    def __init__(self, why: str, close: tuple[int, str], limit: str | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.code, self.reason = close
        self.limit = limit


@dataclass(slots=True)
class MessageGate:
    """Counts the client's messages and forwards bytes only past allowed decisions."""

    limits: MessageLimits
    client: FrameScanner = field(default_factory=lambda: FrameScanner(client=True))
    server: FrameScanner = field(default_factory=lambda: FrameScanner(client=False))
    messages: int = 0

    async def relay(self, data: bytes, upstream: Sink) -> None:
        """Write `data` upstream, deciding each message that ends in it;
        raises GateClosed (after a close frame upstream, when one is due)."""
        ends = self.client.feed(data)
        error = self.client.error
        if not ends and error is None:
            upstream.write(data)
            return
        view, pos = memoryview(data), 0
        for end in ends:
            if end > pos:
                upstream.write(view[pos:end])
                pos = end
            await self._decide(upstream)
        if error is not None:
            if self.client.clean > pos:
                upstream.write(view[pos:self.client.clean])
            raise GateClosed("malformed", PROTOCOL_ERROR)
        if pos < len(data):
            upstream.write(view[pos:])

    async def _decide(self, upstream: Sink) -> None:
        limits = self.limits
        limiter, limit_set, subjects = limits.limiter, limits.limit_set, limits.subjects
        decision = limiter.decide_now(limit_set, subjects, 1)
        if decision is None:
            decision = await limiter.consult_store(limit_set, subjects, 1)
        verdict, outcomes = decision
        if verdict.allowed:
            self.messages += 1
            return
        # The upstream's stream ends at a frame boundary here: the close frame fits.
        if verdict.unavailable:
            upstream.write(close_frame(*UNAVAILABLE, masked=True))
            raise GateClosed("unavailable", UNAVAILABLE)
        upstream.write(close_frame(*RATE_LIMITED, masked=True))
        name = limit_set.limits[refusing_limit(limit_set, outcomes)].name if outcomes else None
        raise GateClosed("rate_limited", RATE_LIMITED, name)

    def client_close(self, closed: GateClosed) -> bytes:
        """The close frame for the client, or b"" when the server's stream is mid-frame."""
        return close_frame(closed.code, closed.reason, masked=False) if self.server.at_boundary else b""
