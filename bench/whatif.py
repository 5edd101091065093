#!/usr/bin/env python3
"""What-if bench: bytes per recorded request, the cost of recording, the
replay's speed, and the proxy's latency while a replay runs.

    python bench/whatif.py [--records 1000000] [--seconds 5] [--connections 8]

(a) memory: tracemalloc over 100,000 records of 1,000 keys and 10,000
    addresses on 50 paths, without and with one selected header.
(b) record: the time of `Recorder.record` per call, over the fill of (c).
(c) one Tollgate in this process (memory store, an anonymous tier that never
    refuses, a free tier of 1,000 keys) whose record is filled with
    `--records` synthetic requests; wrk (1 thread, `--connections`) against
    its proxy port for `--seconds`, first alone, then while POST /api/whatif
    replays the whole record again and again (a stricter candidate).
Results go to bench/results/whatif.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import time
import tracemalloc
from typing import Any

import aiohttp
from _harness import ROOT, Servers, run_wrk
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import config as config_module
from proxy.accesslog import AccessLog
from proxy.app import build_admin_app, build_proxy_app, build_runtime
from proxy.config import Config
from proxy.identity import resolve
from proxy.limits.memory import MemoryStore
from proxy.server import listen
from proxy.whatif import Recorder

KEYS = 1000
ADDRESSES = 10_000
QUIET = open(os.devnull, "w")  # noqa: SIM115 - the access log of the whole run
PATHS = [f"/api/v1/items/{n}" for n in range(50)]


def config_text(upstream: str, *, burst: int, selector: bool = False) -> str:
    per = ", per: 'header:X-Tenant'" if selector else ""
    keys = "\n".join(f"  bench-key-{n}: {{tier: free, name: client-{n}}}" for n in range(KEYS))
    return f"""
upstream: {{url: "{upstream}", start_mock: false}}
tiers:
  anonymous:
    limits: [{{algorithm: token_bucket, capacity: 1000000000, refill_rate: 1000000000}}]
  free:
    limits:
      - {{name: burst, algorithm: token_bucket, capacity: {burst}, refill_rate: {burst / 10}}}
      - {{name: tenant, algorithm: fixed_window, limit: 100000, window: 60{per}}}
