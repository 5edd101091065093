"""Streaming forwarder: one request to the upstream and its response back.

Bodies stream both ways with backpressure (a 1 GiB body never sits in
memory); the raw path and query go out byte-exact; hop-by-hop headers are
dropped (RFC 9110 §7.6.1 and those named in Connection); redirects are passed
back, never followed. The request head is serialized here, once, from the
client's raw header bytes and sent through `proxy.upstream`'s pool; upstream
failures become 502/504 in `upstream_failure`.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import HttpVersion11, web
from yarl import URL

from . import responses
from .aiohttp_private import send_interim
from .problems import problem
from .tunnel import ClientStream, Upgraded
from .upstream import ConnectFailed, ConnectTimeout, Pool, Response, UpstreamBusy, UpstreamError, UpstreamTimeout

HOP_BY_HOP: Final = frozenset(
    h.lower().encode()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection",
        "TE", "Trailer", "Transfer-Encoding", "Upgrade",
    )
)
# Not copied from the client: Host is the upstream's (unless preserve_host),
# Expect is answered by Tollgate's own server, X-Forwarded-* are rewritten,
# and the body's framing (Content-Length or chunked) is Tollgate's to send.
REQUEST_SKIP: Final = HOP_BY_HOP | {b"host", b"expect", b"content-length", b"x-forwarded-for",
                                    b"x-forwarded-proto", b"x-forwarded-host"}
RESPONSE_SKIP: Final = HOP_BY_HOP | {b"content-length"}
# A 101's Upgrade and Connection say what the connection switched to: they go to the client as sent.
SWITCH_SKIP: Final = RESPONSE_SKIP - {b"connection", b"upgrade"}
CONNECTION_UPGRADE: Final = b"Connection: upgrade\r\n"
PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close"})  # Connection values naming no other header
NO_BODY_STATUSES: Final = frozenset({204, 304})
FORWARDED_PROTO_HTTP: Final = b"X-Forwarded-Proto: http\r\n"
FORWARDED_PROTO_HTTPS: Final = b"X-Forwarded-Proto: https\r\n"


class ExpectationFailed(Exception):
    """An HTTP/1.1 Expect other than 100-continue (RFC 9110 §10.1.1: 417)."""


class BodyTooLarge(Exception):
    """The client's body exceeded server.max_body_size while streaming."""


class ClientGone(Exception):
    """The client went away before the exchange finished (nginx logs this as 499)."""


class UpstreamBroken(Exception):
    """The upstream died after its response had started: the client's connection must close."""

    def __init__(self, response: web.StreamResponse, reason: str) -> None:
        super().__init__(reason)
        self.response = response


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where and how to forward; built once per config."""

    base_path: str
    host: str
    port: int
    host_header: bytes  # Host sent upstream unless preserve_host
    host_line: bytes  # the same as a header line, built once
    tls: bool
    preserve_host: bool
    timeout: float
    connect_timeout: float
    max_body_size: int | None
    read_timeout: float | None = None  # None: the same as timeout
    max_connections: int = 1024

    @classmethod
    def from_url(cls, url: str, *, preserve_host: bool, timeout: float, connect_timeout: float,
                 max_body_size: int | None, read_timeout: float | None = None,
                 max_connections: int = 1024) -> Upstream:
        parsed = URL(url)
        assert parsed.host is not None and parsed.port is not None
        host_header = parsed.origin().raw_authority.encode("idna")
        return cls(
            base_path=parsed.raw_path.rstrip("/"), host=parsed.host, port=parsed.port,
            host_header=host_header, host_line=b"Host: %s\r\n" % host_header, tls=parsed.scheme == "https",
            preserve_host=preserve_host, timeout=timeout, connect_timeout=connect_timeout,
            max_body_size=max_body_size, read_timeout=read_timeout, max_connections=max_connections,
        )

    def pool(self) -> Pool:
        """A connection pool for this upstream (call inside the running loop)."""
        # Idle connections are closed after 30 s: before a typical upstream's own
        # keep-alive timeout (aiohttp 75 s, nginx 75 s), so the race is rare.
        return Pool(self.host, self.port, ssl_context=ssl.create_default_context() if self.tls else None,
                    connect_timeout=self.connect_timeout, timeout=self.timeout, read_timeout=self.read_timeout,
                    keepalive=30.0, max_connections=self.max_connections)

    def same_origin(self, other: Upstream) -> bool:
        """Can `other` reuse this one's pool?"""
        return (self.host, self.port, self.tls, self.timeout, self.connect_timeout, self.read_timeout,
                self.max_connections) == (other.host, other.port, other.tls, other.timeout, other.connect_timeout,
                                          other.read_timeout, other.max_connections)


def _connection_named(value: bytes) -> set[bytes]:
    """Header names listed in a Connection value: hop-by-hop for this hop only."""
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


