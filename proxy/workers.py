"""`server.workers` > 1: a supervisor runs N worker processes on the proxy port.

Each worker is `python -m proxy --worker SOCKET`: it reads the config text the
supervisor validated from its stdin, binds the proxy port with SO_REUSEPORT
(the kernel spreads connections by a hash of their addresses), and answers
the supervisor on a unix socket (proxy.control). Limit state lives in Redis,
so every worker, and the supervisor answering /api/clients, sees the same.

A worker that dies is logged and replaced after a back-off that doubles while
replacements die young, so a crash loop does not spin. Workers get SIGTERM
from the kernel if the supervisor dies (PR_SET_PDEATHSIG), so the group
leaves no orphan; on SIGTERM the supervisor sends each worker SIGTERM (each
drains within `server.shutdown_timeout`) and waits for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

from .control import call
from .mockproc import end_with_parent
from .server import StartError

log = logging.getLogger("tollgate.workers")

START_TIMEOUT: Final = 15.0  # seconds for a worker to answer on its control socket
READY_POLL: Final = 0.05
RESTART_DELAY: Final = 0.25  # seconds before the first replacement; doubles while they die young
MAX_RESTART_DELAY: Final = 15.0
STABLE_AFTER: Final = 30.0  # a worker that lived this long resets the back-off
STOP_MARGIN: Final = 5.0  # beyond shutdown_timeout, before a worker that will not stop gets SIGKILL


@dataclass
class Worker:
    index: int
    socket: str
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    delay: float = RESTART_DELAY


def how_it_ended(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


@dataclass
class Group:
    """The workers of one supervisor: started, watched, replaced, reloaded, asked and stopped together."""

    config_path: str
    text: str  # the config text every worker runs (the last one the supervisor validated)
    count: int
    shutdown_timeout: float
    lock: asyncio.Lock  # the reloader's: a worker starts with the text no swap is changing
    directory: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="tollgate-"))  # mode 0700
    workers: list[Worker] = field(default_factory=list)
    stopping: bool = False
    _watchers: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        self.workers = [Worker(i, os.path.join(self.directory, f"worker-{i}.sock")) for i in range(self.count)]
        await asyncio.gather(*(self._spawn(worker) for worker in self.workers))
        for worker in self.workers:
            if not await self._ready(worker):
                raise StartError(f"worker {worker.index} did not start (see its error above)")
        self._watchers = [asyncio.create_task(self._watch(w), name=f"tollgate-worker-{w.index}")
                          for w in self.workers]

    async def _spawn(self, worker: Worker) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(worker.socket)
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "--config", self.config_path, "--worker", worker.socket,
            stdin=asyncio.subprocess.PIPE, preexec_fn=end_with_parent if sys.platform == "linux" else None,
        )
        worker.started = time.monotonic()
        assert worker.proc.stdin is not None
        worker.proc.stdin.write(self.text.encode())
        await worker.proc.stdin.drain()
        worker.proc.stdin.close()

    async def _ready(self, worker: Worker) -> bool:
        """Wait until the worker answers on its control socket (it binds the proxy port first)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while worker.proc is not None and worker.proc.returncode is None and loop.time() < deadline:
            with contextlib.suppress(OSError):
                if (await call(worker.socket, "GET", "/stats", within=1.0))[0] == 200:
                    return True
            await asyncio.sleep(READY_POLL)
        return False

    async def _watch(self, worker: Worker) -> None:
        """Replace the worker whenever it ends, until the group stops."""
        while True:
            assert worker.proc is not None
            returncode = await worker.proc.wait()
            if self.stopping:
                return
            lived = time.monotonic() - worker.started
            worker.delay = RESTART_DELAY if lived >= STABLE_AFTER else worker.delay
            log.error("worker %d (pid %d) %s after %.1fs; starting a new one in %gs",
                      worker.index, worker.proc.pid, how_it_ended(returncode), lived, worker.delay)
            await asyncio.sleep(worker.delay)
            worker.delay = min(worker.delay * 2, MAX_RESTART_DELAY)
            async with self.lock:
                if self.stopping:
                    return
                await self._spawn(worker)
                if await self._ready(worker):
                    log.info("worker %d (pid %d) serving", worker.index, worker.proc.pid)

    def _live(self) -> list[Worker]:
        return [w for w in self.workers if w.proc is not None and w.proc.returncode is None]

    async def _fan_out(self, method: str, route: str, data: str | None = None) -> list[tuple[int, Any] | OSError]:
        async def one(worker: Worker) -> tuple[int, Any] | OSError:
            try:
                return await call(worker.socket, method, route, data=data)
            except OSError as exc:
                return exc
        return list(await asyncio.gather(*(one(w) for w in self._live())))

    async def swap(self, text: str) -> list[str]:
        """Every live worker prepares `text`; all commit, or all abort and the errors are returned."""
        errors: list[str] = []
        for answer in await self._fan_out("POST", "/config/prepare", text):
            if isinstance(answer, OSError):
                errors.append(str(answer))
            elif answer[0] != 200:
                errors.extend(e for e in (answer[1] or {}).get("errors", ["refused"]) if e not in errors)
        if errors:
            await self._fan_out("POST", "/config/abort")
            return errors
        self.text = text  # a worker that dies from here on restarts with the new text
        await self._fan_out("POST", "/config/commit")
        return []

    async def gather(self) -> list[dict[str, Any]]:
        """Each live worker's pid, stats and metrics counts (one that does not answer is left out)."""
        return [answer[1] for answer in await self._fan_out("GET", "/stats")
                if not isinstance(answer, OSError) and answer[0] == 200]

    async def reset_stats(self) -> None:
        await self._fan_out("POST", "/stats/reset")

    async def stop(self) -> None:
        """SIGTERM to every worker, then wait for each (SIGKILL one that outlives its drain)."""
        self.stopping = True
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)  # no replacement starts after this
        live = self._live()
        for worker in live:
            assert worker.proc is not None
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*(self._reap(worker) for worker in live))
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)

    async def _reap(self, worker: Worker) -> None:
        assert worker.proc is not None
        try:
            returncode = await asyncio.wait_for(worker.proc.wait(), self.shutdown_timeout + STOP_MARGIN)
        except TimeoutError:
            worker.proc.kill()
            returncode = await worker.proc.wait()
        log.info("worker %d (pid %d) stopped: %s", worker.index, worker.proc.pid, how_it_ended(returncode))


@contextlib.asynccontextmanager
async def worker_group(config_path: str, text: str, count: int, *, shutdown_timeout: float,
                       lock: asyncio.Lock) -> AsyncIterator[Group]:
    """Start `count` workers on `text`; on exit stop every one of them."""
    group = Group(config_path, text, count, shutdown_timeout, lock)
    try:
        await group.start()
        yield group
    finally:
        await group.stop()
