"""The proxy port's requests: what the head fixes is read from slots, with aiohttp's values."""

from __future__ import annotations

import asyncio

from aiohttp import web
from recording import raw_request

from proxy.aiohttp_private import GuardedServer, ProxyRequest


async def test_a_proxy_request_holds_what_aiohttp_properties_return():
    seen: dict[str, tuple[object, object]] = {}

    async def handler(request: web.BaseRequest) -> web.Response:
        assert type(request) is ProxyRequest
        for name in ProxyRequest.__slots__:  # aiohttp's own property, computed for this request
            seen[name] = (getattr(request, name), web.BaseRequest.__dict__[name].__get__(request, web.BaseRequest))
        return web.Response(text="ok")

    server = GuardedServer(handler, header_timeout=5)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    try:
        port = listener.sockets[0].getsockname()[1]
        head = b"PATCH /a%20b/c?x=1 HTTP/1.0\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 0\r\n\r\n"
        answer = await raw_request(port, head)
    finally:
        listener.close()
        await server.shutdown(1)
    assert answer.status == 200 and sorted(seen) == sorted(ProxyRequest.__slots__)
    for name, (slot, aiohttp_value) in seen.items():
        assert slot == aiohttp_value, name
    assert seen["method"][0] == "PATCH" and seen["raw_path"][0] == "/a%20b/c?x=1"
    assert seen["headers"][0].getall("X-A") == ["1", "2"] and seen["version"][0] == (1, 0)
