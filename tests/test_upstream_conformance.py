"""The upstream client against a scripted raw-socket upstream, end to end through Tollgate.

Every framing an upstream can send (and the broken ones), cut into packets,
ended by FIN or RST; after each case, other clients on the same Tollgate and
pool must get their own answers. Then a Hypothesis differential: random
tagged responses for many clients at once, each client gets its own answer
or a closed connection, never another's, and the pool stays consistent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import pytest
from harness import Tollgate, running
from helpers import read_request
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from proxy.upstream import Pool, UpstreamError

FIN = "fin"  # close the connection cleanly
RST = "rst"  # reset it (SO_LINGER 0)
HOLD = "hold"  # send nothing more until the test ends
Step = bytes | str | float | Callable[[], Awaitable[None]]  # bytes: one write; float: a pause (trickling)


def ok(tag: bytes) -> bytes:
    body = b"ok " + tag
    return b"HTTP/1.1 200 OK\r\nX-Tag: %s\r\nContent-Length: %d\r\n\r\n%s" % (tag, len(body), body)


def path_of(head: bytes) -> bytes:
    return head.split(b" ", 2)[1]


class Scripted:
    """A TCP upstream that answers each request head with the steps `answer(path)` returns.

    After the steps the connection stays open for the next request, unless
    a step closed it. Bytes written are counted, so a test can see that
    Tollgate stopped reading.
    """

    def __init__(self, answer: Callable[[bytes], Sequence[Step]]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.sent = 0
        self.released = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head, _ = await read_request(reader)
                self.requests.append(head)
                if not await self.play(writer, self.answer(path_of(head))):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def play(self, writer: asyncio.StreamWriter, steps: Sequence[Step]) -> bool:
        """Play the steps; False once the connection is closed."""
        for step in steps:
            if isinstance(step, bytes):
                writer.write(step)
                self.sent += len(step)
                await writer.drain()
            elif isinstance(step, float):
                await asyncio.sleep(step)
            elif step == FIN:
                writer.close()
                return False
            elif step == RST:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return False
            elif step == HOLD:
                await self.released.wait()
                return False
            else:
                assert callable(step)
                await step()
        return True


@contextlib.asynccontextmanager
async def scripted(answer: Callable[[bytes], Sequence[Step]]):
    upstream = Scripted(answer)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    try:
        yield upstream, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        upstream.released.set()
        for writer in upstream.writers:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


def config(timeout: float = 2.0, read_timeout: float | None = None, max_connections: int | None = None,
           connect_timeout: float = 1.0) -> str:
    extra = f", read_timeout: {read_timeout}" if read_timeout is not None else ""
    extra += f", max_connections: {max_connections}" if max_connections is not None else ""
    return (f'tiers: {{anonymous: {{unlimited: true}}}}\n'
            f'upstream: {{url: "{{upstream}}", timeout: {timeout}, connect_timeout: {connect_timeout}{extra}}}\n')


@dataclass(frozen=True)
class Outcome:
    """What the client saw: status, headers, body, and whether the body was cut."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    cut: bool = False


async def fetch(tg: Tollgate, path: str, method: str = "GET", timeout: float = 5.0) -> Outcome:
    async with tg.session.request(method, tg.url + path, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        headers = dict(resp.headers)
        try:
            body = await resp.read()
        except aiohttp.ClientPayloadError:
            return Outcome(resp.status, headers, b"", cut=True)
        return Outcome(resp.status, headers, body)


async def others_are_served(tg: Tollgate, start: int = 0) -> None:
    """One client, then four at once: each gets its own answer, with no header of an earlier one."""
    first = await fetch(tg, f"/ok/{start}")
    assert (first.status, first.body) == (200, b"ok %d" % start)
    outcomes = await asyncio.gather(*(fetch(tg, f"/ok/{start + i}") for i in range(1, 5)))
    for i, outcome in enumerate([first, *outcomes]):
        assert (outcome.status, outcome.body, outcome.headers["X-Tag"]) == (200, b"ok %d" % (start + i),
                                                                              str(start + i))
        assert "X-Sum" not in outcome.headers and "X-Trailer" not in outcome.headers


def router(case: Sequence[Step]) -> Callable[[bytes], Sequence[Step]]:
    """`/case` gets the case's steps, `/ok/N` a normal tagged answer."""
    def answer(path: bytes) -> Sequence[Step]:
        if path.startswith(b"/ok/"):
            return [ok(path[4:])]
        return case
    return answer


OK5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
           b"5;ext=1\r\nhello\r\n6;a=b;c\r\n world\r\n0\r\nX-Sum: abc\r\nX-Trailer: 1\r\n\r\n")
