"""Limits on anything (SPEC round 2): selectors, route limits, concurrency and
shadow limits, as one all-or-nothing decision on both stores.

The store rows run on the memory store and on acquire.lua in a real
redis-server, on one fake clock, so both give the same answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from helpers import FakeClock

from proxy.config import ConfigError, StorageConfig, from_text
from proxy.limits.algorithms import Concurrency, FixedWindow, LeakyBucket, Outcome, SlidingWindow, TokenBucket
from proxy.limits.redis import RedisStore, _slot
from proxy.limits.store import Limit, Store
from proxy.routes import Route
from proxy.selectors import MISSING, hashed, parse

ALICE, BOB = "k:alice", "k:bob"


def limit(algorithm: object, name: str, *, per: tuple[str, ...] = ("client",), shadow: bool = False,
          lease: float | None = None) -> Limit:
    return Limit(name=name, algorithm=algorithm, key=f"t.{name}", per=per, shadow=shadow,  # type: ignore[arg-type]
                 lease=lease)


async def test_a_route_limit_refusal_charges_the_tier_limit_nothing(store: Store) -> None:
    """A client's tier limit and a global route limit: two subjects, one decision."""
    burst = limit(TokenBucket(5, 0.001), "burst")
    shared = limit(FixedWindow(2, 60), "export", per=("global",))
    both = [burst, shared]
    assert [o.allowed for o in await store.acquire([ALICE, "global"], both, 1)] == [True, True]
    assert [o.allowed for o in await store.acquire([BOB, "global"], both, 1)] == [True, True]
    for _ in range(3):  # the global window is spent: everybody is refused, and no burst token goes
        refused = await store.acquire([ALICE, "global"], both, 1)
        assert [o.allowed for o in refused] == [True, False]
        assert refused[0].remaining == 4  # the uncharged state: 5 - the one admitted request
    assert [o.remaining for o in await store.peek([ALICE, BOB], [burst, burst])] == [4, 4]


async def test_a_shadow_limit_never_refuses_and_is_charged_only_when_it_allows(store: Store) -> None:
    enforced = limit(TokenBucket(10, 0.001), "burst")
    trial = limit(FixedWindow(2, 60), "trial", shadow=True)
    both = [enforced, trial]
    answers = [await store.acquire([ALICE, ALICE], both, 1) for _ in range(4)]
    assert [[o.allowed for o in a] for a in answers] == [[True, True], [True, True], [True, False], [True, False]]
    assert [a[0].remaining for a in answers] == [9, 8, 7, 6]  # every request passed and was charged
    assert [o.remaining for o in await store.peek([ALICE], [trial])] == [0]  # 2, not 4: refusals are not counted


async def test_an_enforced_refusal_charges_no_shadow_limit(store: Store) -> None:
    enforced = limit(FixedWindow(1, 60), "strict")
    trial = limit(FixedWindow(5, 60), "trial", shadow=True)
    await store.acquire([ALICE, ALICE], [enforced, trial], 1)
    refused = await store.acquire([ALICE, ALICE], [enforced, trial], 1)
    assert [o.allowed for o in refused] == [False, True]
    assert [o.remaining for o in await store.peek([ALICE], [trial])] == [4]


async def test_concurrency_slots_are_taken_and_given_back(store: Store) -> None:
    inflight = limit(Concurrency(2), "inflight", lease=30)
    assert (await store.acquire([ALICE], [inflight], 1, ticket="t1"))[0] == Outcome(True, 1, 0.0)
    assert (await store.acquire([ALICE], [inflight], 1, ticket="t2"))[0] == Outcome(True, 0, 0.0)
    assert (await store.acquire([ALICE], [inflight], 1, ticket="t3"))[0] == Outcome(False, 0, 0.0, 1.0)
    assert (await store.acquire([BOB], [inflight], 1, ticket="t4"))[0].allowed  # per client
    await store.release([ALICE], [inflight], "t1")
    assert (await store.acquire([ALICE], [inflight], 1, ticket="t5"))[0] == Outcome(True, 0, 0.0)
    assert (await store.peek([ALICE], [inflight]))[0] == Outcome(False, 0, 0.0)


async def test_a_concurrency_refusal_elsewhere_takes_no_slot(store: Store) -> None:
    inflight = limit(Concurrency(1), "inflight", lease=30)
    window = limit(FixedWindow(1, 60), "window")
    both = [inflight, window]
    assert [o.allowed for o in await store.acquire([ALICE, ALICE], both, 1, ticket="a")] == [True, True]
    await store.release([ALICE], [inflight], "a")
    assert [o.allowed for o in await store.acquire([ALICE, ALICE], both, 1, ticket="b")] == [True, False]
    assert (await store.peek([ALICE], [inflight]))[0].remaining == 1  # the refused request holds nothing


