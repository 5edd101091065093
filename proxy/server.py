"""The two listeners: a guarded aiohttp server per port, drained on exit.

Every connection gets a request-head deadline (`proxy.aiohttp_private.HeadGuard`,
nginx's `client_header_timeout`): a client that trickles its request line and
headers (slowloris) is cut after `header_timeout` seconds. Bodies and idle
keep-alive connections have their own timeouts. The same handler parses a
connection that opens with a method llhttp does not know with aiohttp's Python
parser (every RFC 9110 method token is forwarded), and what a parser refuses
gets `parse_error_answer`: problem+json, 400 or 505.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine, HttpProcessingError, InvalidURLError

from .aiohttp_private import GuardedAppRunner, GuardedServer, requests_in_progress
from .problems import problem

log = logging.getLogger("tollgate")

HEADER_TIMEOUT = 10.0  # seconds; nginx's client_header_timeout defaults to 60
CANCEL_GRACE = 0.5  # of the drain budget: for requests still running at its end to be cut and logged
DRAIN_POLL = 0.05

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Serve:
    """Every request of the port goes straight to `handler`: no router, match
    info or middleware chain. The proxy port has one catch-all route, and
    resolving it cost about 13 us a request, a third of aiohttp's own
    (bench/README.md). `parser` holds the RequestHandler settings (limits of
    the request parser, decompression)."""

    handler: Handler
    parser: Mapping[str, Any] = field(default_factory=dict)


SERVE: Final = web.AppKey("SERVE", Serve)
"""An app that sets SERVE is served by a plain `web.Server` on that handler; the
app still owns the lifecycle (cleanup_ctx, on_shutdown, on_cleanup)."""


def parse_error_answer(exc: HttpProcessingError) -> web.Response:
    """What a parser refused: 400, or 505 for an HTTP version llhttp does not know (1.2, 3.0).

    llhttp reports an unknown version as HPE_INVALID_VERSION, which aiohttp
    raises as BadStatusLine with llhttp's reason in the message; the versions
    it does accept (0.9, 2.0) are answered by proxy.target.
    """
    if isinstance(exc, BadStatusLine) and not isinstance(exc, BadHttpMethod) and "Invalid HTTP version" in exc.message:
        return problem(505, "http_version_not_supported", "Only HTTP/1.0 and HTTP/1.1 are supported.")
    if isinstance(exc, InvalidURLError) and exc.message == "*":
        return problem(400, "bad_request", "The * request target is for OPTIONS only.")
    return problem(400, "bad_request", "The request is not valid HTTP/1.1.")


class StartError(Exception):
    """Tollgate cannot start for a reason the user can fix; the message says which."""


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.asynccontextmanager
async def listen(
    app: web.Application, host: str, port: int, what: str, *, shutdown_timeout: float,
    keepalive_timeout: float = 75.0, header_timeout: float = HEADER_TIMEOUT, reuse_port: bool = False,
) -> AsyncIterator[int]:
    """Serve `app`, yielding the bound port; on exit close the listener at once,
    then drain in-flight requests up to `shutdown_timeout`. `reuse_port`: workers
    each bind the port (SO_REUSEPORT) and the kernel spreads connections over them."""
    settings: dict[str, Any] = {"access_log": None, "keepalive_timeout": keepalive_timeout,
                                "header_timeout": header_timeout, "refused": parse_error_answer}
    # aiohttp's own shutdown waits up to its timeout twice (for the handlers, then
    # after cancelling them): it gets only the grace at the end of the budget.
    grace = min(CANCEL_GRACE, shutdown_timeout / 2)
    serve = app.get(SERVE)
    runner: web.BaseRunner
    if serve is None:
        runner = GuardedAppRunner(app, shutdown_timeout=grace / 2, **settings)
    else:
        app.freeze()
        await app.startup()
        # A client that goes away cancels its handler, as nginx drops the upstream
        # exchange of an aborted request (499): nothing holds a concurrency slot
        # or an upstream connection for an answer nobody will read.
        runner = web.ServerRunner(GuardedServer(serve.handler, handler_cancellation=True, **serve.parser,
                                                **settings), shutdown_timeout=grace / 2)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=reuse_port or None)
        try:
            await site.start()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StartError(f"cannot listen on {hostport(host, port)} for the {what} port: {reason}") from None
        yield runner.addresses[0][1]
    finally:
        # A plain web.Server has no app to signal: its app's on_shutdown runs once the
        # listener is closed, before the drain (the proxy app closes its tunnels there).
        await _drain(runner, shutdown_timeout - grace, closed=app.shutdown if serve is not None else None)
        await runner.cleanup()
        if serve is not None:
            await app.cleanup()


def stop_event(shutdown_timeout: float, *signums: signal.Signals) -> asyncio.Event:
    """Set on the first of `signums`; a second one exits at once with status 1."""
    stop = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            # straight to stderr: os._exit skips the logging thread's last flush
            print(f"tollgate: second {signum.name}: exiting now", file=sys.stderr, flush=True)
            os._exit(1)
        log.info("%s: stopping (draining up to %gs)", signum.name, shutdown_timeout)
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in signums:
        loop.add_signal_handler(signum, on_signal, signum)
    return stop


async def _drain(runner: web.BaseRunner, budget: float, *,
                 closed: Callable[[], Awaitable[None]] | None = None) -> None:
    """Close the listeners at once (then await `closed`), then let in-flight requests
    finish for up to `budget` seconds; `runner.cleanup()` cuts what still runs after that."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    for site in list(runner.sites):
        await site.stop()
    if closed is not None:
        await closed()
    server = runner.server
    # aiohttp signals no "last request done"; this polls during shutdown only.
    while server is not None and requests_in_progress(server) and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(DRAIN_POLL)
