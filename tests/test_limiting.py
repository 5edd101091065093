"""Limits over HTTP: identity, tiers, routes, headers, all on a fake clock.

The upstream here is the test's own aiohttp app on a real socket, so a test
can count exactly which requests reached it.
"""

from __future__ import annotations

import asyncio
import time

import http_sf
import pytest
from aiohttp import web
from harness import running

CONFIG = """
upstream: {url: "{upstream}"}
clients:
  trusted_proxies: [127.0.0.1/32, 10.0.0.0/8]
  ipv6_prefix: 64
tiers:
  anonymous:
    limits:
      - {algorithm: token_bucket, capacity: 10, refill_rate: 1}
  free:
    limits:
      - {name: burst, algorithm: token_bucket, capacity: 20, refill_rate: 2}
      - {name: daily, algorithm: fixed_window, limit: 1000, window: 86400}
  tiny:
    limits:
      - {name: burst, algorithm: token_bucket, capacity: 2, refill_rate: 0.5}
      - {name: minute, algorithm: sliding_window, limit: 3, window: 60}
  queue:
    limits:
      - {name: drip, algorithm: leaky_bucket, rate: 20, queue: 3}
  internal:
    unlimited: true
api_keys:
  free-key: {tier: free, name: demo-free}
  tiny-key: {tier: tiny, name: tiny}
  queue-key: {tier: queue, name: queued}
  internal-key: {tier: internal, name: ops}
routes:
  - {path: /health, exempt: true}
"""
COST_ROUTE = "  - {path: /search, methods: [GET], cost: 5}\n"
ANONYMOUS_ONLY = CONFIG.split("  free:")[0] + "routes:\n" + COST_ROUTE


