"""Shared limits through Redis: exact across instances, calm when Redis fails.

Two real Tollgate processes share one private redis-server; the failure tests
kill, hang (SIGSTOP) and restart that server under a running Tollgate.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import aiohttp
import pytest
from harness import running
from helpers import free_port, redis_command

ALGORITHMS = {
    "tb": "{algorithm: token_bucket, capacity: 20, refill_rate: 0.001}",
    "sw": "{algorithm: sliding_window, limit: 20, window: 3600}",
    "fw": "{algorithm: fixed_window, limit: 20, window: 86400}",
    # queue 0: only a request that can go at once passes, so exactly 1 of the burst does
    "lb": "{algorithm: leaky_bucket, rate: 0.001, queue: 0}",
}
ADMITTED = {"tb": 20, "sw": 20, "fw": 20, "lb": 1}


def shared_config(redis_url: str, upstream_url: str, port: int, admin: int) -> str:
    tiers = "".join(f"  {name}:\n    limits: [{spec}]\n" for name, spec in ALGORITHMS.items())
    keys = "".join(f"  key-{name}: {{tier: {name}, name: client-{name}}}\n" for name in ALGORITHMS)
    return (
        f"server: {{port: {port}}}\nadmin: {{port: {admin}}}\n"
        f"upstream: {{url: '{upstream_url}', start_mock: false}}\n"
        f"storage: {{backend: redis, url: '{redis_url}', timeout: 0.5}}\n"
        "tiers:\n  anonymous:\n    limits: [{algorithm: token_bucket, capacity: 5, refill_rate: 1}]\n"
        + tiers + "api_keys:\n" + keys
    )


async def test_two_instances_admit_exactly_capacity_in_total(run_process, tmp_path, redis_server, upstream):
    ports = []
    for i in range(2):
        port, admin = free_port(), free_port()
        cfg = tmp_path / f"t{i}.yaml"
        cfg.write_text(shared_config(redis_server.url, upstream.url, port, admin))
        proc = run_process([sys.executable, "run.py", "--config", str(cfg)])
        proc.wait_for_port(port, timeout=15)
        ports.append(port)
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(port: int, key: str) -> int:
            async with session.get(f"http://127.0.0.1:{port}/users", headers={"X-API-Key": key}) as resp:
                await resp.read()
                return resp.status

        for name in ALGORITHMS:
            statuses = await asyncio.gather(*(one(ports[i % 2], f"key-{name}") for i in range(60)))
            assert statuses.count(200) == ADMITTED[name], (name, statuses.count(200))
            assert statuses.count(429) == 60 - ADMITTED[name]
    keys = [k.decode() for k in redis_command(redis_server.port, "KEYS", "*")]
    assert len(keys) == len(ALGORITHMS)
    assert all(k.startswith("tollgate:{") for k in keys)
    assert not any(raw in k for k in keys for raw in ("key-", "client-"))  # no raw API key or name


def failure_config(redis_url: str, upstream_url: str, on_error: str) -> str:
    return (
        f"upstream: {{url: '{upstream_url}'}}\n"
        f"storage: {{backend: redis, url: '{redis_url}', timeout: 0.1, on_error: {on_error}}}\n"
        "tiers:\n  anonymous:\n    limits: [{algorithm: token_bucket, capacity: 3, refill_rate: 0.001}]\n"
    )


async def timed_get(tg, path: str = "/users") -> tuple[int, float, dict[str, str], bytes]:
    started = time.monotonic()
    status, headers, body = await tg.get(path)
    return status, time.monotonic() - started, headers, body


async def wait_until(predicate, timeout: float = 8.0) -> None:
    """Poll an async predicate, bounded: the limiter backs off up to 5 s between probes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def ready(tg) -> int:
    async with tg.session.get(tg.admin_url + "/readyz") as resp:
        return resp.status


