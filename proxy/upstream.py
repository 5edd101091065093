"""The upstream client: a keep-alive pool of HTTP/1.1 connections on asyncio
protocols, responses parsed by httptools (llhttp, the parser aiohttp uses too).

Why not aiohttp's ClientSession: per request it builds a ClientRequest, a
ClientResponse, header multidicts, cookie, redirect, tracing and timeout
machinery, about 80 µs of CPU on the bench machine, more than all of
Tollgate's own work. A proxy needs none of that: it sends a head it has
already built, streams a body, and hands back status, raw headers and body
chunks (bench/README.md has the measurements).

Why it can be trusted with many clients' exchanges on few connections:

- Each exchange is an `_Exchange` with its own parser and state, made fresh
  for it: nothing of one answer (trailers, a half-read head) can reach the next.
- A connection carries at most one exchange (`_Connection.current`). It goes
  back to the pool in one place (`_Connection._end`), after the parser has
  returned, only when the answer is complete, nothing followed it in the same
  read, the request was all sent and both sides keep the connection alive.
  Anything else closes it.
- llhttp decides where a message ends. Tollgate accepts only the framings
  whose reading it agrees on (one Content-Length; `Transfer-Encoding:
  chunked` alone; neither, read to a clean close) and answers 502 to the rest
  (duplicate lengths, length plus chunked, codings it cannot remove), as
  nginx does.
- A response head is bounded like a request head: 8 KiB a line, 100 fields,
  64 KiB in all; past that, nothing more is read.

Timeouts cost no timer per request: each connection has one timer that, when
it fires, compares the clock with the deadline of the connection's state (the
response head's deadline, silence mid-body, idle keep-alive) and either acts
or re-arms for the rest (so a busy connection rarely touches it).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator
from typing import Final

import httptools

from .flow import ByteQueue

MAX_IDLE: Final = 256  # kept-alive connections beyond this many idle ones are closed
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
MAX_HEAD: Final = 64 * 1024  # a response head in all (interim 1xx heads included)
MAX_LINE: Final = 8 * 1024  # one status or header line
MAX_FIELDS: Final = 100  # header fields of one head (and trailer fields of one body)
NO_BODY_STATUSES: Final = frozenset({204, 304})

# The phases of an exchange.
_HEAD: Final = 0  # waiting for (the rest of) the final response head
_BODY: Final = 1  # reading the body
_DONE: Final = 2  # the answer is complete; any further byte is not this exchange's
_UPGRADED: Final = 3  # 101: the connection is a tunnel from the end of the head on


class UpstreamError(Exception):
    """The upstream exchange failed; `kind` names how, for metrics and the access log."""

    kind = "protocol"


class ConnectFailed(UpstreamError):
    kind = "connect"


class ConnectTimeout(UpstreamError):
    kind = "connect_timeout"


class UpstreamTimeout(UpstreamError):
    kind = "timeout"


class UpstreamBusy(UpstreamError):
    """All `max_connections` were in use for the whole of `connect_timeout`."""

    kind = "busy"


class _Stale(UpstreamError):
    """A kept-alive connection closed before any byte of the answer: safe to retry."""


class _Trailing(Exception):
    """Bytes after a complete answer: not this exchange's, and no later one's either."""


class Response:
    """An upstream response: status, raw headers, then body chunks from `read()`.

    `tunnel` is the connection's byte stream after a 101 (None otherwise); it
    is the caller's to close.
    """

    __slots__ = ("_body", "_exchange", "headers", "length", "reason", "status", "tunnel")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], length: bytes | None,
                 exchange: _Exchange | None, tunnel: Tunnel | None = None) -> None:
        self.status = status
        self.reason = reason.decode("latin-1")
        self.headers = headers
        self.length = length  # Content-Length, when that frames the body (not chunked)
        self.tunnel = tunnel
        self._exchange = exchange
        self._body = ByteQueue(exchange)  # paced by the exchange while it owns its connection

    @property
    def complete(self) -> bool:
        """The whole body has arrived intact (it may still be buffered here)."""
        return self._body.ended and self._body.error is None

    def buffered(self) -> bytes:
        """Everything received and not yet read, at once (for a complete body)."""
        return self._body.take_all()

    async def read(self) -> bytes:
        """The next body chunk; b"" at the end. Raises UpstreamError if the body
        is cut, broken or falls silent for `read_timeout`."""
        return await self._body.read()

    def close(self) -> None:
        """Done with it: an unfinished exchange's connection is closed, not reused."""
        exchange, self._exchange = self._exchange, None
        self._body.source = None
        if exchange is not None:
            exchange.abandon()
        self._body.clear()

    # called by the exchange
    def _feed(self, chunk: bytes) -> None:
        self._body.feed(chunk)

    def _finish(self, error: UpstreamError | None = None) -> None:
        if self._body.ended:
            return
        self._exchange = None
        self._body.source = None
        self._body.end(error)


