"""`python run.py` as a user runs it: a real process, real ports, real signals."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp
from helpers import REPO_ROOT, free_port


def write_config(tmp_path: Path, *, mock_port: int, port: int, admin_port: int, extra: str = "",
                 shutdown_timeout: float = 5) -> Path:
    path = tmp_path / "tollgate.yaml"
    path.write_text(
        f"server: {{host: 127.0.0.1, port: {port}, shutdown_timeout: {shutdown_timeout}}}\n"
        f"admin: {{host: 127.0.0.1, port: {admin_port}}}\n"
        f"upstream: {{url: 'http://127.0.0.1:{mock_port}', start_mock: true}}\n" + extra
    )
    return path


def start(run_process, tmp_path: Path, extra: str = "", shutdown_timeout: float = 5):
    ports = {"mock_port": free_port(), "port": free_port(), "admin_port": free_port()}
    cfg = write_config(tmp_path, extra=extra, shutdown_timeout=shutdown_timeout, **ports)
    proc = run_process([sys.executable, "run.py", "--config", str(cfg)])
    proc.wait_for_port(ports["port"], timeout=15)
    proc.wait_for_port(ports["admin_port"], timeout=15)
    return proc, ports


def pid_alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def rss_peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def shipped_config(tmp_path: Path, ports: dict[str, int]) -> Path:
    """The shipped config.yaml on free ports: the demo exactly as a user runs it."""
    text = (REPO_ROOT / "config.yaml").read_text()
    text = text.replace("port: 8080", f"port: {ports['port']}").replace("port: 8081", f"port: {ports['admin_port']}")
    text = text.replace("url: http://127.0.0.1:9000", f"url: http://127.0.0.1:{ports['mock_port']}")
    path = tmp_path / "shipped.yaml"
    path.write_text(text)
    return path


async def test_run_serves_through_the_mock_and_stops_cleanly(run_process, tmp_path):
    ports = {"mock_port": free_port(), "port": free_port(), "admin_port": free_port()}
    proc = run_process([sys.executable, "run.py", "--config", str(shipped_config(tmp_path, ports))])
    proc.wait_for_port(ports["port"], timeout=15)
    proc.wait_for_port(ports["admin_port"], timeout=15)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{ports['port']}/users",
                               headers={"X-API-Key": "demo-free-key"}) as resp:
            assert resp.status == 200
            assert "users" in await resp.json()
            assert resp.headers["RateLimit-Policy"].startswith('"burst";q=20;w=10')
        async with session.get(f"http://127.0.0.1:{ports['admin_port']}/healthz") as resp:
            assert resp.status == 200
    out = proc.stdout_text()
    assert f"http://127.0.0.1:{ports['port']}/" in out and f"http://127.0.0.1:{ports['admin_port']}/" in out
    assert proc.terminate() == 0
    # the mock it started is gone too: its port is free again
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", ports["mock_port"]))
    assert "Traceback" not in proc.stderr_text()


async def test_sigterm_lets_the_in_flight_request_finish(run_process, tmp_path):
    proc, ports = start(run_process, tmp_path)
    async with aiohttp.ClientSession() as session:
        slow = asyncio.create_task(session.get(f"http://127.0.0.1:{ports['port']}/delay/1"))
        await asyncio.sleep(0.3)  # the request is in flight at the upstream
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        # the listener closed at once: a new connection is refused
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", ports["port"])
        except OSError:
            refused = True
        else:
            refused = False
            writer.close()
        resp = await slow
        assert resp.status == 200
        assert (await resp.json())["delayed_seconds"] == 1.0
        resp.release()
    assert refused
    assert proc.wait() == 0


def test_port_in_use_is_one_clear_line(run_process, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        mock_port = free_port()
        cfg = write_config(tmp_path, mock_port=mock_port, port=port, admin_port=free_port())
        proc = run_process([sys.executable, "run.py", "--config", str(cfg)])
        assert proc.wait(timeout=20) == 1
    err = proc.stderr_text()
    assert f"cannot listen on 127.0.0.1:{port} for the proxy port" in err
    assert "Traceback" not in err
    with socket.socket() as s:  # the mock it had started was stopped
        s.bind(("127.0.0.1", mock_port))


def test_missing_or_invalid_config_exits_1_listening_nowhere(run_process, tmp_path):
    proc = run_process([sys.executable, "run.py", "--config", str(tmp_path / "nope.yaml")])
    assert proc.wait(timeout=20) == 1
    assert "no such file" in proc.stderr_text() and "Traceback" not in proc.stderr_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {port: many}\ntiers: {free: {}}\n")
    proc = run_process([sys.executable, "run.py", "--config", str(bad)])
    assert proc.wait(timeout=20) == 1
    err = proc.stderr_text()
    assert 'server.port: must be a port number 0-65535, got "many"' in err
    assert "tiers.free.limits" in err and "Traceback" not in err


def test_check_on_shipped_config(run_process):
    proc = run_process([sys.executable, "run.py", "--check"], cwd=REPO_ROOT)
    assert proc.wait(timeout=20) == 0
    assert proc.stdout_text().strip() == "config OK"


async def test_20mb_up_and_down_stream_in_bounded_memory(run_process, tmp_path):
    proc, ports = start(run_process, tmp_path, extra="tiers: {anonymous: {unlimited: true}}\n")
    base = f"http://127.0.0.1:{ports['port']}"
    size = 20 * 1024 * 1024
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/users") as resp:  # warm up imports and pools
            await resp.read()
        before = rss_peak_kib(proc.pid)
        digest = hashlib.sha256()

        async def upload():
            block = b"\x00\x01\xfe\xff" * 16384
            for _ in range(size // len(block)):
                digest.update(block)
                yield block

        async with session.post(base + "/upload", data=upload()) as resp:
            echoed = await resp.json()
        assert echoed["body_length"] == size and echoed["body_sha256"] == digest.hexdigest()
        received = 0
        async with session.get(base + f"/bytes/{size}") as resp:
            assert resp.headers["Content-Length"] == str(size)
            async for chunk in resp.content.iter_any():
                received += len(chunk)
        assert received == size
        grown_mib = (rss_peak_kib(proc.pid) - before) / 1024
    assert grown_mib < 10, f"proxy peak RSS grew {grown_mib:.1f} MiB for 20 MiB bodies"
    assert proc.terminate() == 0


async def test_json_access_log_one_line_per_request(run_process, tmp_path):
    proc, ports = start(run_process, tmp_path, extra="log: {format: json}\n")
    base = f"http://127.0.0.1:{ports['port']}"
    async with aiohttp.ClientSession() as session:
        for path in ("/users", "/status/404"):
            async with session.get(base + path) as resp:
                await resp.read()
    assert proc.terminate() == 0
    lines = [json.loads(line) for line in proc.stderr_text().splitlines() if '"tollgate.access"' in line]
    assert [(e["path"], e["status"], e["decision"], e["tier"]) for e in lines] == [
        ("/users", 200, "allowed", "anonymous"), ("/status/404", 404, "allowed", "anonymous")]
    assert all(e["client"] == "127.0.0.1" and e["proxy_ms"] >= 0 and e["upstream_ms"] > 0 for e in lines)


async def test_a_second_signal_forces_exit(run_process, tmp_path):
    proc, ports = start(run_process, tmp_path)
    async with aiohttp.ClientSession() as session:
        slow = asyncio.create_task(session.get(f"http://127.0.0.1:{ports['port']}/delay/20"))
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)  # drains for up to shutdown_timeout (5 s here)...
        await asyncio.sleep(0.3)
        assert proc.is_running()
        proc.send_signal(signal.SIGTERM)  # ...unless told again
        assert proc.wait(timeout=3) == 1
        slow.cancel()
    assert "second SIGTERM: exiting now" in proc.stderr_text()
    # the mock upstream it started went with it
    mock_pid = int(re.search(r"Mock upstream .*\(pid (\d+)\)", proc.stdout_text()).group(1))
    deadline = time.monotonic() + 5
    while pid_alive(mock_pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not pid_alive(mock_pid)


async def test_the_drain_keeps_to_shutdown_timeout_and_logs_the_cut_request(run_process, tmp_path):
    """SIGTERM with a request that would take 30 s: the whole stop takes
    shutdown_timeout (1 s here) plus the process's own exit, not twice that, and
    the cut request still gets its access line."""
    proc, ports = start(run_process, tmp_path, extra="log: {format: json}\n", shutdown_timeout=1)
    async with aiohttp.ClientSession() as session:
        slow = asyncio.create_task(session.get(f"http://127.0.0.1:{ports['port']}/delay/30"))
        await asyncio.sleep(0.3)  # the request is in flight at the upstream
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
        took = time.monotonic() - started
        with contextlib.suppress(aiohttp.ClientError):
            await slow
    assert took < 1.0 + 0.8, f"the drain took {took:.2f}s for a shutdown_timeout of 1s"
    lines = [json.loads(line) for line in proc.stderr_text().splitlines() if '"tollgate.access"' in line]
    assert [(line["path"], line["status"]) for line in lines] == [("/delay/30", 499)]