async def test_redis_slots_of_a_dead_instance_end_with_their_lease(redis_server: object, fake_clock: FakeClock) -> None:
    """A ticket never released (its instance died) stops counting once its lease is over."""
    storage = StorageConfig(backend="redis", url=redis_server.url, timeout=1.0)  # type: ignore[attr-defined]
    store = RedisStore.from_config(storage, clock=fake_clock)
    try:
        inflight = limit(Concurrency(1), "inflight", lease=10)
        assert (await store.acquire([ALICE], [inflight], 1, ticket="dead:1"))[0].allowed
        fake_clock.advance(9.9)
        assert not (await store.acquire([ALICE], [inflight], 1, ticket="live:1"))[0].allowed
        await store.renew([ALICE], [inflight], "dead:1")  # a renewal keeps it 10 s more
        fake_clock.advance(9.9)
        assert not (await store.acquire([ALICE], [inflight], 1, ticket="live:2"))[0].allowed
        fake_clock.advance(0.2)
        assert (await store.acquire([ALICE], [inflight], 1, ticket="live:3"))[0].allowed
        await store.renew([ALICE], [inflight], "dead:1")  # a lease that ended is not brought back
        assert (await store.peek([ALICE], [inflight]))[0].remaining == 0
        await store.release([ALICE], [inflight], "live:3")
        assert (await store.peek([ALICE], [inflight]))[0].remaining == 1
    finally:
        await store.close()


# --- selectors ----------------------------------------------------------------


@pytest.mark.parametrize(("per", "expected"), [
    ("client", ("client",)),
    (["address", "method"], ("address", "method")),
    ("header:X-Tenant-Id", ("header:x-tenant-id",)),
    (["query:page", "cookie:session", "claim:org"], ("query:page", "cookie:session", "claim:org")),
])
def test_selectors_parse(per: object, expected: tuple[str, ...]) -> None:
    assert parse(per) == (expected, None)


def test_subjects_hash_every_value_but_the_client_identity() -> None:
    secret = "tenant-secret-42"
    subject = hashed([secret])
    assert secret not in subject and subject.startswith("s:") and len(subject) == 34
    assert hashed([MISSING]) != hashed([""])  # a missing header is not an empty one
    assert hashed(["ab", "c"]) != hashed(["a", "bc"])  # values are joined with a separator


