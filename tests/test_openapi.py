"""GET /api/openapi.json: a valid OpenAPI 3.1 document that cannot drift from the code.

Three guards: the served document passes openapi-spec-validator; the admin
app's routes and the document's paths are the same set; and real answers of
a running Tollgate (every documented operation, errors included) validate
against the document, with its object schemas closed so that a field the code
adds without documenting it fails here.
"""

from __future__ import annotations

import copy
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from harness import Tollgate, running
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from proxy import config as config_module
from proxy.admin import COOKIE, OPEN_PATHS
from proxy.app import build_admin_app, build_runtime
from proxy.limits.memory import MemoryStore
from proxy.openapi import document

# Documented ahead of its handler so that its engineer only implements it.
# Remove an entry as soon as the route is served (the tests fail until then).
NOT_YET_SERVED: set[tuple[str, str]] = set()

TOKEN = "s3cret-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONFIG = """
upstream: {url: "{upstream}", timeout: 2}
admin: {token: s3cret-admin}
tiers:
  anonymous:
    limits: [{algorithm: token_bucket, capacity: 50, refill_rate: 1}]
  free:
    limits:
      - {name: burst, algorithm: token_bucket, capacity: 2, refill_rate: 1}
      - {name: daily, algorithm: fixed_window, limit: 100, window: 86400}
      - {name: trial, algorithm: sliding_window, limit: 1, window: 60, shadow: true}
      - {name: inflight, algorithm: concurrency, max: 4}
    penalty: {after: 1, within: 60, ban: 600}
  internal: {unlimited: true}
api_keys:
  demo-free-key: {tier: free, name: demo-free}
  internal-key: {tier: internal, name: ops}
routes:
  - path: /users
    limits: [{name: users-all, algorithm: fixed_window, limit: 1000, window: 60, per: global}]
