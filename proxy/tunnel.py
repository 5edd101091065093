"""Upgraded connections (WebSocket and any protocol switched to with a 101): a byte tunnel.

After the upstream's 101 the two connections are spliced: bytes are copied
both ways unchanged, so text, binary, ping/pong, close codes, subprotocols and
extensions pass as the endpoints negotiate them, and Tollgate never re-frames
a message. Each direction has backpressure: a side that does not read stops
Tollgate reading from the other.

Ends: when the upstream half-closes, the client gets EOF too and may go on
sending for as long as it keeps talking (a silence of `linger` seconds ends the
tunnel); when the client goes (aiohttp's server does not keep a half-closed
client connection open), the upstream gets EOF and is closed after the bytes
already copied. A write that fails or `Tunnels.close_all` (shutdown) closes
both at once.

`Tunnels.run` is the one place a tunnel runs: its start and its end are where
per-connection accounting (a concurrency slot held while open) hooks in. A
WebSocket with per-message limits runs its client->upstream bytes through a
`proxy.wsgate.MessageGate`, which may end the tunnel with a close frame to
each side.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from . import responses
from .aiohttp_private import take_upgraded_bytes
from .flow import ByteQueue
from .upstream import UpstreamError
from .wsgate import GateClosed, MessageGate

FRAME_GRACE = 1.0  # seconds the upstream may take to finish a frame before Tollgate's close frame


class UpstreamTunnel(Protocol):
    """The upstream side, as `proxy.upstream` hands it over with a 101."""

    async def read(self) -> bytes: ...
    def write(self, data: bytes | memoryview) -> None: ...
    async def drain(self) -> None: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...


class Upgraded(responses.RelayedStream):
    """The 101 relayed to the client (its head as the upstream sent it), with
    both ends of the tunnel it opens: `tunnel` the upstream's, `client` the client's."""

    def __init__(self, *, tunnel: UpstreamTunnel, client: ClientStream, websocket: bool = False) -> None:
        super().__init__(status=101)
        self.tunnel = tunnel
        self.client = client
        self.websocket = websocket  # the 101 says Upgrade: websocket
        self.force_close()  # after the tunnel the connection is not HTTP any more


class ClientStream:
    """The client's bytes after the upgrade request, with backpressure.

    aiohttp's server protocol hands every byte that follows an upgrade to a
    "payload parser" (`feed_data`, `feed_eof`), as its own WebSocket does; this
    one keeps them as they came, and stops reading from the client while more
    than HIGH_WATER bytes wait for the upstream.
    """

    def __init__(self, request: web.BaseRequest) -> None:
        self._transport = request.transport
        self._paused = False
        self._queue = ByteQueue(self)
        self.received = 0

    @property
    def buffered(self) -> int:
        """Bytes received from the client and not yet taken by the upstream pump."""
        return self._queue.buffered

    @property
    def paused(self) -> bool:
        """Is reading from the client stopped until the upstream catches up?"""
        return self._paused

    def attach(self, request: web.BaseRequest) -> None:
        """Take every byte the client sends from now on (call before the 101 goes out)."""
        take_upgraded_bytes(request, self)

    async def read(self) -> bytes:
        """The next bytes from the client; b"" once it has gone."""
        return await self._queue.read()

    def pause_reading(self) -> None:
        transport = self._transport
        if not self._paused and transport is not None and not transport.is_closing():
            self._paused = True
            transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()

    # aiohttp's payload parser interface
    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.received += len(data)
        self._queue.feed(data)
        return False, b""

    def feed_eof(self) -> None:
        self._queue.end()


@dataclass(slots=True)
class Totals:
    """What went through one tunnel."""

    to_upstream: int = 0
    to_client: int = 0
    closed_by: GateClosed | None = None  # the message gate ended the tunnel


class _Run:
    """One running tunnel: the two pumps and how it ends."""

    def __init__(self, request: web.BaseRequest, response: Upgraded, linger: float,
                 gate: MessageGate | None) -> None:
        self.request = request
        self.response = response
        self.linger = linger
        self.gate = gate
        self.finishing = False  # the gate closes the tunnel once the upstream's current frame is out
        self.client_eof = False  # the upstream's EOF was passed on: nothing more can be written
        self.totals = Totals()

    async def __call__(self) -> None:
        up = asyncio.create_task(self._client_to_upstream())
        down = asyncio.create_task(self._upstream_to_client())
        try:
            await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
            if up.done() and isinstance(up.exception(), GateClosed):
                await self._close_with_frame(up.exception(), down)  # type: ignore[arg-type]
            elif down.done() and not up.done() and down.exception() is None:
                # The upstream half-closed and the client has it: the client may still send.
                await self._linger(up, lambda: self.response.client.received)
            elif up.done() and not down.done() and up.exception() is not None:
                # The upstream stopped taking bytes: what it sent before still goes to the client.
                await self._linger(down, lambda: self.totals.to_client)
        finally:
            self.close()
            for task in (up, down):
                task.cancel()
            for task in (up, down):
                with contextlib.suppress(asyncio.CancelledError, ConnectionError, UpstreamError, GateClosed):
                    await task

    async def _client_to_upstream(self) -> None:
        source, tunnel, totals, gate = self.response.client, self.response.tunnel, self.totals, self.gate
        while data := await source.read():
            if gate is None:
                tunnel.write(data)
            else:
                await gate.relay(data, tunnel)
            totals.to_upstream += len(data)
            await tunnel.drain()
        # The client has gone (aiohttp closes a client connection at its EOF):
        # the upstream gets EOF after what was copied, then the close.
        tunnel.write_eof()

    async def _upstream_to_client(self) -> None:
        tunnel, response, totals = self.response.tunnel, self.response, self.totals
        frames = None if self.gate is None else self.gate.server
        while data := await tunnel.read():
            if frames is not None:
                if self.finishing:  # a close frame is due: only the rest of the current frame goes first
                    data = data[:frames.advance(data)]
                    await response.write(data)
                    totals.to_client += len(data)
                    if frames.at_boundary:
                        return
                    continue
                frames.feed(data)  # before the write: a write, once begun, reaches the transport whole
            await response.write(data)  # waits while the client's socket buffer is full
            totals.to_client += len(data)
        transport = self.request.transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            raise ConnectionResetError("the client connection cannot be half-closed")
        transport.write_eof()
        self.client_eof = True

    async def _close_with_frame(self, closed: GateClosed, down: asyncio.Task[None]) -> None:
        """The gate ended the tunnel: stop relaying the upstream, then tell the
        client why (a close frame fits only between the upstream's frames)."""
        self.totals.closed_by = closed
        gate = self.gate
        if gate is not None and not gate.server.at_boundary and not down.done():
            self.finishing = True
            await asyncio.wait((down,), timeout=FRAME_GRACE)
        down.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, UpstreamError):
            await down
        transport = self.request.transport
        frame = gate.client_close(closed) if gate is not None else b""
        if frame and transport is not None and not transport.is_closing() and not self.client_eof:
            transport.write(frame)

    async def _linger(self, pump: asyncio.Task[None], progress: Callable[[], int]) -> None:
        """Let the pump still running finish, for as long as bytes keep moving
        within `linger` seconds of each other."""
        while not pump.done():
            before = progress()
            await asyncio.wait((pump,), timeout=self.linger)
            if progress() == before:
                return

    def close(self) -> None:
        """Close both connections now (bytes already written are still flushed)."""
        self.response.tunnel.close()
        transport = self.request.transport
        if transport is not None:
            transport.close()


class Tunnels:
    """The open tunnels of a proxy app, so that shutdown can close them."""

    def __init__(self) -> None:
        self._open: set[_Run] = set()

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[Upgraded]:
        return iter([tunnel.response for tunnel in self._open])

    async def run(self, request: web.BaseRequest, response: Upgraded, *, linger: float,
                  gate: MessageGate | None = None) -> Totals:
        """Copy bytes both ways until the tunnel ends; both connections are closed on return.
        `gate`: per-message limits on the client's bytes (a WebSocket's)."""
        tunnel = _Run(request, response, linger, gate)
        self._open.add(tunnel)
        try:
            await tunnel()
        finally:
            self._open.discard(tunnel)
        return tunnel.totals

    def close_all(self) -> None:
        """Close every open tunnel (at shutdown: a tunnel has no natural end to wait for)."""
        for tunnel in list(self._open):
            tunnel.close()
