"""The four rate-limit algorithms as pure functions of (state, now, cost).

Nothing here reads a clock or does I/O: a store passes `now` (integer
microseconds since the Unix epoch) and keeps the state this returns. Integer
microseconds keep differences of epoch times exact in a double, which is also
what the Redis Lua scripts compute with (Redis `TIME` is seconds + micros), so
both stores give the same answers at the same instants.

`ALGORITHMS` drives both config validation (each class's `PARAMS`) and
construction, so a new algorithm is added in exactly one place.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, NamedTuple

US: Final = 1_000_000
# Float slack for comparisons of token counts: refill = elapsed_us * rate / 1e6
# is exact for integer rates but not for rates like 0.1.
EPS: Final = 1e-9

State = Any  # each algorithm's own immutable state; None means "fresh"


def to_micros(seconds: float) -> int:
    """Whole microseconds, rounded to nearest: instants and windows alike, in
    both stores (int(), not round(): a third the cost)."""
    return int(seconds * US + 0.5)

new_tuple: Final = tuple.__new__  # NamedTuple construction without its Python-level __new__


class Outcome(NamedTuple):
    """One limit's answer: whether it allows, and what the headers report.

    A NamedTuple, not a frozen dataclass: several are made per request, and a
    tuple is built several times faster. The hot paths build it with
    `new_tuple(Outcome, (...))`: a NamedTuple's own __new__ is a Python
    function that costs twice as much (bench/README.md).
    """

    allowed: bool
    remaining: int  # cost-1 requests that would pass right after this decision
    reset: float  # seconds until the limit is fully available again
    retry_after: float = 0.0  # refused: seconds until this request could pass
    delay: float = 0.0  # leaky bucket: seconds to hold the request before it goes


@dataclass(frozen=True, slots=True)
class Param:
    """A parameter an algorithm reads from config: its kind and lower bound."""

    integer: bool
    minimum: float
    exclusive: bool  # minimum itself is not allowed

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        return f"must be {kind} {'>' if self.exclusive else '>='} {self.minimum:g}"


POSITIVE: Final = Param(integer=False, minimum=0, exclusive=True)
COUNT: Final = Param(integer=True, minimum=1, exclusive=False)
QUEUE: Final = Param(integer=True, minimum=0, exclusive=False)


def _floor(x: float) -> int:
    """Whole units, with the same slack as the allow checks (so `remaining` never
    says 1 while a request of cost 1 would be refused)."""
    return max(0, math.floor(x + EPS))


class Algorithm(ABC):
    """One configured limit's arithmetic; instances are immutable."""

    name: ClassVar[str]
    short: ClassVar[str]  # a stable code used in state keys and in the Lua scripts
    PARAMS: ClassVar[Mapping[str, Param]]

    @property
    @abstractmethod
    def capacity(self) -> int:
        """`q` of the policy header, and the bound a route's `cost` is checked against."""

    @property
    @abstractmethod
    def window(self) -> int:
        """`w` of the policy header: whole seconds, at least 1."""

    @abstractmethod
    def check(self, state: State, now: int, cost: int) -> tuple[Outcome, State]:
        """Decide; return the outcome and the state to keep if the request is charged."""

    @abstractmethod
    def peek(self, state: State, now: int) -> Outcome:
        """The limit's state now, charging nothing (for headers, the admin API)."""

    @abstractmethod
    def ttl(self, state: State, now: int) -> float:
        """Seconds until `state` is fresh again (<= 0: it may be dropped)."""

    def params(self) -> tuple[float, ...]:
        """The parameters in `PARAMS` order: what a limit's identity derives from."""
        return tuple(getattr(self, p) for p in self.PARAMS)


class TokenBucket(Algorithm):
    """`capacity` tokens, refilled continuously at `refill_rate` per second.

    State: (tokens, at_us), the token count at the instant `at_us`.
    """

    name = "token_bucket"
    short = "tb"
    PARAMS = {"capacity": COUNT, "refill_rate": POSITIVE}

    def __init__(self, capacity: int, refill_rate: float) -> None:
        self._capacity = capacity
        self._full = float(capacity)
        self.refill_rate = refill_rate

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def window(self) -> int:
        return max(1, math.ceil(self._capacity / self.refill_rate - EPS))

    def check(self, state: State, now: int, cost: int) -> tuple[Outcome, State]:
        """The refill rule lives here only (peek and ttl are a check of cost 0),
        written as one function: it runs once per request, and the two helper
        calls it used to make were half its time (timeit: 1.83 -> 0.91 us)."""
        full, rate = self._full, self.refill_rate
        if state is None:
            tokens = full
        else:
            tokens = state[0] + (now - state[1]) * rate / US
            if tokens > full:
                tokens = full
        if tokens + EPS >= cost:
            left = tokens - cost
            # left + EPS >= 0 here, so the floor is never negative
            return new_tuple(Outcome, (True, math.floor(left + EPS), (full - left) / rate, 0.0, 0.0)), (left, now)
        return Outcome(False, _floor(tokens), (full - tokens) / rate, (cost - tokens) / rate), state

    def peek(self, state: State, now: int) -> Outcome:
        current = self.check(state, now, 0)[0]
        return current._replace(allowed=current.remaining >= 1)

    def ttl(self, state: State, now: int) -> float:
        return self.check(state, now, 0)[0].reset


