"""The admin port: health, readiness (and later stats, metrics and the admin API)."""

from __future__ import annotations

from aiohttp import web

from .runtime import RUNTIME


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    limiter = request.app[RUNTIME].limiter
    ready = limiter.ready
    body = {"ready": ready, "storage": {"backend": limiter.store.backend, "healthy": limiter.health.healthy,
                                        "on_error": limiter.on_error}}
    return web.json_response(body, status=200 if ready else 503)


def setup_admin(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
