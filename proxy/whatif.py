"""The what-if record: the limited requests of the last `whatif.minutes`,
kept compact enough that a million of them fit in well under 100 MB.

One call per limited request (`Recorder.record`) appends to parallel arrays
in chunks of CHUNK requests: a float, a byte and a few pointers to shared
strings per request, where a dataclass or a tuple per request would cost
three times as much. What a config alone determines (a key's name and tier,
the selector names) is kept once per chunk (`Plan`), not per request.

Nothing raw that identifies a caller is kept: a key as its SHA-256 (what a
candidate's `api_keys` are keyed by), selected header, query and cookie
values as 16 bytes of their SHA-256, which is all a replay needs: requests
with equal values share a state, whatever the values are.
"""

from __future__ import annotations

import bisect
import hashlib
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .bounded import keep
from .config import Config, hash_key
from .identity import request_address
from .selectors import NAMED, Facts

if TYPE_CHECKING:
    from aiohttp import web

    from .identity import Client
    from .limits.store import Clock
    from .routes import Route

CHUNK: Final = 4096  # requests per chunk: the unit the record drops by age
VALUE_BYTES: Final = 16  # of a selector value's SHA-256: collisions are beyond reach
PATHS_KEPT: Final = 65_536  # distinct paths shared between records (bounded: proxy.bounded)


@dataclass(frozen=True, slots=True, eq=False)
class Plan:
    """What the record needs of one live config, built once per config."""

    config: Config
    names: tuple[str, ...]  # the named selectors (header:, query:, cookie:, claim:) its limits use
    digest_of: dict[str, str]  # a key's identity ("k:...") -> its full digest
    keys: dict[str, tuple[str, str]]  # digest -> (the key's name, its tier): the client then

    @classmethod
    def of(cls, config: Config) -> Plan:
        names = sorted({s for limit in config.all_limits() for s in limit.per if s.partition(":")[0] in NAMED})
        keys = config.api_keys.values()
        return cls(config, tuple(names), {"k:" + k.digest[:32]: k.digest for k in keys},
                   {k.digest: (k.name, k.tier) for k in keys})

    def client_then(self, digest: str | None, address: str) -> tuple[str, str]:
        """(id, tier) the live config gave a recorded request."""
        if digest is not None:
            found = self.keys.get(digest)
            if found is not None:
                return found
        return address, "anonymous"


class Chunk:
    """Up to CHUNK recorded requests, field by field, all under one Plan."""

    __slots__ = ("addresses", "allowed", "costs", "digests", "methods", "paths", "plan", "times", "values")

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.times = array("d")  # the store's clock, seconds since the epoch
        self.allowed = bytearray()  # 1: allowed then, 0: refused (429, or 503 under on_error: deny)
        self.methods: list[str] = []
        self.paths: list[str] = []  # the path routes match (normalized, no query)
        self.costs = array("L")
        self.digests: list[str | None] = []  # the API key's SHA-256 hex, None without a key
        self.addresses: list[str] = []  # the client address (IPv6: its prefix), by the live trust rules
        self.values: list[tuple[bytes, ...]] = []  # per plan.names, hashed; empty when it names none


Span = tuple[Chunk, int, int]
"""A snapshot's part of one chunk: [start, end). Chunks only grow, so a
snapshot needs no copy: what is appended after it lies beyond `end`."""


def value_digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()[:VALUE_BYTES]


class Recorder:
    """The bounded record; `record` is on the proxy's hot path, `snapshot` feeds proxy.replay."""

    def __init__(self, config: Config, clock: Clock) -> None:
        self.clock = clock
        self._plan = Plan.of(config)
        self._chunks: deque[Chunk] = deque([Chunk(self._plan)])
        self._head = 0  # records before this index of the first chunk are dropped
        self._count = 0
        self._paths: dict[str, str] = {}
        self._methods: dict[str, str] = {}

    def __len__(self) -> int:
        return self._count

    def record(self, config: Config, request: web.BaseRequest, client: Client, route: Route, path: str,
               allowed: bool) -> None:
        """Remember one limited request and the decision it got."""
        plan = self._plan
        if config is not plan.config:
            plan = self._replan(config)
        if not config.whatif.max_requests:
            return
        chunk = self._chunks[-1]
        if len(chunk.times) >= CHUNK:
            chunk = self._next_chunk(plan)
        identity = client.identity
        if identity[:2] == "k:":
            digest: str | None = plan.digest_of[identity]
            address = request_address(config, request.headers, request.remote)
        else:  # anonymous; an unknown key it carried is kept too: a candidate may know it
            key = request.headers.get(config.clients.api_key_header)
            digest, address = (hash_key(key) if key else None), client.id
        chunk.times.append(self.clock())
        chunk.allowed.append(allowed)
        method = request.method
        chunk.methods.append(self._methods.get(method) or keep(self._methods, method, method, 64))
        chunk.paths.append(self._paths.get(path) or keep(self._paths, path, path, PATHS_KEPT))
        chunk.costs.append(route.cost)
        chunk.digests.append(digest)
        chunk.addresses.append(address)
        if plan.names:
            facts = Facts(request, identity, route.path, address)
            chunk.values.append(tuple(value_digest(facts.value(name)) for name in plan.names))
        self._count += 1
        if self._count > config.whatif.max_requests:
            self._drop_oldest()

    def _replan(self, config: Config) -> Plan:
        """A reload: later records follow the new config's selectors, in a chunk of their own."""
        self._plan = plan = Plan.of(config)
        if self._chunks[-1].times:
            self._next_chunk(plan)
        else:
            self._chunks[-1].plan = plan
        while self._count > config.whatif.max_requests:
            self._drop_oldest()
        return plan

    def _next_chunk(self, plan: Plan) -> Chunk:
        """Start a chunk, and drop the chunks older than `whatif.minutes` while at it."""
        cutoff = self.clock() - plan.config.whatif.minutes * 60
        chunks = self._chunks
        while len(chunks) > 1 and chunks[0].times[-1] < cutoff:
            self._count -= len(chunks[0].times) - self._head
            chunks.popleft()
            self._head = 0
        chunk = Chunk(plan)
        chunks.append(chunk)
        return chunk

    def _drop_oldest(self) -> None:
        self._count -= 1
        self._head += 1
        chunks = self._chunks
        if self._head >= len(chunks[0].times) and len(chunks) > 1:
            chunks.popleft()
            self._head = 0

    def snapshot(self) -> list[Span]:
        """The records of the last `whatif.minutes`, oldest first, as they are now."""
        cutoff = self.clock() - self._plan.config.whatif.minutes * 60
        spans = []
        for n, chunk in enumerate(self._chunks):
            start, end = (self._head if n == 0 else 0), len(chunk.times)
            start = max(start, bisect.bisect_left(chunk.times, cutoff, start, end))
            if start < end:
                spans.append((chunk, start, end))
        return spans

    def clear(self) -> None:
        """Forget everything recorded (tests, benchmarks)."""
        self._chunks = deque([Chunk(self._plan)])
        self._head = self._count = 0


def total(spans: Sequence[Span]) -> int:
    return sum(end - start for _, start, end in spans)