class Tunnel:
    """The raw byte stream of a connection the upstream switched to another
    protocol (101), both ways. Bytes that came in the packet of the 101 head
    come first.

    Never pooled: its bytes belong to the protocol the upstream switched to.
    Reading stops (backpressure) while more than HIGH_WATER bytes wait here;
    the upstream's EOF only half-closes, so bytes can still go out until
    close(). No timeout applies: a WebSocket may be quiet for hours; the
    caller closes it.
    """

    __slots__ = ("_conn", "_from_upstream")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._from_upstream = ByteQueue(conn)

    async def read(self) -> bytes:
        """The next bytes from the upstream; b"" once it closed (cleanly or not)."""
        return await self._from_upstream.read()

    def write(self, data: bytes | memoryview) -> None:
        """Send bytes upstream; raises ConnectionResetError once the connection is gone."""
        transport = self._conn.transport
        if self._conn.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("the upstream connection is closed")
        transport.write(data)

    async def drain(self) -> None:
        """Wait while the upstream's socket buffer is full; ConnectionResetError once it is gone."""
        await self._conn.drain()

    def write_eof(self) -> None:
        """Half-close: the upstream reads EOF, and may still send."""
        transport = self._conn.transport
        if transport is not None and not self._conn.closed and transport.can_write_eof():
            transport.write_eof()

    def close(self) -> None:
        """Close the connection (bytes already written are still flushed)."""
        self._conn.close()

    # called by the connection
    def _feed(self, data: bytes) -> None:
        self._from_upstream.feed(data)

    def _end(self) -> None:
        self._from_upstream.end()


