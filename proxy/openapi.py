"""`GET /api/openapi.json`: the admin API as an OpenAPI 3.1 document.

The document is data, written beside the handlers' shapes (proxy.admin,
proxy.dashboard) rather than generated from them, so that it says what a client
may rely on. tests/test_openapi.py keeps it honest: every route the admin app
registers has an entry here and nothing more, and real answers of a running
Tollgate validate against these schemas (closed: an undocumented field fails).

To document a new endpoint: add its body shapes to SCHEMAS and its operations
to PATHS. `document()` adds what the admin middlewares apply to every route:
the token (security, 401) and the Host and Origin checks (421, 403), by the
same rules the middlewares follow.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Collection
from typing import Any, Final

from prometheus_client import CONTENT_TYPE_LATEST

from .admin_guard import SAFE_METHODS

Schema = dict[str, Any]

PROBLEM_JSON: Final = "application/problem+json"
COUNT: Final[Schema] = {"type": "integer", "minimum": 0}
NAME: Final[Schema] = {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {**schema, "type": [schema["type"], "null"]}


def obj(properties: dict[str, Schema], *, optional: Collection[str] = (), description: str = "") -> Schema:
    """An object schema whose properties are all required but `optional` ones."""
    schema: Schema = {"type": "object", "required": [p for p in properties if p not in optional],
                      "properties": properties}
    if description:
        schema["description"] = description
    return schema


def counts(*names: str) -> dict[str, Schema]:
    return {name: COUNT for name in names}


PER: Final[Schema] = {"type": "array", "items": {"type": "string"}, "minItems": 1,
                     "description": "what the limit counts: client, address, global, method, route, header:<Name>, ..."}
SHADOW: Final[Schema] = {"type": "boolean", "description": "evaluated and charged, never refuses"}

WHATIF_COUNTS: Final = ("allowed_then", "refused_then", "allowed_candidate", "refused_candidate")

SCHEMAS: Final[dict[str, Schema]] = {
    "Problem": obj({
        "type": {"type": "string", "description": "`about:blank` for the admin port's errors"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "error": {"type": "string", "description": "a stable machine-readable code"},
        "message": {"type": "string", "description": "a sentence for people"},
    }, description="An RFC 9457 problem details body, as every error Tollgate itself answers."),
    "Health": obj({"status": {"const": "ok"}}),
    "Storage": obj({
        "backend": {"enum": ["memory", "redis"]},
        "healthy": {"type": "boolean"},
        "on_error": {"enum": ["allow", "deny", "local"]},
        "last_error": nullable({"type": "string", "description": "why the store is unhealthy; null while healthy"}),
        "down": {"type": "array", "description": "each failed shard (a Cluster node, or the one Redis)", "items": obj({
            "shard": {"type": "string"}, "last_error": nullable({"type": "string"}), "errors": COUNT,
            "since": nullable({"type": "string", "format": "date-time"}),
        })},
    }),
    "Readiness": obj({"ready": {"type": "boolean"}, "storage": ref("Storage")}),
    "Totals": obj({
        **counts("requests", "allowed", "blocked", "unauthorized", "exempt", "unavailable", "rejected",
                 "upstream_errors"),
        "websocket_messages_refused": {**COUNT, "description":
                                       "WebSocket messages over a `routes[].messages` limit (each closed its socket)"},
        "shadow_blocked": {**COUNT, "description": "requests a `shadow: true` limit would have refused"},
        "denied": {**COUNT, "description": "requests refused with 403 by `clients.deny` (present once one was)"},
    }, optional=("denied",), description="Requests by decision since start or the last reset."),
    "Percentiles": obj({q: nullable({"type": "number", "minimum": 0}) for q in ("p50", "p95", "p99")},
                       description="Milliseconds over the last minute; null without samples."),
    "TierCounts": obj({
        **counts("requests", "allowed", "blocked"),
        "shadow_blocked": {**COUNT, "description": "of these, requests a shadow limit would have refused"},
    }),
    "ClientRow": obj({
        "id": {"type": "string", "description": "the key's name, or the client's address"},
        "tier": {"type": "string"},
        **counts("requests", "allowed", "blocked"),
        "remaining": nullable({"type": "integer", "description":
                               "requests its most constraining limit allows now; null when unknown or unlimited"}),
    }),
    "TimelinePoint": obj({"t": {"type": "integer", "description": "Unix second"}, **counts("allowed", "blocked")}),
    "TierConfig": obj({
        "unlimited": {"type": "boolean"},
        "limits": {"type": "array", "items": obj({
            "name": NAME, "algorithm": {"type": "string"},
            "policy": {"type": "string", "description": "`q=<capacity>;w=<window>`, as in RateLimit-Policy"},
            "per": PER, "shadow": SHADOW,
        })},
    }),
    "ConfigState": obj({
        "path": nullable({"type": "string"}),
        "version": {"type": "integer", "minimum": 1},
        "loaded_at": {"type": "string", "format": "date-time"},
        "last_error": nullable({"type": "string", "description": "the last refused reload's errors"}),
        "tiers": {"type": "object", "additionalProperties": ref("TierConfig")},
    }),
    "Stats": obj({
        "uptime_seconds": {"type": "number", "minimum": 0},
        "totals": ref("Totals"),
        "success_rate_percent": {"type": "number", "minimum": 0, "maximum": 100},
        "latency_ms": obj({"proxy": ref("Percentiles"), "upstream": ref("Percentiles")}),
        "tiers": {"type": "object", "additionalProperties": ref("TierCounts")},
        "timeline": {"type": "array", "items": ref("TimelinePoint"), "description": "the last 5 minutes"},
        "top_clients": {"type": "array", "items": ref("ClientRow"), "maxItems": 10},
        "top_blocked": {"type": "array", "items": ref("ClientRow"), "maxItems": 10},
        "banned": {"type": "array", "items": ref("BannedClient"), "maxItems": 100,
                   "description": "clients banned by a tier's `penalty` now, latest ban end first: the bans this "
                                  "instance set or refused a request for, each checked with the store"},
        "limits": ref("LimitsOverview"),
        "storage": ref("Storage"),
        "config": ref("ConfigState"),
    }, description="Everything the dashboard shows."),
    "BannedClient": obj({
        "id": {"type": "string"}, "tier": {"type": "string"},
        "banned_until": {"type": "string", "format": "date-time", "description": "RFC 3339, UTC"},
        "seconds_left": {"type": "integer", "minimum": 1, "description": "what Retry-After says now"},
    }),
    "LimitState": obj({
        "name": NAME, "algorithm": {"type": "string"},
        "limit": {**COUNT, "description": "capacity, limit, queue or max"},
        "per": PER, "shadow": SHADOW,
        "remaining": nullable({**COUNT, "description": "null where the subject depends on each request"}),
        "reset_seconds": nullable({**COUNT, "description": "whole seconds until the limit is fully available"}),
        "in_flight": nullable({**COUNT, "description": "concurrency limits: slots held now (in /api/stats: over "
                                                       "all subjects; null with Redis unless `per: global`)"}),
    }, optional=("in_flight",)),
    "RouteLimits": obj({
        "path": {"type": "string", "description": "the route's path prefix"},
        "methods": nullable({"type": "array", "items": {"type": "string"}, "description": "null: every method"}),
        "limits": {"type": "array", "items": ref("LimitState"), "minItems": 1},
    }),
    "LimitsOverview": obj({
        "routes": {"type": "array", "items": ref("RouteLimits"), "description": "each route with limits of its own"},
        "tiers": {"type": "object", "additionalProperties": {"type": "array", "items": ref("LimitState")},
                  "description": "each tier's `per: global` and concurrency limits"},
    }, description="Limits beyond a client's own, with the live state of those that need no request: "
                   "`per: global` limits' remaining and reset, concurrency limits' slots in flight. "
                   "Null while the store is down."),
    "ClientState": obj({
        "id": {"type": "string"}, "tier": {"type": "string"}, "unlimited": {"type": "boolean"},
        "limits": {"type": "array", "items": ref("LimitState")},
        "routes": {"type": "array", "items": ref("RouteLimits"),
                   "description": "each route with limits: this client's state in them (none if unlimited)"},
        "banned_until": nullable({"type": "string", "format": "date-time",
                                  "description": "when the tier's penalty ban ends (RFC 3339, UTC); null: not banned"}),
        "ban_seconds_left": nullable({"type": "integer", "minimum": 1, "description": "what Retry-After says now"}),
    }),
    "CheckRequest": {
        **obj({
            "key": {"type": "string", "minLength": 1, "description": "any identity (its own namespace)"},
            "tier": {"type": "string", "description": "a tier of the config in force"},
            "cost": {"type": "integer", "minimum": 1, "default": 1},
        }, optional=("cost",)),
        "additionalProperties": False,
    },
    "CheckResult": obj({
        "allowed": {"type": "boolean"}, "tier": {"type": "string"},
        "limit": nullable({"type": "string", "description":
                           "the refusing limit, else the most constraining; null for an unlimited tier"}),
        "remaining": nullable({"type": "integer"}),
        "retry_after_seconds": {"type": "number", "minimum": 0},
        "delay_seconds": {"type": "number", "minimum": 0, "description": "a leaky bucket's wait; absent if unlimited"},
    }, optional=("delay_seconds",)),
    "Reloaded": obj({
        "reloaded": {"const": True}, "version": {"type": "integer", "minimum": 1},
        "restart_needed": {"type": "array", "items": {"type": "string"},
                           "description": "changed keys that take effect only on restart"},
    }, optional=("restart_needed",)),
    "ReloadRefused": obj({
        "reloaded": {"const": False},
        "version": {"type": "integer", "minimum": 1, "description": "the version still in force"},
        "errors": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    }),
    "ConfigErrors": obj({"errors": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                    "description": "every error, one a line, with its key path"}}),
    "WhatifCounts": obj(counts("requests", *WHATIF_COUNTS)),
    "WhatifClient": obj({"id": {"type": "string"}, "tier": {"type": "string"}, **counts(*WHATIF_COUNTS)}),
    "WhatifResult": obj({
        "from": {"type": "string", "format": "date-time"},
        "to": {"type": "string", "format": "date-time"},
        "requests": COUNT,
        "tiers": {"type": "object", "additionalProperties": ref("WhatifCounts")},
        "clients": {"type": "array", "items": ref("WhatifClient"), "maxItems": 50,
                    "description": "the 50 clients whose allowed count changes most"},
        "unrecorded_selectors": {"type": "array", "items": {"type": "string"}, "description":
                                 "selectors of the candidate's limits whose values were not recorded (the "
                                 "live config selected none of them): replayed as missing, so those requests "
                                 "share one state"},
    }, description="`from` and `to` are the first and last replayed request (both now when none); tiers and "
                   "clients are those the live config gave each request then."),
}


def json_response(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def problem_response(description: str, *errors: str, headers: Schema | None = None) -> Schema:
    """A problem+json answer; `errors` narrows its `error` code."""
    schema = ref("Problem")
    if errors:
        schema = {"allOf": [schema, {"properties": {"error": {"enum": list(errors)}}}]}
    response: Schema = {"description": description, "content": {PROBLEM_JSON: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def text(description: str, *media_types: str) -> Schema:
    return {"description": description, "content": {m: {"schema": {"type": "string"}} for m in media_types}}


RETRY_AFTER: Final = {"Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 1}}}
UNAVAILABLE: Final = problem_response("The limit store is unavailable.", "limiter_unavailable")
CLIENT_ID: Final = {
    "name": "id", "in": "path", "required": True, "schema": {"type": "string"},
    "description": "a key's `name`, `jwt:<subject>`, or an address (IPv6: any address of the prefix network)",
}
UNKNOWN_CLIENT: Final = problem_response("No key has this name and it is not an address.", "unknown_client")

YAML_BODY: Final = {m: {"schema": {"type": "string", "description": "a config.yaml"}}
                    for m in ("application/yaml", "text/yaml")}

PATHS: Final[dict[str, dict[str, Any]]] = {
    "/healthz": {"get": {"operationId": "health", "summary": "200 while the process runs",
                         "responses": {"200": json_response("Alive.", ref("Health"))}}},
    "/readyz": {"get": {
        "operationId": "readiness", "summary": "Can requests be served under the config's policy?",
        "responses": {"200": json_response("Ready.", ref("Readiness")),
                      "503": json_response("Not ready: the store is down under `on_error: deny`.", ref("Readiness"))},
    }},
    "/api/stats": {"get": {"operationId": "getStats", "summary": "Everything the dashboard shows",
                           "responses": {"200": json_response("The stats.", ref("Stats"))}}},
    "/api/stats/reset": {"post": {"operationId": "resetStats",
                                  "summary": "Zero the counters, tables and timeline (limits untouched)",
                                  "responses": {"204": {"description": "Reset."}}}},
    "/api/stats/stream": {"get": {
        "operationId": "streamStats", "summary": "The stats as server-sent events, once a second",
        "responses": {"200": text("Events named `stats` whose `data` is a Stats document (JSON).",
                                  "text/event-stream")},
    }},
    "/api/clients/{id}": {
        "parameters": [CLIENT_ID],
        "get": {"operationId": "getClient", "summary": "A client's tier and the state of each limit",
                "responses": {"200": json_response("The client's state (an address never seen: every limit full).",
                                                   ref("ClientState")),
                              "404": UNKNOWN_CLIENT, "503": UNAVAILABLE}},
        "delete": {"operationId": "resetClient", "summary": "Reset the client's limits (and lift a ban)",
                   "responses": {"204": {"description": "Reset."}, "404": UNKNOWN_CLIENT, "503": UNAVAILABLE}},
    },
    "/api/check": {"post": {
        "operationId": "check", "summary": "The decision service, for services not behind the proxy",
        "description": "Decides and charges one request of `cost` for `key` in `tier`; these identities "
                       "never touch proxied clients' state.",
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref("CheckRequest")}}},
        "responses": {"200": json_response("The decision.", ref("CheckResult")),
                      "400": problem_response("The body is not valid JSON or not a valid request; "
                                              "the message names the field.", "bad_request"),
                      "503": problem_response("The limit store is unavailable under `on_error: deny`.",
                                              "limiter_unavailable", headers=RETRY_AFTER)},
    }},
    "/api/reload": {"post": {
        "operationId": "reload", "summary": "Re-read the config file now",
        "description": "With a body (a candidate config.yaml, as the dashboard's what-if sends it): the "
                       "candidate is validated, written over the config file (by a rename) and reloaded, so "
                       "that a later SIGHUP, file change or restart keeps it. An invalid one writes nothing.",
        "requestBody": {"required": False, "content": YAML_BODY},
        "responses": {"200": json_response("The new config is in force.", ref("Reloaded")),
                      "422": json_response("Invalid: the old config stays in force.", ref("ReloadRefused"))},
    }},
    "/api/whatif": {"post": {
        "operationId": "whatif", "summary": "Replay recent traffic through a candidate config",
        "description": "Replays the limited requests of the last `whatif.minutes` through the candidate's "
                       "identity rules, tiers, routes and limits on a private store at the recorded times, "
                       "without touching live state. Not recorded, so assumed: each request ends before the "
                       "next (concurrency limits), addresses as the live trusted proxies gave them.",
        "requestBody": {"required": True, "content": YAML_BODY},
        "responses": {"200": json_response("Then and under the candidate, per tier and per client.",
                                           ref("WhatifResult")),
                      "422": json_response("The candidate is invalid: every error, as for reload.",
                                           ref("ConfigErrors"))},
    }},
    "/api/openapi.json": {"get": {"operationId": "openapi", "summary": "This document",
                                  "responses": {"200": json_response("OpenAPI 3.1.", {"type": "object"})}}},
    "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus text exposition",
                         "responses": {"200": text(f"`Content-Type: {CONTENT_TYPE_LATEST}`", "text/plain")}}},
    "/": {"get": {
        "operationId": "dashboard", "summary": "The live HTML dashboard",
        "parameters": [{"name": "token", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "`admin.token`, once: sets the HttpOnly cookie and redirects to `/`"}],
        "responses": {"200": text("The page.", "text/html"),
                      "303": {"description": "The token was right: the cookie is set; go to `/`.",
                              "headers": {"Location": {"schema": {"const": "/"}},
                                          "Set-Cookie": {"schema": {"type": "string"}}}}},
    }},
    "/static/{name}": {"get": {
        "operationId": "dashboardAsset", "summary": "The dashboard's own CSS and JavaScript",
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                       {"name": "v", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "the content hash the page links with: that version is cached for good"}],
        "responses": {"200": text("The file.", "text/css", "text/javascript", "image/svg+xml", "image/png"),
                      "304": {"description": "Not modified (ETag, Last-Modified)."},
                      "404": problem_response("No such file.", "not_found")},
    }},
}


def guard_responses(path: str, method: str, open_paths: Collection[str]) -> Schema:
    """What proxy.admin_guard and the token middleware may answer before the handler."""
    responses: Schema = {}
    if path not in open_paths:
        responses["401"] = {"$ref": "#/components/responses/Unauthorized"}
        responses["421"] = {"$ref": "#/components/responses/MisdirectedRequest"}
    if method.upper() not in SAFE_METHODS:
        responses["403"] = {"$ref": "#/components/responses/CrossOrigin"}
    return responses


def components(cookie: str) -> Schema:
    return {
        "schemas": SCHEMAS,
        "responses": {
            "Unauthorized": problem_response("`admin.token` is set and the request does not carry it.",
                                             "unauthorized", headers={"WWW-Authenticate": {"schema": {
                                                 "type": "string"}}}),
            "MisdirectedRequest": problem_response(
                "`Host` is not an address of the admin listener, `localhost` or in `admin.allowed_hosts`.",
                "misdirected_request"),
            "CrossOrigin": problem_response("A state-changing request from another site (`Origin`, "
                                            "`Sec-Fetch-Site`).", "cross_origin"),
        },
        "securitySchemes": {
            "adminToken": {"type": "http", "scheme": "bearer",
                           "description": "`admin.token`; required only when it is set."},
            "adminCookie": {"type": "apiKey", "in": "cookie", "name": cookie,
                            "description": "Set by opening the dashboard once with `?token=`."},
        },
    }


def _version() -> str:
    try:
        return importlib.metadata.version("tollgate")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@functools.cache
def document(*, open_paths: frozenset[str], cookie: str) -> Schema:
    """The whole document; `open_paths` need no token and skip the Host check."""
    paths: Schema = {}
    for path, item in PATHS.items():
        paths[path] = dict(item)
        for method, operation in item.items():
            if method == "parameters":
                continue
            paths[path][method] = {
                **operation,
                "security": [] if path in open_paths else [{"adminToken": []}, {"adminCookie": []}],
                "responses": {**operation["responses"], **guard_responses(path, method, open_paths)},
            }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Tollgate admin API", "version": _version(),
                 "description": "The admin port: dashboard, stats, per-client state, the decision service, "
                              "reload and metrics. Private by default; errors are application/problem+json."},
        "paths": paths,
        "components": components(cookie),
    }
