"""The live HTML dashboard on the admin port.

``setup_dashboard`` adds three routes to the admin application:

- ``GET /`` renders ``templates/dashboard.html`` with the current stats already
  in it, so the page is useful before (or without) JavaScript;
- ``GET /static/{name}`` serves the page's own CSS and JS (nothing is loaded
  from other origins);
- ``GET /api/stats/stream`` pushes the stats as server-sent events (event
  ``stats``, JSON data) every ``interval`` seconds.

Authentication is not handled here: the admin app's middleware covers these
routes like every other admin route.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp_jinja2
import jinja2
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from .problems import problem

StatsProvider = Callable[[], Awaitable[dict[str, Any]]]

# proxy/shipped/templates links to the top-level templates/ in a checkout and is
# a copy of it in an installed wheel.
TEMPLATES_DIR: Final = Path(__file__).resolve().parent / "shipped" / "templates"
STATIC_DIR: Final = TEMPLATES_DIR / "static"

# Only these types are served; anything else in static/ stays private.
_CONTENT_TYPES: Final[Mapping[str, str]] = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

# The page is same-origin only: no inline script or style, no framing, and no
# Referer that could carry a ?token= to anyone.
_PAGE_HEADERS: Final[Mapping[str, str]] = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


@dataclass
class _Asset:
    """A static file and a content hash, recomputed when the file changes."""

    path: Path
    content_type: str
    _stamp: tuple[int, int] = (-1, -1)
    _version: str = ""

    def version(self) -> str:
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._version = hashlib.sha256(self.path.read_bytes()).hexdigest()[:12]
            self._stamp = stamp
        return self._version


@dataclass
class _Dashboard:
    stats: StatsProvider
    interval: float
    assets: dict[str, _Asset]
    # Set on app shutdown so open streams end at once instead of holding the
    # graceful shutdown for its whole timeout.
    closing: asyncio.Event = field(default_factory=asyncio.Event)


DASHBOARD_KEY: Final = web.AppKey[_Dashboard]("DASHBOARD_KEY")


def setup_dashboard(
    app: web.Application,
    *,
    stats: StatsProvider,
    interval: float = 1.0,
) -> None:
    """Install the dashboard page, its static files and its SSE stream on ``app``.

    ``stats`` returns the same dict as ``GET /api/stats``; it is called once
    per page render and once per ``interval`` for every open stream.
    """
    if not interval > 0:
        raise ValueError(f"dashboard interval must be > 0 seconds, got {interval!r}")
    assets = {
        p.name: _Asset(p, _CONTENT_TYPES[p.suffix])
        for p in sorted(STATIC_DIR.iterdir())
        if p.is_file() and p.suffix in _CONTENT_TYPES
    }
    app[DASHBOARD_KEY] = _Dashboard(stats=stats, interval=interval, assets=assets)

    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=jinja2.select_autoescape(default=True),
        default_helpers=False,
    )
    # aiohttp_jinja2 exposes the whole app to templates; the page needs none of it.
    env.globals.pop("app", None)
    env.filters.update(
        count=format_count,
        percent=format_percent,
        ms=format_ms,
        duration=format_duration,
    )

    app.router.add_get("/", _index, name="dashboard")
    app.router.add_get("/static/{name}", _static, name="dashboard-static")
    app.router.add_get("/api/stats/stream", _stream, name="dashboard-stream")
    app.on_shutdown.append(_stop_streams)


async def _index(request: web.Request) -> web.Response:
    dash = request.app[DASHBOARD_KEY]
    stats = await dash.stats()
    static = request.app.router["dashboard-static"]

    def static_url(name: str) -> str:
        url = static.url_for(name=name).with_query(v=dash.assets[name].version())
        return str(url)

    context = {
        "stats": stats,
        "static_url": static_url,
        # Lets the page place "now" on the chart's time axis in server time.
        "server_time": round(time.time(), 3),
        "interval": dash.interval,
    }
    response = aiohttp_jinja2.render_template("dashboard.html", request, context)
    response.headers.update(_PAGE_HEADERS)
    return response


async def _static(request: web.Request) -> web.StreamResponse:
    dash = request.app[DASHBOARD_KEY]
    asset = dash.assets.get(request.match_info["name"])
    if asset is None:
        return problem(404, "not_found", "The dashboard has no such file.")
    # Page links carry ?v=<hash>: that exact version may be cached for good;
    # any other request revalidates (ETag / Last-Modified from FileResponse).
    if request.query.get("v") == asset.version():
        cache_control = "private, max-age=31536000, immutable"
    else:
        cache_control = "no-cache"
    return web.FileResponse(
        asset.path,
        headers={
            "Content-Type": asset.content_type,
            "Cache-Control": cache_control,
            "X-Content-Type-Options": "nosniff",
        },
    )


async def _stream(request: web.Request) -> web.StreamResponse:
    dash = request.app[DASHBOARD_KEY]
    sse = EventSourceResponse()
    # A client that goes away makes send() raise ConnectionResetError; the app
    # shutting down sets ``closing``. Either ends the loop within one interval.
    with contextlib.suppress(ConnectionResetError):
        await sse.prepare(request)
        async with sse:
            while sse.is_connected() and not dash.closing.is_set():
                data = json.dumps(await dash.stats(), separators=(",", ":"))
                await sse.send(data, event="stats")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(dash.interval):
                        await dash.closing.wait()
    return sse


async def _stop_streams(app: web.Application) -> None:
    app[DASHBOARD_KEY].closing.set()


# Formatting shared with templates/static/dashboard.js: keep the two in step so
# the first live update does not visibly reformat the server-rendered numbers.


def format_count(value: int | float | None) -> str:
    """``1234`` -> ``"1,234"``; ``None`` -> an em dash."""
    if value is None:
        return "\u2014"
    return f"{round(value):,}"


def format_percent(value: float | None) -> str:
    """``99.5`` -> ``"99.5%"``; ``None`` -> an em dash."""
    if value is None:
        return "\u2014"
    return f"{value:.1f}%"


def format_ms(value: float | None) -> str:
    """Milliseconds with 3 significant digits at most: 0.42, 12.3, 250."""
    if value is None or not math.isfinite(value):
        return "\u2014"
    if value < 10:
        return f"{value:.2f} ms"
    if value < 100:
        return f"{value:.1f} ms"
    return f"{round(value):,} ms"


def format_duration(seconds: float | None) -> str:
    """Uptime as its two largest units: ``"45s"``, ``"12m 5s"``, ``"3h 7m"``, ``"2d 4h"``."""
    if seconds is None:
        return "\u2014"
    s = max(0, math.floor(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{s}s"