def is_upgrade(request: web.BaseRequest) -> bool:
    """Does the client ask to switch protocols (RFC 9110 §7.8: HTTP/1.1, an
    Upgrade header and the "upgrade" token in Connection)?"""
    headers = request.headers
    if "Upgrade" not in headers or request.version != HttpVersion11:
        return False
    return any(b"upgrade" in _connection_named(value.encode("latin-1"))
               for value in headers.getall("Connection", ()))


def request_head(request: web.BaseRequest, upstream: Upstream, target: bytes, *,
                 upgrade: bool = False) -> tuple[bytes, bool]:
    """The request head to send upstream (end-to-end headers plus X-Forwarded-*),
    and whether its body goes chunked. An `upgrade` request keeps its Upgrade
    headers and says `Connection: upgrade`."""
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode("ascii"), target)]
    host = forwarded_for = None
    named: set[bytes] | None = None
    chunked = False
    length: bytes | None = None
    raw = request.raw_headers
    for name, value in raw:
        lname = name.lower()
        if lname in REQUEST_SKIP:
            if lname == b"host":
                host = value
            elif lname == b"x-forwarded-for":
                forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
            elif lname == b"connection":
                named = _connection_named(value) | (named or set())
            elif lname == b"content-length":
                length = value
            elif lname == b"transfer-encoding":
                chunked = True
            elif lname == b"upgrade" and upgrade:
                lines.append(b"%s: %s\r\n" % (name, value))
            continue
        lines.append(b"%s: %s\r\n" % (name, value))
    if upgrade:
        named = (named or set()) - {b"upgrade"}
        lines.append(CONNECTION_UPGRADE)
    if named:  # rare: drop what Connection named, keeping order
        lines = [lines[0]] + [line for line in lines[1:] if line.split(b":", 1)[0].lower() not in named]
    peer = (request.remote or "").encode("ascii")
    lines.append(b"X-Forwarded-For: %s\r\n" % (forwarded_for + b", " + peer if forwarded_for else peer))
    lines.append(FORWARDED_PROTO_HTTPS if request.scheme == "https" else FORWARDED_PROTO_HTTP)
    if host:
        lines.append(b"X-Forwarded-Host: %s\r\n" % host)
    lines.append(b"Host: %s\r\n" % host if upstream.preserve_host and host else upstream.host_line)
    if chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif length is not None:
        lines.append(b"Content-Length: %s\r\n" % length)
    lines.append(b"\r\n")
    return b"".join(lines), chunked


def wants_continue(request: web.BaseRequest) -> bool:
    """Does the client wait for "100 Continue" before sending its body?"""
    expect = request.headers.get("Expect")
    if expect is None or request.version != HttpVersion11:
        return False
    if expect.lower() != "100-continue":
        raise ExpectationFailed(expect)
    return True


async def _client_body(request: web.BaseRequest, limit: int | None, send_continue: bool) -> AsyncIterator[bytes]:
    """The client's body as a stream, cut off past `limit` bytes.

    "100 Continue" goes out only here, when the upstream connection is open and
    the body is wanted: a refused or failed request never asks for the body
    (nginx too sends it only when it starts reading the body).
    """
    if send_continue:
        await send_interim(request.writer, b"HTTP/1.1 100 Continue\r\n\r\n")
    sent = 0
    content = request.content
    while True:
        try:
            chunk = await content.readany()
        except (ConnectionError, aiohttp.ClientPayloadError, web.HTTPException) as exc:
            raise ClientGone from exc
        if not chunk:
            return
        sent += len(chunk)
        if limit is not None and sent > limit:
            raise BodyTooLarge
        yield chunk


def upstream_failure(exc: UpstreamError, upstream: Upstream) -> web.Response:
    """Tollgate's answer to a failure before the response started."""
    if isinstance(exc, ConnectTimeout):
        return problem(502, "bad_gateway", f"Could not connect to the upstream within "
                       f"{upstream.connect_timeout:g}s.")
    if isinstance(exc, UpstreamTimeout):
        return problem(504, "gateway_timeout", f"The upstream sent no response within {upstream.timeout:g}s.")
    if isinstance(exc, UpstreamBusy):
        return problem(503, "upstream_busy", f"All {upstream.max_connections} upstream connections stayed busy "
                       f"for {upstream.connect_timeout:g}s; try again shortly.")
    if isinstance(exc, ConnectFailed):
        return problem(502, "bad_gateway", "The upstream refused the connection or is unreachable.")
    return problem(502, "bad_gateway", "The upstream closed the connection without a valid response.")


def upstream_target(request: web.BaseRequest, upstream: Upstream) -> bytes:
    raw = request.raw_path
    if raw == "*":  # OPTIONS * asks the server itself: no base path in front
        return b"*"
    if not raw.startswith("/"):  # absolute-form request target (RFC 9112 §3.2.2)
        raw = URL(raw, encoded=True).raw_path_qs
    return (upstream.base_path + raw).encode("utf-8", "surrogateescape")


