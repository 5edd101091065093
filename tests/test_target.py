"""The request target: routes match the normalized path, the raw target goes upstream,
and CONNECT, `*` and versions other than HTTP/1.x are answered, never forwarded."""

from __future__ import annotations

import pytest
from harness import running
from hypothesis import given
from hypothesis import strategies as st
from recording import port_of, raw_request, recording_upstream

from proxy.target import normalize_path, remove_dot_segments, route_path

# --- the pure function -------------------------------------------------------

RFC_3986_5_4 = [  # RFC 3986 §5.2.4's own examples, and the edges of "never above the root"
    ("/a/b/c/./../../g", "/a/g"),
    ("/mid/content=5/../6", "/mid/6"),
    ("/", "/"),
    ("/.", "/"),
    ("/..", "/"),
    ("/a/..", "/"),
    ("/a/b/..", "/a/"),
    ("/a/./b/", "/a/b/"),
    ("/../../a", "/a"),
    ("//..", "/"),
    ("/a//b/../", "/a//"),
    ("/.a/..b/...", "/.a/..b/..."),
]


@pytest.mark.parametrize(("path", "expected"), RFC_3986_5_4)
def test_remove_dot_segments(path: str, expected: str) -> None:
    assert remove_dot_segments(path) == expected


ROUTE_PATHS = [
    ("/search", "/search"),
    ("/search?q=/../x", "/search"),  # the query is not the path
    ("/health/../users", "/users"),
    ("/x/../search", "/search"),
    ("/x/%2E%2e/search", "/search"),  # `.` is unreserved: %2E%2E is a dot segment
    ("/%73earch/%7euser", "/search/~user"),  # unreserved escapes decoded
    ("/a%2Fb/..", "/"),  # %2F never splits a segment
    ("/a%2fb", "/a%2Fb"),  # other escapes kept, hex upper-cased
    ("/a%20b/%zz", "/a%20b/%zz"),  # not an escape: kept as is
    ("//search", "//search"),  # empty segments are segments (RFC 3986 merges nothing)
    ("/users#/../search", "/users"),
    ("http://h:1/x/../search?q", "/search"),  # absolute-form
    ("http://h", "/"),
    ("*", "*"),
]


@pytest.mark.parametrize(("target", "expected"), ROUTE_PATHS)
def test_route_path(target: str, expected: str) -> None:
    assert route_path(target) == expected


SEGMENT = st.one_of(
    st.sampled_from([".", "..", "%2E", "%2e%2E", ".%2E", "%2F", "%41", "", "a", "~", "%7e", "%zz", "%"]),
    st.text(alphabet="abc.%2Ef/", max_size=6),
)
PATHS = st.lists(SEGMENT, max_size=12).map(lambda segments: "/" + "/".join(segments))


@given(PATHS)
def test_normalize_is_idempotent_and_leaves_no_dot_segment(path: str) -> None:
    once = normalize_path(path)
    assert normalize_path(once) == once
    assert once.startswith("/")
    assert not {".", ".."} & set(once.split("/"))


@given(PATHS)
def test_an_ordinary_path_takes_the_fast_path_unchanged(path: str) -> None:
    if "%" not in path and "/." not in path:
        assert route_path(path) == path


# --- over real sockets --------------------------------------------------------

ROUTED = """
tiers: {anonymous: {limits: [{name: m, algorithm: fixed_window, limit: 100, window: 60}]}}
routes:
  - {path: /health, exempt: true}
  - {path: /search, cost: 5}
upstream: {url: "{upstream}"}
"""

# target -> how it is limited: "exempt" (no headers), else the cost charged.
ROUTE_CASES = [
    ("/health/../users", 1),  # rode the exempt /health
    ("/health/%2E%2E/users", 1),
    ("/health%2F..%2Fusers", 1),  # request.path decodes %2F: this too was exempt
    ("/x/../search", 5),  # escaped the cost-5 /search
    ("/x/.%2e/search/../search", 5),
    ("/./search", 5),
    ("/%73earch", 5),
    ("/search%2Fx", 1),  # one segment, not /search/x
    ("/health", "exempt"),
    ("/health/./x", "exempt"),
    ("/healthz", 1),
    ("/search?q=../../health", 5),
]


