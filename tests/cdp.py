"""A small headless-Chromium driver over the DevTools protocol, for page tests.

Needs only aiohttp: it starts the ``chromium`` on PATH with a throw-away
profile, talks to the page target over its websocket, and ``close()`` kills
only the process group it started. No Chromium is a test failure, never a
skip: a dashboard test that silently did not run proves nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-port=0",
)


def _describe(details: dict[str, Any]) -> str:
    return str(details.get("exception", {}).get("description") or details["text"])


class Browser:
    """One Chromium process and one page; create it with ``await Browser.launch()``."""

    def __init__(self, proc: asyncio.subprocess.Process, profile: Path) -> None:
        self._proc = proc
        self._profile = profile
        self._session = aiohttp.ClientSession()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loaded = asyncio.Event()
        self.dialogs: list[str] = []  # alert()/confirm() messages, each dismissed at once
        self.errors: list[str] = []  # uncaught exceptions in the page

    @classmethod
    async def launch(cls, *, timeout: float = 10.0) -> Browser:
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            pytest.fail("chromium is not on PATH; dashboard tests need it (apt install chromium)")
        profile = Path(tempfile.mkdtemp(prefix="tollgate-cdp-"))
        proc = await asyncio.create_subprocess_exec(
            exe, *_FLAGS, f"--user-data-dir={profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # a process group of its own: close() reaches its helpers
        )
        browser = cls(proc, profile)
        try:
            await browser._connect(timeout)
        except BaseException:
            await browser.close()
            raise
        return browser

    async def _connect(self, timeout: float) -> None:
        port_file = self._profile / "DevToolsActivePort"
        async with asyncio.timeout(timeout):
            while not port_file.exists() or not port_file.read_text().strip():
                if self._proc.returncode is not None:
                    raise RuntimeError(f"chromium exited with {self._proc.returncode}")
                await asyncio.sleep(0.05)
            port = int(port_file.read_text().split()[0])
            async with self._session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                page = next(t for t in await resp.json() if t["type"] == "page")
            self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read(self._ws))
        await self.send("Page.enable")
        await self.send("Runtime.enable")

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            data = msg.json()
            method, params = data.get("method"), data.get("params", {})
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            elif method == "Page.loadEventFired":
                self._loaded.set()
            elif method == "Page.javascriptDialogOpening":
                self.dialogs.append(params["message"])
                task = asyncio.create_task(self.send("Page.handleJavaScriptDialog", accept=False))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif method == "Runtime.exceptionThrown":
                self.errors.append(_describe(params["exceptionDetails"]))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command; return its ``result``."""
        assert self._ws is not None, "not connected"
        msg_id = next(self._ids)
        fut = self._pending[msg_id] = asyncio.get_running_loop().create_future()
        try:
            await self._ws.send_json({"id": msg_id, "method": method, "params": params})
            async with asyncio.timeout(15):
                reply = await fut
        finally:
            self._pending.pop(msg_id, None)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return dict(reply["result"])

    async def navigate(self, url: str, *, timeout: float = 10.0) -> None:
        """Open ``url`` and wait for its load event."""
        self._loaded.clear()
        result = await self.send("Page.navigate", url=url)
        if "errorText" in result:
            raise RuntimeError(f"navigate {url}: {result['errorText']}")
        async with asyncio.timeout(timeout):
            await self._loaded.wait()

    async def evaluate(self, js: str) -> Any:
        """Evaluate an expression in the page, awaiting a promise; return its JSON value."""
        result = await self.send(
            "Runtime.evaluate", expression=js, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{js!r} raised {_describe(result['exceptionDetails'])}")
        return result["result"].get("value")

    async def wait_for(self, js_predicate: str, timeout: float = 5.0) -> Any:
        """Poll ``js_predicate`` until it is truthy and return it; fail with its last value."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not (value := await self.evaluate(js_predicate)):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{timeout}s waiting for {js_predicate} (last: {value!r})")
            await asyncio.sleep(0.05)
        return value

    async def screenshot(self, path: Path | str, width: int, height: int) -> Path:
        """Set the viewport to ``width`` x ``height`` CSS px (mobile under 600) and save a PNG."""
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width, height=height, deviceScaleFactor=1, mobile=width < 600,
        )
        # Two frames: one to lay out (and run resize observers), one to paint.
        await self.evaluate(
            "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
        )
        shot = await self.send("Page.captureScreenshot", format="png")
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(shot["data"]))
        return out

    async def set_cookie(self, name: str, value: str, url: str, *, http_only: bool = True) -> None:
        """Store a cookie for ``url``'s origin, as a server's Set-Cookie would."""
        await self.send("Network.setCookie", name=name, value=value, url=url, httpOnly=http_only)

    async def close(self) -> None:
        """Stop the Chromium this object started (its process group); delete its profile."""
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await self._reader
        await self._session.close()
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(5):
                    await self._proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                await self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)
