"""aiohttp responses that also send header lines serialized in advance (`lines`).

The splice itself is an aiohttp internal and lives in `proxy.aiohttp_private`;
tests/test_forward.py reads the raw bytes on the wire, so a change in aiohttp
fails a test rather than a header.
"""

from __future__ import annotations

from aiohttp import web

from .aiohttp_private import SplicedHead


class Response(SplicedHead, web.Response):
    """web.Response, plus `lines`."""


class StreamResponse(SplicedHead):
    """web.StreamResponse, plus `lines`."""
