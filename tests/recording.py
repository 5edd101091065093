"""A scripted raw-socket upstream that records every request head it gets, and
a raw-socket client for requests aiohttp's client cannot send (CONNECT, `*`,
HTTP/2.0 request lines, dot segments, non-ASCII header bytes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
MAX_HEAD = 65536


@dataclass
class Recorder:
    """The heads received, raw, in order (request line first)."""

    url: str
    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)  # by Content-Length (none sent chunked here)

    def lines(self) -> list[bytes]:
        return [head.split(b"\r\n", 1)[0] for head in self.heads]


@contextlib.asynccontextmanager
async def recording_upstream(base_path: str = "") -> AsyncIterator[Recorder]:
    """An upstream on 127.0.0.1 answering every bodiless request 200 "ok" on a kept-alive connection."""
    recorder: Recorder

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(100):  # bounded: no test sends more on one connection
                head = await reader.readuntil(b"\r\n\r\n")
                recorder.heads.append(head)
                length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
                recorder.bodies.append(await reader.readexactly(int(length[1])) if length else b"")
                writer.write(OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, limit=MAX_HEAD)
    port = server.sockets[0].getsockname()[1]
    recorder = Recorder(url=f"http://127.0.0.1:{port}{base_path}")
    async with server:
        yield recorder


@dataclass
class Answer:
    status_line: bytes
    status: int
    headers: dict[str, str]  # lower-cased names, last value wins
    body: bytes
    closed: bool | None = None  # did the server close after it (None: not checked)

    def problem(self) -> dict[str, Any]:
        assert self.headers.get("content-type", "").startswith("application/problem+json"), self.headers
        body: dict[str, Any] = json.loads(self.body)
        assert body["status"] == self.status
        return body


async def raw_request(port: int, data: bytes, *, timeout: float = 5.0, check_close: bool = False) -> Answer:
    """Send `data` as is and read one answer (the server must close or send Content-Length);
    with `check_close`, also whether the server then closes (waits up to `timeout`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head[:-4].split(b"\r\n")
            headers = {}
            for line in lines:
                name, _, value = line.partition(b":")
                headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
            length = headers.get("content-length")
            body = await reader.readexactly(int(length)) if length is not None else await reader.read()
            closed = await reader.read(1) == b"" if check_close else None
    finally:
        writer.close()
    return Answer(status_line, int(status_line.split(b" ")[1]), headers, body, closed)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])
