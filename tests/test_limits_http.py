"""Limits on anything over HTTP: a real Tollgate, a real upstream, real sockets.

The upstream here holds requests until the test lets them go, so "in flight"
is exact without timing: a concurrency test counts what is held, not what a
timer happened to catch.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import aiohttp
import http_sf
import pytest
from aiohttp import web
from harness import running
from helpers import free_port, redis_command

PER_CONFIG = """
upstream: {url: "{upstream}"}
tiers:
  anonymous:
    limits:
      - {name: burst, algorithm: token_bucket, capacity: 20, refill_rate: 0.001}
      - {name: tenant, algorithm: fixed_window, limit: 3, window: 3600, per: "header:X-Tenant-Id"}
      - {name: trial, algorithm: fixed_window, limit: 2, window: 3600, shadow: true}
  free:
    limits:
      - {name: burst, algorithm: token_bucket, capacity: 5, refill_rate: 0.001}
api_keys:
  free-key: {tier: free, name: demo-free}
  other-key: {tier: free, name: other}
routes:
  - path: /login
    methods: [POST]
    limits:
      - {name: login, algorithm: fixed_window, limit: 2, window: 60, per: address}
  - path: /export
    limits:
      - {name: export-all, algorithm: concurrency, max: 2, per: global}
"""


class Gate:
    """An upstream that holds every request until released, and counts them."""

    def __init__(self) -> None:
        self.held = 0
        self.most = 0
        self.arrived = asyncio.Condition()
        self.open = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        if request.path.startswith("/export"):
            async with self.arrived:
                self.held += 1
                self.most = max(self.most, self.held)
                self.arrived.notify_all()
            try:
                await self.open.wait()
            finally:
                self.held -= 1
        return web.Response(text="ok")

    async def wait_held(self, count: int) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: self.held >= count), 10)


@pytest.fixture
async def gate(aiohttp_server):
    gate = Gate()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", gate.handle)
    server = await aiohttp_server(app)
    gate.url = str(server.make_url("")).rstrip("/")
    return gate


def parse_list(value: str) -> dict[str, dict[str, int]]:
    return {name: dict(params) for name, params in http_sf.parse(value.encode(), tltype="list")}


async def test_a_header_selector_counts_per_value_and_a_missing_header_shares_one_state(gate, fake_clock):
    async with running(PER_CONFIG, gate.url, clock=fake_clock) as tg:
        acme = {"X-Tenant-Id": "acme"}
        assert [(await tg.get("/x", headers=acme))[0] for _ in range(4)] == [200, 200, 200, 429]
        assert (await tg.get("/x", headers={"X-Tenant-Id": "globex"}))[0] == 200  # another tenant, its own state
        assert [(await tg.get("/x"))[0] for _ in range(4)] == [200, 200, 200, 429]  # no header: one shared state
        assert (await tg.get("/x", headers={"X-Tenant-Id": ""}))[0] == 200  # an empty value is a value
        _, _, body = await tg.get("/x", headers=acme)
        assert b'"violated-policies":["tenant"]' in body.replace(b" ", b"")
        assert "acme" not in str(list(tg.runtime.limiter.store._tables["anonymous.tenant." + _key_of(tg)]))


def _key_of(tg) -> str:
    [limit] = [lim for lim in tg.runtime.config.tiers["anonymous"].limits if lim.name == "tenant"]
    return limit.key.split("anonymous.tenant.")[1]


async def test_a_route_limit_and_the_tier_refuse_all_or_nothing(gate, fake_clock):
    key = {"X-API-Key": "free-key"}
    async with running(PER_CONFIG, gate.url, clock=fake_clock) as tg:
        for login_left in (1, 0):
            async with tg.session.post(tg.url + "/login", headers=key) as resp:
                assert resp.status == 200
                state = parse_list(resp.headers["RateLimit"])
                assert list(state) == ["burst", "login"]  # the tier's limits first, then the route's
                assert (state["burst"]["r"], state["login"]["r"]) == (3 + login_left, login_left)
                assert parse_list(resp.headers["RateLimit-Policy"]) == {"burst": {"q": 5, "w": 5000},
                                                                         "login": {"q": 2, "w": 60}}
        for _ in range(3):  # the login limit counts the address: another key from it is refused too
            async with tg.session.post(tg.url + "/login", headers={"X-API-Key": "other-key"}) as resp:
                assert resp.status == 429
                assert (await resp.json())["violated-policies"] == ["login"]
                assert parse_list(resp.headers["RateLimit"])["burst"]["r"] == 5  # nothing charged
        status, headers, _ = await tg.get("/x", headers={"X-API-Key": "other-key"})
        assert parse_list(headers["RateLimit"])["burst"]["r"] == 4
        status, headers, _ = await tg.get("/login", headers=key)  # GET: the route is POST only
        assert status == 200 and "login" not in headers["RateLimit-Policy"]


async def test_shadow_limits_never_refuse_and_are_not_shown(gate, fake_clock):
    async with running(PER_CONFIG, gate.url, clock=fake_clock) as tg:
        for n in range(4):
            status, headers, _ = await tg.get("/x", headers={"X-Tenant-Id": f"t{n}"})
            assert status == 200
            assert "trial" not in headers["RateLimit-Policy"] and "trial" not in headers["RateLimit"]
        [trial] = [limit for limit in tg.runtime.config.tiers["anonymous"].limits if limit.name == "trial"]
        [state] = await tg.runtime.limiter.peek(["a:127.0.0.1"], [trial])
        assert state.remaining == 0  # charged as if enforced, two of four


async def test_exactly_max_in_flight_and_slots_come_back(gate, fake_clock):
    """A global concurrency limit of 2 on /export, many clients at once: two
    reach the upstream, the rest get 429 with Retry-After: 1 at once; when the
    held ones finish, and when a client aborts, the slots come back."""
    async with running(PER_CONFIG, gate.url, clock=fake_clock) as tg:
        held = [asyncio.ensure_future(tg.get("/export", headers={"X-Forwarded-For": f"10.0.0.{i}"}))
                for i in range(2)]
        await gate.wait_held(2)
        refused = await asyncio.gather(*(tg.get(f"/export/{i}") for i in range(10)))
        assert {status for status, _, _ in refused} == {429}
        assert {headers["Retry-After"] for _, headers, _ in refused} == {"1"}
        assert b"export-all" in refused[0][2]
        assert "export-all" not in refused[0][1].get("RateLimit-Policy", "")  # no quota over time
        gate.open.set()
        assert [status for status, _, _ in await asyncio.gather(*held)] == [200, 200]
        assert gate.most == 2
        gate.open.clear()
        # A client that gives up mid-exchange gives its slot back.
        async with aiohttp.ClientSession() as other:
            task = asyncio.ensure_future(other.get(tg.url + "/export/aborted"))
            await gate.wait_held(1)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _ in range(100):
            if tg.runtime.limiter.store.in_flight(tg.runtime.config.routes[1].limits[0]) == 0:
                break
            await asyncio.sleep(0.01)
        assert tg.runtime.limiter.store.in_flight(tg.runtime.config.routes[1].limits[0]) == 0
        gate.open.set()
        tenants = [{"X-Tenant-Id": f"t{i}"} for i in range(3)]  # the tier's tenant limit is not the point here
        assert [(await tg.get("/export", headers=h))[0] for h in tenants] == [200, 200, 200]


REDIS_CONCURRENCY = """
upstream: {url: "{upstream}", timeout: 5}
storage: {backend: redis, url: "REDIS_URL", timeout: 1}
tiers:
  anonymous:
    limits:
      - {name: burst, algorithm: token_bucket, capacity: 1000, refill_rate: 100}
