#!/usr/bin/env python3
"""Memory bench: what one client costs, whether it is given back, and whether 1 GiB streams.

    python bench/memory.py [--clients 100000] [--size 1073741824] [--quick] [--only clients|stream]

(a) clients: one Tollgate (memory store, anonymous tier token_bucket capacity 2,
    refill_rate 100, trusted_proxies [127.0.0.1/32]). wrk (bench/clients.lua)
    sends one request from each of N distinct X-Forwarded-For addresses; RSS
    (VmRSS) is read before, after, and again after the buckets are full (10 ms)
    and the sweeper (every 10 s) has dropped them; then a second wave of N new
    addresses shows whether the freed memory is reused (bounded) or grows.
(b) stream: a 1 GiB download (`/bytes/N` of upstream_mock) read and discarded
    in chunks, then a 1 GiB upload of generated chunks to the mock's echo path,
    each through a fresh Tollgate; peak RSS from VmHWM (reset before each
    transfer via /proc/pid/clear_refs) and VmRSS sampled every 50 ms.
Results go to bench/results/memory.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _harness import (
    ROOT,
    BenchError,
    Servers,
    get_json,
    guarded,
    reset_peak_rss,
    rss_kib,
    run_wrk,
    status_kib,
    step,
    wait_http,
    write_result,
)

SWEEP_WAIT = 12.0  # the sweeper runs every 10 s; one full period plus the sweep itself


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/memory.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100_000, help="distinct clients per wave (default 100000)")
    parser.add_argument("--size", type=int, default=1 << 30, help="bytes per streamed body (default 1 GiB)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections for the clients wave")
    parser.add_argument("--quick", action="store_true", help="20,000 clients and 256 MiB bodies")
    parser.add_argument("--only", choices=("clients", "stream"), help="run one part only")
    parser.add_argument("--churn", action="store_true",
                        help="also run a wave with the brief's capacity 2 / refill 100 bucket (state swept mid-wave)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "memory.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.size = 20_000, 256 << 20
    if not 2 <= args.clients <= 2 * 65_536:
        parser.error("--clients must be 2..131072 (two wrk threads, 65,536 addresses each)")
    return args


def mib(kib: float) -> float:
    return round(kib / 1024, 1)


# -------------------------------------------------------------- (a) clients


def wave(url: str, *, clients: int, octet: int, connections: int, tmp: Path) -> dict[str, Any]:
    """One request from each of `clients` new addresses 10.(octet+t).x.y."""
    per_thread = clients // 2
    deadline = 60 + clients / 200  # wrk is stopped once every thread is done; this bounds a stall
    prefix = tempfile.mktemp(prefix="wave-done-", dir=tmp)  # unique per wave: wrk creates the files
    done = [Path(f"{prefix}{t}") for t in range(2)]
    started = time.monotonic()
    result, _ = run_wrk(url, duration=deadline, connections=connections, threads=2,
                        extra=["-s", str(ROOT / "bench" / "clients.lua")],
                        script_args=[str(per_thread), str(octet), prefix],
                        stop_when=lambda: all(p.exists() for p in done))
    if not all(p.exists() for p in done):
        raise BenchError(f"wrk did not send {clients} requests within {deadline:.0f}s")
    return {"requests": result.requests, "seconds": round(time.monotonic() - started, 1), "rps": result.rps,
            "non_2xx": result.non_2xx, "socket_errors": sum(result.socket_errors.values())}


def _stats(admin: int) -> dict[str, int]:
    totals = get_json(f"http://127.0.0.1:{admin}/api/stats")["totals"]
    return {k: totals[k] for k in ("requests", "allowed", "blocked")}


def _remaining(admin: int, client: str) -> int:
    return int(get_json(f"http://127.0.0.1:{admin}/api/clients/{client}")["limits"][0]["remaining"])


def _counted(w: dict[str, Any], before: dict[str, int], after: dict[str, int]) -> None:
    w["tollgate_requests"] = after["requests"] - before["requests"]
    w["tollgate_blocked"] = after["blocked"] - before["blocked"]


def _tollgate(servers: Servers, name: str, upstream_port: int, limit: str, args: argparse.Namespace
              ) -> tuple[Any, int, float]:
    """A Tollgate keyed by X-Forwarded-For, warmed up; returns (server, admin port, clients/s)."""
    with step(f"{name}: Tollgate with {limit}"):
        server, admin = servers.tollgate(name, upstream_port, anonymous=limit,
                                         extra="clients: {trusted_proxies: [127.0.0.1/32]}\n")
        wait_http(server, f"http://127.0.0.1:{admin}/healthz", time.monotonic() + 30)
    with step("warm-up: 2 s on the exempt route, then 1,000 clients from 10.200-201.x.x"):
        run_wrk(f"http://127.0.0.1:{server.port}/exempt/warm", duration=2, connections=args.connections)
        warm = wave(f"http://127.0.0.1:{server.port}/c", clients=1000, octet=200, connections=args.connections,
                    tmp=servers.tmp)
    time.sleep(1)
    return server, admin, warm["rps"]


def bench_clients(servers: Servers, args: argparse.Namespace) -> dict[str, Any]:
    """Bytes per client with every client's state held at once, what the sweep gives back, and reuse.

    The brief's bucket (capacity 2, refill 100/s) is fresh again 10 ms after a
    client's one request, so the sweeper (every 10 s) keeps dropping state
    *during* a wave that lasts longer than 10 s: the RSS growth would then show
    ~10 s of clients, not N. So the measured run uses capacity 2 with one token
    refilled in H seconds, H longer than the wave (estimated from the warm-up):
    all N states are alive when RSS is read, and fresh H s after the wave, when
    the sweeper drops them. `--churn` also runs the brief's bucket as is.
    """
    with step("static upstream"):
        upstream, _ = servers.static_upstream()
    clients = args.clients - args.clients % 2
    out: dict[str, Any] = {"clients_per_wave": clients}
    churn_limit = "{algorithm: token_bucket, capacity: 2, refill_rate: 100}"
    server, admin, rate = _tollgate(servers, "tollgate-churn", upstream.port, churn_limit, args)
    print(f"  Tollgate's stderr (access log) -> files in {servers.tmp}", flush=True)
    if args.churn:
        url = f"http://127.0.0.1:{server.port}/c"
        churn: dict[str, Any] = {"limit": churn_limit, "rss_before_kib": rss_kib(server.pid)}
        s0 = _stats(admin)
        with step(f"churn: {clients:,} clients at capacity 2 / refill 100 (state fresh 10 ms later)"):
            churn["wave"] = wave(url, clients=clients, octet=0, connections=args.connections, tmp=servers.tmp)
        _counted(churn["wave"], s0, _stats(admin))
        churn["rss_after_kib"] = rss_kib(server.pid)
        time.sleep(SWEEP_WAIT)
        churn["rss_after_sweep_kib"] = rss_kib(server.pid)
        churn["vmhwm_kib"] = status_kib(server.pid, "VmHWM")
        out["churn"] = churn
    server.stop()

    hold = max(20, math.ceil(clients / max(rate, 1.0) * 1.5) + 10)
    limit = f"{{algorithm: token_bucket, capacity: 2, refill_rate: {1 / hold:.6g}}}"
    server, admin, _ = _tollgate(servers, "tollgate-hold", upstream.port, limit, args)
    pid, url = server.pid, f"http://127.0.0.1:{server.port}/c"
    out.update(limit=limit, hold_seconds=hold, pid=pid, rss_before_kib=rss_kib(pid))
    s0 = _stats(admin)
    with step(f"wave 1: {clients:,} clients, one request each (est. {clients / rate:.0f}s at {rate:,.0f}/s)"):
        out["wave1"] = wave(url, clients=clients, octet=0, connections=args.connections, tmp=servers.tmp)
    wave1_end = time.monotonic()
    time.sleep(0.5)
    out["rss_after_wave1_kib"] = rss_kib(pid)
    s1 = _stats(admin)
    _counted(out["wave1"], s0, s1)
    # The first client's state must still be held (1 of 2 left): else the sweeper ran into the wave.
    out["first_client_held"] = _remaining(admin, "10.0.0.0") == 1
    wait = wave1_end + hold + SWEEP_WAIT - time.monotonic()
    with step(f"waiting {wait:.0f}s: every state fresh {hold}s after its request, then a sweep (every 10 s)"):
        samples = []
        while time.monotonic() < wave1_end + hold + SWEEP_WAIT:
            time.sleep(1)
            samples.append(rss_kib(pid))
    out["rss_during_wait_kib"] = samples
    out["rss_after_sweep_kib"] = rss_kib(pid)
    last = clients // 2 - 1  # wrk thread 1's last address
    out["last_client_full"] = _remaining(admin, f"10.1.{last // 256}.{last % 256}") == 2
    with step(f"wave 2: {clients:,} other clients"):
        out["wave2"] = wave(url, clients=clients, octet=100, connections=args.connections, tmp=servers.tmp)
    time.sleep(0.5)
    out["rss_after_wave2_kib"] = rss_kib(pid)
    _counted(out["wave2"], s1, _stats(admin))
    out["vmhwm_kib"] = status_kib(pid, "VmHWM")
    out["bytes_per_client"] = round((out["rss_after_wave1_kib"] - out["rss_before_kib"]) * 1024 / clients, 1)
    server.check_alive()
    return out


def print_clients(out: dict[str, Any]) -> None:
    n = out["clients_per_wave"]
    print(f"\n(a) {n:,} distinct clients, one request each; RSS of the Tollgate process "
          f"(limit {out['limit']}: state held {out['hold_seconds']}s)")
    for key, label in (("rss_before_kib", "before"), ("rss_after_wave1_kib", "after wave 1"),
                       ("rss_after_sweep_kib", "after every state is fresh + a sweep"),
                       ("rss_after_wave2_kib", "after wave 2 (new clients)"), ("vmhwm_kib", "peak (VmHWM)")):
        print(f"    {label:<38} {mib(out[key]):>8.1f} MiB")
    print(f"    bytes per client (wave 1)              {out['bytes_per_client']:>8.0f} B"
          + ("" if out["first_client_held"] else "   [UNDERSTATED: the first client's state was swept "
             "before the wave ended]"))
    given_back = mib(out["rss_after_wave1_kib"] - out["rss_after_sweep_kib"])
    wave2_growth = mib(out["rss_after_wave2_kib"] - out["rss_after_wave1_kib"])
    print(f"    given back by the sweep                {given_back:>8.1f} MiB")
    print(f"    wave 2 growth over wave 1              {wave2_growth:>8.1f} MiB")
    for name in ("wave1", "wave2"):
        w = out[name]
        print(f"    {name}: {w['requests']:,} requests by wrk in {w['seconds']}s ({w['rps']:,.0f}/s), "
              f"Tollgate counted {w['tollgate_requests']:,}, blocked {w['tollgate_blocked']}, "
              f"non-2xx {w['non_2xx']}, socket errors {w['socket_errors']}")
    churn = out.get("churn")
    if churn:
        w = churn["wave"]
        print(f"  churn ({churn['limit']}: fresh 10 ms after each request, so the sweeper drops state "
              f"during the wave):")
        print(f"    RSS {mib(churn['rss_before_kib'])} -> {mib(churn['rss_after_kib'])} MiB after {n:,} clients "
              f"in {w['seconds']}s; {mib(churn['rss_after_sweep_kib'])} MiB after a sweep; "
              f"VmHWM {mib(churn['vmhwm_kib'])} MiB; non-2xx {w['non_2xx']}")


# --------------------------------------------------------------- (b) stream


class Sampler(threading.Thread):
    """VmRSS every 50 ms: the shape of the curve, next to the kernel's exact VmHWM."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.samples = pid, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, rss_kib(self.pid))
            self.samples += 1


