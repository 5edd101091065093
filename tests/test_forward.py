"""Forwarding on the server port, against the real upstream_mock process."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import ssl
import subprocess
from unittest.mock import ANY

import aiohttp
import pytest
from aiohttp import web
from harness import running
from helpers import free_port, read_request
from yarl import URL

OPEN = """
tiers:
  anonymous:
    unlimited: true
upstream: {url: "{upstream}", timeout: 0.5, connect_timeout: 0.5}
"""


async def echo(tg, method: str, path: str, **kwargs) -> dict:
    async with tg.session.request(method, URL(tg.url + path, encoded=True), **kwargs) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"])
async def test_every_method_is_forwarded(upstream, method):
    async with running(OPEN, upstream.url) as tg:
        body = await echo(tg, method, "/anything", data=b"x" if method != "GET" else None)
        assert body["method"] == method


async def test_head_keeps_content_length_and_sends_no_body(upstream):
    async with running(OPEN, upstream.url) as tg:
        async with tg.session.head(tg.url + "/users") as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) > 0
            assert await resp.read() == b""


async def test_raw_path_and_query_go_out_byte_exact(upstream):
    async with running(OPEN, upstream.url) as tg:
        body = await echo(tg, "GET", "/a%2Fb/./x/../c//d?q=%20a+b&q=2&empty=&%7E")
        assert body["path"] == "/a%2Fb/./x/../c//d"
        assert body["query"] == "q=%20a+b&q=2&empty=&%7E"


async def test_encoded_newline_in_path_is_forwarded(upstream):
    async with running(OPEN, upstream.url) as tg:
        body = await echo(tg, "GET", "/a%0Ab%0D%00c")
    assert body["path"] == "/a%0Ab%0D%00c"


async def test_absolute_form_request_target_is_forwarded_by_its_path(upstream):
    async with running(OPEN, upstream.url) as tg:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(tg.url.rsplit(":", 1)[1]))
        writer.write(b"GET http://api.example.com/a/../b%2F?x=%2F HTTP/1.1\r\nHost: api.example.com\r\n"
                     b"Connection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["path"] == "/a/../b%2F" and body["query"] == "x=%2F"


async def test_upstream_path_prefix_is_kept(upstream):
    async with running(OPEN.replace('url: "{upstream}"', 'url: "{upstream}/api/v2/"'), upstream.url) as tg:
        body = await echo(tg, "GET", "/users/7?x=1")
    assert body["path"] == "/api/v2/users/7" and body["query"] == "x=1"


async def test_binary_body_round_trips(upstream):
    payload = bytes(range(256)) * 40
    async with running(OPEN, upstream.url) as tg:
        body = await echo(tg, "POST", "/bin", data=payload)
        assert base64.b64decode(body["body"]) == payload
        assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()


async def test_chunked_upload_streams_through(upstream):
    chunks = [os.urandom(1000) for _ in range(50)]

    async def gen():
        for chunk in chunks:
            yield chunk

    async with running(OPEN, upstream.url) as tg:
        body = await echo(tg, "POST", "/up", data=gen())
        assert body["body_length"] == 50_000
        assert body["body_sha256"] == hashlib.sha256(b"".join(chunks)).hexdigest()


async def test_chunked_response_stays_chunked(upstream):
    async with running(OPEN, upstream.url) as tg:
        async with tg.session.get(tg.url + "/stream/5") as resp:
            assert resp.headers.get("Transfer-Encoding") == "chunked"
            assert "Content-Length" not in resp.headers
            lines = (await resp.text()).splitlines()
        assert [json.loads(line)["chunk"] for line in lines] == [0, 1, 2, 3, 4]


async def test_every_set_cookie_passes(upstream):
    async with running(OPEN, upstream.url) as tg:
        async with tg.session.get(tg.url + "/cookies") as resp:
            assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2; Path=/", "c=3; HttpOnly"]


async def test_hop_by_hop_request_headers_are_dropped(upstream):
    headers = {
        "Connection": "X-Private, keep-alive", "X-Private": "secret", "Keep-Alive": "timeout=5",
        "TE": "trailers", "Proxy-Authorization": "Basic eA==", "X-End": "kept",
    }
    async with running(OPEN, upstream.url) as tg:
        body = await echo(tg, "GET", "/h", headers=headers)
    names = {name.lower() for name, _ in body["headers"]}
    assert not names & {"x-private", "keep-alive", "te", "proxy-authorization"}
    assert ["X-End", "kept"] in body["headers"]


async def test_hop_by_hop_response_headers_are_dropped(upstream):
    async with running(OPEN, upstream.url) as tg:
        async with tg.session.get(tg.url + "/hop") as resp:
            assert resp.headers["X-End-To-End"] == "yes"
            for name in ("X-Custom-Hop", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade"):
                assert name not in resp.headers


async def test_x_forwarded_headers(upstream):
    async with running(OPEN, upstream.url) as tg:
        body = await echo(tg, "GET", "/xff", headers={"X-Forwarded-For": "203.0.113.9"})
        host = URL(tg.url).authority
    headers = dict(body["headers"])
    assert headers["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == host
    assert headers["Host"] == URL(upstream.url).authority  # preserve_host: false


async def test_preserve_host_sends_the_clients_host(upstream):
    cfg = OPEN.replace("connect_timeout: 0.5}", "connect_timeout: 0.5, preserve_host: true}")
    async with running(cfg, upstream.url) as tg:
        body = await echo(tg, "GET", "/host", headers={"Host": "api.example.com:8443"})
    assert dict(body["headers"])["Host"] == "api.example.com:8443"


async def test_redirects_are_passed_back_not_followed(upstream):
    async with running(OPEN, upstream.url) as tg:
        async with tg.session.get(tg.url + "/redirect", allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "/users"


async def test_upstream_5xx_passes_through_as_is(upstream):
    async with running(OPEN, upstream.url) as tg:
        async with tg.session.get(tg.url + "/status/503") as resp:
            assert resp.status == 503
            assert resp.content_type != "application/problem+json"


async def test_closed_port_is_502_problem(upstream):
    async with running(OPEN, f"http://127.0.0.1:{free_port()}") as tg:
        async with tg.session.get(tg.url + "/users") as resp:
            assert resp.status == 502
            assert resp.content_type == "application/problem+json"
            body = await resp.json()
        assert body["error"] == "bad_gateway" and body["status"] == 502
        assert tg.runtime.stats.totals["upstream_errors"] == 1


async def test_slow_upstream_is_504_problem(upstream):
    async with running(OPEN, upstream.url) as tg:
        async with tg.session.get(tg.url + "/delay/3") as resp:
            assert resp.status == 504
            body = await resp.json()
        assert body["error"] == "gateway_timeout"
        assert tg.runtime.stats.totals["upstream_errors"] == 1


async def test_upstream_dying_mid_body_closes_the_client_connection(upstream):
    async with running(OPEN, upstream.url) as tg:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with tg.session.get(tg.url + "/drop/5000") as resp:
                assert resp.status == 200
                await resp.read()
        assert tg.runtime.stats.totals["upstream_errors"] == 1
        # the proxy still serves others afterwards
        status, _, _ = await tg.get("/users")
        assert status == 200


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_over_max_body_size_is_413(upstream, chunked):
    cfg = OPEN + "server: {max_body_size: 1000}\n"

    async def gen():
        for _ in range(10):
            yield b"y" * 500

    async with running(cfg, upstream.url) as tg:
        data = gen() if chunked else b"y" * 5000
        async with tg.session.post(tg.url + "/big", data=data) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"] == "body_too_large"
        body = await echo(tg, "POST", "/small", data=b"z" * 1000)
        assert body["body_length"] == 1000


# --- The upstream client against a raw-socket upstream of the test's own -------
# HTTP edge cases an aiohttp upstream never produces: exact bytes, exact timing.


class RawUpstream:
    """A TCP server that answers each request head with `script(n)`, the bytes
    of its n-th answer (None: close the connection without answering; an
    answer saying `Connection: close` is followed by the close)."""

    def __init__(self, script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head, body = await read_request(reader)
                self.requests.append(head + body)
                answer = self.script(len(self.requests))
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_upstream():
    servers = []

    async def start(script) -> tuple[RawUpstream, str]:
        raw = RawUpstream(script)
        server = await asyncio.start_server(raw.serve, "127.0.0.1", 0)
        servers.append(server)
        return raw, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize(("method", "expected"), [("GET", 200), ("POST", 502)])
async def test_kept_alive_connection_closed_by_the_upstream(raw_upstream, method, expected):
    """The upstream drops a kept-alive connection just as the next request comes:
    an idempotent bodiless request is retried once on a new connection; a POST
    is not (the upstream may have acted on it): 502."""
    raw, url = await raw_upstream(lambda n: OK if n != 2 else None)
    async with running(OPEN, url) as tg:
        assert (await tg.get("/first"))[0] == 200
        async with tg.session.request(method, tg.url + "/second", data=b"x" if method == "POST" else None) as resp:
            assert resp.status == expected
    assert raw.connections == (2 if method == "GET" else 1)


async def test_interim_1xx_answers_are_skipped(raw_upstream):
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
    _, url = await raw_upstream(lambda n: early + OK)
    async with running(OPEN, url) as tg:
        status, headers, body = await tg.get("/x")
    assert (status, body) == (200, b"ok")
    assert "Link" not in headers


async def test_body_delimited_by_close_is_relayed_whole(raw_upstream):
    _, url = await raw_upstream(lambda n: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"z" * 300_000)
    async with running(OPEN, url) as tg:
        status, _, body = await tg.get("/x")
    assert status == 200 and body == b"z" * 300_000


async def test_garbage_from_the_upstream_is_502(raw_upstream):
    _, url = await raw_upstream(lambda n: b"SPAM SPAM SPAM\r\n\r\n")
    async with running(OPEN, url) as tg:
        status, _, body = await tg.get("/x")
        assert status == 502 and json.loads(body)["error"] == "bad_gateway"
        assert tg.runtime.stats.totals["upstream_errors"] == 1


async def test_head_answer_with_length_leaves_the_connection_usable(raw_upstream):
    """A HEAD answer announces a body it does not send; the next exchange on the
    same connection must not read its answer as that body."""
    raw, url = await raw_upstream(lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" if n == 1 else OK)
    async with running(OPEN, url) as tg:
        async with tg.session.head(tg.url + "/h") as resp:
            assert resp.status == 200 and resp.headers["Content-Length"] == "1000"
        assert (await tg.get("/after"))[2] == b"ok"
    assert raw.connections == 1


@pytest.fixture
def self_signed(tmp_path):
    """A certificate for 127.0.0.1 that no CA signed, and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