STRAY = b"HTTP/1.1 200 OK\r\nX-Tag: 3\r\nContent-Length: 4\r\n\r\nok 3"  # looks like /ok/3's answer
BAD_GATEWAY = Outcome(502, body=b"bad_gateway")


def head_with(*lines: bytes, status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


# name -> (steps for /case, method, expected outcome)
CASES: dict[str, tuple[list[Step], str, Outcome]] = {
    "content-length": ([OK5], "GET", Outcome(200, body=b"hello")),
    "content-length-in-packets": ([OK5[:10], 0.01, OK5[10:30], 0.01, OK5[30:]], "GET", Outcome(200, body=b"hello")),
    "chunked-extensions-trailers": ([CHUNKED], "GET", Outcome(200, body=b"hello world")),
    "chunked-trailers-in-own-packet": ([CHUNKED[:-30], 0.01, CHUNKED[-30:]], "GET", Outcome(200, body=b"hello world")),
    "close-delimited-fin": ([head_with() + b"until the close", FIN], "GET", Outcome(200, body=b"until the close")),
    "close-delimited-http10-fin": ([b"HTTP/1.0 200 OK\r\n\r\nold", FIN], "GET", Outcome(200, body=b"old")),
    "close-delimited-rst": ([head_with() + b"partial", 0.05, RST], "GET", Outcome(200, cut=True)),
    "interim-1xx": ([b"HTTP/1.1 100 Continue\r\n\r\n", 0.01, b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK5],
                    "GET", Outcome(200, body=b"hello")),
    "101-without-upgrade": ([head_with(b"Upgrade: websocket", b"Connection: Upgrade",
                                       status=b"101 Switching Protocols") + b"\x81\x00"], "GET", BAD_GATEWAY),
    "204-with-a-body": ([b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello"], "GET", Outcome(204)),
    "304-with-a-body": ([b"HTTP/1.1 304 Not Modified\r\n\r\nhello"], "GET", Outcome(304)),
    "head-with-a-body": ([OK5], "HEAD", Outcome(200)),
    "duplicate-equal-length": ([head_with(b"Content-Length: 5", b"Content-Length: 5") + b"hello"], "GET", BAD_GATEWAY),
    "conflicting-length": ([head_with(b"Content-Length: 5", b"Content-Length: 6") + b"hello!"], "GET", BAD_GATEWAY),
    "length-list": ([head_with(b"Content-Length: 5, 5") + b"hello"], "GET", BAD_GATEWAY),
    "length-and-chunked": ([head_with(b"Content-Length: 5", b"Transfer-Encoding: chunked")
                            + b"5\r\nhello\r\n0\r\n\r\n"], "GET", BAD_GATEWAY),
    "xchunked": ([head_with(b"Transfer-Encoding: xchunked") + b"5\r\nhello\r\n0\r\n\r\n"], "GET", BAD_GATEWAY),
    "chunked-then-gzip": ([head_with(b"Transfer-Encoding: chunked, gzip") + b"5\r\nhello\r\n0\r\n\r\n"],
                          "GET", BAD_GATEWAY),
    "gzip": ([head_with(b"Transfer-Encoding: gzip") + b"\x1f\x8b", FIN], "GET", BAD_GATEWAY),
    "chunked-twice": ([head_with(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked")
                       + b"5\r\nhello\r\n0\r\n\r\n"], "GET", BAD_GATEWAY),
    "cut-length-fin": ([head_with(b"Content-Length: 10") + b"hello", 0.05, FIN], "GET", Outcome(200, cut=True)),
    "cut-length-rst": ([head_with(b"Content-Length: 10") + b"hello", 0.05, RST], "GET", Outcome(200, cut=True)),
    "cut-chunked-fin": ([head_with(b"Transfer-Encoding: chunked") + b"5\r\nhello\r\n", 0.05, FIN],
                        "GET", Outcome(200, cut=True)),
    "cut-chunked-rst": ([head_with(b"Transfer-Encoding: chunked") + b"5\r\nhello\r\n", 0.05, RST],
                        "GET", Outcome(200, cut=True)),
    "cut-head": ([b"HTTP/1.1 200 OK\r\nContent-Le", FIN], "GET", BAD_GATEWAY),
    "garbage": ([b"SPAM SPAM SPAM\r\n\r\n"], "GET", BAD_GATEWAY),
    "extra-response-same-packet": ([OK5 + STRAY], "GET", Outcome(200, body=b"hello")),
    "extra-bytes-same-packet": ([OK5 + b"\x00garbage"], "GET", Outcome(200, body=b"hello")),
    "extra-after-chunked-same-packet": ([CHUNKED + STRAY], "GET", Outcome(200, body=b"hello world")),
    "extra-after-204-same-packet": ([b"HTTP/1.1 204 No Content\r\n\r\n" + STRAY], "GET", Outcome(204)),
    "line-over-8k": ([head_with(b"X-Big: " + b"a" * 8200) + b"", FIN], "GET", BAD_GATEWAY),
    "status-line-over-8k": ([b"HTTP/1.1 200 " + b"O" * 8200 + b"\r\nContent-Length: 0\r\n\r\n"], "GET",
                            BAD_GATEWAY),
    "over-100-fields": ([head_with(*(b"X-%d: 1" % i for i in range(101)), b"Content-Length: 0")], "GET",
                        BAD_GATEWAY),
    "interim-over-100-fields": ([head_with(*(b"Link: </%d>" % i for i in range(101)), status=b"103 Early Hints")
                                 + OK5], "GET", BAD_GATEWAY),
    "trailers-over-100-fields": ([head_with(b"Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n"
                                  + b"".join(b"X-T%d: 1\r\n" % i for i in range(101)) + b"\r\n"], "GET",
                                 Outcome(200, cut=True)),
    "head-over-64k": ([head_with(*(b"X-%d: " % i + b"v" * 800 for i in range(90)), b"Content-Length: 0")], "GET",
                      BAD_GATEWAY),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_conformance(name):
    steps, method, expected = CASES[name]
    async with scripted(router(steps)) as (_, url), running(config(), url) as tg:
        outcome = await fetch(tg, "/case", method)
        assert (outcome.status, outcome.cut) == (expected.status, expected.cut)
        if expected.status == 502:
            assert json.loads(outcome.body)["error"] == "bad_gateway"
        else:
            assert outcome.body == expected.body
        assert "X-Sum" not in outcome.headers and "X-Trailer" not in outcome.headers
        broken = expected.status == 502 or expected.cut
        assert tg.runtime.stats.totals["upstream_errors"] == (1 if broken else 0)
        await others_are_served(tg)
        assert tg.runtime.stats.totals["upstream_errors"] == (1 if broken else 0)
        if name == "head-with-a-body":
            assert outcome.headers["Content-Length"] == "5"


async def wait_for(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Poll `condition` (bounded): for states the test cannot await directly."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_extra_bytes_in_a_later_packet_close_the_idle_connection():
    """Bytes that arrive while a connection is idle belong to no exchange: it is closed, not reused."""
    holder: dict[str, Tollgate] = {}

    async def once_idle() -> None:
        pool = holder["tg"].runtime.pool
        await wait_for(lambda: len(pool._idle) == 1)

    async with scripted(router([OK5, once_idle, STRAY])) as (_, url), running(config(), url) as tg:
        holder["tg"] = tg
        first = await fetch(tg, "/case")
        assert (first.status, first.body) == (200, b"hello")
        await wait_for(lambda: not tg.runtime.pool._all)
        await others_are_served(tg)


async def test_endless_head_is_502_and_read_no_further():
    """A head that never ends: 502 after 64 KiB, and the connection closed (the upstream's writes fail)."""
    endless: list[Step] = [b"HTTP/1.1 200 OK\r\nX-Endless: "] + [b"a" * 65536] * 256  # up to 16 MiB
    async with scripted(router(endless)) as (upstream, url), running(config(), url) as tg:
        outcome = await fetch(tg, "/case")
        assert outcome.status == 502
        await wait_for(lambda: upstream.writers[0].is_closing(), timeout=5)
        await others_are_served(tg)
    assert upstream.sent < 16 * 2**20


async def test_endless_chunk_extension_cuts_the_body_and_is_read_no_further():
    """Chunk framing without a body byte (an extension, trailers) is bounded like a head."""
    endless: list[Step] = [head_with(b"Transfer-Encoding: chunked") + b"5;ext="]
    endless += [b"x" * 16384, 0.0] * 1024  # up to 16 MiB
    async with scripted(router(endless)) as (upstream, url), running(config(timeout=5), url) as tg:
        outcome = await fetch(tg, "/case", timeout=4)
        assert (outcome.status, outcome.cut) == (200, True)
        await others_are_served(tg)
    assert upstream.sent < 16 * 2**20


async def test_trickled_head_past_timeout_is_504():
    """upstream.timeout is a deadline for the head: bytes trickling in do not extend it."""
    trickle: list[Step] = [b"HTTP/1.1 200 OK\r\n"] + [b"X", 0.05] * 200 + [b": 1\r\nContent-Length: 0\r\n\r\n"]
    async with scripted(router(trickle)) as (_, url), running(config(timeout=0.3), url) as tg:
        outcome = await fetch(tg, "/case", timeout=3)
        assert outcome.status == 504 and json.loads(outcome.body)["error"] == "gateway_timeout"
        await others_are_served(tg)


async def test_silence_mid_body_past_read_timeout_cuts_the_body():
    silent: list[Step] = [head_with(b"Content-Length: 10") + b"hello", HOLD]
    async with scripted(router(silent)) as (_, url), running(config(timeout=5, read_timeout=0.3), url) as tg:
        outcome = await fetch(tg, "/case", timeout=3)
        assert (outcome.status, outcome.cut) == (200, True)
        assert tg.runtime.stats.totals["upstream_errors"] == 1
        await others_are_served(tg)


async def test_a_body_flowing_longer_than_timeout_is_not_cut():
    """The head deadline does not bound the body: only silence does (read_timeout)."""
    flowing: list[Step] = [head_with(b"Content-Length: 8")] + [b"ab", 0.1] * 4
    async with scripted(router(flowing)) as (_, url), running(config(timeout=0.25, read_timeout=0.25), url) as tg:
        outcome = await fetch(tg, "/case", timeout=3)
        assert (outcome.status, outcome.body, outcome.cut) == (200, b"abababab", False)


# --- max_connections --------------------------------------------------------


async def test_a_request_beyond_max_connections_gets_503_upstream_busy():
    """Two slow exchanges hold both connections; a third waits connect_timeout, then 503."""
    go = asyncio.Event()
    slow: list[Step] = [go.wait, OK5]
    async with scripted(router(slow)) as (upstream, url), \
            running(config(max_connections=2, connect_timeout=0.2), url) as tg:
        held = [asyncio.create_task(fetch(tg, f"/slow/{i}")) for i in range(2)]
        await wait_for(lambda: len(upstream.requests) == 2)
        busy = await fetch(tg, "/case")
        assert busy.status == 503 and json.loads(busy.body)["error"] == "upstream_busy"
        assert upstream.connections == 2
        go.set()
        assert [(o.status, o.body) for o in await asyncio.gather(*held)] == [(200, b"hello")] * 2
        await others_are_served(tg)
        assert upstream.connections == 2
        assert sum("status=503" in line and "upstream_error=busy" in line for line in tg.access_lines()) == 1


async def test_a_waiting_request_gets_the_first_connection_freed():
    go = asyncio.Event()
    async with scripted(router([go.wait, OK5])) as (upstream, url), \
            running(config(max_connections=1, connect_timeout=2), url) as tg:
        first = asyncio.create_task(fetch(tg, "/slow"))
        await wait_for(lambda: len(upstream.requests) == 1)
        second = asyncio.create_task(fetch(tg, "/ok/7"))
        await wait_for(lambda: len(tg.runtime.pool._waiters) == 1)
        go.set()
        assert ((await first).status, (await second).body) == (200, b"ok 7")
        assert upstream.connections == 1


# --- 101: the tunnel (Pool level; WebSocket proxying is built on it) -------

UPGRADE_HEAD = b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


async def tunnel_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers /ok/N normally; /ws with 101 plus early bytes, then echoes until EOF, then "bye"."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if not path_of(head).startswith(b"/ws"):
                writer.write(ok(path_of(head)[4:]))
                continue
            writer.write(SWITCH + b"early")
            if path_of(head) == b"/ws/flood":
                writer.write(b"f" * 2**21)
            while data := await reader.read(65536):
                writer.write(data)
            writer.write(b"bye")
            await writer.drain()
            break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def tunnel_pool(timeout: float = 2.0):
    server = await asyncio.start_server(tunnel_server, "127.0.0.1", 0)
    pool = Pool("127.0.0.1", server.sockets[0].getsockname()[1], timeout=timeout, connect_timeout=1.0)
    try:
        yield pool
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def read_to_end(read: Callable[[], Awaitable[bytes]]) -> bytes:
    data = b""
    for _ in range(10_000):
        chunk = await asyncio.wait_for(read(), 2)
        if not chunk:
            return data
        data += chunk
    raise AssertionError("no end")


async def test_101_hands_back_a_tunnel_on_a_new_connection():
    async with tunnel_pool(timeout=0.1) as pool:
        normal = await pool.request(b"GET /ok/1 HTTP/1.1\r\nHost: t\r\n\r\n", method="GET")
        assert (normal.status, await normal.read()) == (200, b"ok 1")
        idle = list(pool._idle)
        assert len(idle) == 1
        response = await pool.request(UPGRADE_HEAD, method="GET", upgrade=True)
        tunnel = response.tunnel
        assert (response.status, tunnel is not None) == (101, True)
        assert (b"Upgrade", b"websocket") in response.headers
        assert pool._idle == idle and len(pool._all) == 2  # a new connection, the idle one untouched
        assert await asyncio.wait_for(tunnel.read(), 2) == b"early"  # bytes of the 101's own packet first
        with pytest.raises(TimeoutError):  # no timeout applies to a tunnel's silence (timeout is 0.1 s)
            await asyncio.wait_for(tunnel.read(), 0.4)
        tunnel.write(b"ping")
        await tunnel.drain()
        assert await asyncio.wait_for(tunnel.read(), 2) == b"ping"
        tunnel.write_eof()
        assert await read_to_end(tunnel.read) == b"bye"
        tunnel.close()
        await wait_for(lambda: len(pool._all) == 1)
        assert pool._idle == idle


async def test_a_tunnel_pauses_reading_above_the_high_water_mark():
    async with tunnel_pool() as pool:
        response = await pool.request(UPGRADE_HEAD.replace(b"/ws", b"/ws/flood"), method="GET", upgrade=True)
        tunnel = response.tunnel
        assert tunnel is not None
        (conn,) = pool._all
        await wait_for(lambda: conn.paused_reading)
        tunnel.write_eof()
        assert await read_to_end(tunnel.read) == b"early" + b"f" * 2**21 + b"bye"
        tunnel.close()


async def test_an_upgrade_request_answered_otherwise_is_not_pooled():
    async with tunnel_pool() as pool:
        response = await pool.request(b"GET /ok/2 HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\n"
                                      b"Upgrade: websocket\r\n\r\n", method="GET", upgrade=True)
        assert (response.status, response.tunnel, await response.read()) == (200, None, b"ok 2")
        await wait_for(lambda: not pool._all)
        assert pool._idle == []


async def test_101_to_a_request_without_upgrade_is_a_protocol_error():
    async with tunnel_pool() as pool:
        with pytest.raises(UpstreamError, match="101"):
            await pool.request(UPGRADE_HEAD, method="GET")
        await wait_for(lambda: not pool._all)


async def test_101_without_connection_upgrade_is_a_protocol_error():
    """RFC 9110 §7.8: a 101 names "upgrade" in Connection; llhttp gives no offset without it."""
    answer = [SWITCH.replace(b"Connection: Upgrade\r\n", b"") + b"early"]
    async with scripted(router(answer)) as (_, url):
        pool = Pool("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=2, connect_timeout=1)
        try:
            with pytest.raises(UpstreamError, match="101"):
                await pool.request(UPGRADE_HEAD, method="GET", upgrade=True)
            await wait_for(lambda: not pool._all)
        finally:
            await pool.close()


# --- differential: random tagged answers, many clients, one small pool ------------

HEAD_FAULTS = ("dup-length", "conflicting-length", "length-and-chunked", "xchunked", "chunked-gzip", "garbage",
               "cut-head")
BODY_FAULTS = ("cut-fin", "cut-rst")
FAULTS = (None, None, None, None, "extra", "connection-close", *BODY_FAULTS, *HEAD_FAULTS)
TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)


@dataclass(frozen=True)
class Spec:
    """One scripted answer, before it is tagged and cut into packets."""

    method: str
    status: int
    headers: tuple[tuple[str, str], ...]
    framing: str
    body_size: int
    chunks: tuple[int, ...]
    extensions: bool
    trailers: bool
    interim: tuple[int, ...]
    fault: str | None
    cut_at: float
    packets: tuple[float, ...]


SPECS = st.builds(
    Spec,
    method=st.sampled_from(["GET", "GET", "GET", "HEAD"]),
    status=st.sampled_from([200, 200, 201, 204, 304, 404, 500]),
    headers=st.dictionaries(TOKEN.map(lambda t: "x-h-" + t), TOKEN, max_size=4).map(lambda d: tuple(d.items())),
    framing=st.sampled_from(["length", "chunked", "close"]),
    body_size=st.sampled_from([0, 1, 7, 100, 1000, 5000]),
    chunks=st.lists(st.integers(1, 900), min_size=1, max_size=5).map(tuple),
    extensions=st.booleans(),
    trailers=st.booleans(),
    interim=st.lists(st.sampled_from([100, 103]), max_size=2).map(tuple),
    fault=st.sampled_from(FAULTS),
    cut_at=st.floats(0, 0.999),
    packets=st.lists(st.floats(0, 1), max_size=4).map(tuple),
)


def chunk_encode(body: bytes, sizes: tuple[int, ...], extensions: bool) -> bytes:
    out, i, n = [], 0, 0
    while i < len(body):
        size = sizes[n % len(sizes)]
        out.append(b"%x%s\r\n%s\r\n" % (min(size, len(body) - i), b";e=1;f" if extensions else b"",
                                         body[i:i + size]))
        i, n = i + size, n + 1
    return b"".join(out)


def script_for(spec: Spec, tag: bytes, stray: bytes) -> tuple[list[Step], Outcome]:
    """The steps that answer `spec` tagged `tag`, and what its client must see."""
    body = (tag + b"/") * (spec.body_size // (len(tag) + 1) + 1)
    body = body[:spec.body_size]
    bodiless = spec.method == "HEAD" or spec.status in (204, 304)
    fault = spec.fault
    if fault in BODY_FAULTS and (bodiless or (spec.framing == "close" and fault == "cut-fin")
                                 or (spec.framing == "length" and not body)):
        fault = None  # nothing to cut
    if fault == "extra" and not bodiless and spec.framing == "close":
        fault = None  # everything before the close is the body
    lines = [b"HTTP/1.1 %d Reason" % spec.status, b"X-Tag: " + tag]
    lines += [b"%s: %s" % (name.encode(), value.encode()) for name, value in spec.headers]
    framing = "none" if spec.status in (204, 304) else spec.framing
    if framing == "length" or fault in ("dup-length", "conflicting-length", "length-and-chunked"):
        lines.append(b"Content-Length: %d" % len(body))
    if fault == "dup-length":
        lines.append(b"Content-Length: %d" % len(body))
    if fault == "conflicting-length":
        lines.append(b"Content-Length: %d" % (len(body) + 1))
    if framing == "chunked" or fault == "length-and-chunked":
        lines.append(b"Transfer-Encoding: chunked")
    if fault in ("xchunked", "chunked-gzip"):
        lines.append(b"Transfer-Encoding: " + (b"xchunked" if fault == "xchunked" else b"chunked, gzip"))
    closing = framing == "close" or fault == "connection-close"
    if closing:
        lines.append(b"Connection: close")
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    if fault == "garbage":
        head = b"HTTP/1.1 2OO OK\r\n" + head
    interim = b"".join(b"HTTP/1.1 %d Interim\r\nLink: </x>\r\n\r\n" % code for code in spec.interim)
    wire = b""
    if not bodiless:
        wire = body
        if framing == "chunked" or fault in ("length-and-chunked", "chunked-gzip"):
            wire = chunk_encode(body, spec.chunks, spec.extensions)
            if fault not in BODY_FAULTS:
                wire += b"0\r\n" + (b"X-Trailer: " + tag + b"\r\n" if spec.trailers else b"") + b"\r\n"
    data = interim + head + wire
    end: str | None = FIN if closing or fault == "cut-fin" else None
    if fault in BODY_FAULTS:
        data = interim + head + wire[:int(spec.cut_at * len(wire))]
        end = FIN if fault == "cut-fin" else RST
    if fault == "cut-head":
        data = interim + head[:int(spec.cut_at * (len(head) - 4)) + 1]
        end = FIN
    if fault in HEAD_FAULTS and not bodiless and framing == "close":
        end = FIN
    cuts = sorted({int(p * len(data)) for p in spec.packets} - {0, len(data)})
    steps: list[Step] = []
    for start, stop in zip([0, *cuts], [*cuts, len(data)]):
        steps += [data[start:stop], 0.0]
    if fault == "extra":
        steps[-2] += stray  # in the same write as the answer's last bytes
    if end is not None:
        steps.append(end)
    if fault in HEAD_FAULTS:
        return steps, Outcome(502)
    if fault in BODY_FAULTS:
        return steps, Outcome(spec.status, cut=True)
    headers = {"X-Tag": tag.decode(), **{name: value for name, value in spec.headers}}
    return steps, Outcome(spec.status, headers, b"" if bodiless else body)


def assert_pool_consistent(pool: Pool) -> None:
    idle = pool._idle
    assert len(set(idle)) == len(idle), "a connection is idle twice"
    assert set(idle) <= pool._all
    assert pool.in_use == 0 and pool._connecting == 0 and not pool._waiters
    for conn in pool._all:
        assert conn.current is None and conn.tunnel is None and not conn.closed, "busy and idle at once"


async def run_batch(tg: Tollgate, scripts: dict[bytes, Sequence[Step]], number: int, batch: list[Spec]) -> None:
    tags = [b"%d-%d" % (number, i) for i in range(len(batch))]
    expected = {}
    for i, spec in enumerate(batch):
        stray = ok(tags[(i + 1) % len(tags)])
        scripts[b"/t/" + tags[i]], expected[tags[i]] = script_for(spec, tags[i], stray)
    outcomes = await asyncio.gather(*(fetch(tg, "/t/" + tag.decode(), spec.method)
                                      for tag, spec in zip(tags, batch)))
    for tag, outcome in zip(tags, outcomes):
        want = expected[tag]
        assert (outcome.status, outcome.cut) == (want.status, want.cut), (tag, outcome)
        if want.status == 502:
            assert outcome.headers["Content-Type"].startswith("application/problem+json")
        elif not want.cut:
            assert outcome.body == want.body, tag
            for name, value in want.headers.items():
                assert outcome.headers.get(name) == value, (tag, name)
        assert "X-Trailer" not in outcome.headers
    pool = tg.runtime.pool
    await wait_for(lambda: pool.in_use == 0)
    assert_pool_consistent(pool)
    for tag in tags:
        del scripts[b"/t/" + tag]


def test_differential_each_client_gets_its_own_answer_or_a_closed_connection():
    """2,000 random batches of tagged answers (some broken, cut into random packets)
    for up to six clients at once through one Tollgate whose pool holds at most four
    connections: every client gets exactly its own answer, a 502, or a cut body."""
    scripts: dict[bytes, Sequence[Step]] = {}
    loop = asyncio.new_event_loop()
    stack = contextlib.AsyncExitStack()
    numbers = iter(range(10**9))
    generated = []
    try:
        _, url = loop.run_until_complete(stack.enter_async_context(scripted(lambda path: scripts[path])))
        tg = loop.run_until_complete(stack.enter_async_context(
            running(config(max_connections=4, connect_timeout=5), url)))

        @settings(max_examples=2000, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
        @given(st.lists(SPECS, min_size=1, max_size=6))
        def check(batch: list[Spec]) -> None:
            generated.append(len(batch))
            loop.run_until_complete(run_batch(tg, scripts, next(numbers), batch))

        check()
        assert len(generated) >= 2000 and sum(generated) >= 6000
    finally:
        loop.run_until_complete(stack.aclose())
        loop.close()
