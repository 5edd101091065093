"""aiohttp responses for Tollgate's own answers (with header `lines` serialized
in advance) and for relayed ones (with the upstream's head bytes).

The splice itself is an aiohttp internal and lives in `proxy.aiohttp_private`;
tests/test_forward.py reads the raw bytes on the wire, so a change in aiohttp
fails a test rather than a header.
"""

from __future__ import annotations

from aiohttp import web

from .aiohttp_private import RelayedHead, SplicedHead


class Response(SplicedHead, web.Response):
    """web.Response, plus `lines`."""


class StreamResponse(SplicedHead):
    """web.StreamResponse, plus `lines`."""


class RelayedResponse(RelayedHead, web.Response):
    """An upstream answer that arrived whole: head as the upstream sent it, body in one write."""


class RelayedStream(RelayedHead):
    """An upstream answer streamed as it arrives, head as the upstream sent it."""


Relayed = RelayedResponse | RelayedStream