async def test_https_upstream_is_verified(self_signed, monkeypatch):
    """An https:// upstream's certificate is checked against the system's trust
    store (SSL_CERT_FILE where set): a certificate nobody vouches for is a 502."""
    cert, key = self_signed
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async def secure(request: web.Request) -> web.Response:
        return web.Response(text="over tls")

    app = web.Application()
    app.router.add_get("/secure", secure)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with running(OPEN, url) as tg:
            status, _, body = await tg.get("/secure")
            assert status == 502 and json.loads(body)["error"] == "bad_gateway"
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        async with running(OPEN, url) as tg:
            assert await tg.get("/secure") == (200, ANY, b"over tls")
    finally:
        await runner.cleanup()


async def test_early_answer_to_an_upload_does_not_reuse_its_connection():
    """The upstream refuses a big upload at its head, without reading the body:
    the half-sent connection must not carry the next request (its body bytes
    would be read as that request's head)."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                heads.append(head.split(b"\r\n", 1)[0])
                if head.startswith(b"POST"):
                    writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    while await reader.read(1 << 16):  # never reads a head again on this connection
                        pass
                    break
                writer.write(OK)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        async with running(OPEN, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}") as tg:
            async with tg.session.post(tg.url + "/upload", data=b"u" * (4 << 20)) as resp:
                assert resp.status == 401
            assert (await tg.get("/after"))[:3:2] == (200, b"ok")
    finally:
        server.close()
    assert heads == [b"POST /upload HTTP/1.1", b"GET /after HTTP/1.1"]


# --- Expect: 100-continue: answered by Tollgate, only for a request it will forward ---

ONE_TOKEN = """
tiers:
  anonymous:
    limits: [{algorithm: token_bucket, capacity: 1, refill_rate: 0.001}]
