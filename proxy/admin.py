"""The admin port: health, readiness, stats, per-client state, the decision
service, reload, Prometheus metrics, and the dashboard.

Private by default (127.0.0.1), and deaf to other sites' pages and to
rebinding names (proxy.admin_guard). With `admin.token` set, everything but
/healthz and /readyz needs `Authorization: Bearer <token>` or the HttpOnly
cookie the dashboard sets when opened once with `?token=`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import config as config_module
from .admin_guard import refuse_foreign
from .config import ConfigError
from .dashboard import setup_dashboard
from .identity import find_client, visible_ascii
from .limit_states import limit_body, limits_body
from .limits.store import Limit, StorageUnavailable
from .openapi import document
from .penalty import rfc3339
from .problems import problem
from .ratelimit_headers import most_constraining, refusing_limit
from .replay import replay
from .runtime import RUNTIME, Runtime
from .selectors import CLIENT, GLOBAL, GLOBAL_SUBJECT, hashed
from .stats import Stats

COOKIE: Final = "tollgate_admin"
OPEN_PATHS: Final = frozenset({"/healthz", "/readyz"})
TOP_N: Final = 10
WHATIF_LOCK: Final = web.AppKey("WHATIF_LOCK", asyncio.Lock)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _token_ok(presented: str | None, token: str) -> bool:
    if not presented or not visible_ascii(presented):  # a raw latin-1 byte is a lone surrogate: no encode
        return False
    # Compare digests: constant time whatever the lengths.
    return hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), hashlib.sha256(token.encode()).digest())


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[RUNTIME].config.admin.token
    if token is None or request.path in OPEN_PATHS:
        return await handler(request)
    auth = request.headers.get("Authorization", "")
    bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else None
    if _token_ok(bearer, token) or _token_ok(request.cookies.get(COOKIE), token):
        return await handler(request)
    if request.path == "/" and _token_ok(request.query.get("token"), token):
        # Redirect so the token leaves the address bar and the history.
        response = web.Response(status=303, headers={"Location": "/"})
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
        return response
    return problem(401, "unauthorized", "The admin API needs Authorization: Bearer <admin.token>.",
                   headers={"WWW-Authenticate": 'Bearer realm="tollgate-admin"'})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    limiter = request.app[RUNTIME].limiter
    body = {"ready": limiter.ready, "storage": storage_body(request.app[RUNTIME])}
    return web.json_response(body, status=200 if limiter.ready else 503)


def storage_body(runtime: Runtime) -> dict[str, Any]:
    """The store's health; `down` lists each failed shard (a Cluster node's
    "host:port", "*" for a whole store) with its own error and back-off."""
    limiter = runtime.limiter
    down = limiter.failed_shards()
    last = max(down.values(), key=lambda h: h.down_since or 0.0, default=None)
    return {"backend": limiter.store.backend, "healthy": not down, "on_error": limiter.on_error,
            "last_error": None if last is None else last.last_error,
            "down": [{"shard": str(shard), "last_error": health.last_error, "errors": health.errors,
                      "since": None if health.down_since is None else rfc3339(health.down_since)}
                     for shard, health in down.items()]}


def config_body(runtime: Runtime) -> dict[str, Any]:
    config = runtime.config
    return {
        "path": config.path, "version": runtime.version,
        "loaded_at": rfc3339(runtime.loaded_at),
        "last_error": runtime.last_error,
        "tiers": {
            name: {"unlimited": tier.unlimited,
                   "limits": [{"name": lim.name, "algorithm": lim.algorithm.name,
                               "policy": f"q={lim.algorithm.capacity};w={lim.algorithm.window}",
                               "per": list(lim.per), "shadow": lim.shadow}
                              for lim in tier.limits]}
            for name, tier in config.tiers.items()
        },
    }


async def stats_body(runtime: Runtime) -> dict[str, Any]:
    """Everything the dashboard shows, in one JSON document."""
    stats, workers = runtime.stats, None
    if runtime.workers is not None:
        workers = await runtime.workers.gather()
        stats = Stats.merged([w["stats"] for w in workers], clock=stats.clock, started=stats.started)
    body = stats.snapshot()
    if workers is not None:
        body["workers"] = [{"pid": w["pid"], "requests": w["stats"]["totals"]["requests"]} for w in workers]
    for key, by in (("top_clients", "requests"), ("top_blocked", "blocked")):
        rows = []
        for client_id, counts in stats.top(TOP_N, by=by):
            rows.append({"id": client_id, "tier": counts.tier, "requests": counts.requests,
                         "allowed": counts.allowed, "blocked": counts.blocked,
                         "remaining": await _remaining(runtime, counts.tier, counts.identity)})
        body[key] = rows
    body["limits"] = await limits_body(runtime)
    body["storage"] = storage_body(runtime)
    body["config"] = config_body(runtime)
    body["banned"] = await runtime.penalties.listed()
    return body


async def _remaining(runtime: Runtime, tier_name: str, identity: str) -> int | None:
    tier = runtime.config.tiers.get(tier_name)
    if tier is None or tier.unlimited or not identity or not runtime.limiter.healthy_for(identity):
        return None
    known = [(limit, subject) for limit, subject in client_subjects(tier.limits, identity, "")
             if subject is not None and not limit.shadow and not limit.concurrent]
    if not known:
        return None
    try:
        outcomes = await runtime.limiter.peek([s for _, s in known], [limit for limit, _ in known])
    except StorageUnavailable:
        return None
    return outcomes[most_constraining(outcomes)].remaining


def client_subjects(limits: Sequence[Limit], identity: str, address: str) -> list[tuple[Limit, str | None]]:
    """The subject of each limit that a client id alone determines (None: it
    depends on each request, like a header's value)."""
    facts: dict[tuple[str, ...], str] = {CLIENT: identity, GLOBAL: GLOBAL_SUBJECT}
    out: list[tuple[Limit, str | None]] = []
    for limit in limits:
        subject = facts.get(limit.per)
        if subject is None and limit.per == ("address",) and address:
            subject = hashed([address])
        out.append((limit, subject))
    return out


async def stats(request: web.Request) -> web.Response:
    return web.json_response(await stats_body(request.app[RUNTIME]))


async def stats_reset(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    runtime.stats.reset()
    if runtime.workers is not None:
        await runtime.workers.reset_stats()
    return web.Response(status=204)


def _seen_tier(runtime: Runtime, client_id: str) -> str | None:
    """The tier a client's last request had: a JWT client's comes from its token."""
    seen = runtime.stats.clients.get(client_id)
    return seen.tier if seen is not None else None


async def client_get(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    client_id = request.match_info["id"]
    found = find_client(runtime.config, client_id, seen_tier=_seen_tier(runtime, client_id))
    if found is None:
        return problem(404, "unknown_client", "No API key has this name, and it is not an IP address.")
    tier = runtime.config.tiers[found[0]]
    address = client_id if found[1].startswith("a:") else ""
    routes = [] if tier.unlimited else [route for route in runtime.config.routes if route.limits]
    every = [*tier.limits, *(limit for route in routes for limit in route.limits)]
    peekable = [(limit, subject) for limit, subject in client_subjects(every, found[1], address)
                if subject is not None]
    try:
        outcomes = (await runtime.limiter.peek([s for _, s in peekable], [limit for limit, _ in peekable])
                    if peekable else [])
        ban = await runtime.penalties.client_body(tier, found[1])
    except StorageUnavailable as exc:
        return problem(503, "limiter_unavailable", f"The limit store is unavailable: {exc}")
    state = {limit.key: o for (limit, _), o in zip(peekable, outcomes)}
    return web.json_response({
        "id": client_id, "tier": tier.name, "unlimited": tier.unlimited, **ban,
        "limits": [limit_body(limit, state.get(limit.key)) for limit in tier.limits],
        "routes": [{"path": route.path, "methods": None if route.methods is None else sorted(route.methods),
                    "limits": [limit_body(limit, state.get(limit.key)) for limit in route.limits]}
                   for route in routes],
    })


async def client_delete(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    found = find_client(runtime.config, request.match_info["id"],
                        seen_tier=_seen_tier(runtime, request.match_info["id"]))
    if found is None:
        return problem(404, "unknown_client", "No API key has this name, and it is not an IP address.")
    tier = runtime.config.tiers[found[0]]
    address = request.match_info["id"] if found[1].startswith("a:") else ""
    known = [(limit, subject) for limit, subject in client_subjects(tier.limits, found[1], address)
             if subject is not None and subject != GLOBAL_SUBJECT]  # a client's reset leaves shared states alone
    try:
        await runtime.limiter.reset([s for _, s in known], [limit for limit, _ in known])
        await runtime.penalties.lift(tier, found[1])
    except StorageUnavailable as exc:
        return problem(503, "limiter_unavailable", f"The limit store is unavailable: {exc}")
    return web.Response(status=204)


def _check_input(body: Any, runtime: Runtime) -> tuple[str, str, int] | str:
    """Validate a /api/check body; a string is the 400 message."""
    if not isinstance(body, dict):
        return 'the body must be a JSON object like {"key": "...", "tier": "...", "cost": 1}'
    unknown = sorted(set(body) - {"key", "tier", "cost"})
    if unknown:
        return f"unknown field(s): {', '.join(unknown)}"
    key, tier, cost = body.get("key"), body.get("tier"), body.get("cost", 1)
    if not isinstance(key, str) or not key:
        return "key: must be a non-empty string"
    if not isinstance(tier, str) or tier not in runtime.config.tiers:
        return f"tier: must be one of {', '.join(sorted(runtime.config.tiers))}"
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
        return "cost: must be an integer >= 1"
    return key, tier, cost


async def check(request: web.Request) -> web.Response:
    """The decision service for services not behind the proxy (own identity namespace)."""
    runtime = request.app[RUNTIME]
    try:
        body = await request.json()
    except ValueError:
        return problem(400, "bad_request", "The body is not valid JSON.")
    parsed = _check_input(body, runtime)
    if isinstance(parsed, str):
        return problem(400, "bad_request", parsed)
    key, tier_name, cost = parsed
    tier = runtime.config.tiers[tier_name]
    identity = "c:" + hashlib.sha256(key.encode()).hexdigest()[:32]
    limit_set = tier.limit_set  # the service's own requests have no route; their limits count the key
    verdict, outcomes = await runtime.limiter.decide(limit_set, (identity,) * len(limit_set.limits), cost)
    if verdict.unavailable:
        return problem(503, "limiter_unavailable", "The rate limiter's storage is unavailable.",
                       headers={"Retry-After": "1"})
    result: dict[str, Any] = {"allowed": verdict.allowed, "tier": tier_name, "limit": None,
                              "remaining": None, "retry_after_seconds": 0}
    if outcomes:
        first = 1 if limit_set.banning else 0  # a penalty's ban is no quota (and never strikes these identities)
        tightest = first + most_constraining(outcomes[first:])
        index = tightest if verdict.allowed else refusing_limit(limit_set, outcomes)
        result["limit"] = limit_set.limits[index].name
        result["remaining"] = outcomes[tightest].remaining
        result["retry_after_seconds"] = 0 if verdict.allowed else round(outcomes[index].retry_after, 3)
        result["delay_seconds"] = round(verdict.delay, 3)
    return web.json_response(result)


async def reload(request: web.Request) -> web.Response:
    """Re-read the config file; with a body (a candidate config.yaml, as the
    dashboard's what-if sends it) write that to the file first."""
    reloader = request.app[RUNTIME].reloader
    raw = await request.read()
    if raw:
        text = _yaml_text(raw)
        if text is None:
            return web.json_response({"reloaded": False, "version": request.app[RUNTIME].version,
                                      "errors": [NOT_UTF8]}, status=422)
        result = await reloader.reload_with(text, "POST /api/reload with a config")
    else:
        result = await reloader.reload("POST /api/reload")
    if result.ok:
        body: dict[str, Any] = {"reloaded": True, "version": result.version}
        if result.restart_needed:
            body["restart_needed"] = list(result.restart_needed)
        return web.json_response(body)
    return web.json_response({"reloaded": False, "version": result.version, "errors": list(result.errors)},
                             status=422)


NOT_UTF8: Final = "the body must be a config.yaml in UTF-8"
EMPTY_CANDIDATE: Final = "the body is empty: send the candidate config.yaml ({} for the defaults)"


def _yaml_text(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


async def whatif(request: web.Request) -> web.Response:
    """Replay the recorded traffic through the candidate config in the body (proxy.replay)."""
    runtime = request.app[RUNTIME]
    text = _yaml_text(await request.read())
    if not text or not text.strip():
        errors = [NOT_UTF8 if text is None else EMPTY_CANDIDATE]
        return web.json_response({"errors": errors}, status=422)
    try:
        # In a thread: PyYAML takes ~0.14 s for a config of 1,000 keys, a stall the loop would
        # pass on to every request in flight; a thread shares the GIL instead (bench/README.md).
        candidate = await asyncio.to_thread(config_module.from_text, text)
    except ConfigError as exc:
        return web.json_response({"errors": exc.errors}, status=422)
    async with request.app[WHATIF_LOCK]:  # one replay at a time: each holds a whole store
        recorder = runtime.recorder
        spans = recorder.snapshot()
        answer = await replay(spans, candidate, recorder.clock())
    return web.json_response(answer)


async def metrics(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    if runtime.workers is not None:
        runtime.metrics.load_sum([w["metrics"] for w in await runtime.workers.gather()])
    output = generate_latest(runtime.metrics.registry)
    response = web.Response(body=output)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(document(open_paths=OPEN_PATHS, cookie=COOKIE))


def setup_admin(app: web.Application) -> None:
    runtime = app[RUNTIME]
    app.middlewares.append(refuse_foreign(OPEN_PATHS))  # before the token: a rebinding page gets no 401 to probe
    app.middlewares.append(require_token)
    router = app.router
    router.add_get("/healthz", healthz)
    router.add_get("/readyz", readyz)
    router.add_get("/api/stats", stats)
    router.add_post("/api/stats/reset", stats_reset)
    router.add_get("/api/clients/{id}", client_get)
    router.add_delete("/api/clients/{id}", client_delete)
    router.add_post("/api/check", check)
    router.add_post("/api/reload", reload)
    router.add_post("/api/whatif", whatif)
    app[WHATIF_LOCK] = asyncio.Lock()
    router.add_get("/metrics", metrics)
    router.add_get("/api/openapi.json", openapi_json)
    setup_dashboard(app, stats=lambda: stats_body(runtime))
