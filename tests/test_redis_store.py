"""RedisStore against real redis-server processes: layout, expiry, failures, Cluster, load.

The behaviour table in test_algorithms.py already runs on Redis; here are
the properties only Redis has: what the keys look like (no raw identity, a
hash tag per client, a TTL that ends when the state is fresh), what a dead,
hung or restarted server does to a call (StorageUnavailable, fast, then
recovery without a new store), a Cluster whose clients live on different
nodes, concurrent requests for one client, and a random differential run
against the memory store that must agree to the last bit. The injected clock
makes the expected values exact; nothing here sleeps to let time pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Final

import pytest
from helpers import FakeClock, RedisCluster, RedisReplyError, RedisServer, redis_command
from redis.crc import key_slot

from proxy.config import StorageConfig
from proxy.limits import redis as redis_module
from proxy.limits.algorithms import (
    Algorithm,
    FixedWindow,
    LeakyBucket,
    Outcome,
    SlidingWindow,
    TokenBucket,
    to_micros,
)
from proxy.limits.memory import MemoryStore
from proxy.limits.redis import RedisStore, script_args
from proxy.limits.store import Limit, StorageUnavailable

PREFIX: Final = "tg-test:"
API_KEY_DIGEST: Final = hashlib.sha256(b"demo-secret-key").hexdigest()
IDENTITIES: Final = (f"k:{API_KEY_DIGEST}", "a:203.0.113.9", "c:partner-42")
KEY_RE: Final = re.compile(rf"{re.escape(PREFIX)}\{{([0-9a-f]{{16}})\}}:(.+)")
PTTL_SLACK_MS: Final = 250  # real time that may pass between a script and PTTL


def limit(algorithm: Algorithm, name: str) -> Limit:
    return Limit(name=name, algorithm=algorithm, key=f"t.{name}.{algorithm.short}")


FOUR: Final = [
    limit(TokenBucket(10, 2), "tb"),
    limit(SlidingWindow(5, 60), "sw"),
    limit(FixedWindow(5, 60), "fw"),
    limit(LeakyBucket(2, 3), "lb"),
]

StoreFactory = Callable[..., RedisStore]


@pytest.fixture
async def make_store(redis_server: RedisServer) -> AsyncIterator[StoreFactory]:
    """Factory of stores on the test's Redis (`url=`, `timeout=`, `clock=`), closed after."""
    stores: list[RedisStore] = []

    def make(*, url: str | None = None, timeout: float = 1.0, clock: FakeClock | None = None) -> RedisStore:
        storage = StorageConfig(backend="redis", url=url or redis_server.url, key_prefix=PREFIX, timeout=timeout)
        stores.append(RedisStore.from_config(storage, clock=clock))
        return stores[-1]

    yield make
    for store in stores:
        await store.close()


def scan(port: int) -> list[str]:
    cursor, keys = "0", []
    while True:
        reply = redis_command(port, "SCAN", cursor, "COUNT", "1000")
        assert isinstance(reply, list)
        cursor, batch = reply[0].decode(), reply[1]  # type: ignore[union-attr]
        keys += [key.decode() for key in batch]  # type: ignore[union-attr]
        if cursor == "0":
            return keys


def pttl(port: int, key: str) -> int:
    value = redis_command(port, "PTTL", key)
    assert isinstance(value, int)
    return value


def assert_pttl(port: int, key: str, seconds: float) -> None:
    """The key expires when its state is fresh: `seconds` from the script, not earlier."""
    expected = math.ceil(seconds * 1000)
    assert expected - PTTL_SLACK_MS < pttl(port, key) <= expected


async def test_key_layout(make_store: StoreFactory, redis_server: RedisServer, fake_clock: FakeClock) -> None:
    store = make_store(clock=fake_clock)
    now = to_micros(fake_clock())
    to_fresh: dict[str, float] = {}  # the algorithm's ttl: when the state is fresh again
    for identity in IDENTITIES:
        await store.acquire([identity] * len(FOUR), FOUR, 2)
        for lim in FOUR:
            state = lim.algorithm.check(None, now, 2)[1]
            to_fresh[store.key(identity, lim)] = lim.algorithm.ttl(state, now)
    keys = scan(redis_server.port)
    assert sorted(keys) == sorted(to_fresh)
    tags = set()
    for key in keys:
        match = KEY_RE.fullmatch(key)
        assert match, key
        tags.add(match[1])
        assert match[2] in {lim.key for lim in FOUR}
        for secret in (API_KEY_DIGEST[:16], API_KEY_DIGEST[-16:], "203.0.113.9", "partner-42"):
            assert secret not in key
        assert_pttl(redis_server.port, key, to_fresh[key])
    assert len(tags) == len(IDENTITIES)
    for identity in IDENTITIES:  # one slot per client: a Cluster can run the script
        assert len({key_slot(store.key(identity, lim).encode()) for lim in FOUR}) == 1


