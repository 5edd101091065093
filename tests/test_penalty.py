"""The penalty box (SPEC round 2, `tiers.<name>.penalty`): strikes, bans, and lifting them.

Both stores on one fake clock: the pure `strike` rule and the ban decided
with the limits (memory, and acquire.lua on a real redis-server), then a real
Tollgate before the real upstream_mock, and two Tollgates sharing one Redis.
"""

from __future__ import annotations

import json
import random
import re
import time

import pytest
from harness import Tollgate, running
from helpers import FakeClock

from proxy.config import ConfigError, StorageConfig, from_text
from proxy.limits.algorithms import Ban, SlidingWindow, TokenBucket
from proxy.limits.memory import MemoryStore
from proxy.limits.redis import RedisStore
from proxy.limits.store import Limit, Store

ALICE = "k:alice"
STRIKES = Limit(name="strikes", algorithm=SlidingWindow(2, 60), key="t.penalty.st")  # after: 3
BAN = Limit(name="banned", algorithm=Ban(300), key="t.penalty.bn")
BURST = Limit(name="burst", algorithm=TokenBucket(5, 0.001), key="t.burst")

CONFIG = """
upstream: {url: "{upstream}"}
tiers:
  anonymous:
    limits: [{capacity: 100, refill_rate: 1}]
  free:
    limits: [{name: burst, algorithm: token_bucket, capacity: 2, refill_rate: 0.01}]
    penalty: {after: 3, within: 60, ban: 300, statuses: [401, 403]}
  paid:
    limits: [{name: burst, algorithm: token_bucket, capacity: 100, refill_rate: 1}]
    penalty: {after: 3, within: 60, ban: 300, statuses: [401]}
api_keys:
  free-key: {tier: free, name: alice}
  paid-key: {tier: paid, name: bob}
"""
ALICE_KEY = {"X-API-Key": "free-key"}
BOB_KEY = {"X-API-Key": "paid-key"}


async def test_the_strike_that_reaches_after_bans_and_a_ban_refuses_charging_nothing(
        store: Store, fake_clock: FakeClock) -> None:
    decided = [BAN, BURST]
    assert await store.strike(ALICE, STRIKES, BAN) is None
    fake_clock.advance(59)
    assert await store.strike(ALICE, STRIKES, BAN) is None
    fake_clock.advance(2)  # the first strike is out of the 60 s window: two count
    assert await store.strike(ALICE, STRIKES, BAN) is None
    assert [o.allowed for o in await store.acquire([ALICE, ALICE], decided, 1)] == [True, True]
    banned_at = fake_clock.advance(1)
    assert await store.strike(ALICE, STRIKES, BAN) == banned_at + 300  # the third within 60 s
    assert await store.strike(ALICE, STRIKES, BAN) is None  # a strike while banned changes nothing
    fake_clock.advance(100)
    refused = await store.acquire([ALICE, ALICE], decided, 1)
    assert [o.allowed for o in refused] == [False, True]
    assert refused[0].retry_after == 200
    assert refused[1].remaining == 4  # banned requests charge no limit
    assert (await store.peek([ALICE], [BAN]))[0].retry_after == 200
    fake_clock.advance(200)
    assert [o.allowed for o in await store.acquire([ALICE, ALICE], decided, 1)] == [True, True]
    assert await store.strike(ALICE, STRIKES, BAN) is None  # the count started over with the ban
    await store.strike(ALICE, STRIKES, BAN)
    fake_clock.advance(1)
    await store.strike(ALICE, STRIKES, BAN)
    await store.reset([ALICE, ALICE], [STRIKES, BAN])  # lifted: free, and counting from zero
    assert (await store.peek([ALICE], [BAN]))[0].allowed
    assert await store.strike(ALICE, STRIKES, BAN) is None


async def test_memory_and_redis_agree_on_strikes_and_bans(redis_server, fake_clock: FakeClock) -> None:
    """The same random sequence of strikes and decisions on both stores, answer for answer."""
    rng = random.Random(20)
    memory = MemoryStore(fake_clock)
    redis_store = RedisStore.from_config(StorageConfig(backend="redis", url=redis_server.url, timeout=1.0),
                                         clock=fake_clock)
    try:
        for step in range(300):
            fake_clock.advance(rng.choice((0, 0.5, 3, 17, 61, 150)))
            subject = rng.choice((ALICE, "a:10.0.0.1"))
            if rng.random() < 0.6:
                assert await memory.strike(subject, STRIKES, BAN) == await redis_store.strike(subject, STRIKES, BAN), step
            else:
                assert (memory.acquire_now([subject, subject], [BAN, BURST], 1)
                        == await redis_store.acquire([subject, subject], [BAN, BURST], 1)), step
    finally:
        await redis_store.close()


