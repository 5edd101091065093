"""aiohttp responses that also send header lines serialized in advance.

aiohttp serializes every header of every response, checking each character
for CR and LF: for the five rate-limit headers of a limited answer that was
about 12,600 instructions a request, a quarter of what the limiter cost
(bench/README.md). Those lines are Tollgate's own, made of config names that
passed NAME_RE and of integers, and `proxy.ratelimit_headers` builds them
once per distinct value; here they are appended to aiohttp's serialization
of the other headers as they are.

This overrides StreamResponse._write_headers, an aiohttp internal of the
versions that buffer the head until the first body write (3.12 and later;
setup.cfg asks for 3.13);
tests/test_forward.py reads the raw bytes on the wire, so a change in aiohttp
fails a test rather than a header.
"""

from __future__ import annotations

from aiohttp import web


class _WithLines(web.StreamResponse):
    """A response with `lines`: header lines (each ending CRLF) sent after aiohttp's own."""

    lines: bytes = b""

    async def _write_headers(self) -> None:
        lines = self.lines
        if not lines:
            return await web.StreamResponse._write_headers(self)
        immediately = self._send_headers_immediately  # a StreamResponse's: hold the head to splice
        if immediately:
            self._send_headers_immediately = False
        await web.StreamResponse._write_headers(self)
        writer = self._payload_writer
        assert writer is not None and writer._headers_buf is not None
        writer._headers_buf = writer._headers_buf[:-2] + lines + b"\r\n"  # before the blank line
        if immediately:
            self._send_headers_immediately = True
            writer.send_headers()


class Response(_WithLines, web.Response):
    """web.Response, plus `lines`."""


class StreamResponse(_WithLines):
    """web.StreamResponse, plus `lines`."""
