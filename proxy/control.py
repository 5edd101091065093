"""The private channel between a supervisor and its workers (`server.workers` > 1).

Each worker serves a tiny HTTP app on a unix socket in the supervisor's
private 0700 temp dir, so nothing else on the machine can reach it:

- `GET /stats`: the worker's pid and its summable stats and metrics counts
  (`Stats.dump`, `Metrics.dump`); the supervisor sums them for the admin port;
- `POST /stats/reset`: what `POST /api/stats/reset` does, in this worker;
- `POST /config/prepare` with the config text the supervisor validated, then
  `POST /config/commit` (or `/config/abort`): a reload is two-phase, so either
  every worker swaps or none does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any, Final

import aiohttp
from aiohttp import web

from . import config as config_module
from .config import Config, ConfigError
from .runtime import Runtime

CALL_TIMEOUT: Final = 5.0  # seconds for one control call; a worker that takes longer is skipped
PENDING: Final = web.AppKey("PENDING", dict)
WORKER_RUNTIME: Final = web.AppKey("WORKER_RUNTIME", Runtime)


async def _stats(request: web.Request) -> web.Response:
    runtime = request.app[WORKER_RUNTIME]
    return web.json_response({"pid": os.getpid(), "stats": runtime.stats.dump(), "metrics": runtime.metrics.dump()})


async def _reset(request: web.Request) -> web.Response:
    request.app[WORKER_RUNTIME].stats.reset()
    return web.Response(status=204)


async def _prepare(request: web.Request) -> web.Response:
    runtime = request.app[WORKER_RUNTIME]
    text = await request.text()
    try:
        new = config_module.from_text(text, runtime.config.path)
    except ConfigError as exc:
        return web.json_response({"errors": exc.errors}, status=422)
    request.app[PENDING]["config"] = new
    return web.json_response({"prepared": True})


async def _commit(request: web.Request) -> web.Response:
    runtime = request.app[WORKER_RUNTIME]
    new: Config | None = request.app[PENDING].pop("config", None)
    if new is None:
        return web.json_response({"errors": ["nothing prepared"]}, status=409)
    result = runtime.reloader.take(new, "supervisor")
    return web.json_response({"version": result.version})


async def _abort(request: web.Request) -> web.Response:
    request.app[PENDING].clear()
    return web.Response(status=204)


def control_app(runtime: Runtime) -> web.Application:
    app = web.Application()
    app[WORKER_RUNTIME] = runtime
    app[PENDING] = {}
    app.router.add_get("/stats", _stats)
    app.router.add_post("/stats/reset", _reset)
    app.router.add_post("/config/prepare", _prepare)
    app.router.add_post("/config/commit", _commit)
    app.router.add_post("/config/abort", _abort)
    return app


@contextlib.asynccontextmanager
async def serve_control(runtime: Runtime, path: str) -> AsyncIterator[None]:
    """Serve the control app on the unix socket `path` (its directory is private)."""
    runner = web.AppRunner(control_app(runtime), access_log=None)
    await runner.setup()
    try:
        await web.UnixSite(runner, path).start()
        yield
    finally:
        await runner.cleanup()
        with contextlib.suppress(OSError):
            os.unlink(path)


async def call(path: str, method: str, route: str, *, data: str | None = None,
               within: float = CALL_TIMEOUT) -> tuple[int, Any]:
    """One control call to the worker at `path`: (status, JSON body or None); OSError when it does not answer."""
    connector = aiohttp.UnixConnector(path)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=within)) as session:
            async with session.request(method, "http://worker" + route, data=data) as resp:
                body = await resp.json() if resp.content_type == "application/json" else None
                return resp.status, body
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise OSError(f"worker control {route}: {exc or type(exc).__name__}") from None
