"""aiohttp's server with a header-read timeout, which aiohttp does not have.

A client that opens a connection and trickles its request line and headers
(slowloris) would otherwise hold a connection until the keep-alive timeout.
Here every request's head must arrive within `header_timeout` seconds of its
first byte (or of the connection opening); nginx calls this
`client_header_timeout`. Bodies and idle keep-alive connections are not
affected: those have their own timeouts.

This hooks two aiohttp internals (`RequestHandler.data_received`, the
`_request_count` it bumps per parsed request head, and
`AppRunner._make_server`): small, and covered by tests that would fail if
aiohttp changed them.

Two more request-side duties live here. llhttp, aiohttp's C parser, knows a
fixed list of methods, while every RFC 9110 method token is to be forwarded:
a connection whose first bytes name another method is parsed by aiohttp's
Python parser instead (tests/test_server.py). The C parser stays the rule:
the Python one costs about 90,000 more instructions a request (+29 %,
bench/instructions.py). And what a parser refuses is answered as
problem+json: 400, or 505 for an HTTP version it does not know.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine, HttpProcessingError, InvalidURLError
from aiohttp.http_parser import HttpRequestParserPy, RawRequestMessage
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_server import Server

from .problems import problem

HEADER_TIMEOUT = 10.0  # seconds; nginx's client_header_timeout defaults to 60
# The methods llhttp, aiohttp's C parser, knows (in HTTP mode); it refuses any other token
# (tests/test_server_methods.py checks this list against it).
LLHTTP_METHODS: Final = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH SEARCH UNLOCK "
    b"BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PATCH "
    b"PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split()
)
# An RFC 9110 method token and its SP. No lower case: aiohttp's Python parser upper-cases
# the method, and methods are case-sensitive, so `get` stays refused rather than become GET.
UPPER_METHOD: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Z]{1,64} ")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
SERVE: Final = web.AppKey("SERVE", Handler)
"""An app that sets SERVE has every request go straight to that handler: no
router, match info or middleware chain. The proxy port has one catch-all
route, and resolving it cost about 13 us a request, a third of aiohttp's own
(bench/README.md). The app still owns the lifecycle (cleanup_ctx, on_cleanup)."""


class GuardedRequestHandler(RequestHandler):
    """A request head must arrive within `header_timeout` of its first byte.

    No timer is set or cancelled per request: `_head_since` says since when a
    head has been awaited (None: none is), and one lazy timer per connection
    checks it when it fires, re-arming only while a head is still awaited. A
    head that arrives in one packet, the usual case, costs a comparison.
    """

    header_timeout: float = HEADER_TIMEOUT
    auto_decompress: bool = True
    _header_timer: asyncio.TimerHandle | None = None
    _head_since: float | None = None
    _fresh: bool = False  # no byte received yet: the parser is at a message boundary for sure

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
        bytes llhttp consumed, would make the two disagree on where a request starts."""
        self._parser = TokenMethodParser(
            self, self._loop, self._read_bufsize, max_line_size=self.max_line_size,
            max_field_size=self.max_field_size, max_headers=self.max_headers,
            payload_exception=RequestPayloadError, auto_decompress=self.auto_decompress,
            max_msg_queue_size=self._max_msg_queue_size,
        )

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request the parser refused gets a problem+json answer (aiohttp's is
        text/plain echoing the bad bytes), logged at debug: a client's garbage
        is not a server error. Handler failures (500) stay aiohttp's."""
        if not isinstance(exc, HttpProcessingError) or status != 400 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        self.logger.debug("Refused a malformed request from %s: %r", request.remote, exc)
        response = parse_error_answer(exc)
        response.force_close()
        return response

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


def parse_error_answer(exc: HttpProcessingError) -> web.Response:
    """400 for malformed HTTP, 505 for a version the parser does not know (HTTP/1.2, 3.0).

    llhttp reports an unknown version as HPE_INVALID_VERSION, which aiohttp
    raises as BadStatusLine with llhttp's reason in the message; the versions
    it does accept (0.9, 2.0) are answered by proxy.target.
    """
    if isinstance(exc, BadStatusLine) and not isinstance(exc, BadHttpMethod) and "Invalid HTTP version" in exc.message:
        return problem(505, "http_version_not_supported", "Only HTTP/1.0 and HTTP/1.1 are supported.")
    if isinstance(exc, InvalidURLError) and exc.message == "*":
        return problem(400, "bad_request", "The * request target is for OPTIONS only.")
    return problem(400, "bad_request", "The request is not valid HTTP/1.1.")


class GuardedServer(Server):
    """aiohttp's Server, building GuardedRequestHandler connections."""

    header_timeout: float = HEADER_TIMEOUT

    def __call__(self) -> RequestHandler:
        handler = GuardedRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.header_timeout = self.header_timeout
        handler.auto_decompress = self._kwargs.get("auto_decompress", True)
        return handler


class GuardedRunner(web.AppRunner):
    """An AppRunner whose connections get the header-read timeout."""

    def __init__(self, app: web.Application, *, header_timeout: float = HEADER_TIMEOUT, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = GuardedServer  # same state, one method added
        assert isinstance(server, GuardedServer)
        server.header_timeout = self._header_timeout
        serve = self.app.get(SERVE)
        if serve is not None:
            server.request_handler = serve
            server.request_factory = server._make_request  # a BaseRequest: no match info to build
        return server


class StartError(Exception):
    """Tollgate cannot start for a reason the user can fix; the message says which."""


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.asynccontextmanager
async def listen(
    app: web.Application, host: str, port: int, what: str, *, shutdown_timeout: float,
    keepalive_timeout: float = 75.0, header_timeout: float = HEADER_TIMEOUT,
) -> AsyncIterator[int]:
    """Serve `app`, yielding the bound port; on exit close the listener at once,
    then drain in-flight requests up to `shutdown_timeout`."""
    runner = GuardedRunner(app, handle_signals=False, access_log=None, shutdown_timeout=shutdown_timeout,
                           keepalive_timeout=keepalive_timeout, header_timeout=header_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StartError(f"cannot listen on {hostport(host, port)} for the {what} port: {reason}") from None
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
