"""Byte-exact means bytes: a relayed head is the upstream's, plus only what a
forwarder must add (framing, Date when missing) and the rate-limit headers.

The upstream here is a raw socket that answers scripted bytes, and the client
reads raw bytes, so nothing on either side re-encodes a header.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from harness import running

LIMITED = """
tiers:
  anonymous:
    limits: [{name: burst, algorithm: token_bucket, capacity: 5, refill_rate: 1}]
upstream: {url: "{upstream}", timeout: 2, connect_timeout: 1}
"""


@contextlib.asynccontextmanager
async def scripted(answer: bytes) -> AsyncIterator[str]:
    """An upstream that reads one request head per connection and answers `answer`."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(answer)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def raw_exchange(url: str, request: bytes) -> bytes:
    """Send `request` on a new connection and read until the server closes it."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    data = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    return data


def head_lines(response: bytes) -> list[bytes]:
    head, _, _ = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n")


GET = b"GET /x HTTP/1.1\r\nHost: tollgate\r\nConnection: close\r\n\r\n"


async def test_obs_text_in_reason_and_values_passes_unchanged() -> None:
    answer = (b"HTTP/1.1 200 Tr\xe8s bien\r\nX-Obs: caf\xe9 \xff\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
              b"Content-Length: 2\r\n\r\nhi")
    async with scripted(answer) as upstream, running(LIMITED, upstream) as tg:
        lines = head_lines(await raw_exchange(tg.url, GET))
    assert lines[0] == b"HTTP/1.1 200 Tr\xe8s bien"
    assert b"X-Obs: caf\xe9 \xff" in lines
    assert [line for line in lines if line.startswith(b"Set-Cookie")] == [b"Set-Cookie: a=1", b"Set-Cookie: b=2"]


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
async def test_no_header_the_upstream_did_not_send(streamed: bool) -> None:
    """No Server, no Content-Type; one Date, added because the upstream sent none."""
    body = b"chunk" if streamed else b"hi"
    framing = b"Transfer-Encoding: chunked\r\n\r\n5\r\nchunk\r\n0\r\n\r\n" if streamed else b"Content-Length: 2\r\n\r\nhi"
    async with scripted(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n" + framing) as upstream, running(LIMITED, upstream) as tg:
        response = await raw_exchange(tg.url, GET)
    names = [line.split(b":", 1)[0].lower() for line in head_lines(response)[1:]]
    assert b"server" not in names and b"content-type" not in names
    assert names.count(b"date") == 1
    assert {b"x-a", b"ratelimit", b"ratelimit-policy"} <= set(names)
    assert body in response


async def test_the_upstreams_date_is_kept_and_not_doubled() -> None:
    answer = b"HTTP/1.1 204 No Content\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\n\r\n"
    async with scripted(answer) as upstream, running(LIMITED, upstream) as tg:
        lines = head_lines(await raw_exchange(tg.url, GET))
    assert [line for line in lines if line.lower().startswith(b"date:")] == [b"Date: Tue, 01 Dec 2026 00:00:00 GMT"]


async def test_tollgates_own_answers_do_not_name_their_server() -> None:
    async with scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") as upstream, running(LIMITED, upstream) as tg:
        for _ in range(5):
            await raw_exchange(tg.url, GET)
        refused = await raw_exchange(tg.url, GET)
    lines = head_lines(refused)
    assert lines[0].startswith(b"HTTP/1.1 429 ")
    assert not [line for line in lines if line.lower().startswith(b"server:")]