api_keys:
{keys}
"""


class FakeRequest:
    """What the record reads of an aiohttp request."""

    __slots__ = ("headers", "method", "remote")

    def __init__(self, n: int) -> None:
        headers = CIMultiDict[str](X_Tenant=f"tenant-{n % 97}")
        headers["X-Tenant"] = headers.pop("X_Tenant")
        if n % 2:
            headers["X-API-Key"] = f"bench-key-{n % KEYS}"
        self.headers = CIMultiDictProxy(headers)
        self.method = "GET"
        self.remote = f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"


Traffic = tuple[list[FakeRequest], list[Any]]


def traffic(config: Config) -> Traffic:
    requests = [FakeRequest(n % ADDRESSES) for n in range(ADDRESSES)]
    return requests, [resolve(config, r.headers, r.remote) for r in requests]  # type: ignore[arg-type]


def fill(recorder: Recorder, config: Config, count: int, clock: list[float], sent: Traffic) -> float:
    """Record `count` synthetic requests (20 a millisecond); seconds spent in `record` alone."""
    requests, clients = sent
    route = config.route_table.match("GET", "/") or config_module.Route(path="/")
    spent = 0.0
    for n in range(count):
        clock[0] += 0.00005
        i = n % ADDRESSES
        started = time.perf_counter()
        recorder.record(config, requests[i], clients[i], route, PATHS[n % 50], n % 7 != 0)  # type: ignore[arg-type]
        spent += time.perf_counter() - started
    return spent


def memory(selector: bool, count: int = 100_000) -> float:
    """Bytes per recorded request, as tracemalloc sees them."""
    config = config_module.from_text(config_text("http://127.0.0.1:9", burst=100, selector=selector))
    clock = [1_700_000_000.0]
    recorder = Recorder(config, lambda: clock[0])
    sent = traffic(config)
    fill(recorder, config, 1000, clock, sent)  # the shared strings exist before the measure
    recorder.clear()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    fill(recorder, config, count, clock, sent)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / count


async def replay_loop(session: aiohttp.ClientSession, url: str, candidate: str, stop: asyncio.Event,
                      out: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        async with session.post(url, data=candidate.encode()) as resp:
            body = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"whatif answered {resp.status}: {body}")
        out.append(time.perf_counter() - started)


async def loop_lag(stop: asyncio.Event, lags: list[float]) -> None:
    """How late a 1 ms timer fires: what the loop makes every request wait, machine aside."""
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append((time.perf_counter() - started - 0.001) * 1000)


def quantiles(values: list[float]) -> dict[str, float]:
    values = sorted(values) or [0.0]
    return {q: round(values[min(len(values) - 1, int(len(values) * f))], 2)
            for q, f in (("p50_ms", 0.5), ("p99_ms", 0.99), ("max_ms", 1.0))}


class Collections:
    """Full (generation 2) garbage collections and how long each took, in ms."""

    def __init__(self) -> None:
        self.started = 0.0
        self.durations: list[float] = []

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.durations.append(round((time.perf_counter() - self.started) * 1000, 1))


async def latency(upstream: str, args: argparse.Namespace) -> dict[str, Any]:
    config = config_module.from_text(config_text(upstream, burst=100))
    clock = [time.time() - 60]  # the record ends now: the replay takes all of it
    runtime = build_runtime(config, MemoryStore(), access_log=AccessLog("text", stream=QUIET))
    runtime.recorder = Recorder(config, lambda: clock[0])
    record_seconds = fill(runtime.recorder, config, args.records, clock, traffic(config))
    candidate = config_text(upstream, burst=20)
    async with contextlib.AsyncExitStack() as stack:
        port = await stack.enter_async_context(listen(build_proxy_app(runtime), "127.0.0.1", 0, "proxy",
                                                      shutdown_timeout=1))
        admin = await stack.enter_async_context(listen(build_admin_app(runtime), "127.0.0.1", 0, "admin",
                                                       shutdown_timeout=1))
        session = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(600)))
        url = f"http://127.0.0.1:{port}/users"
        alone, _ = await asyncio.to_thread(run_wrk, url, duration=args.seconds, connections=args.connections,
                                           threads=1)
        stop, durations, lags, idle_lags = asyncio.Event(), [], [], []
        idle_stop = asyncio.Event()
        probe = asyncio.create_task(loop_lag(idle_stop, idle_lags))
        await asyncio.sleep(2)
        idle_stop.set()
        await probe
        probe = asyncio.create_task(loop_lag(stop, lags))
        collections = Collections()
        gc.callbacks.append(collections)
        replays = asyncio.create_task(replay_loop(session, f"http://127.0.0.1:{admin}/api/whatif", candidate,
                                                  stop, durations))
        during, _ = await asyncio.to_thread(run_wrk, url, duration=args.seconds, connections=args.connections,
                                            threads=1)
        stop.set()
        await replays
        await probe
        gc.callbacks.remove(collections)
    return {
        "records": args.records, "record_ns_per_call": round(record_seconds / args.records * 1e9),
        "replay_seconds": [round(d, 2) for d in durations],
        "replay_requests_per_second": round(args.records / min(durations)),
        "alone": {"rps": alone.rps, "p50_ms": alone.p50_ms, "p99_ms": alone.p99_ms},
        "during_replay": {"rps": during.rps, "p50_ms": during.p50_ms, "p99_ms": during.p99_ms},
        "loop_lag_idle": quantiles(idle_lags), "loop_lag_during_replay_and_wrk": quantiles(lags),
        "full_collections_during_replay_ms": collections.durations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    results: dict[str, Any] = {
        "bytes_per_record": round(memory(False), 1),
        "bytes_per_record_one_header_selected": round(memory(True), 1),
    }
    print(json.dumps(results))
    with Servers(deadline_seconds=600) as servers:
        upstream = servers.mock_upstream()
        results.update(asyncio.run(latency(f"http://127.0.0.1:{upstream.port}", args)))
    print(json.dumps(results, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "whatif.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
