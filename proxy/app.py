"""Wiring only: the proxy app, the admin app, and the things they own.

Every closable thing is one small async context manager in `cleanup_ctx`
(the upstream pool, the store, background tasks) so a failing start still
closes what was opened before it.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

from aiohttp import web

from .accesslog import AccessLog
from .admin import setup_admin
from .config import Config, mask_url
from .handler import handle
from .limiter import Limiter
from .limits.memory import MemoryStore
from .limits.store import Store
from .reload import Reloader
from .runtime import RUNTIME, Runtime
from .server import SERVE, Serve
from .tasks import every

SWEEP_INTERVAL = 10.0  # seconds between drops of state that is fresh again


def build_runtime(config: Config, store: Store, *, fallback: MemoryStore | None = None,
                  access_log: AccessLog | None = None) -> Runtime:
    """The shared state of both ports: config, limiter over `store`, stats, reloader."""
    limiter = Limiter(store, on_error=config.storage.on_error, timeout=config.storage.timeout,
                      fallback=fallback, describe=mask_url(config.storage.url))
    runtime = Runtime(config=config, limiter=limiter, access_log=access_log)
    runtime.reloader = Reloader(runtime)
    return runtime


def build_proxy_app(runtime: Runtime) -> web.Application:
    """The server port: every method and path goes to the one handler."""
    app = web.Application()
    app[RUNTIME] = runtime
    # auto_decompress off: a gzip request body is forwarded as sent, not inflated.
    app[SERVE] = Serve(functools.partial(handle, runtime),
                       {"auto_decompress": False, "max_field_size": 8190, "max_line_size": 8190})
    app.cleanup_ctx.append(_upstream_pool)
    app.cleanup_ctx.append(_memory_sweeper)
    app.on_shutdown.append(_close_tunnels)
    app.on_cleanup.append(_close_access_log)
    return app


async def _close_tunnels(app: web.Application) -> None:
    """Upgraded connections never finish on their own: close them when the
    listener closes, so they do not hold the drain to server.shutdown_timeout."""
    app[RUNTIME].tunnels.close_all()


async def _close_access_log(app: web.Application) -> None:
    access_log = app[RUNTIME].access_log
    if access_log is not None:
        access_log.close()


def build_admin_app(runtime: Runtime) -> web.Application:
    app = web.Application()
    app[RUNTIME] = runtime
    setup_admin(app)
    return app


async def _upstream_pool(app: web.Application) -> AsyncIterator[None]:
    """One keep-alive connection pool to the upstream for the life of the app."""
    runtime = app[RUNTIME]
    runtime.pool = runtime.upstream.pool()
    try:
        yield
    finally:
        await runtime.pool.close()


async def _memory_sweeper(app: web.Application) -> AsyncIterator[None]:
    """Drop limit state that is fresh again, so memory follows active clients."""
    runtime = app[RUNTIME]

    async def sweep() -> None:
        limits = runtime.config.all_limits()
        for store in (runtime.limiter.store, runtime.limiter.fallback):
            if isinstance(store, MemoryStore):
                store.retain({limit.key for limit in limits})
                await store.sweep(limits)

    async with every(SWEEP_INTERVAL, sweep, name="tollgate-sweeper"):
        yield
