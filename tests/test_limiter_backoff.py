"""The limiter's back-off while the store is down: per failed probe, not per request.

A store whose calls the test answers one by one (a gate), and an injected clock,
so every step is exact: no sleeping and no real Redis needed for the policy
itself (tests/test_redis_store.py covers a real Redis that dies and hangs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Hashable, Sequence

import pytest
from helpers import FakeClock

from proxy.config import from_text
from proxy.limiter import BACKOFF_MAX, BACKOFF_START, Limiter
from proxy.limits.algorithms import Outcome
from proxy.limits.store import Limit, StorageUnavailable, Store

TIER = from_text("tiers: {anonymous: {limits: [{algorithm: token_bucket, capacity: 10, refill_rate: 1}]}}"
                 ).tiers["anonymous"]
ANSWER = [Outcome(True, 9, 1.0, 0.0, 0.0)]


class GatedStore(Store):
    """Each acquire waits until the test fails or answers it."""

    backend = "gated"

    def __init__(self) -> None:
        self.waiting: list[asyncio.Future[list[Outcome]]] = []

    async def acquire(self, subjects: Sequence[str], limits: Sequence[Limit], cost: int,
                      timeout: float | None = None, ticket: str = "") -> list[Outcome]:
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        return await future

    async def peek(self, subjects: Sequence[str], limits: Sequence[Limit]) -> list[Outcome]:
        raise NotImplementedError

    async def reset(self, subjects: Sequence[str], limits: Sequence[Limit]) -> None:
        raise NotImplementedError

    async def release(self, subjects: Sequence[str], limits: Sequence[Limit], ticket: str) -> None:
        raise NotImplementedError

    def fail_all(self) -> None:
        for future in self.waiting:
            future.set_exception(StorageUnavailable("stalled"))
        self.waiting.clear()

    def answer_all(self) -> None:
        for future in self.waiting:
            future.set_result(ANSWER)
        self.waiting.clear()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_burst_of_failed_requests_backs_off_once(fake_clock: FakeClock) -> None:
    """100 requests in flight when the store stalls: the store is probed again
    after 0.5 s, not after 5 s (one doubling per failed request, before)."""
    store = GatedStore()
    limiter = Limiter(store, on_error="deny", clock=fake_clock)
    in_flight = [asyncio.ensure_future(limiter.decide(TIER.limit_set, ("a",), 1)) for _ in range(100)]
    await settle()
    store.fail_all()
    verdicts = [verdict for verdict, _ in await asyncio.gather(*in_flight)]
    assert all(v.unavailable for v in verdicts)
    assert limiter.health.retry_at - fake_clock() == BACKOFF_START
    fake_clock.advance(BACKOFF_START - 0.001)
    assert limiter.decide_now(TIER.limit_set, ("a",), 1)[0].unavailable  # still backing off: no store call
    fake_clock.advance(0.001)
    probe = asyncio.ensure_future(limiter.decide(TIER.limit_set, ("a",), 1))
    await settle()
    assert limiter.decide_now(TIER.limit_set, ("a",), 1)[0].unavailable  # one probe at a time
    assert len(store.waiting) == 1
    store.answer_all()
    verdict, _ = await probe
    assert verdict.allowed and limiter.health.healthy
    assert limiter.decide_now(TIER.limit_set, ("a",), 1) is None  # healthy: back to the store


async def test_each_failed_probe_doubles_up_to_the_cap(fake_clock: FakeClock) -> None:
    store = GatedStore()
    limiter = Limiter(store, on_error="allow", clock=fake_clock)
    first = asyncio.ensure_future(limiter.decide(TIER.limit_set, ("a",), 1))
    await settle()
    store.fail_all()
    await first
    waits = []
    for _ in range(6):
        wait = limiter.health.retry_at - fake_clock()
        waits.append(wait)
        fake_clock.advance(wait)
        probe = asyncio.ensure_future(limiter.decide(TIER.limit_set, ("a",), 1))
        await settle()
        store.fail_all()
        verdict, _ = await probe
        assert verdict.allowed and verdict.degraded
    assert waits == [0.5, 1.0, 2.0, 4.0, BACKOFF_MAX, BACKOFF_MAX]


async def test_a_cancelled_probe_lets_the_next_request_probe(fake_clock: FakeClock) -> None:
    store = GatedStore()
    limiter = Limiter(store, on_error="deny", clock=fake_clock)
    first = asyncio.ensure_future(limiter.decide(TIER.limit_set, ("a",), 1))
    await settle()
    store.fail_all()
    await first
    fake_clock.advance(BACKOFF_START)
    probe = asyncio.ensure_future(limiter.decide(TIER.limit_set, ("a",), 1))
    await settle()
    probe.cancel()  # the client went away mid-probe
    await settle()
    assert limiter.decide_now(TIER.limit_set, ("a",), 1) is None  # the next request probes


class TwoShardStore(GatedStore):
    """Clients "a…" live on shard "A", the others on "B"; `serving` is the layout."""

    sharded = True

    def __init__(self) -> None:
        super().__init__()
        self.serving = {"A", "B"}

    def shard_of(self, subject: str) -> Hashable:
        return "A" if subject.startswith("a") else "B"

    def shards(self) -> Collection[Hashable]:
        return self.serving


async def test_a_failed_shard_backs_off_alone(fake_clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    store = TwoShardStore()
    limiter = Limiter(store, on_error="deny", clock=fake_clock)
    first = asyncio.ensure_future(limiter.decide(TIER.limit_set, ("a1",), 1))
    await settle()
    store.fail_all()
    assert (await first)[0].unavailable
    assert limiter.decide_now(TIER.limit_set, ("a2",), 1)[0].unavailable  # shard A backs off
    assert limiter.decide_now(TIER.limit_set, ("b1",), 1) is None  # shard B is asked as ever
    assert list(limiter.failed_shards()) == ["A"] and limiter.ready and not limiter.healthy
    assert not limiter.healthy_for("a3") and limiter.healthy_for("b3")
    other = asyncio.ensure_future(limiter.decide(TIER.limit_set, ("b1",), 1))
    await settle()
    store.answer_all()
    assert (await other)[0].allowed
    fake_clock.advance(BACKOFF_START)
    probe = asyncio.ensure_future(limiter.decide(TIER.limit_set, ("a2",), 1))
    await settle()
    store.answer_all()
    assert (await probe)[0].allowed and limiter.healthy
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unavailable (node A)" in m for m in messages) == 1
    assert sum("(node A) is back" in m for m in messages) == 1


async def test_a_shard_that_left_is_forgotten(fake_clock: FakeClock) -> None:
    """A failed-over node serves no slot any more: nothing would probe it again."""
    store = TwoShardStore()
    limiter = Limiter(store, on_error="deny", clock=fake_clock)
    calls = [asyncio.ensure_future(limiter.decide(TIER.limit_set, (c,), 1)) for c in ("a1", "b1")]
    await settle()
    store.fail_all()
    await asyncio.gather(*calls)
    assert set(limiter.failed_shards()) == {"A", "B"} and not limiter.ready  # deny, and nothing serves
    store.serving = {"B", "C"}  # A's slots moved to its replica C
    assert list(limiter.failed_shards()) == ["B"] and limiter.ready  # C serves A's clients
