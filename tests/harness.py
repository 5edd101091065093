"""Tollgate in-process on real loopback sockets, for tests that need a fake clock.

`running(yaml_text, upstream_url)` builds the same runtime and apps that
`python run.py` builds (proxy.app), serves both ports on free ports of
127.0.0.1, and tears everything down on exit. Tests that need the real
command line use the `run_process` fixture instead.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from proxy import config as config_module
from proxy.accesslog import AccessLog
from proxy.app import build_admin_app, build_proxy_app, build_runtime
from proxy.limits.memory import MemoryStore
from proxy.limits.store import Clock, Store, wall_clock
from proxy.runtime import Runtime
from proxy.server import listen


@dataclass
class Tollgate:
    url: str
    admin_url: str
    runtime: Runtime
    store: Store
    session: aiohttp.ClientSession
    access_stream: io.StringIO

    def access_lines(self) -> list[str]:
        """The access log so far, one line per request."""
        self.runtime.access_log.sync()
        return self.access_stream.getvalue().splitlines()

    async def get(self, path: str, **kwargs: object) -> tuple[int, dict[str, str], bytes]:
        """GET through the proxy: status, headers (last value wins), body."""
        async with self.session.get(self.url + path, **kwargs) as resp:  # type: ignore[arg-type]
            return resp.status, dict(resp.headers), await resp.read()


@contextlib.asynccontextmanager
async def running(
    yaml_text: str, upstream_url: str = "http://127.0.0.1:9", *, clock: Clock = wall_clock,
    store: Store | None = None, config_path: Path | None = None, header_timeout: float = 10.0,
    watch_interval: float | None = None,
) -> AsyncIterator[Tollgate]:
    """Serve a Tollgate built from `yaml_text` (`{upstream}` is replaced by the URL)."""
    text = yaml_text.replace("{upstream}", upstream_url)
    if config_path is not None:
        config_path.write_text(text)
        config = config_module.load(config_path)
    else:
        config = config_module.from_text(text)
    if store is None:
        if config.storage.backend == "redis":
            from proxy.limits.redis import RedisStore

            store = RedisStore.from_config(config.storage)
        else:
            store = MemoryStore(clock)
    access_stream = io.StringIO()
    runtime = build_runtime(config, store, access_log=AccessLog(config.log_format, stream=access_stream))
    server = config.server
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(store.close)
        await runtime.limiter.start()
        port = await stack.enter_async_context(listen(
            build_proxy_app(runtime), "127.0.0.1", 0, "proxy", shutdown_timeout=server.shutdown_timeout,
            keepalive_timeout=server.keepalive_timeout, header_timeout=header_timeout,
        ))
        admin_port = await stack.enter_async_context(
            listen(build_admin_app(runtime), "127.0.0.1", 0, "admin", shutdown_timeout=1.0)
        )
        if watch_interval is not None:
            await stack.enter_async_context(runtime.reloader.watching(watch_interval))
        session = await stack.enter_async_context(aiohttp.ClientSession(auto_decompress=False))
        stack.callback(runtime.access_log.close)
        yield Tollgate(url=f"http://127.0.0.1:{port}", admin_url=f"http://127.0.0.1:{admin_port}",
                       runtime=runtime, store=store, session=session, access_stream=access_stream)
