"""proxy.server's request side: every method token is forwarded (llhttp knows a fixed
list; a connection that opens with another method is parsed by aiohttp's Python
parser), and what a parser refuses is a problem+json answer."""

from __future__ import annotations

import asyncio
import re
from unittest import mock

import pytest
from aiohttp.http_exceptions import BadHttpMethod
from aiohttp.http_parser import HttpRequestParserC
from harness import running
from recording import port_of, raw_request, recording_upstream

from proxy.aiohttp_private import LLHTTP_METHODS, unknown_method

OPEN = 'tiers: {anonymous: {unlimited: true}}\nupstream: {url: "{upstream}"}\n'


def llhttp_accepts(method: bytes) -> bool:
    parser = HttpRequestParserC(mock.Mock(), asyncio.new_event_loop(), 2**16)
    target = b"h:443" if method == b"CONNECT" else b"/x"
    try:
        parser.feed_data(method + b" " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    except BadHttpMethod:
        return False
    return True


def test_the_method_list_is_llhttps():
    assert all(llhttp_accepts(method) for method in LLHTTP_METHODS)
    assert not any(llhttp_accepts(method) for method in (b"FOO", b"BREW", b"PROPFINDX", b"X-CUSTOM"))


@pytest.mark.parametrize(("first", "unknown"), [
    (b"FOO / HTTP/1.1\r\n", True), (b"X-CUSTOM_1.~ /", True), (b"GET / HTTP/1.1", False),
    (b"PROPFIND /", False), (b"get /", False), (b"FOO", False), (b"\x16\x03\x01", False), (b"", False),
    (b"F" * 65 + b" /", False),
])
def test_unknown_method(first, unknown):
    assert unknown_method(first) is unknown


# request bytes -> what the upstream must get, request line by request line
FORWARDED = {
    "foo": (b"FOO /x HTTP/1.1\r\nHost: t\r\n\r\n", [b"FOO /x HTTP/1.1"]),
    "symbols": (b"X-CUSTOM_1.~ /x?q=1 HTTP/1.1\r\nHost: t\r\n\r\n", [b"X-CUSTOM_1.~ /x?q=1 HTTP/1.1"]),
    "with-body": (b"BREW /pot HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc", [b"BREW /pot HTTP/1.1"]),
    "pipelined": (b"FOO /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\r\nHost: t\r\n\r\n"
                  b"BAR /c HTTP/1.1\r\nHost: t\r\n\r\n", [b"FOO /a HTTP/1.1", b"GET /b HTTP/1.1", b"BAR /c HTTP/1.1"]),
    "known": (b"PROPFIND /x HTTP/1.1\r\nHost: t\r\n\r\n", [b"PROPFIND /x HTTP/1.1"]),
}


@pytest.mark.parametrize("name", list(FORWARDED))
async def test_every_method_token_is_forwarded(name):
    data, lines = FORWARDED[name]
    async with recording_upstream() as upstream, running(OPEN, upstream.url) as tg:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tg.url))
        try:
            writer.write(data)
            async with asyncio.timeout(5):
                for _ in lines:
                    head = await reader.readuntil(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 200 "), head
                    assert await reader.readexactly(2) == b"ok"
        finally:
            writer.close()
        assert upstream.lines() == lines
        if name == "with-body":
            assert upstream.bodies == [b"abc"]


REFUSED = {
    "lower-case": b"get /x HTTP/1.1\r\nHost: t\r\n\r\n",  # would go upstream as GET
    "lower-case-after-unknown": b"FOO /a HTTP/1.1\r\nHost: t\r\n\r\nget /b HTTP/1.1\r\nHost: t\r\n\r\n",
    "not-a-token": b"F(O) /x HTTP/1.1\r\nHost: t\r\n\r\n",
    # A limit of the fix: llhttp parsed the connection's first request, so it parses this one too.
    "unknown-after-known": b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nFOO /b HTTP/1.1\r\nHost: t\r\n\r\n",
}


@pytest.mark.parametrize("name", list(REFUSED))
async def test_what_the_parser_refuses_is_a_problem_answer(name):
    async with recording_upstream() as upstream, running(OPEN, upstream.url) as tg:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tg.url))
        try:
            writer.write(REFUSED[name])
            async with asyncio.timeout(5):
                answers = await reader.read()  # the server closes after a 400
        finally:
            writer.close()
        *served, refused = re.split(rb"(?=HTTP/1\.[01] \d{3} )", answers)[1:]
        assert refused.startswith(b"HTTP/1.0 400 Bad Request") and b"application/problem+json" in refused
        assert b'"error": "bad_request"' in refused
        assert len(upstream.heads) == len(served)  # only what came before the refused one


async def test_the_python_parser_keeps_the_limits_of_the_c_one():
    """A connection that chose the Python parser gets the same head limits (8190 a line)."""
    async with recording_upstream() as upstream, running(OPEN, upstream.url) as tg:
        answer = await raw_request(port_of(tg.url), b"FOO /x HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 9000
                                   + b"\r\n\r\n")
        assert answer.status in (400, 431)
        assert upstream.heads == []