@pytest.mark.parametrize(("limit_yaml", "error"), [
    ("{algorithm: fixed_window, limit: 5, window: 60, per: tenant}",
     "tiers.free.limits[0].per: must be one of client, address, global, method, route, header:<Name>, "
     "query:<name>, cookie:<name>, claim:<name>, or a list of them, got \"tenant\""),
    ("{algorithm: fixed_window, limit: 5, window: 60, per: [client, client]}",
     "tiers.free.limits[0].per: names the same selector twice, got [\"client\", \"client\"]"),
    ("{algorithm: fixed_window, limit: 5, window: 60, per: []}",
     "tiers.free.limits[0].per: must be a selector or a non-empty list of selectors, got []"),
    ("{algorithm: concurrency, max: 0}", "tiers.free.limits[0].max: must be an integer >= 1, got 0"),
    ("{algorithm: concurrency, max: 2, lease: -1}", "tiers.free.limits[0].lease: must be a number > 0, got -1"),
    ("{algorithm: token_bucket, capacity: 5, refill_rate: 1, lease: 3}",
     "tiers.free.limits[0].lease: unknown key for token_bucket (known: name, algorithm, per, shadow, capacity, "
     "refill_rate)"),
    ("{algorithm: fixed_window, limit: 5, window: 60, shadow: yes-please}",
     "tiers.free.limits[0].shadow: must be true or false, got \"yes-please\""),
])
def test_limit_options_errors_name_the_key_path(limit_yaml: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_text(f"tiers:\n  anonymous: {{unlimited: true}}\n  free:\n    limits:\n      - {limit_yaml}\n")
    assert error in caught.value.errors


@pytest.mark.parametrize(("route_yaml", "error"), [
    ("{path: /login, limits: [{name: burst, algorithm: fixed_window, limit: 5, window: 60}]}",
     "routes[0].limits[0].name: is already the name of a limit of tiers.anonymous; name the route's limit apart, "
     "got \"burst\""),
    ("{path: /health, exempt: true, limits: [{algorithm: fixed_window, limit: 5, window: 60}]}",
     "routes[0].limits: an exempt route is never limited"),
    ("{path: /ws, messages: [{algorithm: leaky_bucket, rate: 1, queue: 1}]}",
     "routes[0].messages[0].algorithm: must be one of token_bucket, sliding_window, fixed_window, got \"leaky_bucket\""),
    ("{path: /x, cost: 9, limits: [{name: small, algorithm: fixed_window, limit: 5, window: 60}]}",
     "routes[0].cost: exceeds the capacity 5 of this route limit \"small\": such requests could never pass, got 9"),
    ("{path: /x, limits: []}", "routes[0].limits: must be a non-empty list of limits, got []"),
])
def test_route_limit_errors_name_the_key_path(route_yaml: str, error: str) -> None:
    text = ("tiers:\n  anonymous:\n    limits: [{name: burst, algorithm: token_bucket, capacity: 10, refill_rate: 1}]\n"
            f"routes:\n  - {route_yaml}\n")
    with pytest.raises(ConfigError) as caught:
        from_text(text)
    assert error in caught.value.errors


def test_a_limit_counting_the_client_keeps_its_state_key_and_a_new_per_starts_fresh() -> None:
    base = "tiers:\n  anonymous:\n    limits: [{name: day, algorithm: fixed_window, limit: 5, window: 60%s}]\n"
    plain = from_text(base % "").tiers["anonymous"].limits[0]
    explicit = from_text(base % ", per: client").tiers["anonymous"].limits[0]
    shadowed = from_text(base % ", shadow: true").tiers["anonymous"].limits[0]
    by_address = from_text(base % ", per: address").tiers["anonymous"].limits[0]
    assert plain.key == explicit.key == shadowed.key  # turning a shadow limit on keeps what it counted
    assert by_address.key != plain.key


def test_the_lease_defaults_to_the_upstream_timeout_plus_five() -> None:
    config = from_text("upstream: {timeout: 12}\ntiers:\n  anonymous:\n    limits:\n"
                       "      - {algorithm: concurrency, max: 4}\n      - {algorithm: concurrency, max: 2, lease: 3}\n")
    assert [limit.lease for limit in config.tiers["anonymous"].limits] == [17, 3]


def test_limit_sets_put_the_tier_first_and_show_only_enforced_quotas() -> None:
    config = from_text("""
tiers:
  anonymous:
    limits:
      - {name: burst, algorithm: token_bucket, capacity: 20, refill_rate: 2}
      - {name: inflight, algorithm: concurrency, max: 4}
      - {name: trial, algorithm: sliding_window, limit: 50, window: 60, shadow: true}
routes:
  - path: /login
    methods: [POST]
    limits:
      - {name: login, algorithm: sliding_window, limit: 5, window: 60, per: address}
""")
    tier, route = config.tiers["anonymous"], config.routes[0]
    limit_set = config.limit_set(tier, route)
    assert [limit.name for limit in limit_set.limits] == ["burst", "inflight", "trial", "login"]
    assert limit_set.policy_header == '"burst";q=20;w=10, "login";q=5;w=60'
    assert limit_set.concurrent == (1,) and limit_set.shadow and not limit_set.per_client
    assert config.route_table.match("GET", "/login") is None  # POST only: a GET has the tier's limits alone
    assert config.limit_set(tier, Route("/")) is tier.limit_set


# --- Redis Cluster: one decision over several slots ------------------------------


@pytest.fixture
async def cluster_store(redis_cluster: object, fake_clock: FakeClock) -> AsyncIterator[RedisStore]:
    storage = StorageConfig(backend="redis", url=redis_cluster.url, cluster=True, timeout=2.0)  # type: ignore[attr-defined]
    store = RedisStore.from_config(storage, clock=fake_clock)
    await store.warm()
    yield store
    await store.close()


def _subject_before(other: str) -> str:
    """A client subject whose slot sorts before `other`'s: its slot is charged first."""
    return next(f"k:c{n}" for n in range(10_000) if _slot(f"k:c{n}") < _slot(other))


@pytest.mark.parametrize("algorithm", [
    TokenBucket(5, 0.001), SlidingWindow(5, 60), FixedWindow(5, 60), LeakyBucket(0.001, 5), Concurrency(5),
], ids=lambda a: a.name)
async def test_a_refusal_in_another_slot_refunds_what_this_slot_charged(
        cluster_store: RedisStore, fake_clock: FakeClock, algorithm: object) -> None:
    """The client's slot is charged first, then the global limit's slot
    refuses: the refund leaves the client's state exactly as it was."""
    client = _subject_before("global")
    mine = limit(algorithm, "mine", lease=60)
    shared = limit(FixedWindow(1, 60), "shared", per=("global",))
    both = [mine, shared]
    assert [o.allowed for o in await cluster_store.acquire([client, "global"], both, 1, ticket="t1")] == [True, True]
    before = await cluster_store.peek([client], [mine])
    fake_clock.advance(0.001)
    refused = await cluster_store.acquire([client, "global"], both, 1, ticket="t2")
    assert [o.allowed for o in refused] == [True, False]
    fake_clock.advance(0.001)
    after = await cluster_store.peek([client], [mine])
    assert (after[0].allowed, after[0].remaining) == (before[0].allowed, before[0].remaining)
    assert refused[0].remaining == after[0].remaining


async def test_cluster_decisions_across_slots_stay_exact_for_many_clients(
        cluster_store: RedisStore, fake_clock: FakeClock) -> None:
    """Ten clients, a tier limit each and one global route limit of 12 on
    three masters: exactly 12 pass, and each client's own limit is charged
    only for the requests that passed."""
    burst = limit(TokenBucket(3, 0.001), "burst")
    shared = limit(FixedWindow(12, 60), "shared", per=("global",))
    passed: dict[str, int] = {}
    for _ in range(3):
        for n in range(10):
            client = f"k:client{n}"
            outcomes = await cluster_store.acquire([client, "global"], [burst, shared], 1)
            if all(o.allowed for o in outcomes):
                passed[client] = passed.get(client, 0) + 1
    assert sum(passed.values()) == 12
    for n in range(10):
        client = f"k:client{n}"
        [state] = await cluster_store.peek([client], [burst])
        assert state.remaining == 3 - passed.get(client, 0)
