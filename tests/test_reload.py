"""Config reload: every trigger, state kept for unchanged limits, bad edits refused."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
from pathlib import Path

import aiohttp
from harness import running
from helpers import free_port

from proxy.app import build_runtime
from proxy.config import load
from proxy.limits.memory import MemoryStore
from proxy.reload import Reloader

BASE = """
upstream: {url: "{upstream}"}
tiers:
  anonymous:
    limits: [{algorithm: token_bucket, capacity: 50, refill_rate: 1}]
  free:
    limits:
      - {name: burst, algorithm: token_bucket, capacity: 20, refill_rate: 2}
      - {name: daily, algorithm: fixed_window, limit: 1000, window: 86400}
api_keys:
  free-key: {tier: free, name: demo-free}
"""
CHANGED_DAILY = BASE.replace("limit: 1000", "limit: 500")
FREE = {"X-API-Key": "free-key"}


async def remaining(tg) -> dict[str, int]:
    async with tg.session.get(tg.admin_url + "/api/clients/demo-free") as resp:
        return {lim["name"]: lim["remaining"] for lim in (await resp.json())["limits"]}


async def config_info(tg) -> dict:
    async with tg.session.get(tg.admin_url + "/api/stats") as resp:
        return (await resp.json())["config"]


async def wait_for_version(tg, version: int, timeout: float = 3.0) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while (await config_info(tg))["version"] != version:
        assert loop.time() - start < timeout, f"version {version} not in force after {timeout}s"
        await asyncio.sleep(0.05)
    return loop.time() - start


async def test_api_reload_keeps_state_of_unchanged_limits_only(upstream, tmp_path, fake_clock):
    path = tmp_path / "c.yaml"
    async with running(BASE, upstream.url, clock=fake_clock, config_path=path) as tg:
        for _ in range(3):
            await tg.get("/x", headers=FREE)
        assert await remaining(tg) == {"burst": 17, "daily": 997}
        path.write_text(CHANGED_DAILY.replace("{upstream}", upstream.url))
        async with tg.session.post(tg.admin_url + "/api/reload") as resp:
            assert resp.status == 200
            assert await resp.json() == {"reloaded": True, "version": 2}
        assert await remaining(tg) == {"burst": 17, "daily": 500}
        _, headers, _ = await tg.get("/x", headers=FREE)
        assert headers["RateLimit-Policy"] == '"burst";q=20;w=10, "daily";q=500;w=86400'


async def test_broken_edit_keeps_the_old_config_and_shows_the_error(upstream, tmp_path, fake_clock):
    path = tmp_path / "c.yaml"
    async with running(BASE, upstream.url, clock=fake_clock, config_path=path) as tg:
        await tg.get("/x", headers=FREE)
        path.write_text(BASE.replace("refill_rate: 2", "refill_rate: fast").replace("{upstream}", upstream.url))
        async with tg.session.post(tg.admin_url + "/api/reload") as resp:
            assert resp.status == 422
            body = await resp.json()
        assert body["reloaded"] is False
        assert body["errors"] == ['tiers.free.limits[0].refill_rate: must be a number > 0, got "fast"']
        info = await config_info(tg)
        assert info["version"] == 1 and "refill_rate" in info["last_error"]
        status, headers, _ = await tg.get("/x", headers=FREE)
        assert status == 200 and parse_burst(headers) == 18  # old config, old state
        async with tg.session.get(tg.admin_url + "/metrics") as resp:
            assert 'tollgate_config_reloads_total{result="failure"} 1.0' in await resp.text()


def parse_burst(headers) -> int:
    return int(headers["RateLimit"].split(";r=")[1].split(";")[0])


async def test_file_change_by_rename_is_picked_up(upstream, tmp_path):
    path = tmp_path / "c.yaml"
    async with running(BASE, upstream.url, config_path=path, watch_interval=0.1) as tg:
        temp = tmp_path / ".c.yaml.swp"
        temp.write_text(CHANGED_DAILY.replace("{upstream}", upstream.url))
        os.replace(temp, path)  # how editors save
        await wait_for_version(tg, 2)
        assert (await config_info(tg))["last_error"] is None


async def test_symlink_swap_is_picked_up(upstream, tmp_path):
    """Kubernetes ConfigMaps: config.yaml -> ..data/config.yaml, ..data -> a dated dir."""
    for name, text in (("v1", BASE), ("v2", CHANGED_DAILY)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "c.yaml").write_text(text.replace("{upstream}", upstream.url))
    os.symlink("v1", tmp_path / "..data")
    os.symlink("..data/c.yaml", tmp_path / "c.yaml")
    link = tmp_path / "c.yaml"
    async with running(BASE, upstream.url, watch_interval=0.1) as tg:
        tg.runtime.config = dataclasses.replace(tg.runtime.config, path=str(link))
        tg.runtime.reloader.__init__(tg.runtime)  # re-read the file's signature at the new path
        os.symlink("v2", tmp_path / "..data_tmp")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")  # the atomic swap kubelet does
        await wait_for_version(tg, 2)
        _, headers, _ = await tg.get("/x", headers=FREE)
    assert '"daily";q=500' in headers["RateLimit-Policy"]


async def test_in_flight_request_finishes_under_its_config(upstream, tmp_path):
    path = tmp_path / "c.yaml"
    async with running(BASE, upstream.url, config_path=path) as tg:
        slow = asyncio.create_task(tg.get("/delay/0.3", headers=FREE))
        await asyncio.sleep(0.1)
        path.write_text(CHANGED_DAILY.replace("{upstream}", upstream.url))
        await tg.runtime.reloader.reload("test")
        status, headers, _ = await slow
    assert status == 200 and '"daily";q=1000' in headers["RateLimit-Policy"]


async def test_listener_change_is_reported_as_needing_restart(upstream, tmp_path):
    path = tmp_path / "c.yaml"
    async with running(BASE, upstream.url, config_path=path) as tg:
        path.write_text(BASE.replace("{upstream}", upstream.url) + "server: {port: 18080}\n")
        async with tg.session.post(tg.admin_url + "/api/reload") as resp:
            body = await resp.json()
    assert body == {"reloaded": True, "version": 2, "restart_needed": ["server.port"]}


async def test_sighup_reloads_a_running_process(run_process, tmp_path, upstream):
    port, admin = free_port(), free_port()
    path = tmp_path / "c.yaml"
    head = f"server: {{port: {port}}}\nadmin: {{port: {admin}}}\n"
    path.write_text(head + BASE.replace("{upstream}", upstream.url))
    proc = run_process([sys.executable, "run.py", "--config", str(path), "--no-mock"])
    proc.wait_for_port(admin, timeout=15)
    # rewrite in place keeping size and mtime-independent content check honest
    path.write_text(head + CHANGED_DAILY.replace("{upstream}", upstream.url))
    proc.send_signal(signal.SIGHUP)
    async with aiohttp.ClientSession() as session:
        for _ in range(60):
            async with session.get(f"http://127.0.0.1:{admin}/api/stats") as resp:
                if (await resp.json())["config"]["version"] >= 2:
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("SIGHUP did not reload")
    assert "config reloaded" in proc.stderr_text() or proc.is_running()
    assert proc.terminate() == 0
    assert Path(path).exists()


# --- the file watcher: settled files only, never an empty one -----------------


DEFAULT_UPSTREAM = "http://127.0.0.1:9000"  # what an empty config names: the same pool, no connection made


def watcher(path: Path, clock) -> Reloader:
    runtime = build_runtime(load(path), MemoryStore(clock))
    return Reloader(runtime, clock=clock)


async def test_a_change_is_taken_only_once_the_file_has_settled(tmp_path, fake_clock):
    path = tmp_path / "c.yaml"
    path.write_text(BASE.replace("{upstream}", DEFAULT_UPSTREAM))
    reloader = watcher(path, fake_clock)
    path.write_text(CHANGED_DAILY.replace("{upstream}", DEFAULT_UPSTREAM)[:40])  # half written
    assert await reloader.poll() is None
    fake_clock.advance(0.3)
    path.write_text(CHANGED_DAILY.replace("{upstream}", DEFAULT_UPSTREAM))  # the rest arrives
    assert await reloader.poll() is None
    fake_clock.advance(0.3)
    assert await reloader.poll() is None  # changed 0.3 s ago: not settled yet
    fake_clock.advance(0.2)
    result = await reloader.poll()
    assert result is not None and result.ok and reloader.runtime.version == 2
    assert reloader.runtime.config.tiers["free"].limits[1].algorithm.limit == 500


async def test_an_empty_file_never_replaces_a_running_config(tmp_path, fake_clock, caplog):
    path = tmp_path / "c.yaml"
    path.write_text(BASE.replace("{upstream}", DEFAULT_UPSTREAM))
    reloader = watcher(path, fake_clock)
    for text in ("", "  \n"):  # truncated, then still blank, over more than a second
        path.write_text(text)
        for _ in range(3):
            assert await reloader.poll() is None
            fake_clock.advance(0.5)
    assert reloader.runtime.version == 1
    assert "free" in reloader.runtime.config.tiers
    assert "is empty; the running config (version 1) stays in force" in caplog.text
    path.write_text(CHANGED_DAILY.replace("{upstream}", DEFAULT_UPSTREAM))  # rewritten whole
    assert await reloader.poll() is None
    fake_clock.advance(0.5)
    result = await reloader.poll()
    assert result is not None and result.ok and reloader.runtime.version == 2


async def test_sighup_and_the_api_take_an_empty_file_as_it_is(tmp_path, fake_clock):
    """Only the watcher guards against half-written files: an operator's explicit
    reload of an empty file is the documented empty config."""
    path = tmp_path / "c.yaml"
    path.write_text(BASE.replace("{upstream}", DEFAULT_UPSTREAM))
    reloader = watcher(path, fake_clock)
    path.write_text("")
    result = await reloader.reload("SIGHUP")
    assert result.ok and set(reloader.runtime.config.tiers) == {"anonymous"}