async def forward(
    request: web.BaseRequest, pool: Pool, upstream: Upstream, lines: bytes = b"",
) -> web.StreamResponse:
    """Send `request` upstream and stream the answer back, with header `lines`
    (serialized, each ending CRLF: the rate-limit headers) added to its head.

    Raises ExpectationFailed, BodyTooLarge or ClientGone before the response started,
    UpstreamBroken after, and UpstreamError for `upstream_failure` to map.
    """
    send_continue = wants_continue(request)
    upgrade = is_upgrade(request)
    head, chunked = request_head(request, upstream, upstream_target(request, upstream), upgrade=upgrade)
    body = _client_body(request, upstream.max_body_size, send_continue) if request.body_exists else None
    try:
        answer = await pool.request(head, body, method=request.method, chunked=chunked, upgrade=upgrade)
    except UpstreamError:
        if request.transport is None or request.transport.is_closing():
            raise ClientGone from None
        raise
    if answer.tunnel is not None:
        return await _switch(request, answer, lines)
    try:
        return await _relay(request, answer, lines)
    finally:
        answer.close()


def _relayed(response: responses.Relayed, answer: Response, lines: bytes) -> None:
    response.raw, response.has_date = response_head_lines(answer)
    response.reason_bytes = answer.reason.encode("latin-1")
    response.lines = lines


async def _relay(request: web.BaseRequest, answer: Response, lines: bytes) -> web.StreamResponse:
    no_body = request.method == "HEAD" or answer.status in NO_BODY_STATUSES
    if answer.complete and answer.length is not None and not no_body:
        # The body arrived whole with its head (most API answers): both go out in one write.
        whole = responses.RelayedResponse(status=answer.status, body=answer.buffered())
        _relayed(whole, answer, lines)
        return whole
    framing = None if answer.length is None else {"Content-Length": answer.length.decode("latin-1")}
    response = responses.RelayedStream(status=answer.status, headers=framing)
    _relayed(response, answer, lines)
    try:
        await response.prepare(request)
        if no_body:
            return response
        while chunk := await answer.read():
            await response.write(chunk)
        await response.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionResetError):
        return response  # the client went away; aiohttp drops the connection quietly
    except UpstreamError as exc:
        raise UpstreamBroken(response, str(exc) or type(exc).__name__) from exc
    return response


async def _switch(request: web.BaseRequest, answer: Response, lines: bytes) -> Upgraded:
    """The upstream accepted the upgrade: its 101 goes to the client, and from
    then on the client's bytes are the tunnel's (`proxy.tunnel` runs it)."""
    tunnel = answer.tunnel
    assert tunnel is not None
    client = ClientStream(request)
    websocket = any(name.lower() == b"upgrade" and value.strip().lower() == b"websocket"
                    for name, value in answer.headers)
    response = Upgraded(tunnel=tunnel, client=client, websocket=websocket)
    raw, connection, response.has_date = switch_head_lines(answer)
    if connection is not None:  # sent by aiohttp as framing; without it, aiohttp would say "close"
        response.headers["Connection"] = connection.decode("latin-1")
    response.raw = raw
    response.reason_bytes = answer.reason.encode("latin-1")
    response.lines = lines
    try:
        client.attach(request)  # before the 101 leaves: the client may answer it at once
        await response.prepare(request)
    except BaseException as exc:
        tunnel.close()
        if isinstance(exc, ConnectionError):
            raise ClientGone from exc
        raise
    return response


def switch_head_lines(source: Response) -> tuple[bytes, bytes | None, bool]:
    """A 101's header lines byte for byte but its Connection (returned apart:
    aiohttp writes that line), and whether Date is among them. Upgrade and
    Connection say what the connection switched to, so unlike other answers'
    they go to the client; the other hop-by-hop headers do not."""
    out = []
    connection: list[bytes] = []
    for name, value in source.headers:
        lname = name.lower()
        if lname == b"connection":
            connection.append(value)
        elif lname not in SWITCH_SKIP:
            out.append(b"%s: %s\r\n" % (name, value))
    has_date = any(line[:5].lower() == b"date:" for line in out)
    return b"".join(out), b", ".join(connection) if connection else None, has_date


def response_head_lines(source: Response) -> tuple[bytes, bool]:
    """The upstream's end-to-end header lines, byte for byte, duplicates
    (Set-Cookie) and order kept, and whether Date is among them
    (Content-Length is the caller's: it depends on how the body goes out).

    One pass; a second only when Connection names a header of its own, which
    "keep-alive" and "close", nearly every upstream's, do not.
    """
    out = []
    named: set[bytes] = set()
    has_date = False
    for name, value in source.headers:
        lname = name.lower()
        if lname in RESPONSE_SKIP:
            if lname == b"connection" and value.lower() not in PLAIN_CONNECTION:
                named |= _connection_named(value) - HOP_BY_HOP
            continue
        if lname == b"date":
            has_date = True
        out.append(b"%s: %s\r\n" % (name, value))
    if named:
        out = [line for line in out if line.split(b":", 1)[0].lower() not in named]
        has_date = has_date and b"date" not in named
    return b"".join(out), has_date
