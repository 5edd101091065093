"""Every private aiohttp name Tollgate uses, in one room, checked at import.

aiohttp has no public way to do these things a proxy needs:
- bound the time a client takes to send a request head (nginx's
  `client_header_timeout`; without it a trickled head holds a connection until
  the keep-alive timeout): `HeadGuard`, a RequestHandler that watches its own
  parser's progress, and `GuardedServer`, a `web.Server` that builds them;
- put header lines serialized in advance into a response head (the rate-limit
  headers, built once per distinct value), without aiohttp's `Server` header:
  `SplicedHead`;
- send a relayed response's head as the upstream's bytes (obs-text and all),
  adding only what HTTP asks of a forwarder (framing, Date): `RelayedHead`;
- answer `100 Continue` on the request's own writer without counting it as the
  answer's body: `send_interim`;
- take the raw bytes that follow an upgrade request (WebSocket or any protocol
  the upstream switches to with a 101), as aiohttp's own WebSocketResponse
  does: `take_upgraded_bytes`.
- parse a connection whose first request names a method llhttp (the C parser)
  does not know with aiohttp's Python parser, which takes any RFC 9110 token,
  and answer what a parser refuses in Tollgate's own format: `HeadGuard`;
- answer a request of another HTTP version in HTTP/1.1: `reply_as_http11`;
- read the request head's parts as plain slots, not cached properties (about
  450 instructions a read): `ProxyRequest`, made by `GuardedServer`.

Nothing else in Tollgate names a private aiohttp attribute. `check()` runs when
this module is imported: if an aiohttp release moved one of these names,
Tollgate refuses to start with one line naming the aiohttp version, instead of
failing mid-request. setup.cfg pins aiohttp's minor version for the same reason.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any, Final, Protocol

import aiohttp
from aiohttp import HttpVersion11, hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.http_parser import HttpRequestParserPy, RawRequestMessage
from aiohttp.http_writer import StreamWriter
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

# The methods llhttp, aiohttp's C parser, knows (in HTTP mode); it refuses any other token
# (tests/test_server.py checks this list against it).
LLHTTP_METHODS: Final = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH SEARCH UNLOCK "
    b"BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PATCH "
    b"PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split()
)
# An RFC 9110 method token and its SP. No lower case: aiohttp's Python parser upper-cases
# the method, and methods are case-sensitive, so `get` stays refused rather than become GET.
UPPER_METHOD: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Z]{1,64} ")
Refused = Callable[[HttpProcessingError], web.StreamResponse]


class IncompatibleAiohttp(RuntimeError):
    """The installed aiohttp lacks an internal Tollgate relies on."""


def _assigned_in_init(cls: type, name: str) -> bool:
    """Does `cls.__init__` assign `self.<name>`? (For attributes not in __slots__.)"""
    init = cls.__dict__.get("__init__")
    return init is not None and name in init.__code__.co_names


def _slots(cls: type) -> set[str]:
    return {slot for klass in cls.__mro__ for slot in getattr(klass, "__slots__", ())}


def check() -> None:
    """Raise IncompatibleAiohttp naming each missing internal and the aiohttp version."""
    missing = []
    handler_slots = _slots(RequestHandler)
    for name in ("_request_count", "_request_in_progress", "_messages", "_loop", "_parser", "_read_bufsize",
                 "_max_msg_queue_size", "max_line_size", "max_field_size", "max_headers"):
        if name not in handler_slots:
            missing.append(f"RequestHandler.{name}")
    for name in ("_loop", "_kwargs"):
        if not _assigned_in_init(web.Server, name):
            missing.append(f"web.Server.{name}")
    for name in ("_headers_buf", "_headers_written"):
        if not _assigned_in_init(StreamWriter, name):
            missing.append(f"StreamWriter.{name}")
    if not callable(getattr(StreamWriter, "send_headers", None)):
        missing.append("StreamWriter.send_headers")
    for name in ("_write_headers", "_send_headers_immediately", "_payload_writer", "_req"):
        if not hasattr(web.StreamResponse, name):
            missing.append(f"StreamResponse.{name}")
    if not callable(getattr(RequestHandler, "set_parser", None)):
        missing.append("RequestHandler.set_parser")
    if not callable(getattr(RequestHandler, "handle_error", None)):
        missing.append("RequestHandler.handle_error")
    if not callable(getattr(HttpRequestParserPy, "parse_message", None)):
        missing.append("HttpRequestParserPy.parse_message")
    for name in ("_message", "_method", "_version", "_headers"):
        if not _assigned_in_init(web.BaseRequest, name):
            missing.append(f"BaseRequest.{name}")
    if not callable(getattr(web.Server, "_make_request", None)):
        missing.append("web.Server._make_request")
    if missing:
        raise IncompatibleAiohttp(
            f"aiohttp {aiohttp.__version__} lacks internals Tollgate relies on ({', '.join(missing)}); "
            f"install the aiohttp version of constraints.txt (setup.cfg names the range)")


check()


class HeadGuard(RequestHandler):
    """A request head must arrive within `header_timeout` of its first byte.

    No timer is set or cancelled per request: `_head_since` says since when a
    head has been awaited (None: none is), and one lazy timer per connection
    checks it when it fires, re-arming only while a head is still awaited. A
    head that arrives in one packet, the usual case, costs a comparison.
    """

    header_timeout: float

    def __init__(self, *args: Any, header_timeout: float, refused: Refused | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.refused = refused
        self._auto_decompress: bool = kwargs.get("auto_decompress", True)
        self._header_timer: asyncio.TimerHandle | None = None
        self._head_since: float | None = None
        self._fresh = False  # no byte received yet: the parser is at a message boundary for sure

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._fresh = True
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self._fresh:
            self._fresh = False
            if unknown_method(data):
                self._parse_in_python()
        before = self._request_count
        super().data_received(data)
        if self._request_count > before:
            self._head_since = None  # a whole request head arrived
        elif self._head_since is None and not self._request_in_progress and not self._messages:
            self._await_head()  # first bytes of the next request on a kept-alive connection

    def _parse_in_python(self) -> None:
        """This connection's requests go through aiohttp's pure-Python parser, which takes any
        method token, where llhttp takes only those it knows. Only on a connection's first
        bytes, where both parsers start from the same state: swapping mid-stream, after
        bytes llhttp consumed, would make the two disagree on where a request starts.
        The C parser stays the rule: the Python one costs ~90,000 more instructions a
        request (+29 %, bench/instructions.py)."""
        self._parser = TokenMethodParser(
            self, self._loop, self._read_bufsize, max_line_size=self.max_line_size,
            max_field_size=self.max_field_size, max_headers=self.max_headers,
            payload_exception=RequestPayloadError, auto_decompress=self._auto_decompress,
            max_msg_queue_size=self._max_msg_queue_size,
        )

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request the parser refused gets `refused`'s answer (aiohttp's is text/plain
        echoing the bad bytes), logged at debug: a client's garbage is not a server error.
        Handler failures (500) stay aiohttp's."""
        if (self.refused is None or not isinstance(exc, HttpProcessingError) or status != 400
                or request.writer.output_size > 0):
            return super().handle_error(request, status, exc, message)
        self.logger.debug("Refused a malformed request from %s: %r", request.remote, exc)
        response = self.refused(exc)
        response.force_close()
        return response

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._head_since = self._loop.time()
        if self._header_timer is None:
            self._header_timer = self._loop.call_at(self._head_since + self.header_timeout, self._expire)

    def _expire(self) -> None:
        self._header_timer = None
        since = self._head_since
        if since is None or self._request_in_progress or self._messages:
            return
        deadline = since + self.header_timeout
        if deadline > self._loop.time() + 0.001:  # a later head started: wait for its own deadline
            self._header_timer = self._loop.call_at(deadline, self._expire)
        elif self.transport is not None:
            self.transport.close()