@pytest.mark.parametrize(("target", "limited"), ROUTE_CASES, ids=[c[0] for c in ROUTE_CASES])
async def test_routes_match_the_normalized_path_and_the_raw_target_goes_upstream(target, limited):
    async with recording_upstream() as upstream, running(ROUTED, upstream.url) as tg:
        answer = await raw_request(port_of(tg.url), b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                                   % target.encode())
        assert answer.status == 200
        if limited == "exempt":
            assert "ratelimit" not in answer.headers
        else:
            assert answer.headers["x-ratelimit-remaining"] == str(100 - limited)
        assert upstream.lines() == [b"GET %s HTTP/1.1" % target.encode()]  # byte for byte


async def test_absolute_form_is_routed_by_its_path():
    async with recording_upstream() as upstream, running(ROUTED, upstream.url) as tg:
        answer = await raw_request(port_of(tg.url), b"GET http://t/x/../search HTTP/1.1\r\nHost: t\r\n"
                                   b"Connection: close\r\n\r\n")
        assert answer.headers["x-ratelimit-remaining"] == "95"
        assert upstream.lines() == [b"GET /x/../search HTTP/1.1"]


OPEN = 'tiers: {anonymous: {unlimited: true}}\nupstream: {url: "{upstream}"}\n'

# request head -> (status, error); none of these reaches the upstream.
REFUSED = {
    "connect": (b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", 405, "method_not_allowed"),
    "connect-ip": (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n", 405, "method_not_allowed"),
    "get-star": (b"GET * HTTP/1.1\r\nHost: t\r\n\r\n", 400, "bad_request"),
    "delete-star": (b"DELETE * HTTP/1.1\r\nHost: t\r\n\r\n", 400, "bad_request"),
    "http-2.0": (b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505, "http_version_not_supported"),
    "http-1.2": (b"GET / HTTP/1.2\r\nHost: t\r\n\r\n", 505, "http_version_not_supported"),
    "http-3.0": (b"GET / HTTP/3.0\r\nHost: t\r\n\r\n", 505, "http_version_not_supported"),
    "http-0.9-style": (b"GET /\r\n\r\n", 505, "http_version_not_supported"),
    "http-0.9": (b"GET / HTTP/0.9\r\nHost: t\r\n\r\n", 505, "http_version_not_supported"),
}


@pytest.mark.parametrize("name", list(REFUSED))
async def test_targets_and_versions_never_forwarded(name):
    data, status, error = REFUSED[name]
    async with recording_upstream() as upstream, running(OPEN, upstream.url) as tg:
        answer = await raw_request(port_of(tg.url), data, check_close=True)
        assert answer.status == status
        assert answer.problem()["error"] == error
        assert answer.status_line.startswith(b"HTTP/1.")  # never "HTTP/2.0 505"
        assert answer.closed
        assert upstream.heads == []
        # and the proxy still serves others
        ok = await raw_request(port_of(tg.url), b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert ok.status == 200


async def test_bytes_after_connect_are_never_forwarded():
    """aiohttp's parser turns a CONNECT connection into a tunnel: what follows is not a request."""
    async with recording_upstream() as upstream, running(OPEN, upstream.url) as tg:
        answer = await raw_request(port_of(tg.url), b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n"
                                   b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n")
        assert answer.status == 405
        assert upstream.heads == []


@pytest.mark.parametrize("base", ["", "/api"])
async def test_options_star_is_forwarded_as_options_star(base):
    async with recording_upstream(base) as upstream, running(OPEN, upstream.url) as tg:
        answer = await raw_request(port_of(tg.url), b"OPTIONS * HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert answer.status == 200
        assert upstream.lines() == [b"OPTIONS * HTTP/1.1"]


@pytest.mark.parametrize("version", [b"1.0", b"1.1"])
async def test_http_1_0_and_1_1_are_forwarded(version):
    async with recording_upstream() as upstream, running(OPEN, upstream.url) as tg:
        answer = await raw_request(port_of(tg.url), b"GET /v HTTP/%s\r\nHost: t\r\nConnection: close\r\n\r\n" % version)
        assert answer.status == 200
        assert upstream.lines() == [b"GET /v HTTP/1.1"]
