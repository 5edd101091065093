"""Tollgate in-process on real loopback sockets, for tests that need a fake clock.

`running(yaml_text, upstream_url)` builds the same runtime and apps that
`python run.py` builds (proxy.app), serves both ports on free ports of
127.0.0.1, and tears everything down on exit. Tests that need the real
command line use the `run_process` fixture instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from proxy import config as config_module
from proxy.app import build_admin_app, build_proxy_app, build_runtime
from proxy.limits.memory import MemoryStore
from proxy.limits.store import Clock, Store, wall_clock
from proxy.runtime import Runtime


@dataclass
class Tollgate:
    url: str
    admin_url: str
    runtime: Runtime
    store: Store
    session: aiohttp.ClientSession

    async def get(self, path: str, **kwargs: object) -> tuple[int, dict[str, str], bytes]:
        """GET through the proxy: status, headers (last value wins), body."""
        async with self.session.get(self.url + path, **kwargs) as resp:  # type: ignore[arg-type]
            return resp.status, dict(resp.headers), await resp.read()


@contextlib.asynccontextmanager
async def running(
    yaml_text: str, upstream_url: str = "http://127.0.0.1:9", *, clock: Clock = wall_clock,
    store: Store | None = None, config_path: Path | None = None,
) -> AsyncIterator[Tollgate]:
    """Serve a Tollgate built from `yaml_text` (`{upstream}` is replaced by the URL)."""
    text = yaml_text.replace("{upstream}", upstream_url)
    if config_path is not None:
        config_path.write_text(text)
        config = config_module.load(config_path)
    else:
        config = config_module.from_text(text)
    store = store if store is not None else MemoryStore(clock)
    runtime = build_runtime(config, store)
    proxy_server = TestServer(build_proxy_app(runtime), host="127.0.0.1")
    admin_server = TestServer(build_admin_app(runtime), host="127.0.0.1")
    await proxy_server.start_server()
    await admin_server.start_server()
    session = aiohttp.ClientSession(auto_decompress=False)
    try:
        yield Tollgate(
            url=str(proxy_server.make_url("")).rstrip("/"),
            admin_url=str(admin_server.make_url("")).rstrip("/"),
            runtime=runtime, store=store, session=session,
        )
    finally:
        await session.close()
        await admin_server.close()
        await proxy_server.close()
        await store.close()