class _Exchange:
    """One request and its answer on one connection, with a parser of its own:
    made fresh per exchange, so nothing of this answer can outlive it."""

    __slots__ = ("body_sent", "conn", "deadline", "got_bytes", "head", "head_bytes", "head_only", "headers",
                 "interim", "keep_alive", "length", "parser", "phase", "progressed", "received", "response",
                 "reused", "stall", "status_text", "trailer_fields", "until_close", "upgrade")

    def __init__(self, conn: _Connection, *, head_only: bool, upgrade: bool, reused: bool, body_sent: bool,
                 deadline: float) -> None:
        self.conn = conn
        self.parser = httptools.HttpResponseParser(self)  # dropped when the exchange ends: see _take_current
        self.head: asyncio.Future[Response] = conn.loop.create_future()
        self.response: Response | None = None
        self.phase = _HEAD
        self.head_only = head_only
        self.upgrade = upgrade
        self.reused = reused
        self.body_sent = body_sent  # False while the request body is still going out
        self.deadline = deadline  # for the response head, once the request is all sent
        self.got_bytes = False
        self.head_bytes = 0
        self.status_text: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.interim = False
        self.length: int | None = None
        self.until_close = False
        self.received = 0
        self.keep_alive = False
        self.progressed = False
        self.stall = 0  # bytes read mid-body without a body byte or a chunk boundary
        self.trailer_fields = 0

    # -- reading
    def feed(self, data: bytes) -> bytes | None:
        """Parse what arrived. Returns the bytes after a 101 head (the tunnel's
        first), else None; raises UpstreamError or httptools' errors."""
        if self.phase == _HEAD:
            room = MAX_HEAD - self.head_bytes
            if len(data) > room:  # parse no byte of a head past MAX_HEAD
                rest = self.feed(data[:room])
                if rest is not None:
                    return rest + data[room:]
                if self.phase == _HEAD:
                    raise UpstreamError(f"the upstream's response head exceeds {MAX_HEAD} bytes")
                return self.feed(data[room:])
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            return data[upgrade.args[0]:]
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, UpstreamError):
                raise exc.__context__ from None
            if self.phase == _UPGRADED:
                raise UpstreamError("a 101 answer without \"Connection: upgrade\"") from None
            raise
        if self.phase == _BODY:
            if self.progressed:
                self.progressed = False
                self.stall = 0
            else:  # chunk framing, extensions or trailers only: bounded like a head
                self.stall += len(data)
                if self.stall > MAX_HEAD:
                    raise UpstreamError("the upstream's chunk framing or trailers exceed the head limit")
        return None

    def on_message_begin(self) -> None:
        if self.phase == _DONE:
            raise _Trailing

    def on_status(self, status: bytes) -> None:
        text = self.status_text
        text.append(status)
        if len(status) > MAX_LINE - 13 or (len(text) > 1 and sum(map(len, text)) > MAX_LINE - 13):
            raise UpstreamError(f"the upstream's status line exceeds {MAX_LINE} bytes")  # "HTTP/1.1 200 ", CRLF

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.phase == _HEAD:
            self.headers.append((name, value))  # lines and fields are counted in _framing, once per head
            return
        # A trailer field: dropped (the client's framing is Tollgate's), but bounded like a head's.
        self.trailer_fields += 1
        if self.trailer_fields > MAX_FIELDS or len(name) + len(value) > MAX_LINE - 4:
            raise UpstreamError("the upstream's trailer fields exceed the head limits")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        reason = b"".join(self.status_text)
        headers, self.headers, self.status_text = self.headers, [], []
        if status == 101:
            self._switch(reason, headers)
        elif status < 200:  # 100 Continue, 103 Early Hints: interim, the real answer follows
            self.interim = True
            self._bounded(headers)
        else:
            self._answer(status, reason, headers)

    def on_body(self, body: bytes) -> None:
        response = self.response
        if self.phase != _BODY or response is None:  # body bytes after a HEAD answer or a 204
            raise _Trailing
        self.received += len(body)
        self.progressed = True
        response._feed(body)

    def on_chunk_header(self) -> None:
        if self.phase != _BODY:
            raise _Trailing
        if self.length is not None or self.until_close:
            raise UpstreamError("the parser and Tollgate disagree on the framing")  # cannot happen: see _framing
        self.progressed = True

    def on_chunk_complete(self) -> None:
        self.progressed = True

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
        elif self.phase == _BODY:
            if self.length is not None and self.received != self.length:
                raise UpstreamError("the parser and Tollgate disagree on the body's length")
            self.keep_alive = self.parser.should_keep_alive()  # before llhttp resets its flags
            self.phase = _DONE
            assert self.response is not None
            self.response._finish()
        # _DONE: the parser's own end of an answer without a body (HEAD, 204, 304)

    def _answer(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        length, chunked = self._framing(headers)
        response = Response(status, reason, headers, length, self)
        self.response = response
        if self.head_only or status in NO_BODY_STATUSES:
            self.phase = _DONE
            self.keep_alive = self.parser.should_keep_alive()
            response._finish()
        else:
            self.phase = _BODY
            self.progressed = True  # the head counts as progress for the bound on chunk framing
            self.length = None if length is None else int(length)
            self.until_close = length is None and not chunked
            self.conn.reading_body()
        if not self.head.done():
            self.head.set_result(response)

    def _switch(self, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        if not self.upgrade:
            raise UpstreamError("101 Switching Protocols to a request that asked for no upgrade")
        self.phase = _UPGRADED  # handed to the caller once llhttp has confirmed it (`_Connection._become_tunnel`)
        response = Response(101, reason, headers, None, None, Tunnel(self.conn))
        response._finish()  # a 101 has no body: its bytes are the tunnel's
        self.response = response

    @staticmethod
    def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, bool]:
        """The Content-Length that frames the body (None if none does), and whether it is
        chunked; and the head's limits on lines and fields (its size is bounded in `feed`).

        Only framings on which llhttp and this function provably agree pass
        (RFC 9112 §6.3): one Content-Length of digits; Transfer-Encoding that is
        exactly `chunked`; neither (read to the close). The rest is 502: two
        lengths (llhttp refuses them too), a length with chunked (a smuggling
        sign), and codings Tollgate cannot remove (`gzip`, `chunked, gzip`,
        `xchunked`; nginx refuses them as well).
        """
        if len(headers) > MAX_FIELDS:
            raise UpstreamError(f"the upstream sent more than {MAX_FIELDS} header fields")
        lengths: list[bytes] = []
        codings: list[bytes] = []
        for name, value in headers:
            if len(name) + len(value) > MAX_LINE - 4:  # ": " and CRLF
                raise UpstreamError(f"an upstream header line exceeds {MAX_LINE} bytes")
            lname = name.lower()
            if lname == b"content-length":
                lengths.append(value.strip(b" \t"))
            elif lname == b"transfer-encoding":
                codings.extend(coding.strip(b" \t") for coding in value.lower().split(b","))
        if codings:
            if lengths:
                raise UpstreamError("the upstream sent both Content-Length and Transfer-Encoding")
            if codings != [b"chunked"]:
                raise UpstreamError(f"the upstream sent Transfer-Encoding {b', '.join(codings)!r}, "
                                    f"which Tollgate cannot relay")
            return None, True
        if not lengths:
            return None, False
        if len(lengths) > 1:
            raise UpstreamError("the upstream sent more than one Content-Length")
        if not lengths[0].isdigit():
            raise UpstreamError(f"the upstream sent an invalid Content-Length {lengths[0]!r}")
        return lengths[0], False

    @staticmethod
    def _bounded(headers: list[tuple[bytes, bytes]]) -> None:
        """The limits `_framing` checks, for an interim head."""
        if len(headers) > MAX_FIELDS or any(len(name) + len(value) > MAX_LINE - 4 for name, value in headers):
            raise UpstreamError("the upstream's interim head exceeds the head limits")

    # -- ending
    def fail(self, error: UpstreamError) -> None:
        """Hand `error` to whoever waits: the head's awaiter, or the body's reader."""
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved: a cancelled awaiter must not leave it unlogged
        elif self.response is not None:
            self.response._finish(error)

    def abandon(self) -> None:
        """The caller gave up on this exchange: close its connection if it is still the current one."""
        self.conn.abandon(self)

    def pause_reading(self) -> None:
        if self.conn.current is self and not self.conn.paused_reading:
            self.conn.pause_reading()

    def resume_reading(self) -> None:
        if self.conn.current is self and self.conn.paused_reading:
            self.conn.resume_reading()

    @property
    def reusable(self) -> bool:
        return self.phase == _DONE and self.keep_alive and self.body_sent and not self.upgrade


class _Connection(asyncio.Protocol):
    """One upstream connection: idle in the pool, carrying one exchange, or a tunnel."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused_reading = False
        self.last_io = self.loop.time()
        self.current: _Exchange | None = None  # set only by exchange(), cleared only by _take_current()
        self.tunnel: Tunnel | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass
        self._arm(self.last_io + self.pool.keepalive)

    def data_received(self, data: bytes) -> None:
        self.last_io = self.loop.time()
        if self.tunnel is not None:
            self.tunnel._feed(data)
            return
        exchange = self.current
        if exchange is None:
            self.close()  # bytes nobody asked for: the connection cannot be trusted
            return
        exchange.got_bytes = True
        try:
            rest = exchange.feed(data)
        except UpstreamError as exc:
            self._fail_current(exc)
            return
        except (httptools.HttpParserError, _Trailing) as exc:
            if exchange.phase == _DONE:  # the answer is whole; what follows it is nobody's
                self._take_current()
                self.close()
            else:
                self._fail_current(UpstreamError(f"invalid response from the upstream: {exc}"))
            return
        if rest is not None:
            self._become_tunnel(exchange, rest)
        elif exchange.phase == _DONE:
            self._end(exchange)

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            self.tunnel._end()
            return self.pool.ssl is None  # keep sending after the upstream's half-close (not over TLS)
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the upstream connection is closed"))
            self._drain.exception()
        if self.tunnel is not None:
            self.tunnel._end()
            return
        exchange = self._take_current()
        if exchange is None:
            return
        if exchange.phase == _BODY and exchange.until_close and exc is None:
            exchange.phase = _DONE  # a body delimited by a clean close (FIN) is complete
            assert exchange.response is not None
            exchange.response._finish()
        elif exchange.phase == _BODY:
            how = "reset" if exc is not None else "closed"
            exchange.fail(UpstreamError(f"the upstream {how} the connection mid-body"))
        elif exchange.got_bytes or not exchange.reused:
            exchange.fail(UpstreamError("the upstream closed the connection without a valid response"))
        else:
            exchange.fail(_Stale("a kept-alive upstream connection was closed"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    async def drain(self) -> None:
        """Return once the transport takes more writes; raise if the connection is lost."""
        if self.closed:
            raise ConnectionResetError("the upstream connection is closed")
        if self._write_paused:
            if self._drain is None:
                self._drain = self.loop.create_future()
            await self._drain

    # -- one exchange
    async def exchange(self, head: bytes, body: AsyncIterator[bytes] | None, *, chunked: bool,
                       head_only: bool, upgrade: bool, reused: bool) -> Response:
        """Send one request, return its response once the head has arrived."""
        assert self.current is None and self.tunnel is None and self.transport is not None
        self.last_io = now = self.loop.time()
        exchange = _Exchange(self, head_only=head_only, upgrade=upgrade, reused=reused, body_sent=body is None,
                             deadline=now + self.pool.timeout)
        self.current = exchange
        self._arm_by(now + self.pool.timeout)
        self.transport.write(head)
        sender = None
        if body is not None:
            sender = self.loop.create_task(self._send_body(exchange, body, chunked))
        try:
            response = await exchange.head
        except BaseException:  # failed, timed out, or the request handler was cancelled
            if sender is not None:
                sender.cancel()
            self.abandon(exchange)
            raise
        if sender is not None and not sender.done():
            # The upstream answered before the body was all sent: it need not read the
            # rest, and the connection is not reused (body_sent stays False).
            sender.cancel()
        return response

    async def _send_body(self, exchange: _Exchange, body: AsyncIterator[bytes], chunked: bool) -> None:
        """Stream the request body with backpressure; a failure of the body's
        source (client gone, too large) is handed to whoever awaits the head."""
        transport = self.transport
        assert transport is not None
        try:
            async for chunk in body:
                if self.current is not exchange:
                    return
                if not chunk:
                    continue
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                self.last_io = self.loop.time()
                await self.drain()
            if self.current is not exchange:
                return
            if chunked:
                transport.write(b"0\r\n\r\n")
            exchange.body_sent = True
            exchange.deadline = self.last_io = self.loop.time()
            exchange.deadline += self.pool.timeout  # the head is due `timeout` after the request's end
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not exchange.head.done():
                exchange.head.set_exception(exc)
            self.abandon(exchange)

    def _take_current(self) -> _Exchange | None:
        """The exchange ends here; the only place that clears `current`.

        Its parser goes with it: an ended exchange parses nothing more, and the
        parser-exchange reference cycle is broken (no garbage collector per request).
        """
        exchange, self.current = self.current, None
        if exchange is not None:
            del exchange.parser
        return exchange

    def _end(self, exchange: _Exchange) -> None:
        """The answer is complete and the parser has returned: release the
        connection (the only place that does) or close it."""
        if self._take_current() is not exchange:
            return
        if exchange.reusable and not self.closed:
            if self.paused_reading:
                self.resume_reading()
            self.pool.release(self)
        else:
            self.close()

    def _fail_current(self, error: UpstreamError) -> None:
        exchange = self._take_current()
        if exchange is not None:
            exchange.fail(error)
        self.close()

    def abandon(self, exchange: _Exchange) -> None:
        """`exchange` is given up (client gone, body too large): close, if it is still this connection's."""
        if self.current is exchange:
            self._fail_current(UpstreamError("the exchange was abandoned"))

    def _become_tunnel(self, exchange: _Exchange, rest: bytes) -> None:
        self._take_current()
        response = exchange.response
        assert response is not None and response.tunnel is not None
        self.tunnel = response.tunnel
        if self._timer is not None:  # no timeout applies to a tunnel's silence
            self._timer.cancel()
            self._timer = None
        if rest:
            self.tunnel._feed(rest)
        if not exchange.head.done():
            exchange.head.set_result(response)
        else:  # the request was given up meanwhile
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
            self.pool.forget(self)

    def pause_reading(self) -> None:
        if self.paused_reading:
            return
        self.paused_reading = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.paused_reading:
            return
        self.paused_reading = False
        self.last_io = self.loop.time()  # a pause is our slowness, not the upstream's silence
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def reading_body(self) -> None:
        """The head is in: from now on silence is bounded by read_timeout."""
        self._arm_by(self.last_io + self.pool.read_timeout)

    # -- the one timer: the head's deadline, silence mid-body, or idle keep-alive
    def _arm(self, at: float) -> None:
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._check)

    def _arm_by(self, at: float) -> None:
        """Make the timer fire no later than `at` (re-arming costs only when it would be later)."""
        if self._timer is not None and self._timer_at > at:
            self._timer.cancel()
            self._arm(at)

    def _due(self, now: float) -> tuple[float, str]:
        exchange = self.current
        pool = self.pool
        if exchange is None:
            return self.last_io + pool.keepalive, ""
        if exchange.phase == _HEAD:
            if exchange.body_sent:
                return exchange.deadline, f"the upstream sent no response head within {pool.timeout:g}s"
            return self.last_io + pool.timeout, f"the upstream read nothing of the request for {pool.timeout:g}s"
        if self.paused_reading:
            return now + pool.read_timeout, ""
        return self.last_io + pool.read_timeout, f"the upstream sent nothing for {pool.read_timeout:g}s mid-body"

    def _check(self) -> None:
        self._timer = None
        if self.closed or self.tunnel is not None:
            return
        now = self.loop.time()
        due, why = self._due(now)
        if due - now > 0.001:
            self._arm(due)
            return
        if self.current is not None:
            self._fail_current(UpstreamTimeout(why))
        self.close()