@pytest.mark.parametrize("failure", ["killed", "hung"])
async def test_deny_answers_503_within_the_timeout_then_recovers(redis_server, upstream, failure):
    async with running(failure_config(redis_server.url, upstream.url, "deny"), upstream.url) as tg:
        assert (await timed_get(tg))[0] == 200
        redis_server.kill() if failure == "killed" else redis_server.stop()
        for _ in range(5):
            status, elapsed, headers, body = await timed_get(tg)
            assert status == 503 and headers["Retry-After"] == "1" and b"limiter_unavailable" in body
            assert elapsed < 0.1 + 0.25  # bounded by storage.timeout, never a hang
        assert await ready(tg) == 503
        redis_server.restart() if failure == "killed" else redis_server.cont()

        async def recovered() -> bool:
            return (await tg.get("/users"))[0] != 503

        await wait_until(recovered)
        assert await ready(tg) == 200


async def test_allow_fails_open_without_headers_and_logs_once(redis_server, upstream, caplog):
    caplog.set_level(logging.INFO, logger="tollgate")
    async with running(failure_config(redis_server.url, upstream.url, "allow"), upstream.url) as tg:
        redis_server.stop()
        results = [await timed_get(tg) for _ in range(20)]
        assert all(status == 200 for status, _, _, _ in results)  # more than capacity 3: fail open
        assert all(elapsed < 0.35 for _, elapsed, _, _ in results)
        assert all("RateLimit" not in headers for _, _, headers, _ in results)
        assert tg.runtime.limiter.health.errors <= 3  # backed off: not a failed call per request
        assert await ready(tg) == 200
        async with tg.session.get(tg.admin_url + "/api/stats") as resp:
            storage = (await resp.json())["storage"]
        assert storage["healthy"] is False and storage["on_error"] == "allow"
        redis_server.cont()

        async def limited_again() -> bool:
            return "RateLimit" in (await tg.get("/users"))[1]

        await wait_until(limited_again)
    outage_lines = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outage_lines) == 1
    assert any("is back" in r.getMessage() for r in caplog.records)


async def test_local_applies_per_instance_limits_while_redis_is_down(redis_server, upstream):
    async with running(failure_config(redis_server.url, upstream.url, "local"), upstream.url) as tg:
        assert (await tg.get("/users"))[0] == 200  # 1 of 3 used in Redis
        redis_server.kill()
        statuses = [(await tg.get("/users"))[0] for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]  # a fresh local bucket of 3
        assert await ready(tg) == 200
        redis_server.restart()  # an empty Redis: state restarts there

        async def shared_again() -> bool:
            status, _, _ = await tg.get("/users")
            return status == 200 and tg.runtime.limiter.health.healthy

        await wait_until(shared_again)


async def test_outage_log_masks_the_password(upstream, caplog):
    caplog.set_level(logging.INFO, logger="tollgate")
    url = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"
    async with running(failure_config(url, upstream.url, "allow"), upstream.url) as tg:
        assert (await tg.get("/users"))[0] == 200
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "unavailable" in text and "***" in text and "hunter2-secret" not in text


async def test_redis_down_at_start_is_not_ready_under_deny_and_logged_once(upstream, caplog):
    caplog.set_level(logging.INFO, logger="tollgate")
    url = f"redis://127.0.0.1:{free_port()}/0"
    async with running(failure_config(url, upstream.url, "deny"), upstream.url) as tg:
        assert await ready(tg) == 503  # before any request has tried Redis
        for _ in range(3):
            assert (await tg.get("/users"))[0] == 503
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1


async def test_redis_cluster_limits_work_across_slots(redis_cluster, upstream):
    cfg = (f"upstream: {{url: '{upstream.url}'}}\n"
           f"storage: {{backend: redis, cluster: true, url: '{redis_cluster.url}', timeout: 1}}\n"
           "clients: {trusted_proxies: [127.0.0.1/32]}\n"
           "tiers:\n  anonymous:\n    limits: [{algorithm: token_bucket, capacity: 2, refill_rate: 0.001},"
           " {algorithm: sliding_window, limit: 5, window: 60}]\n")
    async with running(cfg, upstream.url) as tg:
        for i in range(30):  # 30 clients: their hash tags land in all three nodes' slots
            xff = {"X-Forwarded-For": f"198.51.100.{i}"}
            statuses = [(await tg.get("/users", headers=xff))[0] for _ in range(3)]
            assert statuses == [200, 200, 429], (i, statuses)
        assert tg.runtime.limiter.health.healthy
    sizes = [redis_command(port, "DBSIZE") for port in redis_cluster.ports]
    assert all(size > 0 for size in sizes), sizes  # every node holds some clients' limits
