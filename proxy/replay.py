"""POST /api/whatif: the recorded requests (proxy.whatif) replayed through a
candidate config, on a private MemoryStore whose clock is each request's
recorded time, in the order they came.

It runs on the event loop in slices of at most SLICE seconds (`steps`
yields between them), and touches nothing live. A worker thread was tried
first and measured: the proxy's thread then waits for the GIL after every
system call, and its throughput fell from 7.7k to 0.46k requests/s with a
p99 of 307 ms during a replay (bench/README.md); slices bound what a request
waits to one slice per loop iteration it needs.

What the record cannot know is decided here and said in the answer:
- a selector of the candidate that the live config did not select was not
  recorded: those requests are replayed as lacking the value (they share one
  state, as requests lacking a header do) and the answer lists it in
  `unrecorded_selectors`;
- how long a request took was not recorded: concurrency limits see each
  request end before the next arrives (they refuse only what a single
  request would exceed);
- addresses were found with the live config's trusted proxies;
- a request the candidate does not attribute (an unknown key under
  `unknown_key: reject`, no key under `require_key`, no `anonymous` tier) is
  refused (401); one on an exempt route or of an unlimited tier is allowed.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from .config import Config, LimitSet, Route, Tier
from .limits.memory import MemoryStore
from .selectors import CLIENT, GLOBAL, GLOBAL_SUBJECT, MISSING, NAMED
from .whatif import Chunk, Span, value_digest

TOP_CLIENTS: Final = 50
SLICE: Final = 0.0005  # seconds of replay between two yields to the loop
PAUSE: Final = 0.0005  # seconds the loop has to itself after each slice: the replay takes at most half
CHECK_EVERY: Final = 32  # records between two looks at the time (32 take ~0.1 ms)
NO_ROUTE: Final = Route(path="/")
MISSING_VALUE: Final = value_digest(MISSING)
Counts = list[int]  # requests, allowed_then, refused_then, allowed_candidate, refused_candidate


class Replay:
    """One candidate's replay: drive `steps` to the end once, then `answer`."""

    def __init__(self, candidate: Config) -> None:
        self.candidate = candidate
        self.now = 0.0
        self.store = MemoryStore(lambda: self.now)
        self.tiers: dict[str, Counts] = {}
        self.clients: dict[tuple[str, str], Counts] = {}
        self.unrecorded: set[str] = set()
        self.first: float | None = None
        self.last: float | None = None
        self._routes: dict[tuple[str, str], Route] = {}
        self._who: dict[tuple[str | None, str], tuple[Tier, str] | None] = {}
        self._wanted = sorted({s for lim in candidate.all_limits() for s in lim.per if s.partition(":")[0] in NAMED})

    def steps(self, spans: Sequence[Span]) -> Iterator[None]:
        """Replay `spans` in order; yields whenever SLICE seconds have passed since the last yield."""
        timer = time.perf_counter
        deadline = timer() + SLICE
        for chunk, start, stop in spans:
            for slice_start in range(start, stop, CHECK_EVERY):
                self._replay(chunk, slice_start, min(stop, slice_start + CHECK_EVERY))
                if timer() >= deadline:
                    yield
                    deadline = timer() + SLICE

    def _replay(self, chunk: Chunk, start: int, end: int) -> None:
        names = chunk.plan.names
        index = chunk.plan.index
        if start == 0 or self.first is None:  # once a chunk (a chunk has one plan)
            self.unrecorded.update(s for s in self._wanted if s not in index)
        times, allowed, methods, paths = chunk.times, chunk.allowed, chunk.methods, chunk.paths
        costs, digests, addresses, words = chunk.costs, chunk.digests, chunk.addresses, chunk.words
        client_then = chunk.plan.client_then
        for i in range(start, end):
            self.now = times[i]
            recorded = chunk.selected(i) if names else ()
            digest, address = words[digests[i]] or None, words[addresses[i]]
            ok = self._decide(words[methods[i]], words[paths[i]], costs[i], digest, address, recorded, index)
            self._count(client_then(digest, address), bool(allowed[i]), ok)
        if self.first is None:
            self.first = times[start]
        self.last = times[end - 1]

    def _decide(self, method: str, path: str, cost: int, digest: str | None, address: str,
                recorded: tuple[bytes, ...], index: dict[str, int]) -> bool:
        """Would the candidate let this request through?"""
        route = self._routes.get((method, path))
        if route is None:
            route = self._routes[method, path] = self.candidate.route_table.match(method, path) or NO_ROUTE
        if route.exempt:
            return True
        key = (digest, address)
        if key in self._who:
            who = self._who[key]
        else:
            who = self._who[key] = self._identify(digest, address)
        if who is None:
            return False
        tier, identity = who
        if tier.unlimited:
            return True
        limit_set = self.candidate.limit_set(tier, route)
        subjects = self._subjects(limit_set, identity, method, route.path, address, recorded, index)
        store = self.store
        outcomes = store.acquire_now(subjects, limit_set.limits, cost)
        limits = limit_set.limits
        if any(not o.allowed and not limits[n].shadow for n, o in enumerate(outcomes)):
            return False
        if limit_set.concurrent:  # the request ends before the next one arrives
            store.release_now([subjects[n] for n in limit_set.concurrent],
                              [limits[n] for n in limit_set.concurrent])
        return True

    def _identify(self, digest: str | None, address: str) -> tuple[Tier, str] | None:
        """proxy.identity.resolve's rules, over what was recorded."""
        candidate = self.candidate
        clients = candidate.clients
        if digest is not None:
            entry = candidate.api_keys.get(digest)
            if entry is not None:
                return candidate.tiers[entry.tier], "k:" + digest[:32]
            if clients.unknown_key == "reject":
                return None
        elif clients.require_key:
            return None
        tier = candidate.tiers.get("anonymous")
        return None if tier is None else (tier, "a:" + address)

    @staticmethod
    def _subjects(limit_set: LimitSet, identity: str, method: str, route: str, address: str,
                  recorded: tuple[bytes, ...], index: dict[str, int]) -> tuple[str, ...]:
        if limit_set.per_client:
            return (identity,) * len(limit_set.limits)
        out = []
        for limit in limit_set.limits:
            per = limit.per
            if per == CLIENT:
                out.append(identity)
            elif per == GLOBAL:
                out.append(GLOBAL_SUBJECT)
            else:
                plain = {"client": identity, "address": address, "method": method, "route": route}
                parts = [plain[s] if s in plain else (recorded[index[s]] if s in index else MISSING_VALUE)
                         for s in per]
                out.append("s:" + hashlib.sha256(repr(parts).encode()).hexdigest()[:32])
        return tuple(out)

    def _count(self, then: tuple[str, str], allowed_then: bool, allowed_now: bool) -> None:
        row = self.tiers.get(then[1])
        if row is None:
            row = self.tiers[then[1]] = [0, 0, 0, 0, 0]
        client = self.clients.get(then)
        if client is None:
            client = self.clients[then] = [0, 0, 0, 0, 0]
        for counts in (row, client):
            counts[0] += 1
            counts[2 - allowed_then] += 1
            counts[4 - allowed_now] += 1

    def answer(self, now: float) -> dict[str, Any]:
        """SPEC's shape: per tier then, and the 50 clients whose allowed count changes most."""
        def four(c: Counts) -> dict[str, int]:
            return {"allowed_then": c[1], "refused_then": c[2], "allowed_candidate": c[3], "refused_candidate": c[4]}

        affected = sorted(self.clients.items(), key=lambda kv: (-abs(kv[1][1] - kv[1][3]), -kv[1][0], kv[0]))
        return {
            "from": rfc3339(now if self.first is None else self.first),
            "to": rfc3339(now if self.last is None else self.last),
            "requests": sum(c[0] for c in self.tiers.values()),
            "tiers": {name: {"requests": c[0], **four(c)} for name, c in sorted(self.tiers.items())},
            "clients": [{"id": cid, "tier": tier, **four(c)} for (cid, tier), c in affected[:TOP_CLIENTS]],
            "unrecorded_selectors": sorted(self.unrecorded),
        }


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def replay(spans: Sequence[Span], candidate: Config, now: float) -> dict[str, Any]:
    """The answer of POST /api/whatif for a snapshot of the record, computed between other work."""
    run = Replay(candidate)
    for _ in run.steps(spans):
        await asyncio.sleep(PAUSE)
    return run.answer(now)