async def test_keys_expire_exactly_when_fresh(
    make_store: StoreFactory, redis_server: RedisServer, fake_clock: FakeClock
) -> None:
    store, port = make_store(clock=fake_clock), redis_server.port
    tb, sw, _, lb = FOUR
    key = {lim.name: store.key("a:203.0.113.9", lim) for lim in FOUR}
    await store.acquire(["a:203.0.113.9"] * len(FOUR), FOUR, 4)  # fixed window: t0 is 20 s into its minute
    assert_pttl(port, key["tb"], 2.0)  # 4 tokens at 2/s
    assert_pttl(port, key["sw"], 60.0)
    assert_pttl(port, key["fw"], 40.0)
    assert_pttl(port, key["lb"], 2.0)  # backlog 4 at 2/s
    fake_clock.advance(1.5)
    await store.acquire(["a:203.0.113.9"] * len([tb, sw, lb]), [tb, sw, lb], 1)
    assert_pttl(port, key["tb"], 1.0)  # 9 tokens, 1 used: 8, 2 short
    assert_pttl(port, key["sw"], 60.0)  # the newest entry's window
    assert_pttl(port, key["lb"], 1.0)  # 4 - 3 drained + 1
    before = {name: redis_command(port, "GET", k) for name, k in key.items()}
    refused = await store.acquire(["a:203.0.113.9"] * len(FOUR), FOUR, 1)  # sliding window is full
    assert [o.allowed for o in refused] == [True, False, True, True]
    assert {name: redis_command(port, "GET", k) for name, k in key.items()} == before
    assert pttl(port, key["tb"]) <= 1000  # a refusal extends nothing
    fake_clock.advance(1.0)  # the token bucket is exactly full again
    await store.acquire(["a:203.0.113.9"] * len([tb]), [tb], 0)  # fresh state is not kept
    assert redis_command(port, "EXISTS", key["tb"]) == 0


async def test_sliding_window_keeps_only_live_entries(
    make_store: StoreFactory, redis_server: RedisServer, fake_clock: FakeClock
) -> None:
    store, port = make_store(clock=fake_clock), redis_server.port
    window = [limit(SlidingWindow(100, 10), "sw")]
    key = store.key("c:log", window[0])
    await store.acquire(["c:log"] * len(window), window, 1)
    one_entry = redis_command(port, "STRLEN", key)
    assert isinstance(one_entry, int)
    for _ in range(40):  # one a second: 10 of them inside the window at the end
        fake_clock.advance(1)
        [outcome] = await store.acquire(["c:log"] * len(window), window, 1)
    assert outcome.remaining == 90
    now_length = redis_command(port, "STRLEN", key)
    assert isinstance(now_length, int) and now_length <= 10 * (one_entry + 4)


async def test_caller_timeout_leaves_no_stale_reply(make_store: StoreFactory, redis_server: RedisServer) -> None:
    """The limiter cancels a slow call (asyncio.timeout); the pool must not hand
    that call's late reply to the next one."""
    store = make_store()
    two = FOUR[:2]
    await store.acquire(["c:first"] * len(two), two, 1)
    redis_server.stop()
    try:
        for limits in (FOUR, two):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await store.acquire(["c:first"] * len(limits), limits, 1)
    finally:
        redis_server.cont()
    replies = await asyncio.gather(*(store.acquire(["c:second"] * len(two), two, 1) for _ in range(3)))
    assert sorted(o.remaining for [o, _] in replies) == [7, 8, 9]
    assert all(len(reply) == 2 for reply in replies)
    assert len(await store.peek(["c:first"] * len(FOUR), FOUR)) == 4


