"""Calm under faults: a decision that reaches Redis after its caller gave up
charges nothing, and a Cluster node that stalls degrades only its own clients.

Real redis-server processes hung with SIGSTOP; the limiter's back-off runs on
an injected clock, so recovery needs no sleeping.
"""

from __future__ import annotations

import asyncio

import pytest
from harness import Tollgate, running
from helpers import FakeClock, RedisCluster, RedisServer, redis_command
from test_redis_store import FOUR

from proxy.config import StorageConfig
from proxy.identity import key_identity
from proxy.limiter import BACKOFF_START
from proxy.limits.deadline import MARGIN_MAX, NO_DEADLINE, ServerClock, deadline_us
from proxy.limits.redis import RedisStore
from proxy.limits.store import StorageUnavailable

CONFIG = """\
upstream: {{url: '{upstream}'}}
storage: {{backend: redis, url: '{redis}', timeout: {timeout}, on_error: deny}}
tiers:
  anonymous:
    limits: [{{algorithm: token_bucket, capacity: 10, refill_rate: 0.001}}]
"""


def test_deadline_arithmetic() -> None:
    """now + offset + timeout, less a margin for the reply's way back: a fifth
    of the timeout, at most MARGIN_MAX."""
    assert deadline_us(1000.0, 0.05, 0.0) == 1000_045_000  # 50 ms - MARGIN_MAX (5 ms)
    assert deadline_us(1000.0, 0.01, 0.0) == 1000_008_000  # 10 ms - a fifth
    assert deadline_us(1000.0, 1.0, 2.5) == 1003_500_000 - int(MARGIN_MAX * 1e6)
    assert deadline_us(1000.0, 0.05, -0.25) == 999_795_000


async def test_the_server_clock_is_learned_from_below_and_refreshed(fake_clock: FakeClock) -> None:
    """A TIME reply read at local t gives offset = server - t, at most the true
    one (the reply took time to arrive): deadlines err early, never late."""
    answers = [fake_clock() + 2.0]  # the server is 2 s ahead when it answers

    async def fetch() -> float:
        fake_clock.advance(0.5)  # the reply's way back
        return answers[-1]

    clock = ServerClock(fetch, clock=fake_clock)
    assert clock.deadline(0.05) == NO_DEADLINE  # unknown yet; a measurement starts
    await asyncio.sleep(0)
    assert clock.offset == 1.5
    assert clock.deadline(0.05) == deadline_us(fake_clock(), 0.05, 1.5)
    clock.observed(fake_clock() + 1.25)  # a LATE reply's `now` while its caller still waited
    assert clock.offset == 1.25
    fake_clock.advance(61)
    answers.append(fake_clock() + 3.0)
    clock.deadline(0.05)  # a minute on: measured again
    await asyncio.sleep(0)
    assert clock.offset == 2.5


async def remaining(tg: Tollgate) -> int:
    """The client's tokens, read through the same Redis connection as decisions
    (so after any backlog of them)."""
    async with tg.session.get(tg.admin_url + "/api/clients/127.0.0.1") as resp:
        state = await resp.json()
    value: int = state["limits"][0]["remaining"]
    return value


async def test_decisions_that_reach_a_stalled_redis_late_charge_nothing(redis_server: RedisServer, upstream) -> None:
    config = CONFIG.format(upstream="{upstream}", redis=redis_server.url, timeout=0.1)
    async with running(config, upstream.url) as tg:
        for _ in range(2):
            assert (await tg.get("/users"))[0] == 200
        before = await remaining(tg)
        assert before == 8
        redis_server.stop()
        try:
            # all in flight at once, so each reaches the stalled Redis and times out
            statuses = await asyncio.gather(*(tg.get("/users") for _ in range(6)))
            assert [status for status, _, _ in statuses] == [503] * 6
        finally:
            redis_server.cont()
        assert redis_command(redis_server.port, "PING") == "PONG"  # Redis has run the backlog
        assert await remaining(tg) == before
        assert not tg.runtime.limiter.health.healthy  # the timeouts were failures all the same


