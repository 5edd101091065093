"""Tollgate's own answers as RFC 9457 application/problem+json bodies.

Every status Tollgate itself produces (400, 401, 405, 413, 429, 502, 503, 504,
505 and the admin port's errors) is built here, so the wire format lives in one place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from aiohttp import web

from .responses import Response

CONTENT_TYPE: Final = "application/problem+json"
QUOTA_EXCEEDED: Final = "https://iana.org/assignments/http-problem-types#quota-exceeded"

TITLES: Final = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    421: "Misdirected Request",
    422: "Unprocessable Content",
    429: "Request cannot be satisfied as assigned quota has been exceeded",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


def problem_body(status: int, error: str, message: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": QUOTA_EXCEEDED if status == 429 else "about:blank",
        "title": TITLES.get(status, "Error"),
        "status": status,
    }
    body.update(extra)
    body["error"] = error
    body["message"] = message
    return body


def problem(
    status: int, error: str, message: str, *, headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    lines: bytes = b"", **extra: Any,
) -> web.Response:
    """A problem+json response; `extra` adds members such as `tier` or `limit`,
    `lines` serialized header lines (the rate-limit headers of a 429)."""
    text = json.dumps(problem_body(status, error, message, **extra))
    response = Response(status=status, text=text, headers=headers)
    response.content_type = CONTENT_TYPE
    response.lines = lines
    return response