async def download(url: str, size: int) -> int:
    import aiohttp

    received = 0
    timeout = aiohttp.ClientTimeout(total=300, sock_read=30)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        async with session.get(url) as response:
            if response.status != 200:
                raise BenchError(f"download: {url} answered {response.status}")
            async for chunk in response.content.iter_chunked(256 * 1024):
                received += len(chunk)  # and discarded
    if received != size:
        raise BenchError(f"download: got {received} bytes, expected {size}")
    return received


async def upload(url: str, size: int) -> int:
    import aiohttp

    block = b"\xa5" * (256 * 1024)

    async def body():  # type: ignore[no-untyped-def]
        left = size
        while left > 0:
            n = min(left, len(block))
            yield block if n == len(block) else block[:n]
            left -= n

    timeout = aiohttp.ClientTimeout(total=300, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(url, data=body()) as response:
            if response.status != 200:
                raise BenchError(f"upload: {url} answered {response.status}: {(await response.text())[:200]}")
            echoed = await response.json()
    if echoed["body_length"] != size:
        raise BenchError(f"upload: the mock received {echoed['body_length']} bytes, expected {size}")
    return int(echoed["body_length"])


def transfer(server: Any, name: str, coro_factory: Any, size: int) -> dict[str, Any]:
    pid = server.pid
    resettable = reset_peak_rss(pid)
    before = rss_kib(pid)
    hwm_before = status_kib(pid, "VmHWM")
    cpu0 = server.cpu()
    sampler = Sampler(pid)
    sampler.start()
    started = time.monotonic()
    try:
        asyncio.run(asyncio.wait_for(coro_factory(), timeout=300))
    finally:
        sampler.done.set()
        sampler.join()
    seconds = time.monotonic() - started
    hwm = status_kib(pid, "VmHWM")
    after = rss_kib(pid)
    peak = max(hwm, sampler.peak) if resettable else sampler.peak
    server.check_alive()
    return {
        "transfer": name, "bytes": size, "seconds": round(seconds, 2), "mb_per_s": round(size / seconds / 1e6, 1),
        "tollgate_cpu_seconds": round(server.cpu() - cpu0, 2),
        "rss_before_kib": before, "rss_after_kib": after, "vmhwm_before_kib": hwm_before, "vmhwm_kib": hwm,
        "vmhwm_reset": resettable, "sampled_peak_kib": sampler.peak, "samples": sampler.samples,
        "growth_mb": round((peak - before) * 1024 / 1e6, 1),
    }


def bench_stream(servers: Servers, args: argparse.Namespace) -> list[dict[str, Any]]:
    with step("upstream_mock"):
        mock = servers.mock_upstream()
    results = []
    size = args.size
    for name, path, fn in (("download", f"/bytes/{size}", download), ("upload", "/upload", upload)):
        with step(f"Tollgate for the {name}"):
            server, admin = servers.tollgate(f"tollgate-{name}", mock.port)
            wait_http(server, f"http://127.0.0.1:{admin}/healthz", time.monotonic() + 30)
        url = f"http://127.0.0.1:{server.port}{path}"
        warm = f"http://127.0.0.1:{server.port}" + (f"/bytes/{1 << 20}" if name == "download" else path)
        asyncio.run(fn(warm, 1 << 20))  # the code path warmed up with 1 MiB
        with step(f"{name} of {size / (1 << 20):,.0f} MiB through Tollgate"):
            results.append(transfer(server, name, lambda fn=fn, url=url: fn(url, size), size))
        server.stop()
    return results


def print_stream(results: list[dict[str, Any]]) -> None:
    print("\n(b) streaming through Tollgate: RSS growth over the RSS before the transfer")
    for r in results:
        peak = max(r["vmhwm_kib"], r["sampled_peak_kib"])
        print(f"    {r['transfer']:<9} {r['bytes'] / (1 << 30):.2f} GiB in {r['seconds']:.1f}s "
              f"({r['mb_per_s']:,.0f} MB/s, Tollgate CPU {r['tollgate_cpu_seconds']:.1f}s): "
              f"RSS {r['rss_before_kib'] / 1024:.1f} MiB -> peak {peak / 1024:.1f} MiB "
              f"(VmHWM {r['vmhwm_kib'] / 1024:.1f}, sampled {r['sampled_peak_kib'] / 1024:.1f} over "
              f"{r['samples']} samples) = growth {r['growth_mb']:.1f} MB; after {r['rss_after_kib'] / 1024:.1f} MiB"
              + ("" if r["vmhwm_reset"] else "  [VmHWM could not be reset: growth from samples only]"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wave_deadline = 60 + args.clients / 200
    budget = 120 + (0 if args.only == "stream" else 3 * wave_deadline + 1.5 * args.clients / 200 + 40) \
        + (0 if args.only == "clients" else 2 * 330)
    started = time.monotonic()
    result: dict[str, Any] = {"meta": {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                       "command": " ".join(["memory.py", *sys.argv[1:]])}}
    print(f"Tollgate memory bench; deadline {budget:.0f}s", flush=True)
    def body() -> int:
        with Servers(budget) as servers:
            if args.only in (None, "clients"):
                result["clients"] = bench_clients(servers, args)
            if args.only in (None, "stream"):
                result["stream"] = bench_stream(servers, args)
        return 0

    code = guarded(body)
    if code:
        return code
    if "clients" in result:
        print_clients(result["clients"])
    if "stream" in result:
        print_stream(result["stream"])
    result["meta"]["wall_seconds"] = round(time.monotonic() - started, 1)
    write_result(args.output, result, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