async def test_a_late_decision_raises_storage_unavailable(redis_server: RedisServer) -> None:
    """A decision whose deadline has passed when Redis runs it: StorageUnavailable,
    nothing written; the offset is lowered to what the reply proved."""
    store = RedisStore.from_config(StorageConfig(backend="redis", url=redis_server.url, timeout=1.0))
    try:
        await store.warm()
        store._server_clock.offset = -10.0  # as if Redis were 10 s behind: every deadline is past
        with pytest.raises(StorageUnavailable, match="after its deadline"):
            await store.acquire(["a:203.0.113.9"] * len(FOUR), FOUR, 1)
        assert redis_command(redis_server.port, "DBSIZE") == 0
        assert store._server_clock.offset > -1.0  # corrected from the LATE reply's `now`
        [bucket, *_] = await store.acquire(["a:203.0.113.9"] * len(FOUR), FOUR, 1)
        assert bucket.remaining == 9
    finally:
        await store.close()


def cluster_config(url: str, clients: int) -> str:
    keys = "".join(f"  key-{i}: {{tier: free, name: client-{i}}}\n" for i in range(clients))
    return (
        "upstream: {url: '{upstream}'}\n"
        f"storage: {{backend: redis, cluster: true, url: '{url}', timeout: 0.25, on_error: deny}}\n"
        "tiers:\n  anonymous: {unlimited: true}\n  free:\n    limits: [{algorithm: token_bucket, capacity: 5, refill_rate: 0.001}]\n"
        "api_keys:\n" + keys
    )


async def statuses(tg: Tollgate, client: int, n: int) -> list[int]:
    return [(await tg.get("/users", headers={"X-API-Key": f"key-{client}"}))[0] for _ in range(n)]


async def readyz(tg: Tollgate) -> tuple[int, dict[str, object]]:
    async with tg.session.get(tg.admin_url + "/readyz") as resp:
        return resp.status, await resp.json()


async def test_a_stalled_cluster_node_degrades_only_its_own_clients(
    redis_cluster: RedisCluster, upstream, fake_clock: FakeClock,
) -> None:
    async with running(cluster_config(redis_cluster.url, 24), upstream.url) as tg:
        limiter = tg.runtime.limiter
        limiter.clock = fake_clock  # the back-off passes on this clock, not by sleeping
        by_shard: dict[object, list[int]] = {}
        for i in range(24):
            identity = key_identity(tg.runtime.config.key_by_name(f"client-{i}"))
            by_shard.setdefault(tg.store.shard_of(identity), []).append(i)
        assert len(by_shard) == 3
        stalled, *healthy_shards = sorted(by_shard, key=str)
        hung = by_shard[stalled][:3]
        healthy = [clients[i] for clients in (by_shard[s] for s in healthy_shards) for i in range(2)]
        for client in hung + healthy:
            assert await statuses(tg, client, 1) == [200]  # 4 of 5 left
        node = next(n for n in redis_cluster.nodes if f"127.0.0.1:{n.port}" == stalled)
        node.stop()
        try:
            for client in hung:
                assert await statuses(tg, client, 2) == [503, 503]  # a timeout, then the back-off
            for client in healthy:
                assert await statuses(tg, client, 5) == [200] * 4 + [429]  # exact, throughout
            status, body = await readyz(tg)
            storage = body["storage"]
            assert status == 200 and body["ready"] is True  # two of three nodes serve
            assert isinstance(storage, dict) and storage["healthy"] is False
            assert [d["shard"] for d in storage["down"]] == [stalled]
        finally:
            node.cont()
        fake_clock.advance(BACKOFF_START)
        for client in hung:  # the timed-out decisions charged nothing: 4 of 5 left still
            assert await statuses(tg, client, 5) == [200] * 4 + [429]
        assert limiter.healthy
        assert (await readyz(tg))[1]["storage"] == {
            "backend": "redis", "healthy": True, "on_error": "deny", "last_error": None, "down": []}
