"""The request target: the path routes match, and the targets Tollgate never forwards.

Routes match the path as RFC 3986 §6.2.2 normalizes it (percent-encoded
unreserved characters decoded, dot segments removed), because that is the
resource the upstream serves: `/health/../users` is `/users` and must be
limited as `/users`, not ride the exempt `/health`. What goes upstream is
still the raw target (proxy.forward); only the match uses the normal form.

aiohttp's `request.path` cannot be used for this: it is fully decoded, so
`/a%2Fb` reads as `/a/b` (an encoded slash must never split a segment), and
it keeps dot segments. Everything here starts from `request.raw_path`.
"""

from __future__ import annotations

import re
from typing import Final

from aiohttp import HttpVersion10, HttpVersion11, web
from yarl import URL

from .aiohttp_private import reply_as_http11
from .problems import problem

HTTP_1: Final = (HttpVersion11, HttpVersion10)
UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE: Final = re.compile("%([0-9A-Fa-f]{2})")


def _unescape(match: re.Match[str]) -> str:
    char = chr(int(match[1], 16))
    return char if char in UNRESERVED else "%" + match[1].upper()


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path: `/a/./b/../c` -> `/a/c`; never above the root."""
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if len(out) > 1:  # out[0] is the empty segment before the leading slash
                out.pop()
        elif segment != ".":
            out.append(segment)
    if path.endswith(("/.", "/..")):
        out.append("")  # `/a/..` is the directory `/`, not the file ``
    return "/".join(out) if len(out) > 1 else "/"


def normalize_path(path: str) -> str:
    """An absolute path in RFC 3986 §6.2.2 normal form: unreserved characters
    decoded, other escapes upper-cased (`%2f` -> `%2F`, still one segment),
    dot segments removed. Idempotent."""
    if "%" in path:
        path = _ESCAPE.sub(_unescape, path)
    return remove_dot_segments(path)


def route_path(target: str) -> str:
    """The path routes match, from a raw request target (origin-form, absolute-form or `*`).

    An ordinary target (no `%`, no dot segment, no fragment) costs a split and
    three scans: only the rare rest goes through `normalize_path`.
    """
    path = target.partition("?")[0]
    if "%" in path or "/." in path or "#" in path or path[:1] != "/":
        return _unusual_path(path)
    return path


def _unusual_path(path: str) -> str:
    if path[:1] != "/":
        if path == "*":
            return path  # OPTIONS *: the server itself; only a `/` route matches it
        path = URL(path, encoded=True).raw_path  # absolute-form: http://host/path
    return normalize_path(path.partition("#")[0])


def refuse_target(request: web.BaseRequest) -> web.Response | None:
    """Tollgate's answer to a request it never forwards, or None to forward it.

    Called only when the target is not origin-form or the version not 1.x:
    CONNECT would turn the connection into a tunnel (405), and a version other
    than HTTP/1.0 and 1.1 that the parser let through (0.9, 2.0) is 505. The
    `*` target of other methods never gets here: the parser refuses it
    (proxy.server answers 400).
    """
    if request.version not in HTTP_1:
        reply_as_http11(request)  # not "HTTP/2.0 505" (tests/test_target.py reads the line)
        response = problem(505, "http_version_not_supported", "Only HTTP/1.0 and HTTP/1.1 are supported.")
    elif request.method == "CONNECT":
        response = problem(405, "method_not_allowed", "CONNECT is not supported: Tollgate is a reverse proxy, "
                           "not a tunnel.")
    else:
        return None
    response.force_close()  # CONNECT left aiohttp's parser in tunnel mode: nothing after it is HTTP
    return response
