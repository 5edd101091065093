"""Redis store: any number of proxy instances share every client's limits exactly.

Each decision is one Lua script (lua/acquire.lua) that reads the state of all
of a request's limits, decides with the arithmetic of `algorithms.py`, and
writes only if every limit allows: atomic without WATCH/MULTI round trips. The
script reads the Redis server's clock (`TIME`), so instances with skewed
clocks still agree; tests inject a clock instead and get exact answers.

Keys are `{prefix}{<16 hex of sha256(subject)>}:<limit key>`. The raw
subject (a client's identity, or proxy.selectors' hash of other values)
never appears in Redis, and the hash tag puts all the limits of one subject
in one Cluster slot, which a multi-key script requires. Every key expires
when its state is fresh again, so Redis memory follows recent traffic.

This module only stores: any Redis failure becomes `StorageUnavailable`, and
`proxy.limiter` decides what a request gets then (`storage.on_error`) and
when to try again. That is why redis-py's own retries are off here.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Awaitable, Callable, Collection, Coroutine, Hashable, Sequence
from importlib import resources
from math import ldexp
from typing import Any, Final, TypeVar
from urllib.parse import unquote, urlsplit

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError, ResponseError, SlotNotCoveredError

from ..bounded import keep
from ..config import StorageConfig, mask_url
from .algorithms import (
    Ban,
    Concurrency,
    FixedWindow,
    LeakyBucket,
    Outcome,
    SlidingWindow,
    TokenBucket,
    new_tuple,
    to_micros,
)
from .deadline import NO_DEADLINE, ServerClock, deadline_us
from .redis_pipe import RedisPipe
from .store import WHOLE, Clock, Limit, StorageUnavailable, Store

# Commands in flight at once; also each pool's size, so the pool never runs out
# (redis-py raises rather than waits when it does). Enough to pipeline a busy
# instance's decisions over a LAN round trip.
MAX_CONNECTIONS: Final = 64
HASH_CHARS: Final = 16
FIELDS: Final = 9  # per limit in the script's reply: allowed, then (m, e) of remaining, reset, retry, delay
# Everything redis-py raises for a server that is down, hung, loading, or a
# cluster that is reconfiguring (RedisClusterException is not a RedisError).
REDIS_ERRORS: Final = (RedisError, RedisClusterException, OSError)

RedisClient = Redis | RedisCluster
WARM_CONNECTIONS: Final = 16
MAX_COMMANDS: Final = 4096  # packed decisions kept, about 0.5 kB each
DEFAULT_LEASE: Final = 35.0  # seconds; config sets each concurrency limit's (upstream.timeout + 5)
T = TypeVar("T")


class RedisStore(Store):
    """State in Redis, one atomic script per decision; see the module docstring."""

    backend = "redis"

    def __init__(self, client: RedisClient, *, url: str, key_prefix: str, clock: Clock | None = None,
                 timeout: float | None = None) -> None:
        self._client = client
        self._url = url
        self._prefix = key_prefix
        self._clock = clock
        self._script = client.register_script(_script_source())
        self._in_flight = asyncio.Semaphore(MAX_CONNECTIONS)
        # Decisions go through one pipelined connection (redis_pipe); a Cluster's
        # keys live on many nodes, so there each decision is its own redis-py call.
        self._timeout = timeout  # a call's bound when its caller names none
        self._pipe = None if isinstance(client, RedisCluster) else RedisPipe(
            url, connect_timeout=timeout or 1.0, describe=mask_url(url))
        self.sharded = self._pipe is None
        self._limit_args: dict[int, tuple[Sequence[Limit], list[str]]] = {}
        self._commands: dict[tuple[Any, ...], tuple[Sequence[Limit], bytes, bytes]] = {}
        self._server_clock = ServerClock(self._server_time)

    @classmethod
    def from_config(cls, storage: StorageConfig, *, clock: Clock | None = None) -> RedisStore:
        """A store for `storage.url`; nothing connects until the first call.

        `clock` None reads Redis `TIME` (production: one clock for every
        instance); a clock passes its time to the script (exact tests).
        """
        options: dict[str, Any] = {
            "socket_connect_timeout": storage.timeout,
            "socket_timeout": storage.timeout,
            "health_check_interval": 0,
            "retry": Retry(NoBackoff(), 0),  # the limiter's backoff owns retrying
            "max_connections": MAX_CONNECTIONS,
        }
        client: RedisClient
        if storage.cluster:
            client = RedisCluster.from_url(storage.url, **options)
        else:
            client = Redis.from_url(storage.url, **options)
        return cls(client, url=storage.url, key_prefix=storage.key_prefix, clock=clock,
                   timeout=storage.timeout)

    def shard_of(self, subject: str) -> Hashable:
        """A Cluster's node serving the slot of `subject`'s hash tag now (its
        "host:port"); WHOLE until the client has learned the slot map."""
        try:
            return self._client.nodes_manager.get_node_from_slot(_slot(subject)).name  # type: ignore[union-attr]
        except SlotNotCoveredError:
            return WHOLE

    def shards(self) -> Collection[Hashable]:
        if not self.sharded:
            return (WHOLE,)
        primaries = self._client.get_primaries()  # type: ignore[union-attr]
        return {node.name for node in primaries} or (WHOLE,)

    def key(self, subject: str, limit: Limit) -> str:
        """The Redis key of `subject`'s state in `limit`."""
        return f"{self._prefix}{{{_digest(subject)}}}:{limit.key}"

    def acquire(self, subjects: Sequence[str], limits: Sequence[Limit], cost: int,
                timeout: float | None = None, ticket: str = "") -> Coroutine[Any, Any, list[Outcome]]:
        """Store.acquire; `_decide`'s coroutine itself, not one more wrapped around it."""
        return self._decide("acquire", subjects, limits, cost, timeout, ticket)

    async def peek(self, subjects: Sequence[str], limits: Sequence[Limit]) -> list[Outcome]:
        return await self._decide("peek", subjects, limits, 0, None, "")

    async def reset(self, subjects: Sequence[str], limits: Sequence[Limit]) -> None:
        if limits:
            keys = [self.key(subject, limit) for subject, limit in zip(subjects, limits)]
            await self._call(lambda: self._client.delete(*keys))

    async def release(self, subjects: Sequence[str], limits: Sequence[Limit], ticket: str) -> None:
        await self._slots("release", subjects, limits, ticket)

    async def renew(self, subjects: Sequence[str], limits: Sequence[Limit], ticket: str) -> None:
        await self._slots("renew", subjects, limits, ticket)

    async def strike(self, subject: str, strikes: Limit, ban: Limit) -> float | None:
        """Store.strike: one script call (mode "strike"), both keys under the subject's hash tag."""
        keys = [self.key(subject, strikes), self.key(subject, ban)]
        now = "" if self._clock is None else str(to_micros(self._clock()))
        args = ["strike", now, "1", "", str(NO_DEADLINE),
                *(arg for limit in (strikes, ban) for arg in (*script_args(limit), "0"))]
        reply = await self._call(lambda: self._script(keys=keys, args=args))
        if not isinstance(reply, list) or len(reply) != 2:
            raise StorageUnavailable(f"unexpected reply from acquire.lua: {reply!r:.200}")
        return int(reply[1]) / 1e6 if reply[0] == 1 else None

    def now(self) -> float:
        return self._clock() if self._clock is not None else super().now()

    async def _slots(self, mode: str, subjects: Sequence[str], limits: Sequence[Limit], ticket: str) -> None:
        """Concurrency slots only: each key on its own, so a Cluster needs no common slot."""
        for subject, limit in zip(subjects, limits):
            if limit.concurrent:
                await self._decide(mode, (subject,), (limit,), 0, None, ticket)

    async def ping(self) -> None:
        await self._call(self._client.ping)

    async def warm(self, within: float = 2.0) -> None:
        """Open connections before traffic does: connecting takes several loop
        turns, and a cold burst of new connections can overrun a 50 ms
        `storage.timeout` on a busy machine. Raises StorageUnavailable.

        Decisions go through the pipe, so beside it one pooled connection (for
        peek, reset, ping) is enough; a Cluster's decisions use the pools, so
        there WARM_CONNECTIONS are opened. Opening 16 at once took 35-65 ms on
        an idle 2-core machine, and each waits only its own connect timeout
        (`storage.timeout`): the single-node case must not race that.
        """
        connections = WARM_CONNECTIONS if self._pipe is None else 1
        try:
            async with asyncio.timeout(within):
                await asyncio.gather(*(self.ping() for _ in range(connections)))
                if self._pipe is not None:
                    await self._pipe.connect()
                if self._clock is None:
                    await self._server_clock.learn()
        except TimeoutError as exc:
            raise StorageUnavailable(f"cannot use {mask_url(self._url)} (no answer within {within:g}s)") from exc

    async def _server_time(self) -> float:
        """Redis's `TIME` in seconds, for the deadlines (deadline.py)."""
        if self._pipe is not None:
            reply = await self._pipe.call("TIME", timeout=self._timeout)
            if isinstance(reply, hiredis.ReplyError):
                raise StorageUnavailable(self._describe(reply))
            seconds, micros = reply
        else:
            seconds, micros = await self._call(self._client.time)
        return int(seconds) + int(micros) / 1e6

    async def close(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
        await self._client.aclose()

    async def _decide(self, mode: str, subjects: Sequence[str], limits: Sequence[Limit], cost: int,
                      timeout: float | None, ticket: str) -> list[Outcome]:
        if not limits:
            return []
        if timeout is None:
            timeout = self._timeout
        deadline = NO_DEADLINE  # a peek charges nothing: it needs none
        if mode == "acquire" and timeout is not None:
            deadline = (self._server_clock.deadline(timeout) if self._clock is None
                        else deadline_us(self._clock(), timeout, 0.0))
        if self._pipe is None:
            if len(subjects) > 1 and len({_slot(subject) for subject in subjects}) > 1:
                return await self._decide_across_slots(mode, subjects, limits, cost, timeout, ticket)
            keys, args = self._keys_and_args(mode, subjects, limits, cost, ticket, deadline)
            try:
                async with asyncio.timeout(timeout):
                    reply = await self._call(lambda: self._script(keys=keys, args=args))
            except StorageUnavailable as exc:
                if isinstance(exc.__cause__, ResponseError):
                    self._check_late(str(exc.__cause__))
                raise
            return parse_reply(reply)
        # The hot path: straight to the pipe, no coroutine in between.
        pipe = self._pipe
        command = self._evalsha(mode, subjects, limits, cost, ticket, deadline)
        try:
            reply = await pipe.send(command, timeout=timeout)
            if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
                # a restarted Redis forgot the script: load it, send again
                await pipe.call("SCRIPT", "LOAD", self._script.script, timeout=timeout)
                reply = await pipe.send(command, timeout=timeout)
        except TimeoutError:
            raise StorageUnavailable(f"cannot use {mask_url(self._url)} (Timeout: no reply within "
                                     f"{timeout:g}s)") from None
        if isinstance(reply, hiredis.ReplyError):
            self._check_late(str(reply))
            raise StorageUnavailable(self._describe(reply))
        return parse_reply(reply)

    async def _decide_across_slots(self, mode: str, subjects: Sequence[str], limits: Sequence[Limit], cost: int,
                                   timeout: float | None, ticket: str) -> list[Outcome]:
        """A Cluster decision whose subjects live in several slots (a client's
        limits beside a `per: global` one), which no single script can span.

        Each slot's limits are decided by the script, all or nothing, slot
        after slot at one explicit `now`; when one slot refuses, the slots
        already charged are refunded (acquire.lua's "refund": tokens and
        counts given back, the sliding-window entry at `now` taken out, the
        ticket's slot freed) and report their state as it stands. Nothing is
        ever over-admitted: between a charge and its refund (one round trip)
        another request may be refused for quota that is coming back.
        """
        now = self._clock() if self._clock is not None else self._server_clock.now()
        groups: dict[int, list[int]] = {}
        for i, subject in enumerate(subjects):
            groups.setdefault(_slot(subject), []).append(i)
        order = [groups[slot] for slot in sorted(groups)]
        outcomes: list[Outcome | None] = [None] * len(limits)
        charged: list[list[int]] = []

        async def run(run_mode: str, members: list[int]) -> list[Outcome]:
            keys = [self.key(subjects[i], limits[i]) for i in members]
            args = [run_mode, str(to_micros(now)), str(cost), ticket, f"{NO_DEADLINE:017d}",
                    *self._args_of([limits[i] for i in members])]
            async with asyncio.timeout(timeout):
                return parse_reply(await self._call(lambda: self._script(keys=keys, args=args)))

        for members in order:
            answered = await run(mode, members)
            for i, outcome in zip(members, answered):
                outcomes[i] = outcome
            if mode != "acquire":
                continue
            if any(not outcomes[i].allowed and not limits[i].shadow for i in members):  # type: ignore[union-attr]
                for done in charged:
                    await run("refund", [i for i in done if outcomes[i].allowed])  # type: ignore[union-attr]
                for later in [*charged, *order[order.index(members) + 1:]]:  # report them as they stand
                    for i, outcome in zip(later, await run("peek", later)):
                        outcomes[i] = outcome._replace(allowed=True) if outcome.allowed else outcome
                break
            charged.append(members)
        return [o for o in outcomes if o is not None]

    def _check_late(self, error: str) -> None:
        """A decision that ran past its deadline ("LATE <now>") charged nothing;
        its caller was still waiting, so the offset was too high: take the
        server's `now` as a new lower bound."""
        if not error.startswith("LATE "):
            return
        if self._clock is None:
            self._server_clock.observed(int(error[5:]) / 1e6)
        raise StorageUnavailable(f"cannot use {mask_url(self._url)} (the decision reached Redis after "
                                 "its deadline and was not applied)")

    def _keys_and_args(self, mode: str, subjects: Sequence[str], limits: Sequence[Limit],
                       cost: int, ticket: str, deadline: int) -> tuple[list[str], list[str]]:
        """acquire.lua's KEYS and ARGV for one decision."""
        now = "" if self._clock is None else str(to_micros(self._clock()))
        if len(limits) == 1:  # the common tier, without a comprehension (a call in Python 3.11)
            keys = [self.key(subjects[0], limits[0])]
        else:
            keys = [self.key(subject, limit) for subject, limit in zip(subjects, limits)]
        return keys, [mode, now, str(cost), ticket, f"{deadline:017d}", *self._args_of(limits)]

    def _evalsha(self, mode: str, subjects: Sequence[str], limits: Sequence[Limit], cost: int, ticket: str,
                 deadline: int) -> bytes:
        """The decision's EVALSHA, packed for the pipe.

        Where Redis reads its own clock (no `clock` given) nothing in it but the
        deadline changes from one request of a client to the next, so it is
        packed once per (mode, client, tier's limits, cost) and kept as the
        bytes before and after the deadline, a fixed-width argument: building
        the keys, the arguments and the bytes was 20k of a request's 360k
        instructions (bench/instructions.py).
        """
        if self._clock is not None or ticket:  # the time or the ticket is an argument: new bytes every call
            return self._pack(mode, subjects, limits, cost, ticket, deadline)
        slot = (mode, subjects[0] if len(subjects) == 1 else tuple(subjects), id(limits), cost)
        cached = self._commands.get(slot)
        if cached is None or cached[0] is not limits:  # id() reused after a reload: not ours
            cached = keep(self._commands, slot, (limits, *self._pack_around_deadline(mode, subjects, limits, cost)),
                          MAX_COMMANDS)
        return cached[1] + b"%017d" % deadline + cached[2]

    def _pack(self, mode: str, subjects: Sequence[str], limits: Sequence[Limit], cost: int, ticket: str,
              deadline: int) -> bytes:
        keys, args = self._keys_and_args(mode, subjects, limits, cost, ticket, deadline)
        command: tuple[Any, ...] = ("EVALSHA", self._script.sha, len(keys), *keys, *args)
        packed: bytes = hiredis.pack_command(command)
        return packed

    def _pack_around_deadline(self, mode: str, subjects: Sequence[str], limits: Sequence[Limit],
                              cost: int) -> tuple[bytes, bytes]:
        """The packed EVALSHA split where its 17 deadline digits go (no ticket)."""
        keys, args = self._keys_and_args(mode, subjects, limits, cost, "", NO_DEADLINE)
        before: tuple[Any, ...] = ("EVALSHA", self._script.sha, len(keys), *keys, *args[:4])
        packed: bytes = hiredis.pack_command((*before, *args[4:]))
        # `before` packed alone, its "*<count>" header swapped for the whole command's, then "$17"
        alone = hiredis.pack_command(before)
        head = len(alone) - len(b"*%d\r\n" % len(before)) + len(b"*%d\r\n" % (len(before) + len(args) - 4))
        head += len(b"$17\r\n")
        return packed[:head], packed[head + 17:]

    def _args_of(self, limits: Sequence[Limit]) -> list[str]:
        """The script's per-limit arguments, built once per tier's limits."""
        cached = self._limit_args.get(id(limits))
        if cached is None or cached[0] is not limits:
            args = [arg for limit in limits for arg in (*script_args(limit), "1" if limit.shadow else "0")]
            cached = keep(self._limit_args, id(limits), (limits, args), 1024)  # 1024 tiers' worth of reloads
        return cached[1]

    async def _call(self, command: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis command; any failure of Redis becomes StorageUnavailable.

        A callable, not a coroutine, so nothing is left unawaited when a
        caller's timeout cancels the wait for a free connection.
        """
        try:
            async with self._in_flight:
                return await command()
        except REDIS_ERRORS as exc:
            raise StorageUnavailable(self._describe(exc)) from exc

    def _describe(self, exc: BaseException) -> str:
        reason = str(exc) or type(exc).__name__
        password = urlsplit(self._url).password
        if password:  # redis-py never puts it in a message, but be sure
            reason = reason.replace(password, "***").replace(unquote(password), "***")
        return f"cannot use {mask_url(self._url)} ({reason})"


@functools.lru_cache(maxsize=65536)
def _slot(identity: str) -> int:
    """The Cluster slot of `identity`'s keys: their hash tag's."""
    return key_slot(_digest(identity).encode())


@functools.lru_cache(maxsize=65536)
def _digest(identity: str) -> str:
    """The hash tag of a client's keys: recent clients' digests are kept, not recomputed."""
    return hashlib.sha256(identity.encode()).hexdigest()[:HASH_CHARS]


def script_args(limit: Limit) -> tuple[str, str, str]:
    """The algorithm's code and its two parameters as acquire.lua reads them.

    Windows and leases go in as integer microseconds computed exactly as
    algorithms.py does (`to_micros`), so the script never rounds anything itself.
    """
    algorithm = limit.algorithm
    params: tuple[float, float]
    if isinstance(algorithm, Concurrency):
        params = (algorithm.max, max(1, to_micros(limit.lease or DEFAULT_LEASE)))
    elif isinstance(algorithm, Ban):
        params = (algorithm.seconds_us, 0)
    elif isinstance(algorithm, TokenBucket):
        params = (algorithm.capacity, algorithm.refill_rate)
    elif isinstance(algorithm, (SlidingWindow, FixedWindow)):
        params = (algorithm.limit, max(1, to_micros(algorithm.window_seconds)))
    elif isinstance(algorithm, LeakyBucket):
        params = (algorithm.rate, algorithm.queue)
    else:
        raise TypeError(f"acquire.lua has no port of {type(algorithm).__name__}")
    # repr() of a float is its shortest exact form; Lua's tonumber reads it back exactly.
    return algorithm.short, repr(params[0]), repr(params[1])


def parse_reply(reply: object) -> list[Outcome]:
    """The script's 9 integers per limit back into Outcomes: allowed, then each
    number as (m, e), its exact double m * 2**e (see acquire.lua's `put_exact`)."""
    if not isinstance(reply, list) or len(reply) % FIELDS:
        raise StorageUnavailable(f"unexpected reply from acquire.lua: {reply!r:.200}")
    outcomes = []
    for i in range(0, len(reply), FIELDS):  # a loop: a comprehension is one more call per decision
        outcomes.append(new_tuple(Outcome, (  # allowed, remaining, reset, retry_after, delay; see Outcome
            reply[i] == 1,
            int(ldexp(reply[i + 1], reply[i + 2])),
            ldexp(reply[i + 3], reply[i + 4]),
            ldexp(reply[i + 5], reply[i + 6]),
            ldexp(reply[i + 7], reply[i + 8]),
        )))
    return outcomes


@functools.cache
def _script_source() -> str:
    return (resources.files(__package__) / "lua" / "acquire.lua").read_text(encoding="utf-8")
