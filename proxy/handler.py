"""The proxy port's single handler: route -> identity -> decision -> forward or refuse.

Data flows one way; every outcome is written into one RequestRecord that the
observers (stats, metrics, access log) read afterwards.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from typing import Final

from aiohttp import web

from .config import LimitSet, Route
from .forward import BodyTooLarge, ClientGone, ExpectationFailed, UpstreamBroken, forward, upstream_failure
from .identity import Rejection, denied, request_address, resolve
from .limiter import Limiter, Verdict
from .limits.algorithms import Outcome
from .penalty import banned
from .problems import problem
from .ratelimit_headers import rate_limit_lines, refusing_limit, retry_after_header
from .records import RequestRecord
from .runtime import Runtime
from .selectors import Facts, subjects_of
from .target import HTTP_1, refuse_target, route_path
from .tunnel import Upgraded
from .upstream import UpstreamError
from .wsgate import MessageGate, MessageLimits

NO_ROUTE: Final = Route(path="/")


async def handle(runtime: Runtime, request: web.BaseRequest) -> web.StreamResponse:
    config = runtime.config  # one snapshot: a reload mid-request does not change this one
    started = time.perf_counter()
    banned = denied(config, request.headers, request.remote) if config.clients.deny else None
    if banned is not None:  # before everything else, exempt routes and keys included
        record = RequestRecord(request.method, request.path, banned, "-", "denied")
        response = problem(403, "forbidden", "Requests from this address are not accepted.")
        return _finish(runtime, record, response, started)
    target = request.raw_path
    if target[:1] != "/" or request.version not in HTTP_1:  # rare: CONNECT, *, absolute-form, HTTP/0.9 or 2.0
        refused = refuse_target(request)
        if refused is not None:
            record = RequestRecord(request.method, request.path, request.remote or "", "-", "rejected")
            return _finish(runtime, record, refused, started)
    path = route_path(target)
    route = config.route_table.match(request.method, path) or NO_ROUTE
    limit = config.server.max_body_size
    if limit is not None and (request.content_length or 0) > limit:
        # Refused before the limiter, as nginx does: a declared oversize body costs no quota.
        record = RequestRecord(request.method, request.path, request.remote or "", "-", "rejected")
        response = problem(413, "body_too_large", f"The request body exceeds {limit} bytes.")
        return _finish(runtime, record, response, started, close=True)
    if route.exempt:
        record = RequestRecord(request.method, request.path, request.remote or "", "-", "exempt")
        return await _forward(request, runtime, record, started, b"")
    client = resolve(config, request.headers, request.remote)
    if isinstance(client, Rejection):
        record = RequestRecord(request.method, request.path, request.remote or "", "-", "unauthorized")
        challenge = {"WWW-Authenticate": client.challenge} if client.challenge else None
        response = problem(401, client.error, client.message, headers=challenge)
        return _finish(runtime, record, response, started)
    client_id, tier, identity, claims = client
    record = RequestRecord(request.method, request.path, client_id, tier.name, "allowed", identity)
    if tier.unlimited:
        runtime.recorder.record(config, request, client, route, path, True)
        return await _forward(request, runtime, record, started, b"")
    limit_set = config.limit_set(tier, route)

    def facts() -> Facts:  # called only when some limit counts more than the client
        return Facts(request, identity, route.path, lambda: request_address(config, request.headers, request.remote),
                     claims)

    subjects = subjects_of(limit_set, identity, facts)
    limiter = runtime.limiter
    ticket = limiter.ticket(limit_set)
    decision = limiter.decide_now(limit_set, subjects, route.cost, ticket)
    if decision is None:
        decision = await limiter.consult_store(limit_set, subjects, route.cost, ticket)
    verdict, outcomes = decision
    runtime.recorder.record(config, request, client, route, path, verdict.allowed)
    if limit_set.shadow and outcomes:
        record.shadow = shadow_refusals(limit_set, outcomes)
    lines = rate_limit_lines(limit_set, outcomes) if outcomes else b""
    if not verdict.allowed:
        return _finish(runtime, record, _refuse(limit_set, verdict, outcomes, lines, record), started)
    messages = None if not route.messages else _message_limits(runtime, route, identity, facts)
    if not limit_set.concurrent:
        return await _admitted(request, runtime, record, started, lines, verdict.delay, messages)
    renewing = _renew_while_open(limiter, limit_set, subjects, ticket)
    try:
        return await _admitted(request, runtime, record, started, lines, verdict.delay, messages)
    finally:  # completed, aborted, failed or cut: the slots come back now
        if renewing is not None:
            renewing.cancel()
        limiter.release(limit_set, subjects, ticket, verdict)


def _message_limits(runtime: Runtime, route: Route, identity: str, facts: Callable[[], Facts]) -> MessageLimits:
    """What the messages of a WebSocket on `route` are decided on, should the request upgrade."""
    limit_set = runtime.config.message_sets[route.index]
    return MessageLimits(runtime.limiter, limit_set, subjects_of(limit_set, identity, facts))


async def _admitted(request: web.BaseRequest, runtime: Runtime, record: RequestRecord, started: float,
                    lines: bytes, delay: float, messages: MessageLimits | None) -> web.StreamResponse:
    if delay > 0:
        try:
            await asyncio.sleep(delay)  # leaky bucket: released in arrival order
        except asyncio.CancelledError:  # the client left (or the drain ran out) while queued
            record.status = 499
            runtime.observe(record, time.perf_counter() - started)
            raise
        if request.transport is None or request.transport.is_closing():
            record.status = 499  # gave up while queued: nothing to forward
            runtime.observe(record, time.perf_counter() - started)
            return web.Response(status=499)
    return await _forward(request, runtime, record, started, lines, messages)


def _renew_while_open(limiter: Limiter, limit_set: LimitSet, subjects: tuple[str, ...],
                      ticket: str) -> asyncio.Task[None] | None:
    """Slots with a lease (Redis) outlive a long exchange (a WebSocket, a stream) only if renewed."""
    lease = min((limit_set.limits[i].lease or 0.0 for i in limit_set.concurrent), default=0.0)
    if not lease or not limiter.leases:
        return None

    async def renew() -> None:
        while True:
            await asyncio.sleep(lease / 3)
            await limiter.renew(limit_set, subjects, ticket)

    return asyncio.get_running_loop().create_task(renew())


def shadow_refusals(limit_set: LimitSet, outcomes: Sequence[Outcome]) -> tuple[str, ...]:
    """The shadow limits that would have refused: counted, logged, never enforced."""
    limits = limit_set.limits
    return tuple(limits[i].name for i, o in enumerate(outcomes) if not o.allowed and limits[i].shadow)


def _refuse(limit_set: LimitSet, verdict: Verdict, outcomes: Sequence[Outcome], lines: bytes,
            record: RequestRecord) -> web.Response:
    """429 with the refusing limit, or 503 when the store is down and on_error is deny."""
    if verdict.unavailable:
        record.decision = "unavailable"
        return problem(503, "limiter_unavailable", "The rate limiter's storage is unavailable; "
                       "try again shortly.", headers={"Retry-After": "1"})
    if limit_set.banning and not outcomes[0].allowed:
        return banned(record, outcomes[0].retry_after, lines)
    limits = limit_set.limits
    index = refusing_limit(limit_set, outcomes)
    retry = outcomes[index].retry_after
    record.decision = "blocked"
    record.limit = limits[index].name
    violated = [limit.name for limit, o in zip(limits, outcomes) if not o.allowed and not limit.shadow]
    return problem(
        429, "rate_limited", "Rate limit exceeded", headers={"Retry-After": retry_after_header(retry)}, lines=lines,
        **{"violated-policies": violated}, tier=record.tier, limit=record.limit,
        retry_after_seconds=math.ceil(retry * 1000) / 1000,
    )


async def _forward(
    request: web.BaseRequest, runtime: Runtime, record: RequestRecord, started: float,
    lines: bytes, messages: MessageLimits | None = None,
) -> web.StreamResponse:
    upstream_started = time.perf_counter()
    try:
        response = await forward(request, runtime.pool, runtime.upstream, lines)
    except ExpectationFailed:
        response = problem(417, "expectation_failed", "Only \"Expect: 100-continue\" is supported.")
        return _finish(runtime, record, response, started, close=True)
    except BodyTooLarge:
        limit = runtime.upstream.max_body_size
        response = problem(413, "body_too_large", f"The request body exceeds {limit} bytes.")
        return _finish(runtime, record, response, started, close=True)
    except UpstreamBroken as exc:
        # The status is already sent: closing is the only way left to say "broken".
        if request.transport is not None:
            request.transport.close()
        record.upstream_error = "broken"
        record.upstream_seconds = time.perf_counter() - upstream_started
        record.status = exc.response.status
        runtime.observe(record, time.perf_counter() - started)
        return exc.response
    except ClientGone:
        # Nobody to answer; the upstream exchange was abandoned and its connection closed.
        record.status = 499
        record.upstream_seconds = time.perf_counter() - upstream_started
        runtime.observe(record, time.perf_counter() - started)
        return web.Response(status=499)
    except asyncio.CancelledError:
        # Cut: the shutdown's drain ran out (or aiohttp dropped the connection). Still logged.
        record.status = 499
        record.upstream_error = "cut"
        record.upstream_seconds = time.perf_counter() - upstream_started
        runtime.observe(record, time.perf_counter() - started)
        raise
    except UpstreamError as exc:
        response = upstream_failure(exc, runtime.upstream)
        record.upstream_error = exc.kind
        record.upstream_seconds = time.perf_counter() - upstream_started
        return _finish(runtime, record, response, started)
    record.upstream_seconds = time.perf_counter() - upstream_started
    record.status = response.status
    runtime.observe(record, time.perf_counter() - started)
    if isinstance(response, Upgraded):
        # Recorded above as the 101 it is, with the handshake's timing; the
        # connection's life is the tunnel's, and it ends here.
        gate = MessageGate(messages) if messages is not None and response.websocket else None
        totals = await runtime.tunnels.run(request, response, linger=runtime.upstream.timeout, gate=gate)
        if totals.closed_by is not None:
            runtime.tunnel_closed(record, totals.closed_by)
    return response


def _finish(
    runtime: Runtime, record: RequestRecord, response: web.Response, started: float, *, close: bool = False,
) -> web.Response:
    """Tollgate's own answer: record it and hand it back."""
    if close:  # the rest of the client's body is unread: the connection cannot be reused
        response.force_close()
    record.status = response.status
    runtime.observe(record, time.perf_counter() - started)
    return response
