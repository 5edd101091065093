"""The mock upstream's routes.

Tollgate promises to forward every request byte-exact and to stream both ways,
so the mock must be able to *show* what it received (the echo handler reports
the raw request target, every header in order and a hash of the body) and to
misbehave on demand (slow answers, huge bodies, chunked streams, a connection
that dies mid-body, hop-by-hop headers). Every handler streams: a 1 GiB upload
or download never sits in memory, so the mock is never the bottleneck of a
benchmark or the source of a memory spike.

The application has no path-normalising middleware and its echo route is a
catch-all, so `//x`, `/a/../b` and `%2F` reach the echo handler as sent:
`request.raw_path` is the request target exactly as it appeared on the request
line (aiohttp's `request.path` and `request.query_string` are *decoded* and
must not be used for that).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
from typing import Any, Final

from aiohttp import web

CHUNK_SIZE: Final = 64 * 1024
ECHO_BODY_LIMIT: Final = 1024 * 1024
MAX_DELAY_SECONDS: Final = 60.0
MAX_STREAM_CHUNKS: Final = 100_000
MAX_STREAM_INTERVAL_SECONDS: Final = 10.0
NO_BODY_STATUSES: Final = frozenset({204, 304})
# /bytes sends slices of this block at random offsets: random and incompressible
# (not cryptographic), and far cheaper than os.urandom per chunk, which would
# make the mock the bottleneck of a download benchmark.
_RANDOM_POOL_SIZE: Final = 1024 * 1024
_RANDOM_POOL: Final = memoryview(os.urandom(_RANDOM_POOL_SIZE + CHUNK_SIZE))

USERS: Final = [
    {"id": 1, "name": "Ada Lovelace", "email": "ada@example.com", "role": "admin"},
    {"id": 2, "name": "Alan Turing", "email": "alan@example.com", "role": "user"},
    {"id": 3, "name": "Grace Hopper", "email": "grace@example.com", "role": "user"},
]
DATA: Final = {
    "series": "requests_per_minute",
    "unit": "1/min",
    "points": [{"t": 1_700_000_000 + 60 * i, "v": v} for i, v in enumerate([12, 40, 33, 58, 21])],
}


def create_app() -> web.Application:
    """Build the mock's application; routes for the named endpoints, echo for the rest.

    Every route accepts every method (`*`), so a proxy test can send `DELETE
    /status/500` or `PROPFIND /anything` and get a predictable answer. The path
    patterns are strict (digits only): `/status/abc` falls through to the echo.
    """
    app = web.Application()
    routes = [
        ("/health", health),
        ("/users", users),
        ("/data", data),
        ("/status/{code:\\d{1,3}}", status),
        ("/delay/{seconds:\\d+(?:\\.\\d+)?}", delay),
        ("/bytes/{n:\\d+}", random_bytes),
        ("/stream/{n:\\d+}", stream),
        ("/cookies", cookies),
        ("/redirect", redirect),
        ("/drop/{n:\\d+}", drop),
        ("/hop", hop_by_hop),
        (r"/{tail:[\s\S]*}", echo),
    ]
    for path, handler in routes:
        app.router.add_route("*", path, handler)
    return app


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def users(request: web.Request) -> web.Response:
    return web.json_response({"users": USERS, "count": len(USERS)})


async def data(request: web.Request) -> web.Response:
    return web.json_response(DATA)


async def echo(request: web.Request) -> web.Response:
    """Describe the request as received, reading the body as a stream.

    `headers` are `[name, value]` pairs in wire order with duplicates kept,
    decoded as latin-1 so every octet round-trips (`value.encode("latin-1")`
    gives the exact bytes). `body` is text when the body is UTF-8, base64
    (`body_encoding: "base64"`) otherwise, and null (`body_encoding: null`)
    above 1 MiB; `body_sha256` and `body_length` always describe all of it.
    """
    raw_path, _, raw_query = request.raw_path.partition("?")
    digest, length, kept = await _consume_body(request)
    body, encoding = _describe_body(kept)
    payload: dict[str, Any] = {
        "method": request.method,
        "path": raw_path,
        "query": raw_query,
        "http_version": f"{request.version.major}.{request.version.minor}",
        "remote": request.remote,
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "body": body,
        "body_encoding": encoding,
        "body_sha256": digest,
        "body_length": length,
    }
    return web.json_response(payload)


async def _consume_body(request: web.Request) -> tuple[str, int, bytes | None]:
    """Hash the whole body chunk by chunk; keep its bytes only while under the limit."""
    digest = hashlib.sha256()
    length = 0
    kept: bytearray | None = bytearray()
    async for chunk in request.content.iter_chunked(CHUNK_SIZE):
        digest.update(chunk)
        length += len(chunk)
        if kept is not None:
            kept += chunk
            if len(kept) > ECHO_BODY_LIMIT:
                kept = None
    return digest.hexdigest(), length, None if kept is None else bytes(kept)


def _describe_body(kept: bytes | None) -> tuple[str | None, str | None]:
    if kept is None:
        return None, None
    try:
        return kept.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(kept).decode("ascii"), "base64"


async def status(request: web.Request) -> web.Response:
    """Answer with the status in the path; 3xx point at /users; 204/304 have no body."""
    code = int(request.match_info["code"])
    if not 200 <= code <= 599:
        # 1xx cannot be a final answer: a client would wait for the real one forever.
        return web.json_response(
            {"error": "bad_status", "message": f"status {code} is not in 200-599"}, status=400
        )
    headers = {"Location": "/users"} if 300 <= code < 400 else {}
    if code in NO_BODY_STATUSES:
        return web.Response(status=code, headers=headers)
    return web.json_response({"status": code}, status=code, headers=headers)


async def delay(request: web.Request) -> web.Response:
    seconds = min(float(request.match_info["seconds"]), MAX_DELAY_SECONDS)
    await asyncio.sleep(seconds)
    return web.json_response({"delayed_seconds": seconds})


async def random_bytes(request: web.Request) -> web.StreamResponse:
    """Send n random bytes chunk by chunk, with a Content-Length."""
    remaining = int(request.match_info["n"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = remaining
    await response.prepare(request)
    try:
        while remaining > 0:
            size = min(CHUNK_SIZE, remaining)
            offset = random.randrange(_RANDOM_POOL_SIZE)
            await response.write(_RANDOM_POOL[offset : offset + size])
            remaining -= size
        await response.write_eof()
    except ConnectionError:
        pass  # the client went away mid-download: a normal event, not an error
    return response


async def stream(request: web.Request) -> web.StreamResponse:
    """Send n JSON lines, one chunk each, with chunked transfer encoding.

    `?interval=SECONDS` (capped at 10) pauses between chunks, so a test can tell
    a proxy that streams from one that buffers the whole answer.
    """
    count = min(int(request.match_info["n"]), MAX_STREAM_CHUNKS)
    interval = _float_query(request, "interval", cap=MAX_STREAM_INTERVAL_SECONDS)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for index in range(count):
        if index and interval:
            await asyncio.sleep(interval)
        line = json.dumps({"chunk": index, "of": count}) + "\n"
        await response.write(line.encode("utf-8"))  # write() drains the transport
    await response.write_eof()
    return response


def _float_query(request: web.Request, name: str, *, cap: float) -> float:
    raw = request.query.get(name, "0")
    try:
        value = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a number, got {raw!r}") from None
    return max(0.0, min(value, cap))


async def cookies(request: web.Request) -> web.Response:
    response = web.json_response({"cookies": ["a", "b", "c"]})
    for cookie in ("a=1", "b=2; Path=/", "c=3; HttpOnly"):
        response.headers.add("Set-Cookie", cookie)
    return response


async def redirect(request: web.Request) -> web.Response:
    return web.json_response({"redirect": "/users"}, status=302, headers={"Location": "/users"})


async def drop(request: web.Request) -> web.StreamResponse:
    """Promise 2n bytes, send n, then close the connection: an upstream dying mid-body."""
    sent = int(request.match_info["n"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = 2 * sent
    await response.prepare(request)
    if sent:
        await response.write(b"x" * sent)
    if request.transport is not None:
        request.transport.close()  # flushes what was written, then closes
    return response


async def hop_by_hop(request: web.Request) -> web.Response:
    """Answer with hop-by-hop headers (RFC 9110 §7.6.1) a proxy must drop.

    `X-Custom-Hop` is hop-by-hop only because `Connection` names it;
    `X-End-To-End` must survive.
    """
    response = web.json_response({"hop": True})
    response.headers.update(
        {
            "Connection": "X-Custom-Hop",
            "X-Custom-Hop": "1",
            "Keep-Alive": "timeout=5",
            "Proxy-Authenticate": "Basic",
            "Trailer": "X-T",
            "Upgrade": "h2c",
            "X-End-To-End": "yes",
        }
    )
    return response
