"""The floor: the least an aiohttp reverse proxy can do, for `--targets aiohttp-bare`.

`python bench/bare_proxy.py PORT UPSTREAM_URL`. One pooled ClientSession, uvloop
when available, no limiter, no headers rewritten, no logging, no stats: what
Tollgate costs above this is Tollgate's, what this costs is aiohttp's.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from aiohttp import web

SKIP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host"})


async def main(port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024), auto_decompress=False)

    async def handle(request: web.Request) -> web.StreamResponse:
        async with session.request(request.method, upstream + request.raw_path, allow_redirects=False,
                                   headers={k: v for k, v in request.headers.items() if k.lower() not in SKIP},
                                   data=request.content if request.body_exists else None) as up:
            response = web.StreamResponse(status=up.status)
            for name, value in up.headers.items():
                if name.lower() not in SKIP:
                    response.headers.add(name, value)
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await session.close()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    factory = uvloop.new_event_loop if uvloop else None
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            runner.run(main(int(sys.argv[1]), sys.argv[2].rstrip("/")))
        except KeyboardInterrupt:
            pass