class _Window(Algorithm, ABC):
    """What both window algorithms share: `limit` requests per `window` seconds."""

    PARAMS = {"limit": COUNT, "window": POSITIVE}

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window_seconds = window
        self._window_us = max(1, to_micros(window))

    @property
    def capacity(self) -> int:
        return self.limit

    @property
    def window(self) -> int:
        return max(1, math.ceil(self.window_seconds - EPS))

    def params(self) -> tuple[float, ...]:
        return (self.limit, self.window_seconds)


class SlidingWindow(_Window):
    """Exact: no more than `limit` in any `window` seconds (a log of admissions).

    State: a tuple of (at_us, cost) pairs, oldest first; admissions at the same
    microsecond are merged so a burst costs one entry.
    """

    name = "sliding_window"
    short = "sw"

    def _live(self, state: State, now: int) -> tuple[tuple[int, int], ...]:
        if not state:
            return ()
        horizon = now - self._window_us
        return tuple(e for e in state if e[0] > horizon)

    def _reset(self, live: Sequence[tuple[int, int]], now: int) -> float:
        return (live[-1][0] + self._window_us - now) / US if live else 0.0

    def check(self, state: State, now: int, cost: int) -> tuple[Outcome, State]:
        live = self._live(state, now)
        used = sum(c for _, c in live)
        if used + cost <= self.limit:
            if live and live[-1][0] == now:
                kept = live[:-1] + ((now, live[-1][1] + cost),)
            else:
                kept = live + ((now, cost),)
            return Outcome(True, self.limit - used - cost, self._window_us / US), kept
        need, freed, retry_at = used + cost - self.limit, 0, now
        for at, c in live:
            freed += c
            retry_at = at + self._window_us
            if freed >= need:
                break
        outcome = Outcome(False, self.limit - used, self._reset(live, now), (retry_at - now) / US)
        return outcome, state

    def peek(self, state: State, now: int) -> Outcome:
        live = self._live(state, now)
        left = self.limit - sum(c for _, c in live)
        return Outcome(left >= 1, left, self._reset(live, now))

    def ttl(self, state: State, now: int) -> float:
        return self._reset(self._live(state, now), now)


class FixedWindow(_Window):
    """`limit` per window of `window` seconds aligned to the Unix epoch (UTC).

    State: (window_index, count). Alignment to the epoch makes a 86400 s window
    reset at midnight UTC on every instance.
    """

    name = "fixed_window"
    short = "fw"

    def _count(self, state: State, now: int) -> tuple[int, int, float]:
        index = now // self._window_us
        to_end = ((index + 1) * self._window_us - now) / US
        count = state[1] if state is not None and state[0] == index else 0
        return index, count, to_end

    def check(self, state: State, now: int, cost: int) -> tuple[Outcome, State]:
        index, count, to_end = self._count(state, now)
        if count + cost <= self.limit:
            return Outcome(True, self.limit - count - cost, to_end), (index, count + cost)
        reset = to_end if count else 0.0
        return Outcome(False, self.limit - count, reset, to_end), state

    def peek(self, state: State, now: int) -> Outcome:
        _, count, to_end = self._count(state, now)
        return Outcome(count < self.limit, self.limit - count, to_end if count else 0.0)

    def ttl(self, state: State, now: int) -> float:
        _, count, to_end = self._count(state, now)
        return to_end if count else 0.0


class LeakyBucket(Algorithm):
    """Requests leave at `rate` per second in arrival order; up to `queue` wait.

    State: (backlog, at_us): units admitted but not yet drained at `at_us`. A
    request goes once the backlog ahead of it has drained (`delay`); it is
    refused at once when the units already waiting plus its own exceed `queue`.
    Same model as nginx `limit_req` with `burst` and no `nodelay`.
    """

    name = "leaky_bucket"
    short = "lb"
    PARAMS = {"rate": POSITIVE, "queue": QUEUE}

    def __init__(self, rate: float, queue: int) -> None:
        self.rate = rate
        self.queue = queue

    @property
    def capacity(self) -> int:
        return self.queue

    @property
    def window(self) -> int:
        return max(1, math.ceil(self.queue / self.rate - EPS))

    def _backlog(self, state: State, now: int) -> float:
        if state is None:
            return 0.0
        backlog: float
        at: int
        backlog, at = state
        return max(0.0, backlog - (now - at) * self.rate / US)

    def _report(self, backlog: float) -> tuple[int, float]:
        waiting = max(0.0, backlog - 1)  # the unit leaving now holds no place
        return min(self.queue, _floor(self.queue - waiting)), waiting / self.rate

    def check(self, state: State, now: int, cost: int) -> tuple[Outcome, State]:
        backlog = self._backlog(state, now)
        if backlog > EPS and backlog - 1 + cost > self.queue + EPS:
            free, reset = self._report(backlog)
            retry = (backlog - (self.queue + 1 - cost)) / self.rate
            return Outcome(False, free, reset, retry), state
        free, reset = self._report(backlog + cost)
        return Outcome(True, free, reset, 0.0, backlog / self.rate), (backlog + cost, now)

    def peek(self, state: State, now: int) -> Outcome:
        backlog = self._backlog(state, now)
        free, reset = self._report(backlog)
        return Outcome(backlog <= EPS or backlog <= self.queue + EPS, free, reset)

    def ttl(self, state: State, now: int) -> float:
        return self._backlog(state, now) / self.rate


