"""The mock upstream, run as a real process on a real socket, and the storage fixtures.

The proxy's byte-exact and streaming tests lean on the mock's echo and on its
misbehaving endpoints, so the mock's own promises are pinned here: raw paths
survive, duplicate headers keep their order, big bodies are hashed rather than
held, and the process exits 0 on SIGTERM. The Redis fixtures get a test each
because the storage-failure tests depend on kill / stop / restart doing what
they say.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
import yarl
from helpers import (
    FAKE_EPOCH,
    FORBIDDEN_PORTS,
    LOCALHOST,
    FakeClock,
    ProcessHandle,
    RedisCluster,
    RedisServer,
    Upstream,
    free_port,
    redis_command,
    start_upstream,
)
from multidict import CIMultiDict
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

MOCK = [sys.executable, "-m", "upstream_mock"]


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def raw_url(upstream: Upstream, target: str) -> yarl.URL:
    """A URL sent exactly as written: no decoding, no dot-segment removal."""
    return yarl.URL(upstream.url + target, encoded=True)


async def get_json(client: aiohttp.ClientSession, url: str | yarl.URL) -> Any:
    async with client.get(url) as resp:
        assert resp.status == 200
        return await resp.json()


# --- sample data ------------------------------------------------------------


async def test_health(client: aiohttp.ClientSession, upstream: Upstream) -> None:
    assert await get_json(client, f"{upstream.url}/health") == {"status": "ok"}


async def test_users_and_data(client: aiohttp.ClientSession, upstream: Upstream) -> None:
    users = await get_json(client, f"{upstream.url}/users")
    data = await get_json(client, f"{upstream.url}/data")
    assert users["count"] == len(users["users"]) == 3
    assert len(data["points"]) == 5


# --- echo -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/a%2Fb", "/a/../b", "/../../etc/passwd", "//x", "/a/./b/", "/%7e/%2e%2e/", "/sp%20ace"],
)
async def test_echo_keeps_raw_path_and_query(
    client: aiohttp.ClientSession, upstream: Upstream, path: str
) -> None:
    query = "q=%2F&q=a+b&empty&x=%7e"
    echoed = await get_json(client, raw_url(upstream, f"{path}?{query}"))
    assert (echoed["path"], echoed["query"]) == (path, query)


async def test_echo_keeps_raw_path_from_raw_socket(upstream: Upstream) -> None:
    target = "/x/..%2F../y/%2e%2e?q=%2F"
    reader, writer = await asyncio.open_connection(LOCALHOST, upstream.port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    echoed = json.loads(body)
    assert (echoed["path"], echoed["query"]) == ("/x/..%2F../y/%2e%2e", "q=%2F")


async def test_plain_client_url_is_normalised_so_proxies_need_encoded(
    client: aiohttp.ClientSession, upstream: Upstream
) -> None:
    # Documents the pitfall the forwarder must avoid: yarl drops dot segments
    # and decodes %7e unless the URL is built with encoded=True.
    echoed = await get_json(client, f"{upstream.url}/a/../b/%7e")
    assert echoed["path"] == "/b/~"


async def test_echo_headers_keep_duplicates_order_and_case(
    client: aiohttp.ClientSession, upstream: Upstream
) -> None:
    sent = CIMultiDict([("X-Dup", "1"), ("x-other", "z"), ("X-Dup", "2"), ("X-Dup", "3")])
    async with client.get(f"{upstream.url}/anything", headers=sent) as resp:
        echoed = await resp.json()
    custom = [pair for pair in echoed["headers"] if pair[0].lower().startswith("x-")]
    assert custom == [["X-Dup", "1"], ["x-other", "z"], ["X-Dup", "2"], ["X-Dup", "3"]]


@pytest.mark.parametrize(
    "method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "PURGE"]
)
async def test_echo_accepts_every_method(
    client: aiohttp.ClientSession, upstream: Upstream, method: str
) -> None:
    async with client.request(method, f"{upstream.url}/m", data=b"payload") as resp:
        echoed = await resp.json()
    assert (resp.status, echoed["method"], echoed["body"]) == (200, method, "payload")


async def test_echo_head_has_no_body(client: aiohttp.ClientSession, upstream: Upstream) -> None:
    async with client.head(f"{upstream.url}/m") as resp:
        assert resp.status == 200
        assert int(resp.headers["Content-Length"]) > 0
        assert await resp.read() == b""


async def test_echo_text_body(client: aiohttp.ClientSession, upstream: Upstream) -> None:
    body = "héllo wörld".encode()
    async with client.post(f"{upstream.url}/upload", data=body) as resp:
        echoed = await resp.json()
    assert (echoed["body"], echoed["body_encoding"]) == ("héllo wörld", "utf-8")
    assert echoed["body_length"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_echo_binary_body_is_base64(
    client: aiohttp.ClientSession, upstream: Upstream
) -> None:
    body = bytes(range(256)) * 4
    async with client.put(f"{upstream.url}/upload", data=body) as resp:
        echoed = await resp.json()
    assert echoed["body_encoding"] == "base64"
    assert base64.b64decode(echoed["body"]) == body


async def test_echo_hashes_a_20_mb_streamed_upload(
    client: aiohttp.ClientSession, upstream: Upstream
) -> None:
    chunks = [os.urandom(64 * 1024) for _ in range(320)]  # 20 MiB, sent chunked

    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    async with client.post(f"{upstream.url}/big", data=body()) as resp:
        echoed = await resp.json()
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    assert (echoed["body_length"], echoed["body_sha256"]) == (20 * 1024 * 1024, digest)
    assert (echoed["body"], echoed["body_encoding"]) == (None, None)


# --- named endpoints --------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 65536, 200_001])
async def test_bytes(client: aiohttp.ClientSession, upstream: Upstream, n: int) -> None:
    async with client.get(f"{upstream.url}/bytes/{n}") as resp:
        body = await resp.read()
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert (int(resp.headers["Content-Length"]), len(body)) == (n, n)


async def test_stream_arrives_in_http_chunks(
    client: aiohttp.ClientSession, upstream: Upstream
) -> None:
    chunks: list[bytes] = []
    async with client.get(f"{upstream.url}/stream/5") as resp:
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in resp.headers
        buffer = b""
        async for data, end_of_http_chunk in resp.content.iter_chunks():
            buffer += data
            if end_of_http_chunk and buffer:  # the last-chunk marker may come alone
                chunks.append(buffer)
                buffer = b""
    assert [json.loads(chunk) for chunk in chunks] == [{"chunk": i, "of": 5} for i in range(5)]


async def test_stream_interval_spaces_the_chunks(
    client: aiohttp.ClientSession, upstream: Upstream
) -> None:
    loop = asyncio.get_running_loop()
    async with client.get(f"{upstream.url}/stream/3?interval=0.1") as resp:
        first = await resp.content.readline()
        first_at = loop.time()
        rest = await resp.content.read()
    assert json.loads(first) == {"chunk": 0, "of": 3}
    assert rest.count(b"\n") == 2
    assert loop.time() - first_at >= 0.15  # two intervals passed after the first line


async def test_stream_bad_interval_is_400(
    client: aiohttp.ClientSession, upstream: Upstream
) -> None:
    async with client.get(f"{upstream.url}/stream/3?interval=soon") as resp:
        assert resp.status == 400


async def test_cookies_are_three_headers(client: aiohttp.ClientSession, upstream: Upstream) -> None:
    async with client.get(f"{upstream.url}/cookies") as resp:
        cookies = resp.headers.getall("Set-Cookie")
    assert cookies == ["a=1", "b=2; Path=/", "c=3; HttpOnly"]


@pytest.mark.parametrize("code", [200, 201, 204, 301, 304, 404, 418, 429, 500, 503, 599])
async def test_status(client: aiohttp.ClientSession, upstream: Upstream, code: int) -> None:
    url = f"{upstream.url}/status/{code}"
    async with client.delete(url, allow_redirects=False) as resp:
        body = await resp.read()
    assert resp.status == code
    assert resp.headers.get("Location") == ("/users" if 300 <= code < 400 else None)
    if code in (204, 304):
        assert body == b""
    else:
        assert json.loads(body) == {"status": code}


async def test_status_outside_200_599_is_400(
    client: aiohttp.ClientSession, upstream: Upstream
) -> None:
    async with client.get(f"{upstream.url}/status/100") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "bad_status"


async def test_unmatched_pattern_falls_back_to_echo(
    client: aiohttp.ClientSession, upstream: Upstream
) -> None:
    echoed = await get_json(client, f"{upstream.url}/status/teapot")
    assert echoed["path"] == "/status/teapot"


async def test_redirect_is_not_followed(client: aiohttp.ClientSession, upstream: Upstream) -> None:
    async with client.get(f"{upstream.url}/redirect", allow_redirects=False) as resp:
        assert (resp.status, resp.headers["Location"]) == (302, "/users")


async def test_delay(client: aiohttp.ClientSession, upstream: Upstream) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await get_json(client, f"{upstream.url}/delay/0.2") == {"delayed_seconds": 0.2}
    assert loop.time() - started >= 0.2


async def test_drop_ends_the_body_early(client: aiohttp.ClientSession, upstream: Upstream) -> None:
    async with client.get(f"{upstream.url}/drop/1000") as resp:
        assert (resp.status, resp.headers["Content-Length"]) == (200, "2000")
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_hop_sends_hop_by_hop_headers(
    client: aiohttp.ClientSession, upstream: Upstream
) -> None:
    async with client.get(f"{upstream.url}/hop") as resp:
        headers = resp.headers
    assert headers["Connection"] == "X-Custom-Hop"
    assert (headers["X-Custom-Hop"], headers["Keep-Alive"]) == ("1", "timeout=5")
    assert (headers["Proxy-Authenticate"], headers["Trailer"]) == ("Basic", "X-T")
    assert (headers["Upgrade"], headers["X-End-To-End"]) == ("h2c", "yes")


# --- the process ------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_zero(tmp_path: Path, signum: int) -> None:
    mock = start_upstream(tmp_path)
    try:
        assert mock.proc.stdout_text() == f"upstream_mock listening on {mock.url}\n"
        mock.proc.send_signal(signum)
        assert mock.proc.wait() == 0
        assert "Traceback" not in mock.proc.stderr_text()
    finally:
        mock.proc.close()


def test_bad_arguments_are_a_usage_error(
    run_process: Callable[..., ProcessHandle],
) -> None:
    proc = run_process([*MOCK, "--port", "eighty"])
    assert proc.wait() == 2
    assert "argument --port: not a port number: 'eighty'" in proc.stderr_text()


def test_port_in_use_is_a_message_not_a_traceback(
    run_process: Callable[..., ProcessHandle],
) -> None:
    with socket.socket() as taken:
        taken.bind((LOCALHOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_process([*MOCK, "--port", str(port)])
        assert proc.wait() == 1
    assert f"cannot listen on http://{LOCALHOST}:{port}" in proc.stderr_text()
    assert "Traceback" not in proc.stderr_text()


# --- storage fixtures -------------------------------------------------------


async def test_redis_server_kill_and_restart(redis_server: RedisServer) -> None:
    client = redis.asyncio.from_url(redis_server.url)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()
    old_pid = redis_server.pid
    redis_server.kill()
    with pytest.raises(ConnectionRefusedError):
        redis_command(redis_server.port, "PING")
    redis_server.restart()
    assert redis_server.pid != old_pid
    assert redis_command(redis_server.port, "PING") == "PONG"


def test_redis_server_stop_hangs_and_cont_resumes(redis_server: RedisServer) -> None:
    redis_server.stop()
    with pytest.raises(TimeoutError):
        redis_command(redis_server.port, "PING", timeout=0.2)
    redis_server.cont()
    assert redis_command(redis_server.port, "PING") == "PONG"


def test_redis_server_is_private(redis_server: RedisServer) -> None:
    assert redis_server.port not in FORBIDDEN_PORTS
    assert redis_server.url == f"redis://{LOCALHOST}:{redis_server.port}/0"
    assert redis_command(redis_server.port, "CONFIG", "GET", "save") == [b"save", b""]


async def test_redis_cluster_spreads_keys(redis_cluster: RedisCluster) -> None:
    cluster = AsyncRedisCluster.from_url(redis_cluster.url)
    try:
        await cluster.initialize()
        keys = [f"key-{i}" for i in range(20)]
        nodes = {getattr(cluster.get_node_from_key(key), "port", None) for key in keys}
        for key in keys:
            await cluster.set(key, key.upper())
        values = [await cluster.get(key) for key in keys]
    finally:
        await cluster.aclose()
    assert nodes == set(redis_cluster.ports)
    assert values == [key.upper().encode() for key in keys]


def test_free_port_never_hands_out_the_machine_redis() -> None:
    assert all(free_port() not in FORBIDDEN_PORTS for _ in range(20))


def test_fake_clock(fake_clock: FakeClock) -> None:
    assert fake_clock() == FAKE_EPOCH
    assert fake_clock.advance(1.5) == FAKE_EPOCH + 1.5
    fake_clock.set(10.0)
    assert fake_clock() == 10.0
    with pytest.raises(ValueError, match="backwards"):
        fake_clock.advance(-1)