async def settled(tg: Tollgate, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """One request, and its strike counted (with Redis it is counted in the background)."""
    answer = await tg.get(path, headers=headers)
    await tg.runtime.penalties.settled()
    return answer


def rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_client_collecting_refusals_is_banned_then_freed(
        request: pytest.FixtureRequest, upstream, fake_clock: FakeClock, backend: str) -> None:
    store: Store = MemoryStore(fake_clock)
    if backend == "redis":
        url = request.getfixturevalue("redis_server").url
        store = RedisStore.from_config(StorageConfig(backend="redis", url=url, timeout=1.0), clock=fake_clock)
    async with running(CONFIG, upstream.url, clock=fake_clock, store=store) as tg:
        assert [(await settled(tg, "/users", ALICE_KEY))[0] for _ in range(2)] == [200, 200]
        for _ in range(3):  # the third refusal reaches the count and still gets its own answer
            status, _, body = await settled(tg, "/users", ALICE_KEY)
            assert (status, json.loads(body)["error"]) == (429, "rate_limited")
        banned_at = fake_clock()
        fake_clock.advance(100)
        status, headers, body = await settled(tg, "/users", ALICE_KEY)
        assert (status, headers["Retry-After"], headers["Content-Type"]) == (429, "200", "application/problem+json; charset=utf-8")
        problem = json.loads(body)
        assert (problem["error"], problem["tier"], problem["retry_after_seconds"]) == ("banned", "free", 200)
        assert "banned" not in headers.get("RateLimit-Policy", "")  # the ban is no quota
        await settled(tg, "/users", ALICE_KEY)  # still banned: no strike, no longer ban
        lines = [line for line in tg.access_lines() if "client=alice" in line]
        assert all("upstream_ms=-" in line for line in lines[-2:])  # reached no upstream
        assert "upstream_ms=-" not in lines[0]

        async with tg.session.get(tg.admin_url + "/api/clients/alice") as resp:
            client = await resp.json()
        assert (client["banned_until"], client["ban_seconds_left"]) == (rfc3339(banned_at + 300), 200)
        async with tg.session.get(tg.admin_url + "/api/stats") as resp:
            stats = await resp.json()
        assert stats["banned"] == [{"id": "alice", "tier": "free", "banned_until": rfc3339(banned_at + 300),
                                    "seconds_left": 200}]
        async with tg.session.get(tg.admin_url + "/metrics") as resp:
            metrics = await resp.text()
        assert 'tollgate_bans_total{tier="free"} 1.0' in metrics
        assert 'tollgate_banned_requests_total{tier="free"} 2.0' in metrics

        fake_clock.advance(200)  # the ban is over, and the bucket refilled meanwhile
        assert (await settled(tg, "/users", ALICE_KEY))[0] == 200
        async with tg.session.get(tg.admin_url + "/api/clients/alice") as resp:
            client = await resp.json()
        assert (client["banned_until"], client["ban_seconds_left"]) == (None, None)
        async with tg.session.get(tg.admin_url + "/api/stats") as resp:
            assert (await resp.json())["banned"] == []


async def test_listed_upstream_statuses_ban_and_others_do_not(upstream, fake_clock: FakeClock) -> None:
    async with running(CONFIG, upstream.url, clock=fake_clock) as tg:
        for _ in range(5):  # 403 is listed for free, not for paid
            assert (await settled(tg, "/status/403", BOB_KEY))[0] == 403
        for _ in range(3):
            assert (await settled(tg, "/status/401", BOB_KEY))[0] == 401
        status, headers, body = await settled(tg, "/users", BOB_KEY)
        assert (status, headers["Retry-After"], json.loads(body)["error"]) == (429, "300", "banned")


async def test_two_instances_share_a_ban_and_its_lifting(redis_server, upstream, fake_clock: FakeClock) -> None:
    def store() -> RedisStore:
        return RedisStore.from_config(StorageConfig(backend="redis", url=redis_server.url, timeout=1.0),
                                      clock=fake_clock)

    async with running(CONFIG, upstream.url, store=store()) as one, \
            running(CONFIG, upstream.url, store=store()) as two:
        for _ in range(3):
            assert (await settled(one, "/status/401", BOB_KEY))[0] == 401
        status, _, body = await settled(two, "/users", BOB_KEY)  # the other instance refuses
        assert (status, json.loads(body)["error"]) == (429, "banned")
        for tg in (one, two):  # one set the ban, the other refused a request for it: both list it
            async with tg.session.get(tg.admin_url + "/api/stats") as resp:
                assert [row["id"] for row in (await resp.json())["banned"]] == ["bob"]
        async with two.session.delete(two.admin_url + "/api/clients/bob") as resp:
            assert resp.status == 204
        assert (await settled(one, "/users", BOB_KEY))[0] == 200  # lifted on both
        assert (await settled(two, "/users", BOB_KEY))[0] == 200
        async with one.session.get(one.admin_url + "/api/stats") as resp:
            assert (await resp.json())["banned"] == []  # checked with Redis: the lifted ban is gone
        assert (await settled(one, "/status/401", BOB_KEY))[0] == 401  # the strikes were lifted too
        assert (await settled(one, "/status/401", BOB_KEY))[0] == 401
        assert (await settled(one, "/users", BOB_KEY))[0] == 200


async def test_a_reload_that_keeps_the_ban_keeps_the_bans(upstream, fake_clock: FakeClock) -> None:
    async with running(CONFIG, upstream.url, clock=fake_clock) as tg:
        for _ in range(3):
            await settled(tg, "/status/401", BOB_KEY)
        tg.runtime.config = from_text(CONFIG.replace("{upstream}", upstream.url).replace("[401]}", "[401, 500]}"))
        assert (await settled(tg, "/users", BOB_KEY))[0] == 429
        tg.runtime.config = from_text(CONFIG.replace("{upstream}", upstream.url).replace("ban: 300, statuses: [401]",
                                                                                         "ban: 30, statuses: [401]"))
        assert (await settled(tg, "/users", BOB_KEY))[0] == 200  # a new ban length starts fresh


@pytest.mark.parametrize(("penalty", "errors"), [
    ("{after: 0, within: 0, ban: -1, statuses: [42, '401', true]}", [
        "tiers.free.penalty.after: must be an integer >= 1, got 0",
        "tiers.free.penalty.within: must be a number > 0, got 0",
        "tiers.free.penalty.ban: must be a number > 0, got -1",
        "tiers.free.penalty.statuses[0]: must be an HTTP status 100-599, got 42",
        "tiers.free.penalty.statuses[1]: must be an HTTP status 100-599, got \"401\"",
        "tiers.free.penalty.statuses[2]: must be an HTTP status 100-599, got true",
    ]),
    ("{within: 60, statuses: 401, bans: 3}", [
        "tiers.free.penalty.bans: unknown key (known: after, ban, statuses, within)",
        "tiers.free.penalty.after: is required",
        "tiers.free.penalty.ban: is required",
        "tiers.free.penalty.statuses: must be a list of HTTP statuses (100-599), got 401",
    ]),
    ("[10, 60]", ["tiers.free.penalty: must be a mapping, "
                  "got [10, 60]"]),
])
def test_penalty_config_errors_name_the_key(penalty: str, errors: list[str]) -> None:
    text = f"tiers:\n  anonymous: {{limits: [{{capacity: 1, refill_rate: 1}}], penalty: {penalty}}}\n"
    with pytest.raises(ConfigError) as caught:
        from_text(text.replace("anonymous", "free") + "clients: {require_key: true}\n")
    assert caught.value.errors == errors


def test_an_unlimited_tier_has_no_penalty() -> None:
    with pytest.raises(ConfigError) as caught:
        from_text("tiers:\n  anonymous: {unlimited: true, penalty: {after: 1, within: 1, ban: 1}}\n")
    assert caught.value.errors == ["tiers.anonymous.penalty: an unlimited tier is never refused, so it has no penalty"]


def test_without_penalty_nothing_changes() -> None:
    config = from_text("tiers:\n  anonymous: {limits: [{capacity: 1, refill_rate: 1}]}\n")
    tier = config.tiers["anonymous"]
    assert tier.penalty is None and tier.limit_set.limits == tier.limits and not tier.limit_set.banning
    assert re.fullmatch(r'"token_bucket";q=1;w=1', tier.limit_set.policy_header)


async def test_the_dashboard_lists_a_ban_as_it_happens(upstream, browser, fake_clock: FakeClock) -> None:
    evil = "<script>alert(1)</script>"
    config = CONFIG + f"  evil-key: {{tier: paid, name: {json.dumps(evil)}}}\n"
    async with running(config, upstream.url, clock=fake_clock) as tg:
        await browser.navigate(tg.admin_url + "/")
        await browser.wait_for("document.querySelector('#banned tr.empty') !== null")
        for _ in range(3):
            await settled(tg, "/status/401", {"X-API-Key": "evil-key"})
        await browser.wait_for("document.querySelector('#banned tr[data-client-id]') !== null", timeout=5)
        row = await browser.evaluate(
            "[...document.querySelectorAll('#banned tr[data-client-id] td')].map(td => td.textContent)")
        assert row == [evil, "paid", "300", rfc3339(fake_clock() + 300)]  # a name, not markup
        assert await browser.evaluate("document.querySelectorAll('#banned script').length") == 0


async def test_the_decision_service_does_not_report_the_ban_as_a_quota(upstream) -> None:
    async with running(CONFIG, upstream.url) as tg:
        async with tg.session.post(tg.admin_url + "/api/check", json={"key": "k", "tier": "paid"}) as resp:
            result = await resp.json()
        assert (result["allowed"], result["limit"], result["remaining"]) == (True, "burst", 99)


async def test_strikes_and_bans_work_on_every_cluster_node(redis_cluster, fake_clock: FakeClock) -> None:
    """A strike's two keys share the client's hash tag: one script, whatever node holds them."""
    store = RedisStore.from_config(StorageConfig(backend="redis", cluster=True, url=redis_cluster.url, timeout=1.0),
                                   clock=fake_clock)
    try:
        clients = [f"a:198.51.100.{i}" for i in range(12)]  # their tags land on all three nodes
        for client in clients:
            assert [await store.strike(client, STRIKES, BAN) for _ in range(3)] == [None, None, fake_clock() + 300]
            assert [o.allowed for o in await store.acquire([client, client], [BAN, BURST], 1)] == [False, True]
        assert len({store.shard_of(client) for client in clients}) == 3
    finally:
        await store.close()
