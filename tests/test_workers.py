"""`server.workers: 2` as a user runs it: a supervisor, two real worker processes on one
port (SO_REUSEPORT), a real Redis and the real mock upstream.

The kernel spreads connections over the workers by a hash of their addresses,
so every burst here opens a new connection per request: with 30 of them, the
chance that one worker gets none is 2**-29.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from helpers import RedisServer, free_port
from test_run import pid_alive

from proxy.metrics import Metrics
from proxy.records import RequestRecord
from proxy.stats import Stats

BURST = 30
WAIT = 15.0  # seconds for something that takes well under one


def write_config(path: Path, ports: dict[str, int], redis: RedisServer, capacity: int) -> None:
    path.write_text(
        f"server: {{host: 127.0.0.1, port: {ports['port']}, workers: 2, shutdown_timeout: 2}}\n"
        f"admin: {{host: 127.0.0.1, port: {ports['admin']}}}\n"
        f"upstream: {{url: 'http://127.0.0.1:{ports['mock']}', start_mock: true}}\n"
        f"storage: {{backend: redis, url: '{redis.url}'}}\n"
        # a refill of one token in 1000 s: the burst meets exactly `capacity` tokens
        f"tiers: {{anonymous: {{limits: [{{name: burst, algorithm: token_bucket, capacity: {capacity}, "
        "refill_rate: 0.001}]}}\n"
    )


def start(run_process: Any, tmp_path: Path, redis: RedisServer, capacity: int = 10) -> tuple[Any, dict[str, int], Path]:
    ports = {"port": free_port(), "admin": free_port(), "mock": free_port()}
    cfg = tmp_path / "workers.yaml"
    write_config(cfg, ports, redis, capacity)
    proc = run_process([sys.executable, "run.py", "--config", str(cfg)])
    proc.wait_for_port(ports["admin"], timeout=WAIT)  # the admin port opens once every worker answers
    return proc, ports, cfg


async def burst(port: int, n: int = BURST) -> list[tuple[int, str]]:
    """`n` requests at once, each on a connection of its own: (status, RateLimit-Policy)."""
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one() -> tuple[int, str]:
            async with session.get(f"http://127.0.0.1:{port}/users") as resp:
                await resp.read()
                return resp.status, resp.headers.get("RateLimit-Policy", "")
        return list(await asyncio.gather(*(one() for _ in range(n))))


async def admin(ports: dict[str, int], method: str, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"http://127.0.0.1:{ports['admin']}{path}") as resp:
            body = await resp.json() if resp.content_type == "application/json" else await resp.text()
            return resp.status, body


async def per_worker(ports: dict[str, int]) -> dict[int, int]:
    """Requests served so far, by worker pid."""
    return {w["pid"]: w["requests"] for w in (await admin(ports, "GET", "/api/stats"))[1]["workers"]}


async def test_two_workers_share_limits_stats_reloads_and_replace_the_dead(run_process, tmp_path, redis_server):
    proc, ports, cfg = start(run_process, tmp_path, redis_server)
    answers = await burst(ports["port"])
    assert sorted(status for status, _ in answers) == [200] * 10 + [429] * 20
    status, stats = await admin(ports, "GET", "/api/stats")
    assert stats["totals"]["requests"] == BURST and stats["totals"]["allowed"] == 10
    assert stats["tiers"] == {"anonymous": {"requests": BURST, "allowed": 10, "blocked": 20, "shadow_blocked": 0}}
    served = await per_worker(ports)
    assert len(served) == 2 and all(n > 0 for n in served.values()) and sum(served.values()) == BURST
    metrics = (await admin(ports, "GET", "/metrics"))[1]
    assert 'tollgate_requests_total{decision="allowed",tier="anonymous"} 10.0' in metrics
    assert 'tollgate_requests_total{decision="blocked",tier="anonymous"} 20.0' in metrics

    # a good reload reaches both workers
    write_config(cfg, {"port": ports["port"], "admin": ports["admin"], "mock": ports["mock"]}, redis_server, 50)
    assert (await admin(ports, "POST", "/api/reload"))[0] == 200
    before = await per_worker(ports)
    answers = await burst(ports["port"])
    after = await per_worker(ports)
    assert all(status == 200 and policy.startswith('"burst";q=50;') for status, policy in answers)
    assert all(after[pid] > before[pid] for pid in before)

    # a broken one is refused, and both keep the good one
    cfg.write_text(cfg.read_text().replace("capacity: 50", "capacity: -1"))
    status, body = await admin(ports, "POST", "/api/reload")
    assert status == 422 and any("capacity" in e for e in body["errors"])
    proc.send_signal(signal.SIGHUP)
    proc.wait_for_output("config reload (SIGHUP) refused", stderr=True)
    answers = await burst(ports["port"])
    assert all(policy.startswith('"burst";q=50;') for _, policy in answers)

    # a worker killed outright is replaced, and the new one serves
    victim, survivor = sorted(served)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + WAIT
    while (pids := set(await per_worker(ports))) in ({survivor}, {victim, survivor}) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    (new,) = pids - {survivor}
    assert new != victim and pid_alive(new)
    await burst(ports["port"])
    assert (await per_worker(ports))[new] > 0
    assert re.search(rf"worker \d \(pid {victim}\) was killed by SIGKILL after [\d.]+s; starting a new one",
                     proc.stderr_text())

    # the dashboard renders the sum; a stats reset reaches every worker
    assert (await admin(ports, "GET", "/"))[0] == 200
    assert (await admin(ports, "POST", "/api/stats/reset"))[0] == 204
    assert set((await per_worker(ports)).values()) == {0}

    # SIGTERM: every worker drains and exits 0, then the supervisor
    assert proc.terminate() == 0
    assert not pid_alive(new) and not pid_alive(survivor)
    assert proc.stderr_text().count("stopped: exited with status 0") == 2
    assert "Traceback" not in proc.stderr_text()


async def test_workers_do_not_outlive_a_killed_supervisor(run_process, tmp_path, redis_server):
    proc, ports, _ = start(run_process, tmp_path, redis_server)
    pids = set(await per_worker(ports))
    assert len(pids) == 2
    proc.kill()
    deadline = time.monotonic() + WAIT
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not any(pid_alive(pid) for pid in pids)


def test_more_than_one_worker_needs_redis(run_process, tmp_path):
    cfg = tmp_path / "memory.yaml"
    cfg.write_text("server: {workers: 2}\n")
    proc = run_process([sys.executable, "run.py", "--config", str(cfg), "--check"])
    assert proc.wait(timeout=20) == 1
    assert proc.stderr_text().splitlines()[0] == (
        "server.workers: more than one worker needs storage.backend: redis (memory state is per process), got 2")


def record(client: str, decision: str, proxy: float, upstream: float | None) -> RequestRecord:
    return RequestRecord(method="GET", path="/", client=client, tier="free", identity="a:" + client, decision=decision,
                         proxy_seconds=proxy, upstream_seconds=upstream)


def test_merged_dumps_show_what_one_process_would(fake_clock):
    """Two workers' stats, summed by the supervisor, equal one Stats that saw every request."""
    one, left, right = (Stats(clock=fake_clock, started=fake_clock()) for _ in range(3))
    left_metrics, right_metrics, summed = (Metrics(storage_errors=lambda: 1, storage_healthy=lambda: True)
                                           for _ in range(3))
    for i in range(40):
        fake_clock.advance(0.7)
        rec = record(f"10.0.0.{i % 7}", "blocked" if i % 5 == 0 else "allowed", 0.0001 * i, 0.001 * (i % 3) or None)
        if i % 4 == 0:
            rec.shadow = ("trial",)
        one.observe(rec)
        (left if i % 3 else right).observe(rec)
        (left_metrics if i % 3 else right_metrics).observe(rec)
    merged = Stats.merged([left.dump(), right.dump()], clock=fake_clock, started=one.started)
    assert merged.snapshot() == one.snapshot()
    assert sorted((c, k.tier, k.identity, k.requests, k.blocked) for c, k in merged.clients.items()) == \
        sorted((c, k.tier, k.identity, k.requests, k.blocked) for c, k in one.clients.items())
    summed.load_sum([left_metrics.dump(), right_metrics.dump()])
    assert summed.requests == {("free", "allowed"): 32, ("free", "blocked"): 8}
    assert summed.shadow_refusals == {("free", "trial"): 10}  # from both workers
    assert sum(summed.duration_counts) == 40


def test_a_worker_that_cannot_listen_stops_the_start_with_one_clear_line(run_process, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = {"port": busy.getsockname()[1], "admin": free_port(), "mock": free_port()}
        cfg = tmp_path / "busy.yaml"
        cfg.write_text(f"server: {{port: {ports['port']}, workers: 2}}\n"
                       f"admin: {{port: {ports['admin']}}}\n"
                       f"upstream: {{url: 'http://127.0.0.1:{ports['mock']}', start_mock: true}}\n"
                       f"storage: {{backend: redis, url: 'redis://127.0.0.1:{free_port()}/0'}}\n")
        proc = run_process([sys.executable, "run.py", "--config", str(cfg)])
        assert proc.wait(timeout=20) == 1
    err = proc.stderr_text()
    assert f"cannot listen on 127.0.0.1:{ports['port']} for the proxy port" in err
    assert "tollgate: worker 0 did not start (see its error above)" in err and "Traceback" not in err
    with socket.socket() as s:  # the mock it had started was stopped
        s.bind(("127.0.0.1", ports["mock"]))