class Pool:
    """Keep-alive connections to one upstream origin, most recently used first,
    at most `max_connections` open at once."""

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                 connect_timeout: float = 2.0, timeout: float = 30.0, read_timeout: float | None = None,
                 keepalive: float = 30.0, max_connections: int = 1024) -> None:
        self.host, self.port = host, port
        self.ssl = ssl_context
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.read_timeout = timeout if read_timeout is None else read_timeout
        self.keepalive = keepalive
        self.max_connections = max_connections
        self.loop = asyncio.get_running_loop()
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._connecting = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._retired = False  # replaced by a new pool: keep no connection alive

    @property
    def in_use(self) -> int:
        """Connections carrying an exchange (or a tunnel) now."""
        return len(self._all) - len(self._idle)

    async def request(self, head: bytes, body: AsyncIterator[bytes] | None = None, *, method: str,
                      chunked: bool = False, upgrade: bool = False) -> Response:
        """Send a request (its head already serialized) and return the response head.

        A kept-alive connection that turns out closed is retried once on a new
        one when nothing of the request can have been acted on (an idempotent
        method without a body), as nginx's proxy_next_upstream does. An
        `upgrade` request goes on a new connection that never returns to the pool.
        """
        head_only = method == "HEAD"
        conn, reused = await self._acquire(fresh=upgrade)
        if reused:
            try:
                return await conn.exchange(head, body, chunked=chunked, head_only=head_only, upgrade=False,
                                           reused=True)
            except _Stale as exc:
                if body is not None or method not in IDEMPOTENT:
                    raise UpstreamError(str(exc)) from None
            conn, _ = await self._acquire(fresh=True)
        return await conn.exchange(head, body, chunked=chunked, head_only=head_only, upgrade=upgrade,
                                   reused=False)

    async def _acquire(self, *, fresh: bool) -> tuple[_Connection, bool]:
        """An idle connection (unless `fresh`) or a new one, waiting up to
        connect_timeout for room under max_connections; and whether it was idle."""
        deadline = self.loop.time() + self.connect_timeout
        while True:
            if not fresh:
                conn = self._take()
                if conn is not None:
                    return conn, True
            if fresh and self._idle and len(self._all) + self._connecting >= self.max_connections:
                self._idle.pop(0).close()  # the least recently used idle one makes room
            if len(self._all) + self._connecting < self.max_connections:
                return await self._connect(), False
            await self._wait_for_room(deadline)

    async def _wait_for_room(self, deadline: float) -> None:
        waiter = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._wake()  # woken, but leaving: the next waiter gets the chance
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            if isinstance(exc, TimeoutError):
                raise UpstreamBusy(f"no upstream connection free within {self.connect_timeout:g}s "
                                   f"({self.max_connections} in use)") from None
            raise

    def _wake(self) -> None:
        """A connection became idle or room was made: let the first waiter look again."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _take(self) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
            self._all.discard(conn)
        return None

    async def _connect(self) -> _Connection:
        self._connecting += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None)
        except BaseException as exc:
            self._connecting -= 1
            if self._waiters:
                self._wake()  # the room this attempt held is free again
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout(f"could not connect within {self.connect_timeout:g}s") from None
            if isinstance(exc, OSError):
                raise ConnectFailed(exc.strerror or str(exc)) from None
            raise
        self._connecting -= 1
        self._all.add(conn)
        return conn

    def release(self, conn: _Connection) -> None:
        """Take back a connection whose exchange ended cleanly (called by `_Connection._end` only)."""
        assert conn.current is None and conn.tunnel is None
        if self._retired or len(self._idle) >= MAX_IDLE:
            conn.close()
            return
        self._idle.append(conn)
        if self._waiters:
            self._wake()

    def forget(self, conn: _Connection) -> None:
        if conn not in self._all:
            return
        self._all.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass
        if self._waiters:
            self._wake()

    def close_idle(self) -> None:
        """Close the idle connections; busy ones close when their exchange ends."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        self._retired = True

    async def close(self) -> None:
        for conn in list(self._all):
            conn._fail_current(UpstreamError("the upstream pool was closed"))
        self._idle.clear()
        self._all.clear()
        await asyncio.sleep(0)  # let the transports' connection_lost run
