"""Run upstream_mock as a child process for the demo (`upstream.start_mock`)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import sys
from collections.abc import AsyncIterator

from yarl import URL

START_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1


def end_with_parent(signum: int = signal.SIGTERM) -> None:
    """In a child, before exec (`preexec_fn`): the kernel sends it `signum` when
    its parent dies, so a forced exit (second signal, SIGKILL) leaves no child
    behind (Linux; elsewhere a no-op)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)


class MockStartError(Exception):
    """The mock upstream could not start; the message says why and what to do."""


async def _port_open(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


@contextlib.asynccontextmanager
async def mock_upstream(url: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """Start `python -m upstream_mock` on the url's host and port; stop it on exit."""
    parsed = URL(url)
    host, port = parsed.host or "127.0.0.1", parsed.port or 80
    if await _port_open(host, port):
        raise MockStartError(f"cannot start the mock upstream: {host}:{port} is already in use "
                             "(run with --no-mock to use what listens there)")
    proc = await asyncio.create_subprocess_exec(
        # The proxy drains its clients before the mock is stopped: whatever the mock
        # still runs then was cut already, so it need not wait (SPEC bounds the stop).
        sys.executable, "-m", "upstream_mock", "--host", host, "--port", str(port), "--shutdown-timeout", "0.1",
        stdout=asyncio.subprocess.DEVNULL, preexec_fn=end_with_parent if sys.platform == "linux" else None,
    )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while not await _port_open(host, port):
            if proc.returncode is not None or loop.time() > deadline:
                raise MockStartError(f"the mock upstream did not start on {host}:{port}")
            await asyncio.sleep(0.05)
        print(f"Mock upstream       http://{host}:{port}/  (pid {proc.pid})", flush=True)
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