class Counter:
    """A real upstream that records what reached it."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request.headers.get("X-Seq", request.path))
        return web.Response(text="ok")


@pytest.fixture
async def counter(aiohttp_server):
    counter = Counter()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", counter.handle)
    server = await aiohttp_server(app)
    counter.url = str(server.make_url("")).rstrip("/")
    return counter


def parse_list(value: str) -> dict[str, dict[str, int]]:
    return {name: dict(params) for name, params in http_sf.parse(value.encode(), tltype="list")}


async def test_concurrent_burst_admits_exactly_capacity(counter, fake_clock):
    async with running(CONFIG, counter.url, clock=fake_clock) as tg:
        results = await asyncio.gather(*(tg.get("/x") for _ in range(30)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 10 and statuses.count(429) == 20
    assert len(counter.seen) == 10  # the upstream never sees a refused request


async def test_headers_report_each_limit_exactly(counter, fake_clock):
    key = {"X-API-Key": "free-key"}
    async with running(CONFIG, counter.url, clock=fake_clock) as tg:
        for _ in range(3):
            status, headers, _ = await tg.get("/x", headers=key)
    assert status == 200
    assert parse_list(headers["RateLimit-Policy"]) == {"burst": {"q": 20, "w": 10}, "daily": {"q": 1000, "w": 86400}}
    state = parse_list(headers["RateLimit"])
    to_midnight = 86400 - int(fake_clock()) % 86400
    assert state == {"burst": {"r": 17, "t": 2}, "daily": {"r": 997, "t": to_midnight}}
    assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"], headers["X-RateLimit-Reset"]) == (
        "20", "17", "2")


async def test_refusal_is_429_problem_with_honest_retry_after(counter, fake_clock):
    key = {"X-API-Key": "tiny-key"}
    async with running(CONFIG, counter.url, clock=fake_clock) as tg:
        assert [(await tg.get("/x", headers=key))[0] for _ in range(2)] == [200, 200]
        async with tg.session.get(tg.url + "/x", headers=key) as resp:
            body = await resp.json()
            headers = resp.headers
            assert resp.status == 429
            assert resp.content_type == "application/problem+json"
        assert headers["Retry-After"] == "2"  # 1 token at 0.5/s
        assert body == {
            "type": "https://iana.org/assignments/http-problem-types#quota-exceeded",
            "title": "Request cannot be satisfied as assigned quota has been exceeded",
            "status": 429, "violated-policies": ["burst"], "error": "rate_limited",
            "message": "Rate limit exceeded", "tier": "tiny", "limit": "burst", "retry_after_seconds": 2.0,
        }
        assert parse_list(headers["RateLimit"]) == {"burst": {"r": 0, "t": 4}, "minute": {"r": 1, "t": 60}}
        # The refusal charged nothing: the sliding window still has 1 left.
        fake_clock.advance(2)
        status, headers, _ = await tg.get("/x", headers=key)
        assert status == 200
        assert parse_list(headers["RateLimit"])["minute"]["r"] == 0
        fake_clock.advance(2)
        async with tg.session.get(tg.url + "/x", headers=key) as resp:
            body = await resp.json()
        assert body["violated-policies"] == ["minute"] and body["limit"] == "minute"
        assert resp.headers["Retry-After"] == "56"  # the first entry leaves the window at t=60
    assert len(counter.seen) == 3


async def test_tiers_by_key_and_unlimited(counter, fake_clock):
    async with running(CONFIG, counter.url, clock=fake_clock) as tg:
        _, free, _ = await tg.get("/x", headers={"X-API-Key": "free-key"})
        _, anon, _ = await tg.get("/x")
        status, internal, _ = await tg.get("/x", headers={"X-API-Key": "internal-key"})
    assert "burst" in parse_list(free["RateLimit-Policy"])
    assert parse_list(anon["RateLimit-Policy"]) == {"token_bucket": {"q": 10, "w": 10}}
    assert status == 200 and "RateLimit" not in internal and "RateLimit-Policy" not in internal


async def test_unknown_key_is_401_and_reaches_nothing(counter):
    async with running(CONFIG, counter.url) as tg:
        async with tg.session.get(tg.url + "/x", headers={"X-API-Key": "nope"}) as resp:
            body = await resp.json()
            assert resp.status == 401
        assert body["error"] == "invalid_api_key" and "nope" not in body["message"]
    assert counter.seen == []


async def test_unknown_key_as_anonymous_and_require_key(counter):
    cfg = CONFIG.replace("ipv6_prefix: 64", "ipv6_prefix: 64\n  unknown_key: anonymous")
    async with running(cfg, counter.url) as tg:
        status, headers, _ = await tg.get("/x", headers={"X-API-Key": "nope"})
        assert status == 200 and "token_bucket" in headers["RateLimit-Policy"]
    cfg = CONFIG.replace("ipv6_prefix: 64", "ipv6_prefix: 64\n  require_key: true")
    async with running(cfg, counter.url) as tg:
        status, _, body = await tg.get("/x")
        assert status == 401 and b"missing_api_key" in body
        assert (await tg.get("/x", headers={"X-API-Key": "free-key"}))[0] == 200


async def test_trusted_proxy_walk_keys_the_real_client(counter, fake_clock):
    async with running(CONFIG, counter.url, clock=fake_clock) as tg:
        chain = {"X-Forwarded-For": "203.0.113.5, 198.51.100.7, 10.1.2.3"}
        for _ in range(10):
            assert (await tg.get("/x", headers=chain))[0] == 200
        assert (await tg.get("/x", headers=chain))[0] == 429
        # another client behind the same proxies has its own bucket
        assert (await tg.get("/x", headers={"X-Forwarded-For": "198.51.100.8"}))[0] == 200
        async with tg.session.get(tg.admin_url + "/api/clients/198.51.100.7") as resp:
            state = await resp.json()
    assert state["tier"] == "anonymous" and state["limits"][0]["remaining"] == 0


async def test_spoofed_forwarded_for_from_untrusted_peer_is_ignored(counter, fake_clock):
    cfg = CONFIG.replace("[127.0.0.1/32, 10.0.0.0/8]", "[10.0.0.0/8]")
    async with running(cfg, counter.url, clock=fake_clock) as tg:
        for i in range(10):
            assert (await tg.get("/x", headers={"X-Forwarded-For": f"198.51.100.{i}"}))[0] == 200
        # every spoofed address was keyed as the real peer, 127.0.0.1
        assert (await tg.get("/x", headers={"X-Forwarded-For": "198.51.100.99"}))[0] == 429


async def test_ipv6_clients_share_their_prefix(counter, fake_clock):
    async with running(CONFIG, counter.url, clock=fake_clock) as tg:
        for i in range(10):
            xff = {"X-Forwarded-For": f"2001:db8:1:2:{i:x}::1"}
            assert (await tg.get("/x", headers=xff))[0] == 200
        assert (await tg.get("/x", headers={"X-Forwarded-For": "2001:db8:1:2:ffff::9"}))[0] == 429
        assert (await tg.get("/x", headers={"X-Forwarded-For": "2001:db8:1:3::1"}))[0] == 200
        async with tg.session.get(tg.admin_url + "/api/stats") as resp:
            ids = {c["id"] for c in (await resp.json())["top_clients"]}
    assert {"2001:db8:1:2::", "2001:db8:1:3::"} <= ids


async def test_exempt_route_has_no_limits_and_no_headers(counter, fake_clock):
    async with running(CONFIG, counter.url, clock=fake_clock) as tg:
        for _ in range(15):
            status, headers, _ = await tg.get("/health")
            assert status == 200 and "RateLimit" not in headers
        assert (await tg.get("/healthy"))[2] == b"ok"  # /healthy is not /health: limited
        assert tg.runtime.stats.totals["exempt"] == 15
        _, headers, _ = await tg.get("/x")
    assert parse_list(headers["RateLimit"])["token_bucket"]["r"] == 8


async def test_route_cost_is_charged_to_every_limit(counter, fake_clock):
    async with running(ANONYMOUS_ONLY, counter.url, clock=fake_clock) as tg:
        _, headers, _ = await tg.get("/search/q")
        assert parse_list(headers["RateLimit"])["token_bucket"]["r"] == 5
        async with tg.session.post(tg.url + "/search") as resp:  # the cost applies to GET only
            assert parse_list(resp.headers["RateLimit"])["token_bucket"]["r"] == 4
        status, headers, _ = await tg.get("/search")
        assert status == 429 and headers["Retry-After"] == "1"
        fake_clock.advance(1)
        status, headers, _ = await tg.get("/search")
        assert status == 200 and parse_list(headers["RateLimit"])["token_bucket"]["r"] == 0
    assert counter.seen == ["/search/q", "/search", "/search"]


async def test_leaky_bucket_releases_in_order_and_refuses_when_queue_full(counter, fake_clock):
    key = {"X-API-Key": "queue-key"}
    async with running(CONFIG, counter.url, clock=fake_clock) as tg:
        async def send(i: int) -> tuple[int, float, dict[str, str]]:
            started = time.monotonic()
            async with tg.session.get(tg.url + "/x", headers={**key, "X-Seq": str(i)}) as resp:
                await resp.read()
                return resp.status, time.monotonic() - started, dict(resp.headers)

        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(send(i)))
            await asyncio.sleep(0.005)  # arrival order, on the same fake instant
        results = await asyncio.gather(*tasks)
    assert [status for status, _, _ in results] == [200, 200, 200, 200, 429]
    assert counter.seen == ["0", "1", "2", "3"]
    # held 0, 50, 100, 150 ms; the fifth is refused at once, not after waiting
    assert results[3][1] >= 0.15 - 0.01
    assert results[4][1] < results[3][1]
    assert parse_list(results[4][2]["RateLimit"]) == {"drip": {"r": 0, "t": 1}}
    assert results[4][2]["Retry-After"] == "1"


async def test_memory_follows_active_clients(counter, fake_clock):
    async with running(CONFIG, counter.url, clock=fake_clock) as tg:
        for i in range(200):
            assert (await tg.get("/x", headers={"X-Forwarded-For": f"198.51.{i // 250}.{i % 250}"}))[0] == 200
        store = tg.store
        limits = tg.runtime.config.all_limits()
        assert store.clients() == 200
        fake_clock.advance(0.5)
        assert await store.sweep(limits) == 0  # not yet full again
        fake_clock.advance(0.5)  # 1 token refilled at 1/s: back to full
        assert await store.sweep(limits) == 200
        assert store.clients() == 0


async def test_a_client_that_gives_up_while_queued_is_not_forwarded(counter, fake_clock):
    key = {"X-API-Key": "queue-key"}
    async with running(CONFIG, counter.url, clock=fake_clock) as tg:
        assert (await tg.get("/x", headers={**key, "X-Seq": "first"}))[0] == 200
        _, writer = await asyncio.open_connection("127.0.0.1", int(tg.url.rsplit(":", 1)[1]))
        writer.write(b"GET /x HTTP/1.1\r\nHost: t\r\nX-API-Key: queue-key\r\nX-Seq: quitter\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)  # queued for 50 ms behind the first
        writer.transport.abort()
        await asyncio.sleep(0.1)
        assert (await tg.get("/x", headers={**key, "X-Seq": "third"}))[0] == 200
        lines = tg.access_lines()
    assert counter.seen == ["first", "third"]
    assert any("status=499" in line for line in lines)
