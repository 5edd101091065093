"""In-process store: the default, nothing to install, exact for one instance.

Each limit has its own dict of client -> state. A request's limits are checked
and charged with no await in between, which makes the step atomic on the
event loop. A sweep drops state that is fresh again, so memory follows the
clients active recently, not every client ever seen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from .algorithms import US, Ban, Concurrency, Outcome, SlidingWindow, State, check_all, strike, to_micros
from .store import Clock, Limit, Store, wall_clock

SWEEP_CHUNK = 5_000  # entries examined between yields to the event loop


class MemoryStore(Store):
    backend = "memory"

    def __init__(self, clock: Clock = wall_clock) -> None:
        self._clock = clock
        self._tables: dict[str, dict[str, State]] = {}

    @property
    def clock(self) -> Clock:
        """The time its decisions are made at (proxy.whatif records requests on it)."""
        return self._clock

    def _table(self, limit: Limit) -> dict[str, State]:
        table = self._tables.get(limit.key)
        if table is None:
            table = self._tables[limit.key] = {}
        return table

    def acquire_now(self, subjects: Sequence[str], limits: Sequence[Limit], cost: int) -> list[Outcome]:
        """`acquire` without the coroutine, for callers already on the loop."""
        # to_micros, inlined: the call was 0.3-0.5k of the limiter's 21.8k instructions (bench/instructions.py)
        now = int(self._clock() * US + 0.5)
        tables = self._tables
        if len(limits) == 1 and not limits[0].shadow:  # the common tier; check_all over one limit is exactly this
            limit, subject = limits[0], subjects[0]
            table = tables.get(limit.key) or self._table(limit)
            outcome, state = limit.algorithm.check(table.get(subject), now, cost)
            if outcome.allowed:
                table[subject] = state
            return [outcome]
        states = []
        for limit, subject in zip(limits, subjects):
            found = tables.get(limit.key)
            states.append(None if found is None else found.get(subject))
        outcomes, new_states = check_all([limit.algorithm for limit in limits], states, now, cost,
                                         [limit.shadow for limit in limits])
        if new_states is not None:
            for limit, subject, state in zip(limits, subjects, new_states):
                if state is not None:
                    self._table(limit)[subject] = state
        return outcomes

    async def acquire(self, subjects: Sequence[str], limits: Sequence[Limit], cost: int,
                      timeout: float | None = None, ticket: str = "") -> list[Outcome]:
        return self.acquire_now(subjects, limits, cost)

    async def peek(self, subjects: Sequence[str], limits: Sequence[Limit]) -> list[Outcome]:
        now = to_micros(self._clock())
        return [
            limit.algorithm.peek(self._tables.get(limit.key, {}).get(subject), now)
            for limit, subject in zip(limits, subjects)
        ]

    async def reset(self, subjects: Sequence[str], limits: Sequence[Limit]) -> None:
        for limit, subject in zip(limits, subjects):
            self._tables.get(limit.key, {}).pop(subject, None)

    def release_now(self, subjects: Sequence[str], limits: Sequence[Limit]) -> None:
        """Give back one slot of each concurrency limit (no ticket: a slot is a count here)."""
        for limit, subject in zip(limits, subjects):
            table = self._tables.get(limit.key)
            if table is not None and limit.concurrent:
                left = Concurrency.release(table.get(subject))
                if left is None:
                    table.pop(subject, None)
                else:
                    table[subject] = left

    async def release(self, subjects: Sequence[str], limits: Sequence[Limit], ticket: str) -> None:
        self.release_now(subjects, limits)

    def strike_now(self, subject: str, strikes: Limit, ban: Limit) -> float | None:
        """`strike` without the coroutine: the end of the ban it starts (epoch seconds), or None."""
        assert isinstance(strikes.algorithm, SlidingWindow) and isinstance(ban.algorithm, Ban)
        now = to_micros(self._clock())
        counted_table, ban_table = self._table(strikes), self._table(ban)
        banned = ban_table.get(subject)
        counted, new_ban = strike(strikes.algorithm, ban.algorithm, counted_table.get(subject), banned, now)
        if counted is None:
            counted_table.pop(subject, None)
        else:
            counted_table[subject] = counted
        if new_ban is None or new_ban == banned:
            return None
        ban_table[subject] = new_ban
        return float(new_ban / US)

    async def strike(self, subject: str, strikes: Limit, ban: Limit) -> float | None:
        return self.strike_now(subject, strikes, ban)

    def now(self) -> float:
        return self._clock()

    def in_flight(self, limit: Limit) -> int:
        """Slots held now in a concurrency limit, over all its subjects."""
        return sum(self._tables.get(limit.key, {}).values())

    def clients(self) -> int:
        """How many (client, limit) states are held: what memory follows."""
        return sum(len(t) for t in self._tables.values())

    def retain(self, live_keys: set[str]) -> None:
        """Drop whole tables of limits no longer configured (after a reload)."""
        for key in [k for k in self._tables if k not in live_keys]:
            del self._tables[key]

    async def sweep(self, limits: Sequence[Limit]) -> int:
        """Drop every state that is fresh again; yields to the loop between chunks."""
        dropped = 0
        by_key = {limit.key: limit for limit in limits}
        for key, table in list(self._tables.items()):
            limit = by_key.get(key)
            if limit is None:
                continue
            identities = list(table)
            before = len(identities)
            for start in range(0, len(identities), SWEEP_CHUNK):
                now = to_micros(self._clock())
                for identity in identities[start : start + SWEEP_CHUNK]:
                    state = table.get(identity)
                    if state is not None and limit.algorithm.ttl(state, now) <= 0:
                        del table[identity]
                        dropped += 1
                await asyncio.sleep(0)
            if len(table) < before // 2:
                # dicts never shrink on delete: copy to give the memory back
                self._tables[key] = dict(table)
        return dropped
