"""The dashboard: server render, static files, the SSE stream, and the page in Chromium.

The browser tests drive a real headless Chromium (tests/cdp.py) against a real
admin-like app on a free port whose stats the test changes while the page is
open, so every value they wait for can only have arrived by a live update.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cdp import Browser

from proxy.dashboard import (
    format_count,
    format_duration,
    format_ms,
    format_percent,
    setup_dashboard,
)

SCRIPT_NAME = "<script>alert(1)</script>"
IMG_NAME = "<img src=x onerror=window.__xss=1>"
COOKIE = ("tollgate_admin", "s3cret")
REPO_ROOT = Path(__file__).resolve().parent.parent


def sample_stats(now: float) -> dict[str, Any]:
    """A /api/stats body with traffic over the last five minutes."""
    timeline = [
        {"t": int(now) - ago,
         "allowed": round(24 + 9 * math.sin(ago / 23) + 4 * math.sin(ago / 5)),
         "blocked": max(0, round(3 + 6 * math.sin(ago / 31)))}
        for ago in range(299, -1, -1)
        if ago % 50 > 4
    ]
    def client(id: str, tier: str, requests: int, blocked: int, left: int | None) -> dict[str, Any]:
        return {"id": id, "tier": tier, "requests": requests, "allowed": requests - blocked,
                "blocked": blocked, "remaining": left}

    def limit(name: str, algorithm: str, policy: str) -> dict[str, Any]:
        return {"unlimited": False,
                "limits": [{"name": name, "algorithm": algorithm, "policy": policy}]}

    clients = [
        client("demo-pro", "pro", 5120, 20, 180),
        client("demo-free", "free", 2210, 810, 0),
        client(SCRIPT_NAME, "free", 12, 3, None),
        client(IMG_NAME, "anonymous", 4, 0, 1),
    ]
    return {
        "uptime_seconds": 754.2,
        "totals": {"requests": 7346, "allowed": 6513, "blocked": 833, "unauthorized": 7,
                   "exempt": 0, "upstream_errors": 1, "unavailable": 0},
        "success_rate_percent": 88.7,
        "latency_ms": {"proxy": {"p50": 0.38, "p95": 0.91, "p99": 1.6},
                       "upstream": {"p50": 4.2, "p95": 17.5, "p99": 42.0}},
        "tiers": {"pro": {"requests": 5120, "allowed": 5100, "blocked": 20},
                  "free": {"requests": 2222, "allowed": 1409, "blocked": 813},
                  "anonymous": {"requests": 4, "allowed": 4, "blocked": 0}},
        "top_clients": clients,
        "top_blocked": sorted(clients, key=lambda c: -c["blocked"]),
        "timeline": timeline,
        "storage": {"backend": "redis", "healthy": True, "on_error": "allow", "last_error": None},
        "config": {"path": "/etc/tollgate/config.yaml", "version": 3,
                   "loaded_at": "2026-11-23T01:00:00Z", "last_error": None,
                   "tiers": {"free": limit("burst", "token_bucket", "q=20;w=10"),
                             "pro": limit("burst", "gcra", "q=200;w=10"),
                             "internal": {"unlimited": True, "limits": []}}},
    }


@dataclass
class Admin:
    """The served test app: its base URL, the stats it returns, the calls it saw."""

    url: str
    stats: dict[str, Any]
    stats_calls: int = 0
    client_calls: list[tuple[str, str]] = field(default_factory=list)
    remaining: int = 0

    async def provide(self) -> dict[str, Any]:
        self.stats_calls += 1
        return copy.deepcopy(self.stats)


def build_app(admin: Admin, *, interval: float, break_stream: bool = False) -> web.Application:
    @web.middleware
    async def fake_auth(request: web.Request, handler: Any) -> web.StreamResponse:
        # Stands in for the admin app's token middleware: cookie or nothing.
        if request.cookies.get(COOKIE[0]) != COOKIE[1]:
            raise web.HTTPUnauthorized()
        if break_stream and request.path == "/api/stats/stream":
            raise web.HTTPServiceUnavailable()
        return await handler(request)

    async def api_stats(request: web.Request) -> web.Response:
        return web.json_response(await admin.provide())

    async def get_client(request: web.Request) -> web.Response:
        admin.client_calls.append(("GET", request.match_info["id"]))
        burst = {"name": "burst", "algorithm": "token_bucket", "limit": 20,
                 "remaining": admin.remaining, "reset_seconds": 4.5}
        body = {"id": request.match_info["id"], "tier": "free", "limits": [burst]}
        return web.json_response(body)

    async def reset_client(request: web.Request) -> web.Response:
        admin.client_calls.append(("DELETE", request.match_info["id"]))
        admin.remaining = 20
        return web.Response(status=204)

    app = web.Application(middlewares=[fake_auth])
    setup_dashboard(app, stats=admin.provide, interval=interval)
    app.router.add_get("/api/stats", api_stats)
    app.router.add_get("/api/clients/{id}", get_client)
    app.router.add_delete("/api/clients/{id}", reset_client)
    return app


@asynccontextmanager
async def serve(app: web.Application, admin: Admin) -> AsyncIterator[web.AppRunner]:
    # A long shutdown_timeout, so a stream that held shutdown would show.
    runner = web.AppRunner(app, shutdown_timeout=30)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        admin.url = f"http://{host}:{port}/"
        yield runner
    finally:
        await runner.cleanup()


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    state = Admin(url="", stats=sample_stats(time.time()))
    async with serve(build_app(state, interval=0.2), state):
        yield state


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookies=dict([COOKIE])) as session:
        yield session


async def open_dashboard(browser: Browser, url: str) -> None:
    await browser.set_cookie(*COOKIE, url=url)
    await browser.navigate(url)


def js(value: str) -> str:
    """A JS string literal."""
    return json.dumps(value)


# ---- server side ---------------------------------------------------------


async def test_page_renders_current_stats_escaped(
    admin: Admin, http: aiohttp.ClientSession
) -> None:
    async with http.get(admin.url) as resp:
        body = await resp.text()
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert resp.headers["Cache-Control"] == "no-store"
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert '<div class="value" id="total-requests">7,346</div>' in body
    assert '<div class="value" id="success-rate">88.7%</div>' in body
    assert SCRIPT_NAME not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "<img src=x" not in body
    assert re.search(r'href="/static/dashboard\.css\?v=[0-9a-f]{12}"', body)


async def test_static_files_types_and_caching(admin: Admin, http: aiohttp.ClientSession) -> None:
    async with http.get(admin.url) as resp:
        body = await resp.text()
    js_url = re.search(r'src="(/static/dashboard\.js\?v=[0-9a-f]+)"', body)
    assert js_url is not None
    async with http.get(admin.url.rstrip("/") + js_url[1]) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert resp.headers["Cache-Control"] == "private, max-age=31536000, immutable"
        etag = resp.headers["ETag"]
    async with http.get(admin.url + "static/dashboard.css") as resp:
        assert resp.headers["Content-Type"] == "text/css; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-cache"
    async with http.get(admin.url + "static/dashboard.js", headers={"If-None-Match": etag}) as resp:
        assert resp.status == 304
    for name in ("missing.js", "..%2Fdashboard.html", "..%2F..%2Fproxy%2Fdashboard.py"):
        async with http.get(admin.url + "static/" + name) as resp:
            assert resp.status == 404, name


async def read_event(resp: aiohttp.ClientResponse) -> tuple[str, dict[str, Any]]:
    event, data = "", ""
    async with asyncio.timeout(5):
        while line := (await resp.content.readline()).decode():
            if line.startswith("event: "):
                event = line[7:].strip()
            elif line.startswith("data: "):
                data += line[6:].strip()
            elif line in ("\r\n", "\n") and data:
                return event, json.loads(data)
    raise AssertionError("stream ended")


async def test_stream_pushes_stats_and_ends_at_shutdown(http: aiohttp.ClientSession) -> None:
    state = Admin(url="", stats=sample_stats(time.time()))
    async with serve(build_app(state, interval=0.05), state) as runner:
        async with http.get(state.url + "api/stats/stream") as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert await read_event(resp) == ("stats", state.stats)
            state.stats["totals"]["requests"] = 99
            while (await read_event(resp))[1]["totals"]["requests"] != 99:
                pass
            loop = asyncio.get_running_loop()
            started = loop.time()
            await runner.cleanup()
            assert loop.time() - started < 2, "an open stream held the graceful shutdown"


async def test_stream_stops_when_the_client_goes(http: aiohttp.ClientSession) -> None:
    state = Admin(url="", stats=sample_stats(time.time()))
    async with serve(build_app(state, interval=0.05), state):
        async with http.get(state.url + "api/stats/stream") as resp:
            await read_event(resp)
        # Each tick of a live stream calls stats(); a stopped one calls it no more.
        calls = -1
        async with asyncio.timeout(5):
            while calls != state.stats_calls:
                calls = state.stats_calls
                await asyncio.sleep(0.2)


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="dashboard interval must be > 0 seconds, got 0"):
        setup_dashboard(web.Application(), stats=Admin("", {}).provide, interval=0)


@pytest.mark.parametrize(
    ("fmt", "value", "text"),
    [
        (format_count, 1234567, "1,234,567"), (format_count, None, "\u2014"),
        (format_percent, 99.95, "100.0%"), (format_percent, 80, "80.0%"),
        (format_ms, 0.4, "0.40 ms"), (format_ms, 12.34, "12.3 ms"),
        (format_ms, 1234.5, "1,234 ms"), (format_ms, None, "\u2014"),
        (format_duration, 45.9, "45s"), (format_duration, 725, "12m 5s"),
        (format_duration, 3 * 3600 + 7 * 60, "3h 7m"),
        (format_duration, 2 * 86400 + 4 * 3600 + 5, "2d 4h"),
    ],
)
def test_formatting(fmt: Any, value: Any, text: str) -> None:
    assert fmt(value) == text


# ---- in the browser --------------------------------------------------------


async def test_page_updates_live_and_renders_names_as_text(
    admin: Admin, browser: Browser, tmp_path: Path
) -> None:
    await open_dashboard(browser, admin.url)
    await browser.wait_for("document.getElementById('connection').dataset.state === 'live'")
    shot = await browser.screenshot(tmp_path / "dashboard.png", 1280, 900)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("TOLLGATE_SCREENSHOT"):
        await browser.screenshot(REPO_ROOT / "docs" / "dashboard.png", 1280, 900)
    scripts = await browser.evaluate("document.querySelectorAll('script').length")
    first_update = await browser.evaluate("document.getElementById('last-update').dateTime")

    admin.stats["totals"]["requests"] = 123457
    admin.stats["success_rate_percent"] = 42.5
    await browser.wait_for("document.getElementById('total-requests').textContent === '123,457'")
    assert await browser.evaluate("document.getElementById('success-rate').textContent") == "42.5%"
    assert await browser.evaluate("document.getElementById('last-update').dateTime") != first_update

    for table in ("top-clients", "top-blocked"):
        for name in (SCRIPT_NAME, IMG_NAME):
            cell = await browser.evaluate(
                f"[...document.querySelectorAll('#{table} tr[data-client-id]')]"
                f".find(tr => tr.dataset.clientId === {js(name)}).cells[0].firstChild.textContent"
            )
            assert cell == name
    assert await browser.evaluate("document.querySelectorAll('script').length") == scripts
    assert await browser.evaluate("document.querySelectorAll('main img').length") == 0
    assert await browser.evaluate("window.__xss") is None
    assert browser.dialogs == []
    assert browser.errors == []
    # Stacked areas plus their lines, drawn from the timeline.
    assert await browser.evaluate("document.querySelectorAll('#rps-chart path').length") == 4

    await browser.screenshot(tmp_path / "phone.png", 390, 844)
    assert await browser.evaluate("document.documentElement.scrollWidth") <= 390


async def test_unhealthy_storage_and_reload_error_show_red(admin: Admin, browser: Browser) -> None:
    await open_dashboard(browser, admin.url)
    assert await browser.evaluate("document.getElementById('storage-banner').hidden") is True
    admin.stats["storage"].update(healthy=False, on_error="deny", last_error="redis: refused")
    admin.stats["config"]["last_error"] = "tiers.free.limits[0].rate: expected a number, got 'ten'"

    await browser.wait_for(
        "document.getElementById('storage-status').dataset.state === 'unhealthy'"
    )
    banner = await browser.evaluate("document.getElementById('storage-banner').innerText")
    assert "storage.on_error=deny is in force" in banner
    color = await browser.evaluate(
        "getComputedStyle(document.getElementById('storage-status')).color"
    )
    red, green, blue = map(int, re.findall(r"\d+", color)[:3])
    assert red > 180 and green < 120 and blue < 120, color
    error = await browser.evaluate(
        "(e => [e.dataset.state, e.textContent])(document.getElementById('config-error'))"
    )
    assert error == ["error", admin.stats["config"]["last_error"]]


async def test_client_panel_shows_limits_and_resets_them(admin: Admin, browser: Browser) -> None:
    await open_dashboard(browser, admin.url)
    await browser.evaluate(
        f"[...document.querySelectorAll('#top-blocked tr[data-client-id]')]"
        f".find(tr => tr.dataset.clientId === {js(SCRIPT_NAME)}).click()"
    )
    await browser.wait_for("!document.getElementById('client-panel').hidden")
    await browser.wait_for("document.querySelectorAll('#client-limits tbody tr').length === 1")
    panel_id = await browser.evaluate("document.getElementById('client-panel-id').textContent")
    assert panel_id == SCRIPT_NAME
    row = await browser.evaluate(
        "[...document.querySelector('#client-limits tbody tr').cells]"
        ".map(c => c.firstChild.textContent)"
    )
    assert row == ["burst", "20", "0", "4.5 s"]
    assert admin.client_calls[0] == ("GET", SCRIPT_NAME)

    await browser.evaluate("document.getElementById('client-reset').click()")
    await browser.wait_for(
        "document.getElementById('client-panel-status').textContent.startsWith('Limits reset')"
    )
    assert ("DELETE", SCRIPT_NAME) in admin.client_calls
    assert admin.client_calls[-1] == ("GET", SCRIPT_NAME)  # refreshed after the reset
    remaining = await browser.evaluate(
        "document.querySelector('#client-limits tbody tr').cells[2].firstChild.textContent"
    )
    assert remaining == "20"


async def test_polls_when_the_stream_fails(browser: Browser) -> None:
    state = Admin(url="", stats=sample_stats(time.time()))
    async with serve(build_app(state, interval=0.2, break_stream=True), state):
        await open_dashboard(browser, state.url)
        await browser.wait_for(
            "document.getElementById('connection').dataset.state === 'polling'"
        )
        state.stats["totals"]["blocked"] = 4321
        await browser.wait_for(
            "document.getElementById('total-blocked').textContent === '4,321'"
        )
