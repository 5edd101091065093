"""nginx as the reference proxy: the same upstream bytes through both, compared.

One scripted raw-socket upstream answers by path (`/case/NAME`); nginx
(proxy_pass, HTTP/1.1 upstream, no buffering) and Tollgate both proxy to it,
and a raw client reads what each relays: the status, the body, and whether the
message ended cleanly or the connection was cut. Where the two differ, SPEC
decides, and DIFFERENCES says which and why. CI installs nginx; a machine
without it fails here rather than skipping.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httptools
import pytest
from harness import running
from helpers import ProcessHandle, free_port, wait_for_port

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

OK = b"HTTP/1.1 200 OK\r\n"
# name -> (bytes the upstream sends, how it ends: "keep" open, "fin", or "rst")
CASES: dict[str, tuple[bytes, str]] = {
    "length": (OK + b"Content-Length: 5\r\n\r\nhello", "keep"),
    "chunked-ext-trailers": (OK + b"Transfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n0\r\nX-T: t\r\n\r\n", "keep"),
    "close-delimited-fin": (OK + b"\r\nhello", "fin"),
    "close-delimited-rst": (OK + b"\r\nhello", "rst"),
    "length-cut-fin": (OK + b"Content-Length: 10\r\n\r\nhello", "fin"),
    "length-cut-rst": (OK + b"Content-Length: 10\r\n\r\nhello", "rst"),
    "chunked-cut-fin": (OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", "fin"),
    "conflicting-lengths": (OK + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", "keep"),
    "length-and-chunked": (OK + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                           "keep"),
    "xchunked": (OK + b"Transfer-Encoding: xchunked\r\n\r\nhello", "fin"),
    "chunked-then-gzip": (OK + b"Transfer-Encoding: chunked, gzip\r\n\r\nhello", "fin"),
    "trailers-then-next": (OK + b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-Leak: 1\r\n\r\n", "keep"),
    "head-too-large": (OK + b"X-Big: " + b"a" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n", "keep"),
    "not-http": (b"HELLO WORLD\r\n\r\n", "fin"),
    "nothing": (b"", "fin"),
    "interim-100": (b"HTTP/1.1 100 Continue\r\n\r\n" + OK + b"Content-Length: 2\r\n\r\nhi", "keep"),
    "no-content-with-body": (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello", "fin"),
    "extra-bytes-same-packet": (OK + b"Content-Length: 2\r\n\r\nhiHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!",
                                "keep"),
}


@dataclass(frozen=True)
class Seen:
    """What a client got: status (None: no response), body, and whether the message was whole.

    The body of a proxy's own 502/504 is its own page (nginx's HTML, Tollgate's
    problem+json): only a relayed body is compared."""

    status: int | None
    body: bytes | None
    whole: bool

    @classmethod
    def of(cls, status: int | None, body: bytes, whole: bool) -> Seen:
        return cls(status, None if status in (502, 504) else body, whole)


BAD_GATEWAY = Seen(502, None, True)
# Where Tollgate differs from nginx 1.22 on purpose: case -> (Tollgate's outcome, why).
DIFFERENCES: dict[str, tuple[Seen, str]] = {
    "conflicting-lengths": (BAD_GATEWAY, "nginx relays with the last length; RFC 9112 §6.3 (5): a proxy MUST "
                                         "treat different Content-Length values as unrecoverable, 502"),
    "length-and-chunked": (BAD_GATEWAY, "nginx relays the chunked body; RFC 9112 §6.1 says such a message "
                                        "ought to be handled as an error (smuggling), and llhttp, which frames "
                                        "Tollgate's reads, refuses it: 502, never a guess"),
    "xchunked": (BAD_GATEWAY, "nginx refuses it too but closes the client's connection with no answer; SPEC: "
                              "an upstream's malformed framing is a 502 problem"),
    "chunked-then-gzip": (BAD_GATEWAY, "as xchunked: a coding Tollgate cannot remove is refused with a 502 answer, "
                                       "where nginx closes without one"),
    "not-http": (BAD_GATEWAY, "nginx relays it as an HTTP/0.9 answer and cuts the connection; SPEC: "
                              "malformed bytes from an upstream get a 502"),
}


async def serve_cases(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            name = head.split(b" ", 2)[1].decode().rsplit("/", 1)[-1]
            answer, end = CASES[name]
            writer.write(answer)
            await writer.drain()
            if end == "rst":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            if end == "fin":
                break
    writer.close()


@contextlib.asynccontextmanager
async def case_upstream() -> AsyncIterator[int]:
    server = await asyncio.start_server(serve_cases, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


NGINX_CONF = """\
daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 2s;
            proxy_next_upstream off;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_proxy(prefix: Path, upstream_port: int):
    if NGINX is None:
        pytest.fail("nginx is not installed (CI installs it: apt-get install nginx-light)")
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, upstream=upstream_port))
    with ProcessHandle([NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
                       log_dir=prefix) as proc:
        wait_for_port("127.0.0.1", port, 10, alive=proc.is_running)
        yield f"http://127.0.0.1:{port}"


async def fetch(url: str, path: str) -> Seen:
    """GET `path` on a new connection; read until the message ends or the connection does."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET %s HTTP/1.1\r\nHost: test\r\n\r\n" % path.encode())
    state: dict[str, object] = {"body": [], "whole": False, "status": None}

    class Callbacks:
        def on_headers_complete(self) -> None:
            state["status"] = parser.get_status_code()

        def on_body(self, body: bytes) -> None:
            state["body"].append(body)  # type: ignore[attr-defined]

        def on_message_complete(self) -> None:
            state["whole"] = True

    parser = httptools.HttpResponseParser(Callbacks())
    try:
        async with asyncio.timeout(5):
            while not state["whole"]:
                data = await reader.read(65536)
                if not data:
                    break
                parser.feed_data(data)
    except (ConnectionError, httptools.HttpParserError):
        pass
    finally:
        writer.close()
    return Seen.of(state["status"], b"".join(state["body"]), bool(state["whole"]))  # type: ignore[arg-type]


TOLLGATE = """
tiers: {anonymous: {unlimited: true}}
upstream: {url: "{upstream}", timeout: 2, connect_timeout: 1}
"""


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Seen, Seen]]:
    """Every case through nginx and through Tollgate: name -> (nginx's, Tollgate's)."""

    async def observe() -> dict[str, tuple[Seen, Seen]]:
        async with case_upstream() as port, running(TOLLGATE, f"http://127.0.0.1:{port}") as tg:
            with nginx_proxy(tmp_path_factory.mktemp("nginx"), port) as nginx:
                out = {}
                for name in CASES:
                    out[name] = (await fetch(nginx, f"/case/{name}"), await fetch(tg.url, f"/case/{name}"))
                return out

    return asyncio.run(observe())


@pytest.mark.parametrize("name", list(CASES))
def test_tollgate_relays_what_nginx_relays(observed: dict[str, tuple[Seen, Seen]], name: str) -> None:
    nginx, tollgate = observed[name]
    if name in DIFFERENCES:
        expected, _why = DIFFERENCES[name]
        assert tollgate == expected
        assert nginx != expected  # the difference is still there; else drop it from DIFFERENCES
    else:
        assert tollgate == nginx
