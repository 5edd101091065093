"""One pipelined connection to a single Redis node, for the decision hot path.

Many commands are in flight at once and Redis answers in order, so replies
are matched to callers first in, first out, and parsed by hiredis (the C
parser redis-py itself uses). Each command is written the moment it is made:
holding a loop turn's commands back for one joint write saved syscalls but
left every decision waiting for the rest of the turn, and the proxy idled on
Redis (bench/run.py: redis/memory 0.81 batched, 0.92 written at once, CPU
per request lower too). Each call has its own deadline,
enforced by one lazy timer for the whole connection rather than a timer per
call, so a hung Redis never holds a request longer than its timeout.

Why not redis-py's pipeline: per batch it builds a Pipeline, checks a
connection out of the pool, encodes every argument in Python and runs each
reply through its callbacks, which cost several times Tollgate's whole
in-memory decision (bench/README.md). redis-py stays for everything else:
Cluster, the admin API's peeks and resets, health checks.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Awaitable
from typing import Any, Final
from urllib.parse import unquote

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from .store import StorageUnavailable

NO_DEADLINE: Final = float("inf")


class RedisPipe(asyncio.Protocol):
    """Commands in, replies out, in order; see the module docstring."""

    def __init__(self, url: str, *, connect_timeout: float, describe: str) -> None:
        options = parse_url(url)
        self._host: str | None = options.get("host", "localhost")
        self._port: int = options.get("port", 6379)
        self._path: str | None = options.get("path")
        if options.get("connection_class") is UnixDomainSocketConnection:
            self._host = None
        self._ssl = ssl.create_default_context() if options.get("connection_class") is SSLConnection else None
        self._handshake: list[tuple[Any, ...]] = []
        password = options.get("password")
        if password:
            username = options.get("username")
            self._handshake.append(("AUTH", unquote(username), unquote(password)) if username
                                   else ("AUTH", unquote(password)))
        if options.get("db"):
            self._handshake.append(("SELECT", int(options["db"])))
        self._connect_timeout = connect_timeout
        self._describe = describe
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.Transport | None = None
        self._ready = False  # connected and through the handshake
        self._connecting: asyncio.Future[None] | None = None
        self._reader = hiredis.Reader()
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def call(self, *args: Any, timeout: float | None = None) -> Awaitable[Any]:
        """One command's reply, to await (an error reply is returned as hiredis.ReplyError).

        Raises StorageUnavailable when Redis cannot be reached or the
        connection drops, TimeoutError when no reply came within `timeout`.
        """
        return self.send(hiredis.pack_command(args), timeout)

    def send(self, command: bytes, timeout: float | None = None) -> Awaitable[Any]:
        """`call` for a command already packed (hiredis.pack_command), so a caller
        that sends the same bytes again and again packs them once.

        Connected, this is the reply's future itself: no coroutine per command.
        """
        if not self._ready:  # not connected, or still authenticating: nothing may overtake AUTH/SELECT
            return self._connect_and_send(command, timeout)
        return self._send(command, timeout)

    async def _connect_and_send(self, command: bytes, timeout: float | None) -> Any:
        await self.connect()
        return await self._send(command, timeout)

    def _send(self, command: bytes, timeout: float | None) -> asyncio.Future[Any]:
        loop, transport = self._loop, self._transport
        assert loop is not None
        if transport is None or transport.is_closing():  # lost between connecting and now
            raise StorageUnavailable(f"cannot use {self._describe} (connection lost)")
        future = loop.create_future()
        deadline = NO_DEADLINE if timeout is None else loop.time() + timeout
        transport.write(command)
        self._waiting.append((future, deadline))
        if deadline != NO_DEADLINE and self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        return future

    async def connect(self) -> None:
        """Connect (once, however many callers wait) and authenticate."""
        if self._connecting is None:
            self._loop = asyncio.get_running_loop()
            self._connecting = self._loop.create_future()
            task = self._loop.create_task(self._open())
            task.add_done_callback(_retrieve)
        await asyncio.shield(self._connecting)

    async def _open(self) -> None:
        assert self._loop is not None and self._connecting is not None
        done = self._connecting
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._host is None:
                    await self._loop.create_unix_connection(lambda: self, self._path)
                else:
                    await self._loop.create_connection(lambda: self, self._host, self._port, ssl=self._ssl)
            for command in self._handshake:
                reply = await self._send(hiredis.pack_command(command), self._connect_timeout)
                if isinstance(reply, hiredis.ReplyError):
                    raise StorageUnavailable(f"{self._describe} refused {command[0]}: {reply}")
        except (OSError, TimeoutError, StorageUnavailable) as exc:
            self._connecting = None
            if self._transport is not None:
                self._transport.close()
            done.set_exception(exc if isinstance(exc, StorageUnavailable) else StorageUnavailable(
                f"cannot use {self._describe} ({_reason(exc)})"))
            return
        self._ready = True
        done.set_result(None)

    def _expire(self) -> None:
        """Fail every call past its deadline; re-arm for the next one."""
        self._timer = None
        assert self._loop is not None
        now = self._loop.time()
        for future, deadline in self._waiting:  # oldest first
            if deadline > now:
                if deadline != NO_DEADLINE:
                    self._timer = self._loop.call_at(deadline, self._expire)
                return
            if not future.done():
                future.set_exception(TimeoutError())
        # the entries stay queued: their replies, if they ever come, are matched and dropped

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._reader = hiredis.Reader()

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        waiting = self._waiting
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                future, _ = waiting.popleft()
                if not future.done():
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError):
            if self._transport is not None:
                self._transport.close()  # out of step with the server: start over

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._ready = False
        self._connecting = None
        error = StorageUnavailable(f"cannot use {self._describe} (connection lost)")
        waiting, self._waiting = self._waiting, collections.deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(error)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "connect timed out"
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