routes:
  - path: /export
    limits:
      - {name: export-all, algorithm: concurrency, max: 3, per: global, lease: 60}
"""


async def test_two_instances_on_one_redis_share_concurrency_exactly(gate, redis_server):
    text = REDIS_CONCURRENCY.replace("REDIS_URL", redis_server.url)
    async with running(text, gate.url) as first, running(text, gate.url) as second:
        held = [asyncio.ensure_future(tg.get("/export")) for tg in (first, second, first)]
        await gate.wait_held(3)
        refused = await asyncio.gather(*(tg.get("/export") for tg in (first, second) * 3))
        assert [status for status, _, _ in refused] == [429] * 6
        gate.open.set()
        assert [status for status, _, _ in await asyncio.gather(*held)] == [200] * 3
        assert gate.most == 3
        for _ in range(100):  # the releases run in the background
            keys = redis_command(redis_server.port, "KEYS", "*export-all*")
            if not keys or redis_command(redis_server.port, "ZCARD", keys[0].decode()) == 0:
                break
            await asyncio.sleep(0.01)
        gate.open.clear()
        again = [asyncio.ensure_future(tg.get("/export")) for tg in (second, second, first)]
        await gate.wait_held(3)
        assert (await first.get("/export"))[0] == 429
        gate.open.set()
        assert [status for status, _, _ in await asyncio.gather(*again)] == [200] * 3


async def test_an_instance_killed_with_slots_held_frees_them_after_its_lease(run_process, gate, redis_server,
                                                                              tmp_path):
    """SIGKILL leaves two leased tickets behind; they block until the lease
    (1 s) is over, then count no more."""
    port, admin = free_port(), free_port()
    text = REDIS_CONCURRENCY.replace("REDIS_URL", redis_server.url).replace("lease: 60", "lease: 1")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"server: {{port: {port}}}\nadmin: {{port: {admin}}}\n" + text.replace("{upstream}", gate.url)
                   .replace("max: 3", "max: 2"))
    proc = run_process([sys.executable, "run.py", "--config", str(cfg), "--no-mock"])
    proc.wait_for_port(port, timeout=15)
    async with aiohttp.ClientSession() as session:
        held = [asyncio.ensure_future(session.get(f"http://127.0.0.1:{port}/export")) for _ in range(2)]
        await gate.wait_held(2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        for task in held:
            with contextlib.suppress(aiohttp.ClientError):
                await task
    [key] = redis_command(redis_server.port, "KEYS", "*export-all*")
    assert redis_command(redis_server.port, "ZCARD", key.decode()) == 2  # the dead instance's slots are still held
    async with running(text.replace("lease: 60", "lease: 1").replace("max: 3", "max: 2"), gate.url) as tg:
        assert (await tg.get("/export/blocked"))[0] == 429
        gate.open.set()
        deadline = asyncio.get_running_loop().time() + 10
        while (status := (await tg.get("/export"))[0]) == 429 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)  # the lease runs on Redis's own clock
        assert status == 200
