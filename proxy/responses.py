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
        if not self.lines:
            await super()._write_headers()
            return
        writer = self._payload_writer
        assert writer is not None
        immediately = self._send_headers_immediately
        self._send_headers_immediately = False  # keep the head buffered to splice the lines in
        try:
            await super()._write_headers()
        finally:
            self._send_headers_immediately = immediately
        head = writer._headers_buf  # ends with the blank line: CRLF CRLF
        assert head is not None and head.endswith(b"\r\n\r\n")
        writer._headers_buf = head[:-2] + self.lines + b"\r\n"
        if immediately:
            writer.send_headers()


class Response(_WithLines, web.Response):
    """web.Response, plus `lines`."""


class StreamResponse(_WithLines):
    """web.StreamResponse, plus `lines`."""
