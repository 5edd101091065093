"""Limits inside a WebSocket (`routes[].messages`) and concurrency slots held
by upgraded connections, end to end on real sockets.

The upstream is the test's own aiohttp app (a real `web.WebSocketResponse`
echo that records what reached it; handlers never assert), the client is
aiohttp's `ws_connect` or a raw socket writing frames by hand, Tollgate runs
in-process (`harness.running`) on a memory store or a real redis-server,
both with a fake clock.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import WSMsgType, web
from harness import Tollgate, running
from helpers import FakeClock, RedisServer
from prometheus_client import generate_latest

from proxy.config import StorageConfig
from proxy.limits.algorithms import to_micros
from proxy.limits.memory import MemoryStore
from proxy.limits.redis import RedisStore
from proxy.limits.store import Store
from proxy.metrics import Metrics

GUARD = 10.0  # seconds: a hang guard, far beyond what any step here takes
MESSAGES = """
tiers:
  anonymous:
    limits:
      - {name: burst, algorithm: token_bucket, capacity: 100, refill_rate: 1}
routes:
  - path: /ws
    messages:
      - {name: chat, algorithm: fixed_window, limit: 3, window: 60}
upstream: {url: "{upstream}", timeout: 5}
"""
SLOTS = """
tiers:
  anonymous:
    limits:
      - {name: one-open, algorithm: concurrency, max: 1, lease: 0.3}