upstream: {url: "{upstream}", timeout: 2, connect_timeout: 0.5}
"""


async def _expecting(port: int, expect: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Send a head with `Expect` and no body; return what came back before the body was sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: {expect}\r\n\r\n".encode())
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    return reader, writer, first


async def test_100_continue_is_sent_when_the_request_is_allowed_then_the_body_goes_through(upstream):
    async with running(ONE_TOKEN, upstream.url) as tg:
        reader, writer, first = await _expecting(int(tg.url.rsplit(":", 1)[1]), "100-continue")
        assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        body = json.loads(await reader.readexactly(length))
        writer.close()
    assert body["body_length"] == 5 and body["body"] == "hello"
    assert "expect" not in {name.lower() for name, _ in body["headers"]}  # answered here, not forwarded


async def test_a_refused_request_is_never_told_to_continue(upstream):
    async with running(ONE_TOKEN, upstream.url) as tg:
        assert (await tg.get("/spend"))[0] == 200  # the only token
        _, writer, first = await _expecting(int(tg.url.rsplit(":", 1)[1]), "100-continue")
        writer.close()
    assert first.startswith(b"HTTP/1.1 429 ")  # the final answer, without asking for the body


async def test_an_unknown_expectation_is_417(upstream):
    async with running(OPEN, upstream.url) as tg:
        _, writer, first = await _expecting(int(tg.url.rsplit(":", 1)[1]), "magic")
        writer.close()
    assert first.startswith(b"HTTP/1.1 417 ")


THREE_TOKENS = """
tiers:
  anonymous:
    limits: [{name: burst, algorithm: token_bucket, capacity: 3, refill_rate: 0.001}]