class ProxyRequest(web.BaseRequest):
    """A BaseRequest whose parts fixed by the request head are plain slots.

    aiohttp serves them as cached properties, and every read of one, cached or
    not, is a descriptor call and a dict lookup: about 450 instructions, where
    a slot costs a few dozen. The proxy path reads them about fifteen times a
    request (bench/README.md). Same values as the properties: each is what
    BaseRequest's own property returns, taken once here.
    """

    __slots__ = ("headers", "method", "raw_headers", "raw_path", "version")
    ATTRS = web.BaseRequest.ATTRS | frozenset(__slots__)  # aiohttp's debug mode warns of other names

    def __init__(self, message: RawRequestMessage, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        self.method, self.version, self.headers = self._method, self._version, self._headers
        self.raw_headers, self.raw_path = self._message.raw_headers, self._message.path


class GuardedServer(web.Server):
    """A `web.Server` whose connections are HeadGuard handlers, and whose
    requests (unless a request factory is given) are ProxyRequests."""

    def __init__(self, handler: Callable[..., Any], *, header_timeout: float, refused: Refused | None = None,
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout = header_timeout
        self.refused = refused

    def _make_request(self, message: RawRequestMessage, payload: Any, protocol: RequestHandler,
                      writer: AbstractStreamWriter, task: asyncio.Task[None]) -> web.BaseRequest:
        return ProxyRequest(message, payload, protocol, writer, task, self._loop)

    def __call__(self) -> RequestHandler:
        return HeadGuard(self, loop=self._loop, header_timeout=self.header_timeout, refused=self.refused,
                         **self._kwargs)


def guarded_copy(server: web.Server, header_timeout: float, refused: Refused | None = None) -> GuardedServer:
    """The same server (handler, request factory, settings), with HeadGuard connections."""
    return GuardedServer(server.request_handler, request_factory=server.request_factory, loop=server._loop,
                         header_timeout=header_timeout, refused=refused, **server._kwargs)


class GuardedAppRunner(web.AppRunner):
    """An AppRunner (the app's startup, router and cleanup) whose server is guarded."""

    def __init__(self, app: web.Application, *, header_timeout: float, refused: Refused | None = None,
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout = header_timeout
        self.refused = refused

    async def _make_server(self) -> web.Server:
        return guarded_copy(await super()._make_server(), self.header_timeout, self.refused)


class TokenMethodParser(HttpRequestParserPy):
    """aiohttp's Python parser, but a method with lower case is refused as llhttp refuses it,
    not upper-cased: `get` must not reach the upstream as `GET`."""

    def parse_message(self, lines: list[bytes]) -> RawRequestMessage:
        if not UPPER_METHOD.match(lines[0]):
            raise BadHttpMethod(lines[0].decode("latin-1"))
        return super().parse_message(lines)


def unknown_method(first: bytes) -> bool:
    """Do a connection's first bytes start with a method token that llhttp would refuse?"""
    match = UPPER_METHOD.match(first)
    return match is not None and match.group()[:-1] not in LLHTTP_METHODS


def reply_as_http11(request: web.BaseRequest) -> None:
    """Have Tollgate's answer to `request` say HTTP/1.1 whatever version it came in
    (aiohttp echoes the request's: "HTTP/2.0 505"). The proxy port's requests are
    ProxyRequests (GuardedServer), whose `version` is a plain slot."""
    assert isinstance(request, ProxyRequest), "only the proxy port refuses versions"
    request.version = HttpVersion11


class SplicedHead(web.StreamResponse):
    """A response with `lines`: header lines (each ending CRLF) sent after aiohttp's own.

    Tollgate's own lines are made of config names that passed NAME_RE and of
    integers, so they skip aiohttp's per-character CR/LF check (bench/README.md).
    aiohttp's `Server` header (its version) is not sent.
    """

    lines: bytes = b""

    async def _write_headers(self) -> None:
        self.headers.popall(hdrs.SERVER, None)
        lines = self.lines
        if not lines:
            return await web.StreamResponse._write_headers(self)
        immediately = self._send_headers_immediately  # a StreamResponse's: hold the head to splice
        if immediately:
            self._send_headers_immediately = False
        await web.StreamResponse._write_headers(self)
        writer = self._payload_writer
        assert isinstance(writer, StreamWriter) and writer._headers_buf is not None
        writer._headers_buf = writer._headers_buf[:-2] + lines + b"\r\n"  # before the blank line
        if immediately:
            self._send_headers_immediately = True
            writer.send_headers()


# What a forwarder adds to a relayed head: the client connection's own framing.
_FRAMING: Final = (hdrs.CONTENT_LENGTH, hdrs.TRANSFER_ENCODING, hdrs.CONNECTION)


class RelayedHead(web.StreamResponse):
    """A relayed response: its head is the upstream's bytes, not aiohttp's.

    `raw` holds the upstream's end-to-end header lines exactly as received
    (each ending CRLF), `reason_bytes` its reason phrase, `lines` Tollgate's
    rate-limit lines. aiohttp decides the framing towards the client (it knows
    the client's version and keep-alive); of its headers only that framing goes
    out, plus `Date` when the upstream sent none (RFC 9110 §6.6.1). No
    `Server`, no `Content-Type` the upstream did not send.
    """

    raw: bytes = b""
    reason_bytes: bytes = b""
    lines: bytes = b""
    has_date: bool = False

    async def _write_headers(self) -> None:
        request, writer = self._req, self._payload_writer
        assert request is not None and isinstance(writer, StreamWriter)
        own = self.headers
        version = request.version
        parts = [b"HTTP/%d.%d %d %s\r\n" % (version.major, version.minor, self.status, self.reason_bytes),
                 self.raw]
        for name in _FRAMING:
            value = own.get(name)
            if value is not None:
                parts.append(b"%s: %s\r\n" % (name.encode(), value.encode("latin-1")))
        if not self.has_date:
            parts.append(b"Date: %s\r\n" % own[hdrs.DATE].encode("latin-1"))
        parts.append(self.lines)
        parts.append(b"\r\n")
        writer._headers_buf = b"".join(parts)
        writer._headers_written = False
        if self._send_headers_immediately:
            writer.send_headers()


def requests_in_progress(server: web.Server) -> bool:
    """Is any connection of `server` in the middle of a request?"""
    return any(handler._request_in_progress for handler in server.connections)


async def send_interim(writer: AbstractStreamWriter, head: bytes) -> None:
    """Write an interim (1xx) response ahead of the answer, not counted as its body."""
    await writer.write(head)
    writer.output_size = 0


class PayloadParser(Protocol):
    """What aiohttp's server protocol feeds the bytes after an upgrade to."""

    def feed_data(self, data: bytes) -> tuple[bool, bytes]: ...
    def feed_eof(self) -> None: ...


def take_upgraded_bytes(request: web.BaseRequest, parser: PayloadParser) -> None:
    """From now on, every byte the client sends on `request`'s connection goes
    to `parser.feed_data` (bytes already buffered behind the upgrade request
    first), and its end to `parser.feed_eof`.

    `RequestHandler.set_parser` is what web_ws.WebSocketResponse uses; it is
    annotated for aiohttp's own WebSocketReader, hence the Any.
    """
    protocol: Any = request.protocol
    protocol.set_parser(parser)
