"""Take docs/dashboard.png: the shipped demo under a live traffic loop.

    python docs/make_screenshot.py [--seconds 45]

Runs `python run.py` with the shipped config.yaml on free ports (mock
included), drives a bounded mixed traffic loop through the proxy, and
screenshots the dashboard in headless Chromium (tests/cdp.py).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from cdp import Browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def traffic(base: str, seconds: float) -> None:
    keys = ["demo-free-key", "demo-premium-key", None, None]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            rate = 6 + 5 * (1 + __import__("math").sin(loop.time() / 6))  # a visible wave
            batch = []
            for _ in range(int(rate)):
                key = random.choice(keys)
                path = random.choice(["/users", "/data", "/search?q=x", "/health", "/items/7"])
                headers = {"X-API-Key": key} if key else {"X-Forwarded-For": f"198.51.100.{random.randint(1, 9)}"}
                batch.append(session.get(base + path, headers=headers))
            for resp in await asyncio.gather(*batch, return_exceptions=True):
                if isinstance(resp, aiohttp.ClientResponse):
                    resp.release()
            await asyncio.sleep(0.5)


async def main(seconds: float) -> None:
    port, admin, mock = free_port(), free_port(), free_port()
    text = (ROOT / "config.yaml").read_text()
    text = text.replace("port: 8080", f"port: {port}").replace("port: 8081", f"port: {admin}")
    text = text.replace("http://127.0.0.1:9000", f"http://127.0.0.1:{mock}")
    text = text.replace("trusted_proxies: []", "trusted_proxies: [127.0.0.1/32]")
    cfg = Path("/tmp") / f"tollgate-screenshot-{port}.yaml"
    cfg.write_text(text)
    proc = subprocess.Popen([sys.executable, "run.py", "--config", str(cfg)], cwd=ROOT,
                            stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", admin), 0.1).close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        browser = await Browser.launch()
        try:
            await browser.navigate(f"http://127.0.0.1:{admin}/")
            await traffic(f"http://127.0.0.1:{port}", seconds)
            await asyncio.sleep(1.5)
            shot = await browser.screenshot(ROOT / "docs" / "dashboard.png", 1280, 1400)
            print(f"wrote {shot}")
        finally:
            await browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
        cfg.unlink(missing_ok=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=45)
    asyncio.run(main(parser.parse_args().seconds))
