"""The upstream client: a keep-alive pool of HTTP/1.1 connections on asyncio
protocols, responses parsed by httptools (llhttp, the parser aiohttp uses too).

Why not aiohttp's ClientSession: per request it builds a ClientRequest, a
ClientResponse, header multidicts, cookie, redirect, tracing and timeout
machinery, about 80 µs of CPU on the bench machine, more than all of
Tollgate's own work. A proxy needs none of that: it sends a head it has
already built, streams a body, and hands back status, raw headers and body
chunks (bench/README.md has the measurements).

Timeouts cost no timer per request: each connection has one timer that,
when it fires, compares the time of the last byte with the deadline and
either acts or re-arms for the rest (so a busy connection never touches it).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator
from typing import Final

import httptools

MAX_IDLE: Final = 256  # kept-alive connections beyond this many idle ones are closed
HIGH_WATER: Final = 256 * 1024  # buffered response bytes that pause reading from the upstream
LOW_WATER: Final = 64 * 1024
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class UpstreamError(Exception):
    """The upstream exchange failed; `kind` names how, for metrics and the access log."""

    kind = "protocol"


class ConnectFailed(UpstreamError):
    kind = "connect"


class ConnectTimeout(UpstreamError):
    kind = "connect_timeout"


class UpstreamTimeout(UpstreamError):
    kind = "timeout"


class _Stale(UpstreamError):
    """A kept-alive connection closed before any byte of the answer: safe to retry."""


class Response:
    """An upstream response: status, raw headers, then body chunks from `read()`.

    A 101 to an upgrade request has no body: its `tunnel` carries the
    connection's bytes from then on (None for every other answer).
    """

    __slots__ = ("_buffered", "_chunks", "_conn", "_done", "_error", "_waiter", "headers", "length", "reason",
                 "status", "tunnel")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], length: bytes | None,
                 conn: _Connection) -> None:
        self.status = status
        self.reason = reason.decode("latin-1")
        self.headers = headers
        self.length = length  # Content-Length, when that frames the body (not chunked)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: UpstreamError | None = None
        self._conn: _Connection | None = conn
        self.tunnel: Tunnel | None = None

    @property
    def complete(self) -> bool:
        """The whole body has arrived (it may still be buffered here)."""
        return self._done

    def buffered(self) -> bytes:
        """Everything received and not yet read, at once (for a complete body)."""
        chunks = self._chunks
        body = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return body

    async def read(self) -> bytes:
        """The next body chunk; b"" at the end. Raises UpstreamError if the upstream
        fails or falls silent mid-body."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        conn = self._conn
        if conn is not None and conn.paused_reading and self._buffered < LOW_WATER:
            conn.resume_reading()
        return chunk

    def close(self) -> None:
        """Done with it: an unfinished exchange's connection is closed, not reused."""
        conn, self._conn = self._conn, None
        if conn is not None and not self._done:
            conn.abandon()
        self._chunks.clear()

    # called by the connection
    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        conn = self._conn
        if self._buffered > HIGH_WATER and conn is not None and not conn.paused_reading:
            conn.pause_reading()
        self._wake()

    def _finish(self, error: UpstreamError | None = None) -> None:
        self._done = True
        self._error = error
        self._conn = None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Tunnel:
    """An upgraded upstream connection as a raw byte stream both ways.

    Never pooled: its bytes belong to the protocol the upstream switched to.
    Reading stops (backpressure) while more than HIGH_WATER bytes wait here;
    the upstream's EOF only half-closes, so bytes can still go out until close().
    """

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None

    async def read(self) -> bytes:
        """The next bytes from the upstream; b"" once it has closed or reset."""
        while not self._chunks:
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        conn = self._conn
        if conn.paused_reading and self._buffered < LOW_WATER:
            conn.resume_reading()
        return chunk

    def write(self, data: bytes) -> None:
        """Send bytes upstream; raises ConnectionResetError once the connection is gone."""
        transport = self._conn.transport
        if self._conn.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("the upstream connection is closed")
        transport.write(data)

    async def drain(self) -> None:
        """Wait while the upstream's socket buffer is full."""
        await self._conn.drained()

    def write_eof(self) -> None:
        """Half-close: the upstream sees EOF and may still answer."""
        transport = self._conn.transport
        if transport is not None and not self._conn.closed and transport.can_write_eof():
            transport.write_eof()

    def close(self) -> None:
        """Close the connection (bytes already written are still flushed)."""
        self._conn._close()

    # called by the connection
    def _feed(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered > HIGH_WATER and not self._conn.paused_reading:
                self._conn.pause_reading()
        self._wake()

    def _feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One upstream connection: idle in the pool, or carrying one exchange."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.paused_reading = False
        self.last_io = self.loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        # the exchange in progress
        self.busy = False
        self._head: asyncio.Future[Response] | None = None
        self._response: Response | None = None
        self._head_only = False
        self._until_close = False
        self._interim = False
        self._reset_parser = False
        self._status_text: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._got_bytes = False
        self._reused = False
        self._body_sent = True  # False while a request body is still going out: not reusable then
        self._timer_at = 0.0
        self._upgrade = False  # the request asks to switch protocols
        self._tunnel: Tunnel | None = None  # after a 101: the connection is a raw byte stream

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass
        self._arm(self.pool.keepalive)

    def data_received(self, data: bytes) -> None:
        self.last_io = self.loop.time()
        if self._tunnel is not None:
            self._tunnel._feed(data)
            return
        if not self.busy:
            self._close()  # bytes nobody asked for: the connection cannot be trusted
            return
        self._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._tunnel is None:
                self._fail(UpstreamError("the upstream switched protocols unasked"))
                self._close()
            else:  # bytes of the new protocol that came with the 101 head
                self._tunnel._feed(data[exc.args[0]:])
            return
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"invalid response from the upstream: {exc}"))
            self._close()
            return
        if self._reset_parser:  # a HEAD answer ended at its head: the body it announces never comes
            self._reset_parser = False
            self.parser = httptools.HttpResponseParser(self)

    def eof_received(self) -> bool | None:
        if self._tunnel is not None:
            self._tunnel._feed_eof()
            return self.pool.ssl is None  # keep sending after the upstream's half-close (not over TLS)
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionError("upstream connection lost"))
        if self._tunnel is not None:
            self._tunnel._feed_eof()
            return
        if not self.busy:
            return
        response = self._response
        if response is not None and self._until_close:
            self._complete()  # a body delimited by the connection's close
        elif response is not None:
            self._fail(UpstreamError("the upstream closed the connection mid-body"))
        elif self._got_bytes or not self._reused:
            self._fail(UpstreamError("the upstream closed the connection without a valid response"))
        else:
            self._fail(_Stale("a kept-alive upstream connection was closed"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    # -- httptools callbacks
    def on_status(self, status: bytes) -> None:
        self._status_text.append(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status == 101 and self._upgrade and self.parser.should_upgrade():
            self._start_tunnel()
            return
        if status < 200:  # 100 Continue, 103 Early Hints: interim, the real answer follows
            self._interim = True
            self._headers = []
            self._status_text = []
            return
        length: bytes | None = None
        chunked = False
        for name, value in self._headers:
            lname = name.lower()
            if lname == b"content-length":
                length = value
            elif lname == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            length = None
        self._until_close = length is None and not chunked and not self._head_only and status not in (204, 304)
        response = Response(status, b"".join(self._status_text), self._headers, length, self)
        self._response = response
        self._headers = []
        self._status_text = []
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(response)
        if self._head_only:
            self._reset_parser = True
            self._complete()

    def _start_tunnel(self) -> None:
        """The upstream accepted the upgrade: from here on the connection is the tunnel's."""
        response = Response(101, b"".join(self._status_text), self._headers, None, self)
        response._finish()  # no body; closing the Response leaves the connection to the tunnel
        response.tunnel = self._tunnel = Tunnel(self)
        self._headers = []
        self._status_text = []
        if self._timer is not None:  # a tunnel may stay silent for as long as its endpoints like
            self._timer.cancel()
            self._timer = None
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(response)

    async def drained(self) -> None:
        """Return once the transport takes more writes; raise if the connection is lost."""
        if self.closed:
            raise ConnectionResetError("the upstream connection is closed")
        if self._write_paused:
            if self._drain is None or self._drain.done():
                self._drain = self.loop.create_future()
            await self._drain

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is not None:
            response._feed(body)

    def on_message_complete(self) -> None:
        if self._tunnel is not None:
            return
        if self._interim:
            self._interim = False
            return
        if self._response is not None:
            self._complete()

    # -- one exchange
    async def exchange(self, head: bytes, body: AsyncIterator[bytes] | None, *, chunked: bool,
                       head_only: bool, reused: bool, upgrade: bool = False) -> Response:
        """Send one request, return its response once the head has arrived."""
        assert self.transport is not None
        self.busy = True
        self._upgrade = upgrade
        self._reused = reused
        self._got_bytes = False
        self._head_only = head_only
        self._response = None
        self._body_sent = body is None
        future: asyncio.Future[Response] = self.loop.create_future()
        self._head = future
        self.last_io = now = self.loop.time()
        if self._timer_at > now + self.pool.timeout:  # the silence limit is shorter than the keep-alive
            self._timer.cancel()  # type: ignore[union-attr]
            self._arm(self.pool.timeout)
        self.transport.write(head)
        sender = None
        if body is not None:
            sender = self.loop.create_task(self._send_body(body, chunked))
        try:
            response = await future
        except BaseException:  # failed, timed out, or the request handler was cancelled
            if sender is not None:
                sender.cancel()
            self.abandon()
            raise
        if sender is not None and not sender.done():
            # The upstream answered before the body was all sent: it need not read the
            # rest, and the connection is not reused (_body_sent stays False).
            sender.cancel()
        return response

    async def _send_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        """Stream the request body with backpressure; a failure of the body's
        source (client gone, too large) is handed to whoever awaits the head."""
        transport = self.transport
        assert transport is not None
        try:
            async for chunk in body:
                if self.closed:
                    return
                if not chunk:
                    continue
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                self.last_io = self.loop.time()
                if self._write_paused:
                    self._drain = self.loop.create_future()
                    await self._drain
            if chunked and not self.closed:
                transport.write(b"0\r\n\r\n")
            self._body_sent = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            head, self._head = self._head, None
            if head is not None and not head.done():
                head.set_exception(exc)
            self.abandon()

    def _complete(self) -> None:
        response, self._response = self._response, None
        self.busy = False
        reusable = (not self._until_close and not self.closed and self._body_sent and not self._upgrade
                    and self.parser.should_keep_alive())
        if response is not None:
            response._finish()
        if reusable:
            if self.paused_reading:
                self.resume_reading()
            self.pool.release(self)
        else:
            self._close()

    def _fail(self, error: UpstreamError) -> None:
        self.busy = False
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(error)
        response, self._response = self._response, None
        if response is not None:
            response._finish(error)

    def abandon(self) -> None:
        """The exchange is given up (client gone, body too large): close."""
        if self.busy:
            self._fail(UpstreamError("the exchange was abandoned"))
        self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
            self.pool.forget(self)

    def pause_reading(self) -> None:
        self.paused_reading = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.paused_reading = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- the one timer: idle keep-alive in the pool, or upstream silence mid-exchange
    def _arm(self, after: float) -> None:
        self._timer_at = self.last_io + after
        self._timer = self.loop.call_at(self._timer_at, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.closed or self._tunnel is not None:
            return
        limit = self.pool.timeout if self.busy else self.pool.keepalive
        left = self.last_io + limit - self.loop.time()
        if left > 0.001:
            self._arm(limit)
            return
        if self.busy:
            self._fail(UpstreamTimeout(f"the upstream sent nothing for {limit:g}s"))
        self._close()


class Pool:
    """Keep-alive connections to one upstream origin, most recently used first."""

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                 connect_timeout: float = 2.0, timeout: float = 30.0, keepalive: float = 30.0) -> None:
        self.host, self.port = host, port
        self.ssl = ssl_context
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.keepalive = keepalive
        self.loop = asyncio.get_running_loop()
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._retired = False  # replaced by a new pool: keep no connection alive

    @property
    def in_use(self) -> int:
        """Connections carrying an exchange now."""
        return len(self._all) - len(self._idle)

    async def request(self, head: bytes, body: AsyncIterator[bytes] | None = None, *, method: str,
                      chunked: bool = False, upgrade: bool = False) -> Response:
        """Send a request (its head already serialized) and return the response head.

        A kept-alive connection that turns out closed is retried once on a new
        one when nothing of the request can have been acted on (an idempotent
        method without a body), as nginx's proxy_next_upstream does.
        An `upgrade` request goes on a new connection that is never pooled
        afterwards; a 101 answer's `tunnel` then owns it.
        """
        head_only = method == "HEAD"
        if upgrade:
            new = await self._connect()
            return await new.exchange(head, body, chunked=chunked, head_only=head_only, reused=False, upgrade=True)
        conn = self._take()
        if conn is not None:
            try:
                return await conn.exchange(head, body, chunked=chunked, head_only=head_only, reused=True)
            except _Stale as exc:
                if body is not None or method not in IDEMPOTENT:
                    raise UpstreamError(str(exc)) from None
        conn = await self._connect()
        return await conn.exchange(head, body, chunked=chunked, head_only=head_only, reused=False)

    def _take(self) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
            self._all.discard(conn)
        return None

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None)
        except TimeoutError:
            raise ConnectTimeout(f"could not connect within {self.connect_timeout:g}s") from None
        except OSError as exc:
            raise ConnectFailed(exc.strerror or str(exc)) from None
        self._all.add(conn)
        return conn

    def release(self, conn: _Connection) -> None:
        if self._retired or len(self._idle) >= MAX_IDLE:
            conn.abandon()
        else:
            self._idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def close_idle(self) -> None:
        """Close the idle connections; busy ones close when their exchange ends."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abandon()
        self._retired = True

    async def close(self) -> None:
        for conn in list(self._all):
            conn.abandon()
        self._idle.clear()
        self._all.clear()
        await asyncio.sleep(0)  # let the transports' connection_lost run