async def test_matches_memory_store_bit_for_bit(make_store: StoreFactory, fake_clock: FakeClock) -> None:
    """Random requests at awkward instants: every Outcome field must be == (no tolerance)."""
    rng = random.Random(20240607)
    algorithms: list[Algorithm] = [
        TokenBucket(7, 0.3),
        TokenBucket(100, 33.3),
        SlidingWindow(5, 2.5),
        SlidingWindow(4, 0.75),
        FixedWindow(4, 1.5),
        FixedWindow(10, 3600),
        LeakyBucket(0.7, 3),
        LeakyBucket(5, 0),
        LeakyBucket(1 / 3, 2),
    ]
    limits = [limit(alg, f"l{i}") for i, alg in enumerate(algorithms)]
    redis_store, memory = make_store(clock=fake_clock), MemoryStore(fake_clock)
    for step in range(600):
        fake_clock.advance(rng.choice([0, 1e-6, 0.1, 1 / 3, rng.uniform(0, 2), 0.75]))
        chosen = rng.sample(limits, rng.randint(1, 3))
        identity = rng.choice(IDENTITIES)
        if rng.random() < 0.15:
            got, want = await redis_store.peek([identity] * len(chosen), chosen), await memory.peek([identity] * len(chosen), chosen)
        else:
            cost = rng.randint(1, 3)
            got = await redis_store.acquire([identity] * len(chosen), chosen, cost)
            want = await memory.acquire([identity] * len(chosen), chosen, cost)
        assert (step, got) == (step, want)


async def test_numbers_at_the_ends_of_the_double_range_come_back_exact(
    make_store: StoreFactory, redis_server: RedisServer, fake_clock: FakeClock,
) -> None:
    """Numbers come back as integers (m, e) for m * 2**e: huge counts, tiny
    rates and long waits must still agree with the memory store to the bit,
    and a TTL past what Redis takes for PX keeps the key instead."""
    algorithms: list[Algorithm] = [
        TokenBucket(1e300, 3e-7),     # remaining ~1e300: far past any integer reply
        TokenBucket(3, 1e-300),       # reset and retry_after ~1e300 s
        TokenBucket(2**53 + 2, 0.1),  # remaining just past 2**53
        LeakyBucket(1e-9, 1e15),      # delays of 1e9 s and more
        SlidingWindow(1e15, 1e-6),
    ]
    limits = [limit(alg, f"x{i}") for i, alg in enumerate(algorithms)]
    redis_store, memory = make_store(clock=fake_clock), MemoryStore(fake_clock)
    for step in range(8):
        fake_clock.advance(step * 0.37)
        for one in limits:
            got = await redis_store.acquire([IDENTITIES[0]] * len([one]), [one], 2)
            want = await memory.acquire([IDENTITIES[0]] * len([one]), [one], 2)
            assert (step, one.name, got) == (step, one.name, want)
    assert (await redis_store.acquire([IDENTITIES[0]] * len(limits[:1]), limits[:1], 1))[0].remaining > 10**299
    assert pttl(redis_server.port, redis_store.key(IDENTITIES[0], limits[1])) == -1  # kept, no expiry
    assert pttl(redis_server.port, redis_store.key(IDENTITIES[0], limits[2])) > 0


async def test_killed_redis_fails_fast_then_recovers(make_store: StoreFactory, redis_server: RedisServer) -> None:
    store = make_store()
    masked = make_store(url=f"redis://:hunter2-pw@127.0.0.1:{redis_server.port}/0")
    assert (await store.acquire(["a:203.0.113.9"] * len(FOUR), FOUR, 1))[0].remaining == 9
    redis_server.kill()
    for call in (
        lambda: store.acquire(["a:203.0.113.9"] * len(FOUR), FOUR, 1),
        store.ping,
        lambda: masked.acquire(["a:203.0.113.9"] * len(FOUR), FOUR, 1),
    ):
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as failure:
            await call()
        assert time.monotonic() - started < 1.0
    assert f"127.0.0.1:{redis_server.port}" in str(failure.value)
    assert "***" in str(failure.value) and "hunter2" not in str(failure.value)
    redis_server.restart()  # empty, and its script cache too: NOSCRIPT reloads
    assert (await store.acquire(["a:203.0.113.9"] * len(FOUR), FOUR, 1))[0].remaining == 9
    await store.ping()


async def test_hung_redis_times_out_then_recovers(make_store: StoreFactory, redis_server: RedisServer) -> None:
    store = make_store(timeout=0.2)
    await store.warm()  # learns Redis's clock: decisions carry a deadline
    await store.acquire(["a:203.0.113.9"] * len(FOUR), FOUR, 1)
    redis_server.stop()
    try:
        for _ in range(2):  # a pooled connection, then a new one
            started = time.monotonic()
            with pytest.raises(StorageUnavailable, match="Timeout"):
                await store.acquire(["a:203.0.113.9"] * len(FOUR), FOUR, 1)
            assert time.monotonic() - started < 0.2 + 0.3
    finally:
        redis_server.cont()
    # The scripts sent before the client gave up run once Redis resumes, past
    # their deadline: they charge nothing.
    [bucket, *_] = await store.acquire(["a:203.0.113.9"] * len(FOUR), FOUR, 1)
    assert bucket.allowed and bucket.remaining == 8
    assert (await store.acquire(["c:after"] * len(FOUR), FOUR, 1))[0].remaining == 9