"""
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def the_document() -> dict[str, Any]:
    return copy.deepcopy(document(open_paths=OPEN_PATHS, cookie=COOKIE))


def documented_operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method) for path, item in doc["paths"].items() for method in item if method in METHODS}


def served_operations() -> set[tuple[str, str]]:
    """Every (path, method) the admin app registers; HEAD rides along with GET (aiohttp adds it)."""
    runtime = build_runtime(config_module.from_text(""), MemoryStore())
    app = build_admin_app(runtime)
    served = set()
    for resource in app.router.resources():
        methods = {route.method.lower() for route in resource}
        if "get" in methods:
            methods.discard("head")
        served |= {(resource.canonical, method) for method in methods}
    return served


def test_every_served_route_is_documented_and_nothing_else():
    served, documented = served_operations(), documented_operations(the_document())
    assert served - documented == set(), "routes missing from proxy/openapi.py PATHS"
    assert documented - served == NOT_YET_SERVED, "documented but not served (or NOT_YET_SERVED is stale)"
    assert ("/api/stats/stream", "get") in served and ("/", "get") in served  # the dashboard's are walked too


async def test_served_document_is_valid_openapi_3_1(upstream):
    async with running(CONFIG, upstream.url) as tg:
        async with tg.session.get(tg.admin_url + "/api/openapi.json", headers=AUTH) as resp:
            assert resp.status == 200 and resp.content_type == "application/json"
            served = await resp.json()
    assert served == the_document()
    assert served["openapi"].startswith("3.1.")
    validate(served)
    broken = the_document()
    del broken["paths"]["/api/stats"]["get"]["responses"]["200"]["description"]  # required by OpenAPI
    with pytest.raises(OpenAPIValidationError):  # the validator does look at what we give it
        validate(broken)


def test_guards_are_documented_where_the_middlewares_apply_them():
    paths = the_document()["paths"]
    assert paths["/healthz"]["get"]["security"] == [] and "401" not in paths["/healthz"]["get"]["responses"]
    stats = paths["/api/stats"]["get"]
    assert stats["security"] == [{"adminToken": []}, {"adminCookie": []}]
    assert {"401", "421"} <= set(stats["responses"]) and "403" not in stats["responses"]
    assert "403" in paths["/api/reload"]["post"]["responses"]


def closed(node: Any, *, in_all_of: bool = False) -> Any:
    """A copy where every object schema with properties admits no other property."""
    if isinstance(node, list):
        return [closed(item, in_all_of=in_all_of) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: closed(value, in_all_of=key == "allOf") for key, value in node.items()}
    if "properties" in node and not in_all_of and not {"additionalProperties", "unevaluatedProperties"} & set(node):
        out["unevaluatedProperties"] = False
    return out


class Conformance:
    """Sends requests to a running Tollgate and checks each answer against the document."""

    def __init__(self) -> None:
        self.doc = the_document()
        self.components = closed(self.doc["components"])
        self.templates = [(re.compile(re.sub(r"\{[^/]+\}", "[^/]+", path) + "$"), path) for path in self.doc["paths"]]
        self.exercised: set[tuple[str, str]] = set()

    def operation(self, method: str, path: str) -> dict[str, Any]:
        [template] = [t for regex, t in self.templates if regex.match(path)]
        self.exercised.add((template, method.lower()))
        return self.doc["paths"][template][method.lower()]

    def response_spec(self, method: str, path: str, status: int) -> dict[str, Any]:
        operation = self.operation(method, path)
        assert str(status) in operation["responses"], f"{method} {path}: {status} is not documented"
        spec = operation["responses"][str(status)]
        if "$ref" in spec:
            spec = self.doc["components"]["responses"][spec["$ref"].rsplit("/", 1)[1]]
        return spec

    def check_body(self, spec: dict[str, Any], content_type: str, body: Any, where: str = "") -> None:
        assert content_type in spec["content"], f"{where}: {content_type} is not documented: {sorted(spec['content'])}"
        schema = {**closed(spec["content"][content_type]["schema"]), "components": self.components}
        validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]
        assert errors == [], f"{where}: {errors}"

    async def call(self, tg: Tollgate, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        kwargs.setdefault("allow_redirects", False)
        async with tg.session.request(method, tg.admin_url + path, **kwargs) as resp:
            raw = await resp.read()
            spec = self.response_spec(method, resp.url.path, resp.status)
            if "json" in kwargs and resp.status < 300:  # what the code accepted, the document accepts
                self.check_body(self.operation(method, path)["requestBody"], "application/json", kwargs["json"],
                                f"{method} {path} request")
            for name, header in spec.get("headers", {}).items():
                assert not header.get("required") or name in resp.headers, f"{name} missing"
            if "content" not in spec:
                assert raw == b"", f"{method} {path} {resp.status}: a body where none is documented"
                return resp.status, None
            body: Any = raw.decode()
            if resp.content_type.endswith("json"):
                body = json.loads(raw)
            self.check_body(spec, resp.content_type, body, f"{method} {path} {resp.status}")
            return resp.status, body

    async def stream_event(self, tg: Tollgate) -> dict[str, Any]:
        """The first event of the stats stream; its data must be a Stats document."""
        async with tg.session.get(tg.admin_url + "/api/stats/stream", headers=AUTH) as resp:
            spec = self.response_spec("GET", "/api/stats/stream", resp.status)
            assert resp.content_type in spec["content"]
            lines = [(await resp.content.readline()).decode().strip() for _ in range(2)]
        assert lines[0] == "event: stats" and lines[1].startswith("data: ")
        data = json.loads(lines[1][len("data: "):])
        self.check_body({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Stats"}}}},
                        "application/json", data, "GET /api/stats/stream data")
        return data


async def traffic(tg: Tollgate) -> None:
    for _ in range(3):  # 2 allowed, 1 blocked
        await tg.get("/users", headers={"X-API-Key": "demo-free-key"})
    await tg.get("/users", headers={"X-API-Key": "internal-key"})
    await tg.get("/users")
    await tg.get("/users", headers={"X-API-Key": "wrong"})


async def healthy_answers(tg: Tollgate, c: Conformance, config_path: Path) -> None:
    await traffic(tg)
    assert (await c.call(tg, "GET", "/healthz"))[0] == 200
    assert (await c.call(tg, "GET", "/readyz"))[0] == 200
    status, stats = await c.call(tg, "GET", "/api/stats", headers=AUTH)
    assert status == 200 and stats["top_clients"] and stats["timeline"]  # rows and points were checked too
    assert {row["remaining"] for row in stats["top_clients"]} >= {0, None}  # keyed and unlimited
    assert stats["totals"]["shadow_blocked"] > 0 and stats["limits"]["routes"][0]["limits"][0]["remaining"] > 0
    assert [row["id"] for row in stats["banned"]] == ["demo-free"]  # its refusal banned it
    status, client = await c.call(tg, "GET", "/api/clients/demo-free", headers=AUTH)
    assert status == 200 and client["banned_until"] is not None and client["ban_seconds_left"] is not None
    await c.stream_event(tg)
    for client_id in ("demo-free", "ops", "127.0.0.1", "2001:db8::1"):
        assert (await c.call(tg, "GET", f"/api/clients/{client_id}", headers=AUTH))[0] == 200
    assert (await c.call(tg, "GET", "/api/clients/nobody", headers=AUTH))[0] == 404
    assert (await c.call(tg, "DELETE", "/api/clients/demo-free", headers=AUTH))[0] == 204
    assert (await c.call(tg, "DELETE", "/api/clients/nobody", headers=AUTH))[0] == 404
    for body in ({"key": "k", "tier": "free", "cost": 2}, {"key": "k", "tier": "free"}, {"key": "k", "tier": "internal"}):
        assert (await c.call(tg, "POST", "/api/check", json=body, headers=AUTH))[0] == 200
    assert (await c.call(tg, "POST", "/api/check", json={"key": "k", "tier": "gold"}, headers=AUTH))[0] == 400
    assert (await c.call(tg, "POST", "/api/check", data=b"{", headers=AUTH))[0] == 400
    assert (await c.call(tg, "POST", "/api/stats/reset", headers=AUTH))[0] == 204
    assert (await c.call(tg, "GET", "/metrics", headers=AUTH))[0] == 200
    assert (await c.call(tg, "GET", "/api/openapi.json", headers=AUTH))[0] == 200
    await dashboard_answers(tg, c)
    await whatif_answers(tg, c)
    await reload_answers(tg, c, config_path)
    await guard_answers(tg, c)


async def dashboard_answers(tg: Tollgate, c: Conformance) -> None:
    assert (await c.call(tg, "GET", "/", headers=AUTH))[0] == 200
    assert (await c.call(tg, "GET", f"/?token={TOKEN}"))[0] == 303
    async with tg.session.get(tg.admin_url + "/static/dashboard.css", headers=AUTH) as resp:
        etag = resp.headers["ETag"]
    assert (await c.call(tg, "GET", "/static/dashboard.js", headers=AUTH))[0] == 200
    assert (await c.call(tg, "GET", "/static/dashboard.css", headers={**AUTH, "If-None-Match": etag}))[0] == 304
    assert (await c.call(tg, "GET", "/static/nothing.css", headers=AUTH))[0] == 404


async def whatif_answers(tg: Tollgate, c: Conformance) -> None:
    yaml = {**AUTH, "Content-Type": "application/yaml"}
    stricter = CONFIG.replace("capacity: 2,", "capacity: 1,").replace("{upstream}", "http://127.0.0.1:9")
    stricter = stricter.replace("    limits: [{name: users-all,", "    limits: [{name: per-tenant, algorithm: fixed_window, limit: 9, "
                                "window: 9, per: 'header:X-Tenant'}, {name: users-all,")
    status, answer = await c.call(tg, "POST", "/api/whatif", data=stricter, headers=yaml)
    assert status == 200 and answer["tiers"]["free"]["refused_candidate"] == 2 and answer["clients"]
    assert answer["unrecorded_selectors"] == ["header:x-tenant"]
    assert (await c.call(tg, "POST", "/api/whatif", data="tiers: []\n", headers=yaml))[0] == 422
    status, reloaded = await c.call(tg, "POST", "/api/reload", data="tiers: 1\n", headers=yaml)
    assert status == 422 and reloaded["reloaded"] is False


async def reload_answers(tg: Tollgate, c: Conformance, config_path: Path) -> None:
    good = config_path.read_text()
    config_path.write_text(good + "tiers: {}\n")  # a duplicate key
    status, refused = await c.call(tg, "POST", "/api/reload", headers=AUTH)
    assert status == 422 and refused["errors"]
    config_path.write_text(good.replace("admin: {", "admin: {port: 18181, "))
    status, reloaded = await c.call(tg, "POST", "/api/reload", headers=AUTH)
    assert status == 200 and reloaded["restart_needed"] == ["admin.port"]
    status, stats = await c.call(tg, "GET", "/api/stats", headers=AUTH)
    assert status == 200 and stats["config"]["last_error"] is None and stats["config"]["version"] == 2


async def guard_answers(tg: Tollgate, c: Conformance) -> None:
    assert (await c.call(tg, "GET", "/api/stats"))[0] == 401
    assert (await c.call(tg, "GET", "/api/stats", headers={**AUTH, "Host": "evil.example"}))[0] == 421
    foreign = {**AUTH, "Origin": "http://evil.example"}
    assert (await c.call(tg, "POST", "/api/check", json={}, headers=foreign))[0] == 403


def dead_redis_url() -> str:
    """A port that was free a moment ago: connections to it are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


