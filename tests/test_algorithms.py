"""One behaviour table for every store: the same steps, the same exact answers.

Each algorithm gets a list of steps (advance the fake clock, ask with a cost,
expect allowed / remaining / retry_after / reset / delay), chosen at the
instants where off-by-one mistakes live: exactly empty, exactly refilled, a
window edge (fixed windows are aligned to multiples of the window since the
epoch; a sliding-window entry stops counting exactly at t + window), costs
above 1 and a long idle. The table runs on the memory store and on a real
Redis (the Lua port) with the same injected clock, so the two can never drift
apart silently. Integers compare with ==; float seconds with a 1e-6 tolerance.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
from helpers import FakeClock

from proxy.limits.algorithms import (
    Algorithm,
    FixedWindow,
    LeakyBucket,
    Outcome,
    SlidingWindow,
    TokenBucket,
)
from proxy.limits.store import Limit, Store

CLIENT = "a:192.0.2.7"


class Step(NamedTuple):
    """Advance the clock by `advance` s, ask for `cost`, expect the rest."""

    advance: float
    cost: int
    allowed: bool
    remaining: int
    retry_after: float
    reset: float
    delay: float = 0.0


# capacity 10, 2 tokens/s: 5 s from empty to full
TOKEN_BUCKET = [
    Step(0, 1, True, 9, 0, 0.5),  # fresh: full
    Step(0, 9, True, 0, 0, 5.0),  # exactly empty
    Step(0, 1, False, 0, 0.5, 5.0),
    Step(0.25, 1, False, 0, 0.25, 4.75),  # half a token
    Step(0.25, 1, True, 0, 0, 5.0),  # exactly one token refilled
    Step(1.0, 3, False, 2, 0.5, 4.0),  # cost 3 with 2 tokens: charges nothing
    Step(0.5, 3, True, 0, 0, 5.0),
    Step(100, 1, True, 9, 0, 0.5),  # long idle: capped at capacity
    Step(4.5, 10, True, 0, 0, 5.0),  # exactly full again, all at once
    Step(0, 1, False, 0, 0.5, 5.0),
]

# 3 per 10 s, exact
SLIDING_WINDOW = [
    Step(0, 1, True, 2, 0, 10.0),  # t0
    Step(2, 1, True, 1, 0, 10.0),  # t0+2
    Step(0, 1, True, 0, 0, 10.0),  # t0+2 again: merged into one entry of cost 2
    Step(1, 1, False, 0, 7.0, 9.0),  # t0+3: the t0 entry frees at t0+10
    Step(6.5, 1, False, 0, 0.5, 2.5),  # t0+9.5: still inside
    Step(0.5, 1, True, 0, 0, 10.0),  # t0+10: the t0 entry no longer counts
    Step(0, 2, False, 0, 2.0, 10.0),  # cost 2 needs the (t0+2, 2) entry gone
    Step(2, 2, True, 0, 0, 10.0),  # t0+12: exactly then
    Step(1000, 3, True, 0, 0, 10.0),  # long idle: empty log
    Step(0, 1, False, 0, 10.0, 10.0),
]

# 3 per 60 s windows aligned to the epoch: t0 = 1_700_000_000 is 20 s into one
FIXED_WINDOW = [
    Step(0, 1, True, 2, 0, 40.0),
    Step(39.5, 2, True, 0, 0, 0.5),
    Step(0.25, 1, False, 0, 0.25, 0.25),
    Step(0.25, 1, True, 2, 0, 60.0),  # t0+40: exactly the next window
    Step(30, 3, False, 2, 30.0, 30.0),  # 1 + 3 > 3: charges nothing
    Step(0, 2, True, 0, 0, 30.0),
    Step(1000, 1, True, 2, 0, 50.0),  # t0+1070: 10 s into its window
]

# 2 per second leave, up to 3 units wait
LEAKY_BUCKET = [
    Step(0, 1, True, 3, 0, 0.0, delay=0.0),  # empty: goes at once, holds no place
    Step(0, 1, True, 2, 0, 0.5, delay=0.5),
    Step(0, 2, True, 0, 0, 1.5, delay=1.0),  # 3 units waiting: queue full
    Step(0, 1, False, 0, 0.5, 1.5),
    Step(0.5, 1, True, 0, 0, 1.5, delay=1.5),  # one unit drained: exactly room
    Step(0.25, 2, False, 0, 0.75, 1.25),
    Step(100, 3, True, 1, 0, 1.0, delay=0.0),  # long idle: empty again
    Step(0.5, 1, True, 1, 0, 1.0, delay=1.0),
]

# Rates like 0.1 make token counts land one ulp short of a whole number; EPS
# and the slack in `_floor` must count them as whole (capacity 3, 0.1/s).
TOKEN_BUCKET_TENTHS = [
    Step(0, 3, True, 0, 0, 30.0),
    Step(3, 1, False, 0, 7.0, 27.0),
    Step(11, 1, True, 0, 0, 26.0),  # 1.4 tokens: 0.3999999999999999 left
    Step(6, 2, False, 1, 10.0, 20.0),  # 0.9999999999999999 tokens: remaining 1
    Step(0, 1, True, 0, 0, 30.0),  # ... and a request of 1 passes
]

# 0.2 per second leave, up to 2 units wait: a backlog of 2.0000000000000004 is 2
LEAKY_BUCKET_FIFTHS = [
    Step(0, 1, True, 2, 0, 0.0, delay=0.0),
    Step(2, 1, True, 1, 0, 3.0, delay=3.0),
    Step(1, 1, True, 0, 0, 7.0, delay=7.0),
    Step(2, 1, True, 0, 0, 10.0, delay=10.0),  # exactly a full queue
    Step(0, 1, False, 0, 5.0, 10.0),
]

TABLES: dict[str, tuple[Algorithm, list[Step]]] = {
    "token_bucket": (TokenBucket(10, 2), TOKEN_BUCKET),
    "token_bucket_tenths": (TokenBucket(3, 0.1), TOKEN_BUCKET_TENTHS),
    "leaky_bucket_fifths": (LeakyBucket(0.2, 2), LEAKY_BUCKET_FIFTHS),
    "sliding_window": (SlidingWindow(3, 10), SLIDING_WINDOW),
    "fixed_window": (FixedWindow(3, 60), FIXED_WINDOW),
    "leaky_bucket": (LeakyBucket(2, 3), LEAKY_BUCKET),
}


def limit(algorithm: Algorithm, name: str = "only") -> Limit:
    return Limit(name=name, algorithm=algorithm, key=f"test.{name}.{algorithm.short}")


class Row(NamedTuple):
    """What a step expects (or what a store answered), as one comparable row."""

    allowed: object
    remaining: object
    retry_after: object
    reset: object
    delay: object


def seen(outcome: Outcome) -> Row:
    return Row(outcome.allowed, outcome.remaining, outcome.retry_after, outcome.reset, outcome.delay)


def expected(step: Step) -> Row:
    def approx(seconds: float) -> object:
        return pytest.approx(seconds, abs=1e-6)

    return Row(step.allowed, step.remaining, approx(step.retry_after), approx(step.reset), approx(step.delay))


PEEKED = ["token_bucket", "sliding_window", "fixed_window", "leaky_bucket"]


@pytest.mark.parametrize("table", list(TABLES))
async def test_behaviour_table(store: Store, fake_clock: FakeClock, table: str) -> None:
    algorithm, steps = TABLES[table]
    limits = [limit(algorithm)]
    for number, step in enumerate(steps):
        fake_clock.advance(step.advance)
        [outcome] = await store.acquire([CLIENT] * len(limits), limits, step.cost)
        assert (number, seen(outcome)) == (number, expected(step))


async def test_all_or_nothing(store: Store, fake_clock: FakeClock) -> None:
    """A refusal by one limit charges no limit, whichever order they come in."""
    burst, daily = limit(TokenBucket(5, 1), "burst"), limit(FixedWindow(2, 60), "daily")
    for limits in ([burst, daily], [daily, burst]):
        first = await store.acquire([CLIENT] * len([burst, daily]), [burst, daily], 1)
        assert [(o.allowed, o.remaining) for o in first] == [(True, 4), (True, 1)]
        await store.acquire([CLIENT] * len([burst, daily]), [burst, daily], 1)
        for _ in range(3):
            outcomes = await store.acquire([CLIENT] * len(limits), limits, 1)
            by_name = dict(zip((lim.name for lim in limits), outcomes))
            assert by_name["daily"] == Outcome(False, 0, 40.0, 40.0)
            # burst would allow, so it reports its uncharged state: 3 tokens
            assert by_name["burst"] == Outcome(True, 3, 2.0)
        fake_clock.advance(60)  # a new daily window, burst full again


async def test_peek_charges_nothing(store: Store, fake_clock: FakeClock) -> None:
    limits = [limit(TABLES[name][0], name) for name in PEEKED]
    assert await store.peek([CLIENT] * len(limits), limits) == [
        Outcome(True, 10, 0.0),
        Outcome(True, 3, 0.0),
        Outcome(True, 3, 0.0),
        Outcome(True, 3, 0.0),
    ]
    await store.acquire([CLIENT] * len(limits), limits, 3)
    fake_clock.advance(0.5)
    expected_now = [
        Outcome(True, 8, 1.0),  # 7 + 1 refilled
        Outcome(False, 0, 9.5),
        Outcome(False, 0, 39.5),
        Outcome(True, 2, 0.5),  # 3 - 1 drained = 2: one leaving, one waiting
    ]
    assert await store.peek([CLIENT] * len(limits), limits) == expected_now
    assert await store.peek([CLIENT] * len(limits), limits) == expected_now


async def test_reset_starts_full_and_touches_only_that_client(store: Store, fake_clock: FakeClock) -> None:
    limits = [limit(TokenBucket(2, 1))]
    for client in (CLIENT, "a:192.0.2.8"):
        await store.acquire([client] * len(limits), limits, 2)
    await store.reset([CLIENT] * len(limits), limits)
    assert await store.peek([CLIENT] * len(limits), limits) == [Outcome(True, 2, 0.0)]
    assert await store.peek(["a:192.0.2.8"] * len(limits), limits) == [Outcome(False, 0, 2.0)]