async def test_redis_errors_become_storage_unavailable(make_store: StoreFactory, redis_server: RedisServer) -> None:
    store = make_store()
    redis_command(redis_server.port, "HSET", store.key("a:203.0.113.9", FOUR[0]), "x", "1")
    with pytest.raises(StorageUnavailable, match="WRONGTYPE"):
        await store.acquire(["a:203.0.113.9"] * len(FOUR), FOUR, 1)
    redis_command(redis_server.port, "SCRIPT", "FLUSH")
    assert (await store.acquire(["c:other"] * len(FOUR), FOUR, 1))[0].remaining == 9


async def test_cluster_clients_on_every_node(redis_cluster: RedisCluster, fake_clock: FakeClock) -> None:
    storage = StorageConfig(backend="redis", url=redis_cluster.url, cluster=True, key_prefix=PREFIX, timeout=1.0)
    store, memory = RedisStore.from_config(storage, clock=fake_clock), MemoryStore(fake_clock)
    limits = [limit(TokenBucket(3, 1), "burst"), limit(FixedWindow(2, 60), "daily")]
    identities = [f"a:198.51.100.{n}" for n in range(12)]
    try:
        for _ in range(3):
            for identity in identities:
                got = await store.acquire([identity] * len(limits), limits, 1)
                assert got == await memory.acquire([identity] * len(limits), limits, 1)
        assert [o.allowed for o in got] == [True, False]
        for identity in identities:
            assert await store.peek([identity] * len(limits), limits) == await memory.peek([identity] * len(limits), limits)
            await store.reset([identity] * len(limits), limits)
            assert await store.peek([identity] * len(limits), limits) == [Outcome(True, 3, 0.0), Outcome(True, 2, 0.0)]
        await store.ping()
    finally:
        await store.close()
    slots = {key_slot(store.key(identity, limits[0]).encode()) for identity in identities}
    assert {slot * 3 // 16384 for slot in slots} == {0, 1, 2}  # all three nodes' ranges


async def test_concurrent_requests_admit_exactly_capacity(make_store: StoreFactory) -> None:
    store = make_store()  # the server's clock (TIME): refill over the test is ~0.001 tokens
    bucket = [limit(TokenBucket(100, 0.001), "tb")]
    outcomes = await asyncio.gather(*(store.acquire(["k:busy"] * len(bucket), bucket, 1) for _ in range(300)))
    allowed = [o for [o] in outcomes if o.allowed]
    assert len(allowed) == 100
    assert sorted(o.remaining for o in allowed) == list(range(100))
    assert all(o.retry_after > 0 for [o] in outcomes if not o.allowed)


async def test_packed_decisions_never_cross_clients_costs_modes_or_tiers(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the server's clock a decision's EVALSHA is packed once and sent again
    (RedisStore._evalsha); bytes reused for another client, cost, mode or a
    reloaded tier's limits would charge the wrong bucket by the wrong amount."""
    monkeypatch.setattr(redis_module, "MAX_COMMANDS", 3)  # starts over every few decisions
    store = make_store()  # no clock: Redis TIME, refill over the test ~0.001 tokens
    tier = [limit(TokenBucket(10, 0.001), "tb")]

    async def remaining(identity: str, limits: list[Limit], cost: int = 1) -> int:
        [outcome] = await store.acquire([identity] * len(limits), limits, cost)
        return outcome.remaining

    assert [await remaining("k:a", tier) for _ in range(3)] == [9, 8, 7]
    assert await remaining("k:a", tier, cost=3) == 4
    assert await remaining("k:b", tier) == 9
    assert [o.remaining for o in await store.peek(["k:a"] * len(tier), tier)] == [4]  # a peek charges nothing
    assert await remaining("k:a", tier) == 3
    assert len(store._commands) <= 3
    # A reload's new limits may get the id() of freed old ones: the bytes kept
    # under that id must not be sent for them.
    reloaded = [limit(TokenBucket(20, 0.001), "tb2")]
    store._commands[("acquire", "k:a", id(reloaded), 1)] = (tier, *store._pack_around_deadline("acquire", ["k:a"], tier, 1))
    assert await remaining("k:a", reloaded) == 19


async def test_password_and_database_from_the_url(tmp_path) -> None:
    """The decision pipe authenticates and selects the URL's database itself."""
    with RedisServer(tmp_path / "auth", password="s3cret") as server:
        good = RedisStore.from_config(StorageConfig(
            backend="redis", url=f"redis://:s3cret@127.0.0.1:{server.port}/3", key_prefix=PREFIX, timeout=1.0))
        try:
            [outcome] = await good.acquire(["a:203.0.113.9"] * len(FOUR[:1]), FOUR[:1], 2)
            assert outcome.remaining == 8
            keys = redis_command(server.port, "KEYS", "*", password="s3cret", db=3)
            assert keys == [good.key("a:203.0.113.9", FOUR[0]).encode()]
            assert redis_command(server.port, "DBSIZE", password="s3cret", db=0) == 0
        finally:
            await good.close()
        bad = RedisStore.from_config(StorageConfig(
            backend="redis", url=f"redis://:wrong-pw@127.0.0.1:{server.port}/0", key_prefix=PREFIX, timeout=1.0))
        try:
            with pytest.raises(StorageUnavailable) as failure:
                await bad.acquire(["a:203.0.113.9"] * len(FOUR[:1]), FOUR[:1], 1)
            assert "AUTH" in str(failure.value) and "wrong-pw" not in str(failure.value)
        finally:
            await bad.close()


async def test_requests_during_the_handshake_wait_for_auth(tmp_path) -> None:
    """Requests that arrive while the pipe is connected but still authenticating
    must not overtake its AUTH and SELECT: each would get NOAUTH or land in db 0."""
    with RedisServer(tmp_path / "burst", password="s3cret") as server:
        await _burst_during_the_handshake(server)


async def _burst_during_the_handshake(server: RedisServer) -> None:
    store = RedisStore.from_config(StorageConfig(
        backend="redis", url=f"redis://:s3cret@127.0.0.1:{server.port}/2", key_prefix=PREFIX, timeout=2.0))
    try:
        pipe = store._pipe
        assert pipe is not None
        # As after a reconnect: the script is cached, so nothing retries a command that went out too early.
        source = resources.files("proxy.limits").joinpath("lua/acquire.lua").read_text()
        redis_command(server.port, "SCRIPT", "LOAD", source, password="s3cret")
        first = asyncio.ensure_future(store.acquire(["a:198.51.100.0"] * len(FOUR[:1]), FOUR[:1], 1))
        for _ in range(10_000):  # loop turns, not time: until the TCP connection is up
            if pipe._transport is not None:
                break
            await asyncio.sleep(0)
        assert pipe._transport is not None and not first.done()  # connected, AUTH not yet answered
        burst = await asyncio.gather(*(store.acquire([f"a:198.51.100.{i}"] * len(FOUR[:1]), FOUR[:1], 1) for i in range(1, 40)))
        assert all(o.allowed and o.remaining == 9 for [o] in [await first, *burst])
        assert redis_command(server.port, "DBSIZE", password="s3cret", db=2) == 40
        assert redis_command(server.port, "DBSIZE", password="s3cret", db=0) == 0
    finally:
        await store.close()


@pytest.mark.parametrize(("argv", "error"), [
    (["acquire", "", "1", "", "0", "zz", "1", "1", "0"], "unknown algorithm zz"),
    (["acquire", "", "1", "", "0", "tb", "5", "1", "0", "qq", "1", "1", "0"], "unknown algorithm qq"),  # after a known one
    (["charge", "", "1", "", "0", "tb", "5", "1", "0"], "unknown mode charge"),
    (["acquire", "1000001", "1", "", "1000000", "tb", "5", "1", "0"], "^LATE 1000001$"),  # past its deadline
])
def test_the_script_names_what_it_cannot_run(redis_server: RedisServer, argv: list[str], error: str) -> None:
    source = resources.files("proxy.limits").joinpath("lua/acquire.lua").read_text()
    keys = ["t:{x}:a", "t:{x}:b"][: (len(argv) - 5) // 4]
    with pytest.raises(RedisReplyError, match=error):
        redis_command(redis_server.port, "EVAL", source, str(len(keys)), *keys, *argv)
    assert redis_command(redis_server.port, "EXISTS", *keys) == 0  # nothing written


@pytest.mark.parametrize("window", [2.5e-6, 0.0000035, 1.0000005, 86400.0])
def test_windows_reach_the_script_in_the_microseconds_the_memory_store_uses(window: float) -> None:
    """Both stores round a window the same way, ties included, so they agree on every instant."""
    for algorithm in (SlidingWindow(3, window), FixedWindow(3, window)):
        assert int(script_args(limit(algorithm, "w"))[2]) == algorithm._window_us == max(1, to_micros(window))