upstream: {url: "{upstream}", timeout: 5}
"""
BIG = bytes(range(256)) * (16 * 1024)  # 4 MiB: far more than the socket buffers hold
WS_HANDSHAKE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode()}


@dataclass
class Seen:
    """What the upstream received: data messages, and each socket's close (code, reason)."""

    messages: list[object] = field(default_factory=list)
    closes: list[tuple[object, object]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


async def echo_app(seen: Seen) -> web.Application:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        closing: tuple[object, object] = (None, None)
        try:
            async for msg in ws:  # ends at the close (answered by aiohttp), or at a dropped connection
                if msg.type == WSMsgType.TEXT and msg.data == "close-me":
                    await ws.close(code=1000, message=b"upstream done")
                elif msg.type == WSMsgType.TEXT and msg.data == "big":
                    seen.messages.append(msg.data)
                    await ws.send_bytes(BIG)
                elif msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    seen.messages.append(msg.data)
                    await (ws.send_str(msg.data) if msg.type == WSMsgType.TEXT else ws.send_bytes(msg.data))
            closing = (ws.close_code, None)
        finally:
            seen.closes.append(closing)
            seen.closed.set()
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    return app


@pytest.fixture
async def upstream_ws(aiohttp_server) -> AsyncIterator[tuple[Seen, str]]:
    seen = Seen()
    server = await aiohttp_server(await echo_app(seen))
    yield seen, str(server.make_url("")).rstrip("/")


@pytest.fixture(params=["memory", "redis"])
def store_and_config(request, fake_clock: FakeClock) -> tuple[Store, str]:
    """(a store on the fake clock, the storage lines of the config): memory, or a private Redis."""
    if request.param == "memory":
        return MemoryStore(fake_clock), ""
    server = request.getfixturevalue("redis_server")
    storage = StorageConfig(backend="redis", url=server.url)
    return RedisStore.from_config(storage, clock=fake_clock), f"storage: {{backend: redis, url: '{server.url}'}}\n"


def ws_url(tg: Tollgate, path: str) -> str:
    return tg.url.replace("http://", "ws://") + path


def port_of(tg: Tollgate) -> int:
    return int(tg.url.rsplit(":", 1)[1])


async def no_tunnel_left(tg: Tollgate) -> None:
    async with asyncio.timeout(GUARD):
        while len(tg.runtime.tunnels) or tg.runtime.pool.in_use:
            await asyncio.sleep(0.01)


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True) -> bytes:
    """One client frame, masked with a random key unless `mask` is False."""
    n = len(payload)
    second = 0x80 if mask else 0
    if n < 126:
        head = bytes((0x80 * fin | opcode, second | n))
    elif n < 1 << 16:
        head = bytes((0x80 * fin | opcode, second | 126)) + struct.pack("!H", n)
    else:
        head = bytes((0x80 * fin | opcode, second | 127)) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server frame (unmasked): (opcode, payload)."""
    first, second = await reader.readexactly(2)
    assert not second & 0x80, "a server frame must not be masked"
    n = second & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return first & 0x0F, await reader.readexactly(n)


async def raw_ws(tg: Tollgate, path: str = "/ws") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tg))
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16))
    writer.write(b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                 b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n\r\n" % (path.encode(), key))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


def close_payload(code: int, reason: str) -> bytes:
    return code.to_bytes(2, "big") + reason.encode()


async def test_the_message_over_the_limit_closes_1008_and_never_reaches_the_upstream(
        upstream_ws, store_and_config, fake_clock, caplog):
    caplog.set_level(logging.INFO, logger="tollgate.websocket")
    seen, url = upstream_ws
    store, storage = store_and_config
    async with running(MESSAGES + storage, url, clock=fake_clock, store=store) as tg, asyncio.timeout(GUARD):
        async with tg.session.ws_connect(ws_url(tg, "/ws")) as ws:
            for text in ("one", "two", "three"):
                await ws.send_str(text)
                assert await ws.receive_str() == text
            await ws.send_str("four")
            msg = await ws.receive()
            assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1008, "rate limited")
        await seen.closed.wait()
        await no_tunnel_left(tg)
        totals = tg.runtime.stats.snapshot()["totals"]
        scrape = generate_latest(tg.runtime.metrics.registry).decode()
    assert seen.messages == ["one", "two", "three"]  # the fourth never reached the upstream
    assert seen.closes == [(1008, None)]  # Tollgate's own (masked) close frame reached the upstream
    assert totals["websocket_messages_refused"] == 1
    assert totals["requests"] == 1  # the upgrade; the messages are no requests
    assert 'tollgate_websocket_messages_refused_total{tier="anonymous"} 1.0' in scrape
    assert [r.getMessage() for r in caplog.records if r.name == "tollgate.websocket"] == [
        "websocket closed (rate_limited 1008) client=127.0.0.1 tier=anonymous path=/ws limit=chat"]


async def test_messages_in_one_packet_are_decided_in_order(upstream_ws, store_and_config, fake_clock):
    seen, url = upstream_ws
    store, storage = store_and_config
    async with running(MESSAGES + storage, url, clock=fake_clock, store=store) as tg, asyncio.timeout(GUARD):
        reader, writer = await raw_ws(tg)
        # With Redis every decision waits for the store: the frames behind it wait too.
        writer.write(b"".join(frame(0x1, str(i).encode()) for i in range(1, 6)))
        frames = []
        while (got := await read_frame(reader))[0] != 0x8:
            frames.append(got)
        assert got == (0x8, close_payload(1008, "rate limited"))
        writer.close()
        await seen.closed.wait()
        await no_tunnel_left(tg)
    assert seen.messages == ["1", "2", "3"]
    assert frames == [(0x1, b"1"), (0x1, b"2"), (0x1, b"3")][:len(frames)]  # echoes racing the close


@pytest.mark.parametrize(("on_error", "expected"), [("deny", (1013, "try again later")), ("allow", None)])
async def test_storage_on_error_applies_to_messages(upstream_ws, redis_server: RedisServer, on_error, expected):
    seen, url = upstream_ws
    config = MESSAGES + f"storage: {{backend: redis, url: '{redis_server.url}', on_error: {on_error}}}\n"
    async with running(config, url) as tg, asyncio.timeout(GUARD):
        async with tg.session.ws_connect(ws_url(tg, "/ws")) as ws:
            await ws.send_str("before")
            assert await ws.receive_str() == "before"
            redis_server.kill()
            for text in ("down-1", "down-2", "down-3"):  # over the limit of 3, were the store up
                await ws.send_str(text)
                msg = await ws.receive()
                if expected is not None:
                    assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, *expected)
                    break
                assert msg.data == text
        await seen.closed.wait()
        totals = tg.runtime.stats.snapshot()["totals"]
    assert seen.messages == (["before"] if expected else ["before", "down-1", "down-2", "down-3"])
    assert totals["websocket_messages_refused"] == (1 if expected else 0)


async def test_per_selects_what_messages_count(upstream_ws, fake_clock):
    seen, url = upstream_ws
    config = MESSAGES.replace("limit: 3, window: 60}", "limit: 1, window: 60, per: 'header:X-Room'}")
    async with running(config, url, clock=fake_clock) as tg, asyncio.timeout(GUARD):
        for room in ("a", "b"):  # one message a room: a second socket in another room is not refused
            async with tg.session.ws_connect(ws_url(tg, "/ws"), headers={"X-Room": room}) as ws:
                await ws.send_str(room)
                assert await ws.receive_str() == room
        async with tg.session.ws_connect(ws_url(tg, "/ws"), headers={"X-Room": "a"}) as ws:
            await ws.send_str("a again")
            assert (await ws.receive()).data == 1008
    assert seen.messages == ["a", "b"]


async def test_a_new_websocket_of_the_same_client_stays_limited(upstream_ws, fake_clock):
    seen, url = upstream_ws
    async with running(MESSAGES, url, clock=fake_clock) as tg, asyncio.timeout(GUARD):
        for text in ("one", "two"):
            async with tg.session.ws_connect(ws_url(tg, "/ws")) as ws:
                await ws.send_str(text)
                assert await ws.receive_str() == text
        async with tg.session.ws_connect(ws_url(tg, "/ws")) as ws:
            await ws.send_str("three")
            assert await ws.receive_str() == "three"
            await ws.send_str("four")
            assert (await ws.receive()).data == 1008
        fake_clock.advance(60)  # a new window
        async with tg.session.ws_connect(ws_url(tg, "/ws")) as ws:
            await ws.send_str("five")
            assert await ws.receive_str() == "five"
    assert seen.messages == ["one", "two", "three", "five"]


async def test_a_fragmented_message_counts_once_and_control_frames_not_at_all(upstream_ws, fake_clock):
    seen, url = upstream_ws
    async with running(MESSAGES, url, clock=fake_clock) as tg, asyncio.timeout(GUARD):
        reader, writer = await raw_ws(tg)
        writer.write(frame(0x1, b"frag", fin=False) + frame(0x9, b"p1") + frame(0x0, b"men", fin=False)
                     + frame(0xA, b"unsolicited") + frame(0x0, b"ted"))
        assert await read_frame(reader) == (0xA, b"p1")  # the upstream answered the ping
        assert await read_frame(reader) == (0x1, b"fragmented")
        for _ in range(5):
            writer.write(frame(0x9, b"again"))
            assert await read_frame(reader) == (0xA, b"again")
        writer.write(frame(0x2, b"\x00\x01") + frame(0x1, b"third"))
        assert await read_frame(reader) == (0x2, b"\x00\x01")
        assert await read_frame(reader) == (0x1, b"third")
        writer.write(frame(0x1, b"fourth"))
        assert await read_frame(reader) == (0x8, close_payload(1008, "rate limited"))
        assert await reader.read() == b""  # then the connection closes
        writer.close()
        await no_tunnel_left(tg)
    assert seen.messages == ["fragmented", b"\x00\x01", "third"]


async def test_frames_split_byte_by_byte_are_counted_right(upstream_ws, fake_clock):
    seen, url = upstream_ws
    texts = [b"a" * 5, b"b" * 130, b"c" * 70000]  # 7-, 16- and 64-bit lengths
    async with running(MESSAGES, url, clock=fake_clock) as tg, asyncio.timeout(GUARD):
        reader, writer = await raw_ws(tg)
        for data in [frame(0x2, text) for text in texts]:
            for i in range(min(len(data), 20)):  # each header byte (and a few more) alone
                writer.write(data[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0)  # let Tollgate read it before the next
            writer.write(data[20:])
        for text in texts:
            assert await read_frame(reader) == (0x2, text)
        writer.write(frame(0x2, b"over"))  # refused at its first byte: the tunnel closes
        assert await read_frame(reader) == (0x8, close_payload(1008, "rate limited"))
        writer.close()
        await no_tunnel_left(tg)
    assert seen.messages == texts


async def test_the_close_frame_waits_for_the_end_of_the_upstream_frame_under_way(upstream_ws, fake_clock):
    seen, url = upstream_ws
    async with running(MESSAGES, url, clock=fake_clock) as tg, asyncio.timeout(GUARD):
        reader, writer = await raw_ws(tg)
        writer.write(frame(0x1, b"big"))
        assert await reader.readexactly(10) == b"\x82\x7f" + len(BIG).to_bytes(8, "big")
        payload = await reader.readexactly(64 * 1024)  # the upstream's frame is under way...
        writer.write(frame(0x1, b"2") + frame(0x1, b"3") + frame(0x1, b"4"))  # ...when "4" is refused
        while not tg.runtime.stats.totals["websocket_messages_refused"]:
            await asyncio.sleep(0.01)
        payload += await reader.readexactly(len(BIG) - len(payload))
        assert payload == BIG  # the frame went out whole, then the close
        assert await read_frame(reader) == (0x8, close_payload(1008, "rate limited"))
        assert await reader.read() == b""
        writer.close()
        await no_tunnel_left(tg)
    assert seen.messages[0] == "big" and "4" not in seen.messages


@pytest.mark.parametrize("bad", [
    frame(0x1, b"unmasked", mask=False),
    frame(0x3, b"reserved opcode"),
    frame(0x9, b"fragmented ping", fin=False),
    frame(0x9, b"p" * 126),
    bytes((0x82, 0xFF)) + b"\x80" + b"\x00" * 7 + b"mask",  # 64-bit length, top bit set
    frame(0x0, b"continuation of nothing"),
], ids=["unmasked", "reserved-opcode", "fragmented-ping", "long-ping", "length-top-bit", "lone-continuation"])
async def test_malformed_client_framing_closes_the_tunnel(upstream_ws, fake_clock, bad):
    seen, url = upstream_ws
    async with running(MESSAGES, url, clock=fake_clock) as tg, asyncio.timeout(GUARD):
        reader, writer = await raw_ws(tg)
        writer.write(frame(0x1, b"fine"))
        assert await read_frame(reader) == (0x1, b"fine")
        writer.write(bad + frame(0x1, b"after"))
        assert await read_frame(reader) == (0x8, close_payload(1002, "protocol error"))
        assert await reader.read() == b""
        writer.close()
        await seen.closed.wait()
        await no_tunnel_left(tg)
        totals = tg.runtime.stats.snapshot()["totals"]
    assert seen.messages == ["fine"]
    assert totals["websocket_messages_refused"] == 0  # a protocol error is no refusal


async def test_routes_without_messages_and_unlimited_tiers_count_nothing(upstream_ws, fake_clock):
    seen, url = upstream_ws
    config = MESSAGES.replace("    limits:\n      - {name: burst, algorithm: token_bucket, capacity: 100, "
                              "refill_rate: 1}\n", "    unlimited: true\n")
    async with running(config, url, clock=fake_clock) as tg, asyncio.timeout(GUARD):
        async with tg.session.ws_connect(ws_url(tg, "/ws")) as ws:
            for i in range(5):
                await ws.send_str(str(i))
                assert await ws.receive_str() == str(i)
    assert len(seen.messages) == 5


async def test_an_upgrade_to_another_protocol_is_not_read_as_websocket_frames(fake_clock):
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: tollgate-test/1\r\nConnection: Upgrade\r\n\r\n")
        while data := await reader.read(65536):
            writer.write(data)  # an echo of raw bytes
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with running(MESSAGES, url, clock=fake_clock) as tg, asyncio.timeout(GUARD):
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tg))
            writer.write(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: tollgate-test/1\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
            unmasked = frame(0x1, b"x", mask=False) * 5  # malformed, and over the limit, were it a WebSocket
            writer.write(unmasked)
            assert await reader.readexactly(len(unmasked)) == unmasked
            writer.close()
            await no_tunnel_left(tg)
    finally:
        server.close()
        await server.wait_closed()


async def upgrade_status(tg: Tollgate) -> tuple[int, str | None]:
    async with tg.session.get(tg.url + "/ws", headers=WS_HANDSHAKE) as resp:
        return resp.status, resp.headers.get("Retry-After")


async def test_an_open_websocket_holds_its_concurrency_slot_until_it_closes(upstream_ws, fake_clock):
    seen, url = upstream_ws
    async with running(SLOTS, url, clock=fake_clock) as tg, asyncio.timeout(GUARD):
        async with tg.session.ws_connect(ws_url(tg, "/ws")) as ws:
            await ws.send_str("hold")
            assert await ws.receive_str() == "hold"
            assert await upgrade_status(tg) == (429, "1")
        await no_tunnel_left(tg)  # closed by the client: the slot is back
        async with aiohttp.ClientSession() as other, other.ws_connect(ws_url(tg, "/ws")) as ws:
            await ws.send_str("close-me")
            assert (await ws.receive()).type == WSMsgType.CLOSE
        await no_tunnel_left(tg)  # closed by the upstream: the slot is back
        async with tg.session.ws_connect(ws_url(tg, "/ws")) as ws:
            await ws.send_str("again")
            assert await ws.receive_str() == "again"
    assert seen.messages == ["hold", "again"]


async def lease_end(client: aioredis.Redis) -> float:
    """The lease end (micros) of the one slot held in the private Redis."""
    async for key in client.scan_iter():
        if await client.type(key) == b"zset":
            ((_, score),) = await client.zrange(key, 0, -1, withscores=True)
            return float(score)
    raise AssertionError("no slot is held")


async def test_an_open_websocket_renews_its_redis_lease(upstream_ws, fake_clock, redis_server: RedisServer):
    _, url = upstream_ws
    storage = StorageConfig(backend="redis", url=redis_server.url)
    store = RedisStore.from_config(storage, clock=fake_clock)
    config = SLOTS + f"storage: {{backend: redis, url: '{redis_server.url}'}}\n"
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async with running(config, url, clock=fake_clock, store=store) as tg, asyncio.timeout(GUARD):
            async with tg.session.ws_connect(ws_url(tg, "/ws")) as ws:
                assert await lease_end(client) == to_micros(fake_clock() + 0.3)
                for _ in range(3):  # 0.6 s of fake time: twice the lease, which renewals keep ahead
                    fake_clock.advance(0.2)
                    while await lease_end(client) != to_micros(fake_clock() + 0.3):
                        await asyncio.sleep(0.02)  # a renewal runs every lease / 3 = 0.1 s
                assert await upgrade_status(tg) == (429, "1")
                await ws.send_str("still open")
                assert await ws.receive_str() == "still open"
            await no_tunnel_left(tg)
            while await client.dbsize():  # released in the background
                await asyncio.sleep(0.01)
            assert (await upgrade_status(tg))[0] != 429
    finally:
        await client.aclose()


def test_refusals_of_every_worker_are_summed():
    """The supervisor's /metrics (server.workers) shows every worker's refusals."""
    workers = [Metrics(storage_errors=lambda: 0, storage_healthy=lambda: True) for _ in range(3)]
    workers[0].websocket_refused = {"free": 2}
    workers[1].websocket_refused = {"free": 1, "pro": 4}
    workers[2].load_sum([workers[0].dump(), workers[1].dump()])
    assert workers[2].websocket_refused == {"free": 3, "pro": 4}
