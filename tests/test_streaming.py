"""Long-lived streams (server-sent events) reach the client as they are produced.

The upstream sends one event, then waits until the client has read it before
sending the next: a proxy that buffered a chunk would deadlock here, and the
test fails on its time-out instead.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from harness import running

OPEN = """
tiers: {anonymous: {unlimited: true}}
upstream: {url: "{upstream}", timeout: 2, connect_timeout: 1}
"""
EVENTS = 5


async def test_each_event_arrives_before_the_next_is_sent() -> None:
    delivered = [asyncio.Event() for _ in range(EVENTS)]

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(EVENTS):
            await response.write(b"data: %d\n\n" % i)
            await delivered[i].wait()  # the client has it: only now the next one
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/events", events)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with running(OPEN, f"http://127.0.0.1:{port}") as tg:
            async with tg.session.get(tg.url + "/events") as resp:
                assert resp.headers["Content-Type"] == "text/event-stream"
                for i in range(EVENTS):
                    line = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
                    assert line == b"data: %d\n\n" % i
                    delivered[i].set()
                assert await resp.content.read() == b""
    finally:
        await runner.cleanup()
