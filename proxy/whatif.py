"""The what-if record: the limited requests of the last `whatif.minutes`,
kept compact enough that a million of them fit in well under 100 MB.

One call per limited request (`Recorder.record`) appends to parallel arrays
in chunks of CHUNK requests: a float, a byte and a few pointers to shared
strings per request, where a dataclass or a tuple per request would cost
several times as much. What a config alone determines (a key's name and tier,
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

from .config import Config, hash_key
from .identity import request_address
from .selectors import NAMED, Facts

if TYPE_CHECKING:
    from aiohttp import web

    from .identity import Client
    from .limits.store import Clock
    from .routes import Route

CHUNK: Final = 65_536  # requests per chunk: the unit the record drops by age
VALUE_BYTES: Final = 16  # of a selector value's SHA-256: collisions are beyond reach


@dataclass(frozen=True, slots=True, eq=False)
class Plan:
    """What the record needs of one live config, built once per config."""

    config: Config
    names: tuple[str, ...]  # the named selectors (header:, query:, cookie:, claim:) its limits use
    digest_of: dict[str, str]  # a key's identity ("k:...") -> its full digest
    keys: dict[str, tuple[str, str]]  # digest -> (the key's name, its tier): the client then
    index: dict[str, int]  # a name's place in `names`
    peer_is_address: bool  # no trusted proxies: an IPv4 peer is the client's address as it is

    @classmethod
    def of(cls, config: Config) -> Plan:
        names = sorted({s for limit in config.all_limits() for s in limit.per if s.partition(":")[0] in NAMED})
        keys = config.api_keys.values()
        return cls(config, tuple(names), {"k:" + k.digest[:32]: k.digest for k in keys},
                   {k.digest: (k.name, k.tier) for k in keys}, {name: i for i, name in enumerate(names)},
                   not config.clients.trusted_proxies)

    def client_then(self, digest: str | None, address: str) -> tuple[str, str]:
        """(id, tier) the live config gave a recorded request."""
        if digest is not None:
            found = self.keys.get(digest)
            if found is not None:
                return found
        return address, "anonymous"


class Chunk:
    """Up to CHUNK recorded requests, field by field, all under one Plan.

    Strings (method, path, key digest, address) are kept once per chunk in
    `words` and per request as their 4-byte index: 29 bytes a request and
    no object of its own, so the garbage collector, which walks every list
    element on each full collection, never walks the record's requests (a
    list per field added 20-50 ms to each full collection at a million).
    A chunk is large so that a client's strings are kept once for many of
    its requests.
    """

    __slots__ = ("addresses", "allowed", "costs", "digests", "index", "methods", "paths", "plan", "times",
                 "values", "words")

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.words: list[str] = [""]  # 0, "": no key (a digest is never empty)
        self.index: dict[str, int] = {"": 0}
        self.times = array("d")  # the store's clock, seconds since the epoch
        self.allowed = bytearray()  # 1: allowed then, 0: refused (429, or 503 under on_error: deny)
        self.costs = array("L")
        self.methods = array("I")
        self.paths = array("I")  # the path routes match (normalized, no query)
        self.digests = array("I")  # the API key's SHA-256 hex, 0 ("") without a key
        self.addresses = array("I")  # the client address (IPv6: its prefix), by the live trust rules
        self.values = bytearray()  # VALUE_BYTES per plan.names entry per request: the selected values, hashed

    def word(self, text: str) -> int:
        n = self.index.get(text)
        if n is None:
            n = self.index[text] = len(self.words)
            self.words.append(text)
        return n

    def selected(self, i: int) -> tuple[bytes, ...]:
        """Request i's hashed values of plan.names."""
        width = len(self.plan.names)
        row = bytes(self.values[i * width * VALUE_BYTES:(i + 1) * width * VALUE_BYTES])
        return tuple(row[k:k + VALUE_BYTES] for k in range(0, len(row), VALUE_BYTES))


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
            digest = plan.digest_of[identity]
            peer = request.remote
            if plan.peer_is_address and peer and ":" not in peer:
                address = peer  # what request_address finds, unparsed: 3.2 -> 0.7 us a keyed record
            else:
                address = request_address(config, request.headers, peer)
        else:  # anonymous; an unknown key it carried is kept too: a candidate may know it
            key = request.headers.get(config.clients.api_key_header)
            digest, address = (hash_key(key) if key else ""), client.id
        word = chunk.word
        chunk.times.append(self.clock())
        chunk.allowed.append(allowed)
        chunk.costs.append(route.cost)
        chunk.methods.append(word(request.method))
        chunk.paths.append(word(path))
        chunk.digests.append(word(digest))
        chunk.addresses.append(word(address))
        if plan.names:
            facts = Facts(request, identity, route.path, address)
            for name in plan.names:
                chunk.values += value_digest(facts.value(name))
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
