"""Streaming forwarder: one request to the upstream and its response back.

Bodies stream both ways with backpressure (a 1 GiB body never sits in
memory); the raw path and query go out byte-exact; hop-by-hop headers are
dropped (RFC 9110 §7.6.1 and those named in Connection); redirects are passed
back, never followed. Upstream failures become 502/504 in `upstream_failure`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .problems import problem

HOP_BY_HOP: Final = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection",
        "TE", "Trailer", "Transfer-Encoding", "Upgrade",
    )
)
# Not forwarded to the upstream: the session sets its own Host (unless
# preserve_host) and Expect is answered by Tollgate's own server.
REQUEST_SKIP: Final = HOP_BY_HOP | {"host", "expect"}
RESPONSE_SKIP: Final = HOP_BY_HOP | {"content-length"}
CHUNK: Final = 64 * 1024
NO_BODY_STATUSES: Final = frozenset({204, 304})


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

    base: URL
    base_path: str
    preserve_host: bool
    timeout: float
    connect_timeout: float
    max_body_size: int | None
    client_timeout: aiohttp.ClientTimeout

    @classmethod
    def from_url(cls, url: str, *, preserve_host: bool, timeout: float, connect_timeout: float,
                 max_body_size: int | None) -> Upstream:
        parsed = URL(url)
        return cls(
            base=parsed.origin(), base_path=parsed.raw_path.rstrip("/"), preserve_host=preserve_host,
            timeout=timeout, connect_timeout=connect_timeout, max_body_size=max_body_size,
            # sock_read: no byte from the upstream for `timeout` s (headers or between chunks)
            client_timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=timeout),
        )


def _connection_named(values: list[str]) -> set[str]:
    """Header names listed in Connection: hop-by-hop for this hop only."""
    return {token.strip().lower() for value in values for token in value.split(",") if token.strip()}


def request_headers(request: web.Request, upstream: Upstream) -> CIMultiDict[str]:
    """The headers to send upstream: end-to-end ones plus X-Forwarded-*."""
    incoming = request.headers
    named = _connection_named(incoming.getall("Connection", []))
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lname = name.lower()
        if lname in REQUEST_SKIP or lname in named or lname == "x-forwarded-for":
            continue
        out.add(name, value)
    peer = request.remote or ""
    prior = ", ".join(incoming.getall("X-Forwarded-For", []))
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Forwarded-Proto"] = request.scheme
    host = incoming.get("Host")
    if host:
        out["X-Forwarded-Host"] = host
        if upstream.preserve_host:
            out["Host"] = host
    return out


class _Body:
    """The client's body as a stream, cut off past `limit` bytes.

    aiohttp's client wraps errors raised by a payload, so the overflow is
    also remembered here for `forward` to tell apart from an upstream error.
    """

    def __init__(self, request: web.Request, limit: int | None) -> None:
        self._request = request
        self._limit = limit
        self.too_large = False
        self.client_gone = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        sent = 0
        chunks = self._request.content.iter_chunked(CHUNK)
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            except (ConnectionError, aiohttp.ClientPayloadError, web.HTTPException) as exc:
                self.client_gone = True
                raise ClientGone from exc
            sent += len(chunk)
            if self._limit is not None and sent > self._limit:
                self.too_large = True
                raise BodyTooLarge
            yield chunk


def upstream_failure(exc: BaseException, upstream: Upstream) -> tuple[web.Response, str]:
    """Map a failure before the response started to Tollgate's answer and an error kind."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return problem(502, "bad_gateway", f"Could not connect to the upstream within "
                       f"{upstream.connect_timeout:g}s."), "connect_timeout"
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return problem(504, "gateway_timeout", f"The upstream sent no response within "
                       f"{upstream.timeout:g}s."), "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return problem(502, "bad_gateway", "The upstream refused the connection or is unreachable."), "connect"
    return problem(502, "bad_gateway", "The upstream closed the connection without a valid response."), "protocol"


async def forward(
    request: web.Request, session: aiohttp.ClientSession, upstream: Upstream,
    extra_headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """Send `request` upstream and stream the answer back.

    Raises BodyTooLarge before the response started, UpstreamBroken after,
    and aiohttp/timeout errors for `upstream_failure` to map.
    """
    raw = request.raw_path
    if not raw.startswith("/"):  # absolute-form request target (RFC 9112 §3.2.2)
        raw = URL(raw, encoded=True).raw_path_qs
    path, _, query = raw.partition("?")
    # URL.build keeps dot segments and %2F as sent; URL.join would resolve them.
    url = URL.build(scheme=upstream.base.scheme, authority=upstream.base.raw_authority,
                    path=upstream.base_path + path, query_string=query, encoded=True)
    body = _Body(request, upstream.max_body_size) if request.body_exists else None
    try:
        return await _exchange(request, session, upstream, url, body, extra_headers)
    except (TimeoutError, aiohttp.ClientError) as exc:
        if body is not None and body.too_large:
            raise BodyTooLarge from exc
        if (body is not None and body.client_gone) or request.transport is None or request.transport.is_closing():
            raise ClientGone from exc
        raise


async def _exchange(
    request: web.Request, session: aiohttp.ClientSession, upstream: Upstream, url: URL,
    body: _Body | None, extra_headers: Mapping[str, str] | None,
) -> web.StreamResponse:
    data = body.__aiter__() if body is not None else None
    async with session.request(
        request.method, url, headers=request_headers(request, upstream), data=data,
        allow_redirects=False, auto_decompress=False, compress=None, timeout=upstream.client_timeout,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    ) as upstream_response:
        response = web.StreamResponse(status=upstream_response.status, reason=upstream_response.reason)
        copy_response_headers(upstream_response, response)
        if extra_headers:
            response.headers.update(extra_headers)
        await response.prepare(request)
        if request.method == "HEAD" or upstream_response.status in NO_BODY_STATUSES:
            return response
        try:
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
        except ConnectionError:
            return response  # the client went away; aiohttp drops the connection quietly
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise UpstreamBroken(response, str(exc) or type(exc).__name__) from exc
        await response.write_eof()
        return response


def copy_response_headers(source: aiohttp.ClientResponse, target: web.StreamResponse) -> None:
    """End-to-end response headers, duplicates (Set-Cookie) and order kept."""
    named = _connection_named(source.headers.getall("Connection", []))
    headers = target.headers
    for raw_name, raw_value in source.raw_headers:
        name = raw_name.decode("latin-1")
        lname = name.lower()
        if lname in RESPONSE_SKIP or lname in named:
            continue
        headers.add(name, raw_value.decode("latin-1"))
    length = source.headers.get("Content-Length")
    if length is not None and "Transfer-Encoding" not in source.headers:
        target.headers["Content-Length"] = length
