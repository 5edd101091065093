"""The admin port refuses cross-site requests (403) and foreign Host names (421),
token or not, and a malformed token or cookie is a 401, never a 500."""

from __future__ import annotations

import pytest
from harness import running
from recording import port_of, raw_request

from proxy.admin_guard import host_allowed, host_name, own_origin
from proxy.config import AdminConfig

OPEN = 'tiers: {anonymous: {unlimited: true}}\nupstream: {url: "{upstream}"}\n'
EVIL = "http://evil.example"

# --- the pure parts -------------------------------------------------------------


@pytest.mark.parametrize(("host", "name"), [
    ("127.0.0.1:8081", "127.0.0.1"), ("LocalHost:80", "localhost"), ("[::1]:8081", "::1"), ("[::1]", "::1"),
    ("::1", "::1"), ("admin.example", "admin.example"), (" a.b:1 ", "a.b"),
])
def test_host_name(host, name):
    assert host_name(host) == name


ALLOWED = AdminConfig(host="0.0.0.0", allowed_hosts=("admin.example",))


@pytest.mark.parametrize(("host", "local", "admin", "allowed"), [
    ("127.0.0.1:8081", "127.0.0.1", AdminConfig(), True),
    ("127.0.0.1:9999", "127.0.0.1", AdminConfig(), True),  # kubectl port-forward changes the port
    ("localhost:8081", "127.0.0.1", AdminConfig(), True),
    ("10.1.2.3:8081", "10.1.2.3", ALLOWED, True),  # a probe to the pod IP of a 0.0.0.0 listener
    ("10.1.2.3:8081", "::ffff:10.1.2.3", ALLOWED, True),  # the same on a dual-stack socket
    ("[::1]:8081", "::1", AdminConfig(host="::1"), True),
    ("admin.example", "10.1.2.3", ALLOWED, True),
    ("ADMIN.example:443", "10.1.2.3", ALLOWED, True),
    (None, "127.0.0.1", AdminConfig(), True),  # no browser omits Host
    ("box.internal:8081", "10.0.0.9", AdminConfig(host="box.internal"), True),  # the configured listener name
    ("evil.example:8081", "127.0.0.1", AdminConfig(), False),  # DNS rebinding
    ("10.9.9.9:8081", "10.1.2.3", ALLOWED, False),  # not this listener's address
    ("0.0.0.0:8081", "127.0.0.1", AdminConfig(host="0.0.0.0"), False),
    ("localhost.evil.example", "127.0.0.1", AdminConfig(), False),
    ("127.0.0.1.evil.example", "127.0.0.1", AdminConfig(), False),
])
def test_host_allowed(host, local, admin, allowed):
    assert host_allowed(host, local, admin) is allowed


@pytest.mark.parametrize(("origin", "host", "own"), [
    ("http://127.0.0.1:8081", "127.0.0.1:8081", True),
    ("http://LOCALHOST:8081", "localhost:8081", True),
    ("http://admin.example", "admin.example:80", True),
    ("https://admin.example", "admin.example", True),  # behind a TLS proxy
    ("https://admin.example:443", "admin.example", True),
    ("http://127.0.0.1:3000", "127.0.0.1:8081", False),  # another local port: same site, other origin
    ("http://localhost:8081", "127.0.0.1:8081", False),
    ("null", "127.0.0.1:8081", False),
    ("file://", "127.0.0.1:8081", False),
    ("http://127.0.0.1:8081", None, False),
    ("https://admin.example", "admin.example:80", False),
])
def test_own_origin(origin, host, own):
    assert own_origin(origin, host) is own


# --- over real sockets ------------------------------------------------------------


