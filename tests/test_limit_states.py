"""The new limits made visible, over HTTP with a real Tollgate and upstream_mock:
shadow refusals in /api/stats, /metrics and the access log; a global
limit's state and concurrency slots in flight in /api/stats' `limits`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from harness import Tollgate, running

CONFIG = """
upstream: {url: "{upstream}"}
clients: {trusted_proxies: [127.0.0.1/32]}
tiers:
  anonymous:
    limits:
      - {name: burst, algorithm: token_bucket, capacity: 100, refill_rate: 1}
      - {name: trial, algorithm: fixed_window, limit: 2, window: 60, shadow: true}
      - {name: inflight, algorithm: concurrency, max: 4}
routes:
  - path: /export
    methods: [GET, POST]
    limits:
      - {name: export-all, algorithm: fixed_window, limit: 3, window: 60, per: global}
      - {name: login, algorithm: sliding_window, limit: 5, window: 60, per: address}
  - path: /delay
    limits:
      - {name: slow-all, algorithm: concurrency, max: 2, per: global}
"""


async def admin_stats(tg: Tollgate) -> dict[str, Any]:
    async with tg.session.get(tg.admin_url + "/api/stats") as resp:
        assert resp.status == 200
        return await resp.json()  # type: ignore[no-any-return]


async def metrics_text(tg: Tollgate) -> str:
    async with tg.session.get(tg.admin_url + "/metrics") as resp:
        return await resp.text()


def by_name(limits: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {limit["name"]: limit for limit in limits}


async def test_a_shadow_limit_never_refuses_and_its_refusals_are_counted_everywhere(upstream, fake_clock):
    async with running(CONFIG, upstream.url, clock=fake_clock) as tg:
        results = [await tg.get("/users") for _ in range(5)]
        assert [status for status, _, _ in results] == [200] * 5
        assert all("trial" not in headers.get("RateLimit-Policy", "") for _, headers, _ in results)
        stats = await admin_stats(tg)
        assert stats["totals"]["shadow_blocked"] == 3 and stats["totals"]["blocked"] == 0
        assert stats["tiers"]["anonymous"]["shadow_blocked"] == 3
        assert 'tollgate_shadow_refusals_total{limit="trial",tier="anonymous"} 3.0' in await metrics_text(tg)
        lines = tg.access_lines()
    assert [line.endswith(" shadow=trial") for line in lines] == [False, False, True, True, True]
    assert "decision=allowed" in lines[-1] and "status=200" in lines[-1]


async def test_the_json_access_line_lists_the_shadow_limits(upstream, fake_clock):
    async with running(CONFIG + "log: {format: json}\n", upstream.url, clock=fake_clock) as tg:
        for _ in range(3):
            await tg.get("/users")
        entries = [json.loads(line) for line in tg.access_lines()]
    assert ["shadow" in entry for entry in entries] == [False, False, True]
    assert entries[-1]["shadow"] == ["trial"] and entries[-1]["decision"] == "allowed"


async def test_a_global_route_limit_shows_its_shared_state(upstream, fake_clock):
    async with running(CONFIG, upstream.url, clock=fake_clock) as tg:
        before = await admin_stats(tg)
        for address in ("198.51.100.1", "198.51.100.2"):  # two clients, one state
            status, _, _ = await tg.get("/export", headers={"X-Forwarded-For": address})
            assert status == 200
        after = await admin_stats(tg)
        async with tg.session.get(tg.admin_url + "/api/clients/198.51.100.1") as resp:
            client = await resp.json()
    (mine, _) = client["routes"]
    assert mine["path"] == "/export" and {n: v["remaining"] for n, v in by_name(mine["limits"]).items()} == {
        "export-all": 1, "login": 4}  # the shared state, and this address's own
    assert by_name(client["limits"])["inflight"]["in_flight"] == 0
    (route, _), tiers = after["limits"]["routes"], after["limits"]["tiers"]
    assert route["path"] == "/export" and route["methods"] == ["GET", "POST"]
    limits = by_name(route["limits"])
    assert 1 <= limits["export-all"].pop("reset_seconds") <= 60  # a fixed window ends on the clock's minute
    assert by_name(before["limits"]["routes"][0]["limits"])["export-all"]["remaining"] == 3
    assert limits["export-all"] == {"name": "export-all", "algorithm": "fixed_window", "limit": 3,
                                    "per": ["global"], "shadow": False, "remaining": 1}
    assert limits["login"]["remaining"] is None  # one state per address: no request, no subject
    assert list(tiers) == ["anonymous"] and [limit["name"] for limit in tiers["anonymous"]] == ["inflight"]
    assert after["config"]["tiers"]["anonymous"]["limits"][1]["shadow"] is True


async def wait_for(tg: Tollgate, predicate: Any, what: str) -> dict[str, Any]:
    """Poll /api/stats until `predicate(stats)`: bounded in count, not a timing threshold."""
    for _ in range(500):
        stats = await admin_stats(tg)
        if predicate(stats):
            return stats
        await asyncio.sleep(0.01)
    raise AssertionError(f"/api/stats never showed {what}: {stats['limits']}")


def slots(stats: dict[str, Any]) -> tuple[int | None, int | None]:
    """(slow-all's in flight on /delay, the anonymous tier's inflight over all clients)."""
    route = next(r for r in stats["limits"]["routes"] if r["path"] == "/delay")
    return route["limits"][0]["in_flight"], stats["limits"]["tiers"]["anonymous"][0]["in_flight"]


async def test_slots_in_flight_show_while_a_slow_request_is_open_and_come_back(upstream):
    async with running(CONFIG, upstream.url) as tg:
        assert slots(await admin_stats(tg)) == (0, 0)
        slow = asyncio.ensure_future(tg.get("/delay/2"))
        stats = await wait_for(tg, lambda s: slots(s) == (1, 1), "one slot in flight")
        route = by_name(next(r for r in stats["limits"]["routes"] if r["path"] == "/delay")["limits"])
        assert route["slow-all"]["remaining"] == 1  # max 2, one held
        status, _, _ = await slow
        assert status == 200
        assert slots(await admin_stats(tg)) == (0, 0)


async def test_with_redis_global_states_show_and_a_dead_store_gives_nulls_not_500(upstream, redis_server):
    config = CONFIG + f"storage: {{backend: redis, url: '{redis_server.url}', timeout: 0.5, on_error: allow}}\n"
    async with running(config, upstream.url) as tg:
        slow = asyncio.ensure_future(tg.get("/delay/2"))
        stats = await wait_for(tg, lambda s: slots(s)[0] == 1, "a global slot held in Redis")
        assert slots(stats) == (1, None)  # per-client slots over all clients would need a scan: not shown
        assert (await slow)[0] == 200
        await tg.get("/export")
        redis_server.kill()
        await tg.get("/users")  # the limiter learns the store is down
        stats = await admin_stats(tg)
        assert stats["storage"]["healthy"] is False
        export = by_name(next(r for r in stats["limits"]["routes"] if r["path"] == "/export")["limits"])
        assert export["export-all"]["remaining"] is None and slots(stats) == (None, None)