class Concurrency(Algorithm):
    """At most `max` requests in flight at once: a slot is taken when a request
    is allowed and given back (`release`) when its exchange ends.

    State: the number of slots held. Not a quota over time, so it has no
    window and is never shown in the RateLimit headers; a refusal asks the
    client to come back in a second.
    """

    name = "concurrency"
    short = "cc"
    PARAMS = {"max": COUNT}

    def __init__(self, max: int) -> None:
        self.max = max

    @property
    def capacity(self) -> int:
        return self.max

    @property
    def window(self) -> int:
        return 1

    def check(self, state: State, now: int, cost: int) -> tuple[Outcome, State]:
        held = state or 0
        if held < self.max:  # one slot per request, whatever its cost
            return Outcome(True, self.max - held - 1, 0.0), held + 1
        return Outcome(False, 0, 0.0, 1.0), state

    def peek(self, state: State, now: int) -> Outcome:
        held = state or 0
        return Outcome(held < self.max, self.max - held, 0.0)

    def ttl(self, state: State, now: int) -> float:
        return math.inf if state else 0.0  # a held slot lives until released

    @staticmethod
    def release(state: State) -> State:
        """The state after one slot is given back (None: none held)."""
        return state - 1 if state and state > 1 else None


class Ban(Algorithm):
    """A tier's penalty box (`tiers.<name>.penalty`), decided with the limits:
    refuses while the client is banned, for the seconds left.

    State: the instant the ban ends (integer microseconds). Not configurable
    as a limit (absent from `ALGORITHMS`) and never shown in the headers;
    `strike` is what sets the state. A check never changes it, so deciding
    costs no write.
    """

    name = "ban"
    short = "bn"
    PARAMS = {"seconds": POSITIVE}

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.seconds_us = max(1, to_micros(seconds))

    @property
    def capacity(self) -> int:
        return 1

    @property
    def window(self) -> int:
        return max(1, math.ceil(self.seconds - EPS))

    def check(self, state: State, now: int, cost: int) -> tuple[Outcome, State]:
        return self.peek(state, now), state

    def peek(self, state: State, now: int) -> Outcome:
        if state is not None and state > now:
            left = (state - now) / US
            return Outcome(False, 0, left, left)
        return Outcome(True, 1, 0.0)

    def ttl(self, state: State, now: int) -> float:
        return (state - now) / US if state is not None and state > now else 0.0


def strike(strikes: SlidingWindow, ban: Ban, counted: State, banned: State, now: int) -> tuple[State, State]:
    """One strike against a client: (strikes' new state, ban's new state).

    `strikes` counts them in a sliding window whose limit is `after - 1`, so
    the strike that reaches `after` is the one it refuses: that strike bans
    (ends at now + ban) and starts the count over. A strike while banned
    changes nothing: a ban lasts what Retry-After promised.
    """
    if banned is not None and banned > now:
        return counted, banned
    outcome, kept = strikes.check(counted, now, 1)
    if outcome.allowed:
        return kept, None
    return None, now + ban.seconds_us


ALGORITHMS: Final[Mapping[str, type[Algorithm]]] = {
    cls.name: cls for cls in (TokenBucket, SlidingWindow, FixedWindow, LeakyBucket, Concurrency)
}

def check_all(
    algorithms: Sequence[Algorithm], states: Sequence[State], now: int, cost: int,
    shadow: Sequence[bool] = (),
) -> tuple[list[Outcome], list[State] | None]:
    """All-or-nothing over a request's limits: new states only if every
    enforced limit allows.

    A refused request charges nothing anywhere, so a client hammering a
    `daily` limit cannot drain its `burst` limit and vice versa. A shadow
    limit (`shadow[i]` true) never refuses: it is charged, as if enforced,
    when the request passes and it allows; when it would refuse it keeps its
    state and its outcome says so, for the operator to count.
    """
    outcomes: list[Outcome] = []
    new_states: list[State] = []
    allowed = True
    for i, (algorithm, state) in enumerate(zip(algorithms, states)):
        outcome, new_state = algorithm.check(state, now, cost)
        outcomes.append(outcome)
        new_states.append(new_state)
        if not outcome.allowed and not (shadow and shadow[i]):
            allowed = False
    if allowed:
        return outcomes, new_states  # a refusing shadow limit's new_state is its old one
    # Nothing is charged: the limits that would have allowed report as they stand.
    uncharged = [
        o if not o.allowed else a.peek(s, now)._replace(allowed=True)
        for a, s, o in zip(algorithms, states, outcomes)
    ]
    return uncharged, None