def head(method: str, path: str, host: str, *extra: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Content-Length: 0", "Connection: close", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# (method, path, Host ("{own}": the admin URL's host:port), extra headers, status, error);
# a refused reset must leave the counters alone.
GUARD_CASES = {
    "cross-site-post": ("POST", "/api/stats/reset", "{own}", [f"Origin: {EVIL}"], 403, "cross_origin"),
    "cross-site-reload": ("POST", "/api/reload", "{own}", [f"Origin: {EVIL}"], 403, "cross_origin"),
    "cross-site-delete": ("DELETE", "/api/clients/1.2.3.4", "{own}", [f"Origin: {EVIL}"], 403, "cross_origin"),
    "origin-null": ("POST", "/api/stats/reset", "{own}", ["Origin: null"], 403, "cross_origin"),
    "other-local-port": ("POST", "/api/stats/reset", "{own}", ["Origin: http://127.0.0.1:1"], 403, "cross_origin"),
    "sec-fetch-cross-site": ("POST", "/api/stats/reset", "{own}", ["Sec-Fetch-Site: cross-site"], 403,
                             "cross_origin"),
    "rebinding-get": ("GET", "/api/stats", "evil.example:{port}", [], 421, "misdirected_request"),
    "rebinding-post": ("POST", "/api/stats/reset", "evil.example:{port}", ["Origin: http://evil.example:{port}"],
                       421, "misdirected_request"),
    "rebinding-dashboard": ("GET", "/", "evil.example:{port}", [], 421, "misdirected_request"),
    "rebinding-metrics": ("GET", "/metrics", "evil.example", [], 421, "misdirected_request"),
}


@pytest.mark.parametrize("name", list(GUARD_CASES))
async def test_cross_site_and_rebinding_requests_are_refused(upstream, name):
    method, path, host, extra, status, error = GUARD_CASES[name]
    async with running(OPEN, upstream.url) as tg:
        await tg.get("/users")
        port = port_of(tg.admin_url)
        own = tg.admin_url.removeprefix("http://")
        fill = {"own": own, "port": port}
        data = head(method, path, host.format(**fill), *(h.format(**fill) for h in extra))
        answer = await raw_request(port, data)
        assert answer.status == status
        assert answer.problem()["error"] == error
        assert tg.runtime.stats.totals["requests"] == 1  # not reset
        assert tg.runtime.version == 1  # not reloaded


# (method, path, Host, extra headers, status): what must keep working
PASS_CASES = {
    "same-origin-post": ("POST", "/api/stats/reset", "{own}", ["Origin: http://{own}", "Sec-Fetch-Site: same-origin"],
                         204),
    "no-origin-post": ("POST", "/api/stats/reset", "{own}", [], 204),  # curl
    "cross-site-get": ("GET", "/api/stats", "{own}", [f"Origin: {EVIL}"], 200),  # reads are CORS's to refuse
    "localhost": ("GET", "/api/stats", "localhost:{port}", [], 200),
    "port-forwarded": ("GET", "/api/stats", "127.0.0.1:1", [], 200),
    "healthz-any-host": ("GET", "/healthz", "tollgate.default.svc:{port}", [], 200),
    "readyz-any-host": ("GET", "/readyz", "10.99.0.1", [], 200),
    "allowed-host": ("GET", "/api/stats", "admin.example:443", [], 200),
    "allowed-host-https-origin": ("POST", "/api/stats/reset", "admin.example", ["Origin: https://admin.example"],
                                  204),
}


@pytest.mark.parametrize("name", list(PASS_CASES))
async def test_own_requests_and_probes_pass(upstream, name):
    method, path, host, extra, status = PASS_CASES[name]
    async with running(OPEN + "admin: {allowed_hosts: [admin.example]}\n", upstream.url) as tg:
        port = port_of(tg.admin_url)
        fill = {"own": tg.admin_url.removeprefix("http://"), "port": port}
        answer = await raw_request(port, head(method, path, host.format(**fill), *(h.format(**fill) for h in extra)))
        assert answer.status == status


async def test_allowed_hosts_follow_a_reload(upstream, tmp_path):
    async with running(OPEN, upstream.url, config_path=tmp_path / "config.yaml") as tg:
        port = port_of(tg.admin_url)
        assert (await raw_request(port, head("GET", "/api/stats", "admin.example"))).status == 421
        (tmp_path / "config.yaml").write_text(OPEN.replace("{upstream}", upstream.url)
                                              + "admin: {allowed_hosts: [admin.example]}\n")
        assert (await raw_request(port, head("POST", "/api/reload", "localhost"))).status == 200
        assert (await raw_request(port, head("GET", "/api/stats", "admin.example"))).status == 200


# --- malformed tokens: 401, never 500 -------------------------------------------------

TOKEN = 'admin: {token: "s3cret"}\n'
MALFORMED = {
    "bearer-latin-1": b"Authorization: Bearer s3cr\xe9t",
    "bearer-utf-8": b"Authorization: Bearer s3cr\xc3\xa9t",
    "bearer-tab": b"Authorization: Bearer s3\tcret",
    "cookie-latin-1": b"Cookie: tollgate_admin=s3cr\xe9t",
    "cookie-utf-8": b"Cookie: tollgate_admin=s3cr\xc3\xa9t",
    "cookie-obs-text": b"Cookie: tollgate_admin=\xff",
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_a_malformed_token_is_401_never_500(upstream, name):
    async with running(OPEN + TOKEN, upstream.url) as tg:
        port = port_of(tg.admin_url)
        own = tg.admin_url.removeprefix("http://").encode()
        data = b"GET /api/stats HTTP/1.1\r\nHost: %s\r\n%s\r\nConnection: close\r\n\r\n" % (own, MALFORMED[name])
        answer = await raw_request(port, data)
        assert answer.status == 401
        assert answer.problem()["error"] == "unauthorized"
        good = await raw_request(port, head("GET", "/api/stats", own.decode(), "Authorization: Bearer s3cret"))
        assert good.status == 200


@pytest.mark.parametrize("query", [b"token=s3cr%E9t", b"token=s3cr%C3%A9t", b"token=s3cr%09et"])
async def test_a_malformed_token_in_the_query_is_401(upstream, query):
    async with running(OPEN + TOKEN, upstream.url) as tg:
        port = port_of(tg.admin_url)
        own = tg.admin_url.removeprefix("http://").encode()
        answer = await raw_request(port, b"GET /?%s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (query, own))
        assert answer.status == 401