async def storage_down_answers(tg: Tollgate, c: Conformance) -> None:
    body = {"key": "k", "tier": "anonymous"}
    assert (await c.call(tg, "POST", "/api/check", json=body, headers=AUTH))[0] == 503
    assert (await c.call(tg, "GET", "/readyz"))[0] == 503
    assert (await c.call(tg, "GET", "/api/clients/127.0.0.1", headers=AUTH))[0] == 503
    assert (await c.call(tg, "DELETE", "/api/clients/127.0.0.1", headers=AUTH))[0] == 503
    status, stats = await c.call(tg, "GET", "/api/stats", headers=AUTH)
    assert status == 200 and stats["storage"]["healthy"] is False and stats["storage"]["last_error"]
    assert stats["limits"]["routes"][0]["limits"][0]["remaining"] is None  # no state known, no 500


async def test_real_answers_match_the_document(upstream, tmp_path):
    c = Conformance()
    async with running(CONFIG, upstream.url, config_path=tmp_path / "config.yaml") as tg:
        await healthy_answers(tg, c, tmp_path / "config.yaml")
    down = CONFIG + f"storage: {{backend: redis, url: '{dead_redis_url()}', timeout: 0.05, on_error: deny}}\n"
    async with running(down, upstream.url) as tg:
        await storage_down_answers(tg, c)
    assert documented_operations(c.doc) - c.exercised == NOT_YET_SERVED, "add a call for each new operation"


def test_an_undocumented_field_fails_the_check():
    c = Conformance()
    spec = c.response_spec("GET", "/api/clients/x", 200)
    state = {"id": "x", "tier": "free", "unlimited": False, "limits": [], "routes": [], "banned_until": None,
             "ban_seconds_left": None}
    c.check_body(spec, "application/json", state)
    with pytest.raises(AssertionError, match="'surprise' was unexpected"):
        c.check_body(spec, "application/json", {**state, "surprise": 1})
    with pytest.raises(AssertionError, match="404 is not documented"):
        c.response_spec("GET", "/api/stats", 404)


async def test_the_document_needs_the_token_like_every_admin_route(upstream):
    async with running(CONFIG, upstream.url) as tg:
        async with tg.session.get(tg.admin_url + "/api/openapi.json") as resp:
            assert resp.status == 401 and resp.content_type == "application/problem+json"