upstream: {url: "{upstream}", timeout: 2, connect_timeout: 0.5}
"""
RATE_LIMIT_NAMES = ("ratelimit-policy", "ratelimit", "x-ratelimit-limit", "x-ratelimit-remaining",
                    "x-ratelimit-reset")


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
                    method: str = "GET") -> tuple[bytes, list[tuple[str, str]], bytes]:
    """One request on a kept-alive connection, read by hand: status line, header
    lines in wire order, and the body its framing delimits."""
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    status, *lines = head[:-4].split(b"\r\n")
    headers = [(name.decode().lower(), value.decode().strip()) for name, value in
               (line.split(b":", 1) for line in lines)]
    fields = dict(headers)
    if method == "HEAD":
        body = b""
    elif fields.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(await reader.readline(), 16):
            body += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
        assert await reader.readexactly(2) == b"\r\n"
    else:
        body = await reader.readexactly(int(fields["content-length"]))
    return status, headers, body


async def test_rate_limit_headers_on_the_wire_once_each_in_every_kind_of_answer(upstream):
    """The rate-limit lines are spliced into aiohttp's serialized head
    (proxy.responses): in a buffered answer, a streamed one, a HEAD and
    Tollgate's own 429, each header exactly once, in a head that still ends
    where it should, so the next answer on the connection parses."""
    async with running(THREE_TOKENS, upstream.url) as tg:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(tg.url.rsplit(":", 1)[1]))
        try:
            answers = [
                await _exchange(reader, writer, "/buffered"),
                await _exchange(reader, writer, "/stream/3"),
                await _exchange(reader, writer, "/head", "HEAD"),
                await _exchange(reader, writer, "/refused"),
            ]
        finally:
            writer.close()
    statuses = [status.split(b" ")[1] for status, _, _ in answers]
    assert statuses == [b"200", b"200", b"200", b"429"]
    for (_, headers, _), remaining in zip(answers, ["2", "1", "0", "0"]):
        names = [name for name, _ in headers]
        assert [names.count(name) for name in RATE_LIMIT_NAMES] == [1] * 5, names
        fields = dict(headers)
        assert fields["ratelimit-policy"] == '"burst";q=3;w=3000'
        assert fields["ratelimit"] == f'"burst";r={remaining};t={fields["x-ratelimit-reset"]}'
        assert (fields["x-ratelimit-limit"], fields["x-ratelimit-remaining"]) == ("3", remaining)
    assert json.loads(answers[0][2])["path"] == "/buffered"
    assert [json.loads(line)["chunk"] for line in answers[1][2].splitlines()] == [0, 1, 2]
    assert dict(answers[1][1])["transfer-encoding"] == "chunked"
    assert json.loads(answers[3][2])["error"] == "rate_limited" and dict(answers[3][1])["retry-after"] == "1000"
