#!/usr/bin/env python3
"""Instruction bench: what one proxied request costs Tollgate, counted by callgrind instead of timed.

    python bench/instructions.py [--requests 1000] [--concurrency 10] [--quick] [--modes off,memory,redis]

On a shared machine CPU seconds per request swing by ±30 %; the instructions
valgrind's callgrind counts (user space, every thread of the Tollgate process)
barely move between runs. Tollgate runs under callgrind with instrumentation
off; after a warm-up of each path, every phase switches it on, zeroes the
counters, sends exactly N requests from an aiohttp client in this process,
dumps, and switches it off again. Modes: `off` (the exempt route /exempt/bench)
and `memory` (/bench, memory store) alternate on one Tollgate process; `redis`
(/bench, a private redis-server) runs on a second one once the first has
stopped. Results go to bench/results/instructions.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
from _harness import ROOT, BenchError, Servers, checkout, guarded, step, wait_http, write_result

MODES = ("off", "memory", "redis")
RATIOS = (("memory", "off", "limiter on vs off"), ("off", "memory", "the same, read as a throughput ratio"),
          ("redis", "memory", "the Redis round trip"),
          ("off", "baseline-off", "--baseline: this code vs that commit's"),
          ("memory", "baseline-memory", "--baseline: this code vs that commit's"),
          ("redis", "baseline-redis", "--baseline: this code vs that commit's"))
WARMUP = 500  # requests per path before the first phase: code paths, caches and connections settled
VALGRIND = shutil.which("valgrind")
CALLGRIND_CONTROL = shutil.which("callgrind_control")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/instructions.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per measured phase (default 1000)")
    parser.add_argument("--concurrency", type=int, default=10, help="client connections, each sequential (default 10)")
    parser.add_argument("--quick", action="store_true", help="300 requests, one phase per mode")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    parser.add_argument("--deadline", type=float, default=600, help="seconds for the whole bench (default 600)")
    parser.add_argument("--baseline", metavar="REV",
                        help="also count an older commit's Tollgate (git archive REV) in the same modes")
    parser.add_argument("--keep-dumps", type=Path, metavar="DIR",
                        help="copy each phase's callgrind dump to DIR/<mode>-<phase>.cg.out (for callgrind_annotate)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "instructions.json")
    parser.add_argument("--limits", default=None,
                        help="the anonymous tier's limits as a YAML flow list's items (default: one token bucket "
                             "too large to refuse); e.g. to price an extra limit or a selector")
    args = parser.parse_args(argv)
    args.phases = 1 if args.quick else 2
    if args.quick:
        args.requests = 300
    wanted = {m.strip() for m in args.modes.split(",") if m.strip()}
    if not wanted or wanted - set(MODES):
        parser.error(f"--modes: a comma-separated subset of {','.join(MODES)}")
    args.modes = [m for m in MODES if m in wanted]
    if not 1 <= args.concurrency <= args.requests:
        parser.error("--concurrency must be between 1 and --requests")
    return args


async def load(session: aiohttp.ClientSession, url: str, n: int, concurrency: int, limited: bool) -> None:
    """Exactly `n` GETs from `concurrency` sequential workers. Each must be a 200 that went through
    the limiter (RateLimit-Policy sent) or not, as the mode says: else we would count another path."""

    async def worker(count: int) -> None:
        for _ in range(count):
            async with session.get(url) as response:
                await response.read()
                if response.status != 200 or ("RateLimit-Policy" in response.headers) != limited:
                    raise BenchError(f"{url} answered {response.status}, RateLimit-Policy "
                                     f"{'present' if 'RateLimit-Policy' in response.headers else 'absent'}")

    await asyncio.gather(*(worker(n // concurrency + (i < n % concurrency)) for i in range(concurrency)))


def callgrind(pid: int, *command: str) -> None:
    """callgrind_control exits 0 whatever happens; "OK." is its word that vgdb reached the process."""
    done = subprocess.run([CALLGRIND_CONTROL, *command, str(pid)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    if "OK." not in done.stdout:
        raise BenchError(f"callgrind_control {' '.join(command)} {pid}: {(done.stdout + done.stderr).strip()}")


def dumps(out: Path) -> list[Path]:
    """callgrind's dumps, cg.out.1, cg.out.2, ..., in the order written: by number (mtimes can tie)."""
    numbered = [p for p in out.parent.glob(out.name + ".*") if p.suffix[1:].isdigit()]
    return sorted(numbered, key=lambda p: int(p.suffix[1:]))


async def phases(pid: int, out: Path, urls: dict[str, str], order: list[str],
                 args: argparse.Namespace) -> dict[str, list[float]]:
    """Warm every path up uninstrumented, then one dump per phase: instructions / requests.

    One session for all phases: its connections stay open, so no phase counts connects or closes.
    callgrind_control blocks the loop on purpose: the client is idle between phases."""
    figures: dict[str, list[float]] = {mode: [] for mode in order}
    connector = aiohttp.TCPConnector(limit=args.concurrency, keepalive_timeout=3600)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        for mode in figures:
            await load(session, urls[mode], WARMUP, args.concurrency, not mode.endswith("off"))
        for mode in order:
            started, before = time.monotonic(), len(dumps(out))
            callgrind(pid, "-i", "on")
            callgrind(pid, "-z")
            await load(session, urls[mode], args.requests, args.concurrency, not mode.endswith("off"))
            callgrind(pid, "-d")
            callgrind(pid, "-i", "off")
            written = dumps(out)
            if len(written) <= before:
                raise BenchError(f"callgrind_control -d {pid} wrote no new dump next to {out}")
            match = re.search(r"^summary:\s+(\d+)", written[-1].read_text(), re.M)
            if match is None:
                raise BenchError(f"{written[-1]} has no summary: line")
            figures[mode].append(int(match.group(1)) / args.requests)
            if args.keep_dumps is not None:
                args.keep_dumps.mkdir(parents=True, exist_ok=True)
                shutil.copy(written[-1], args.keep_dumps / f"{mode}-{len(figures[mode])}.cg.out")
            print(f"    {mode:<7} {figures[mode][-1]:>10,.0f} instructions/request  "
                  f"({time.monotonic() - started:.1f}s)", flush=True)
    return figures


def storage_errors(admin: int) -> float:
    """tollgate_storage_errors_total: a decision the store did not make (storage.on_error) costs otherwise."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^tollgate_storage_errors_total(?:\{[^}]*\})?\s+([\d.e+]+)", text, re.M)
    return float(match.group(1)) if match else 0.0


def run_tollgate(servers: Servers, upstream_port: int, name: str, order: list[str], args: argparse.Namespace,
                 storage: str = "{backend: memory}", root: Path = ROOT) -> tuple[dict[str, list[float]], str]:
    """One Tollgate (of the checkout `root`) under callgrind through its phases, then stopped;
    returns (figures, its command)."""
    out = servers.tmp / name / "cg.out"
    out.parent.mkdir()
    wrapper = [VALGRIND, "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no", f"--callgrind-out-file={out}"]
    with step(f"{name} under callgrind (slow to start)"):
        limits = {} if args.limits is None else {"anonymous": args.limits}
        server, admin = servers.tollgate(name, upstream_port, storage=storage, wrapper=wrapper, root=root, **limits)
        wait_http(server, f"http://127.0.0.1:{admin}/healthz", time.monotonic() + 180)
    print(f"  warm-up: {WARMUP} requests per path; phases: {' '.join(order)}", flush=True)
    urls = {mode: f"http://127.0.0.1:{server.port}{'/exempt/bench' if mode.endswith('off') else '/bench'}"
            for mode in order}
    figures = asyncio.run(phases(server.pid, out, urls, order, args))
    server.check_alive()
    if storage_errors(admin):
        raise BenchError(f"{name}: storage errors: some decisions were storage.on_error's, not the store's")
    server.stop(timeout=30)  # before the next one: valgrind is slow and there are 2 cores
    return figures, " ".join(server.argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    command = " ".join(["python bench/instructions.py", *sys.argv[1:]])
    print(f"{command}\n  {args.requests} requests per phase, concurrency {args.concurrency}, {args.phases} "
          f"phase(s) per mode, {WARMUP} warm-up requests per path; deadline {args.deadline:.0f}s", flush=True)
    runs: list[tuple[dict[str, list[float]], str]] = []

    def body() -> int:
        if VALGRIND is None or CALLGRIND_CONTROL is None:
            raise BenchError("valgrind / callgrind_control not found: apt-get install valgrind")
        with Servers(args.deadline) as servers:
            with step("static upstream"):
                upstream, _ = servers.static_upstream()
            checkouts = [("", ROOT)]
            if args.baseline:
                checkouts.append(("baseline-", checkout(args.baseline, servers.tmp)))
            redis = None
            for prefix, root in checkouts:
                local = [prefix + m for m in ("off", "memory") if m in args.modes] * args.phases
                if local:
                    runs.append(run_tollgate(servers, upstream.port, f"{prefix or 'tollgate-'}memory", local, args,
                                             root=root))
                if "redis" in args.modes:
                    if redis is None:
                        with step("private redis-server"):
                            redis = servers.redis()
                    # A timeout of 1 s, not 0.05: under valgrind a round trip can outlast 50 ms; same code path.
                    storage = f'{{backend: redis, url: "redis://127.0.0.1:{redis.port}/0", timeout: 1}}'
                    runs.append(run_tollgate(servers, upstream.port, f"{prefix or 'tollgate-'}redis",
                                             [prefix + "redis"] * args.phases, args, storage, root=root))
        return 0

    code = guarded(body)
    if code:
        return code
    figures = {mode: values for found, _ in runs for mode, values in found.items()}
    commands = [argv for _, argv in runs]
    modes = [*args.modes, *(f"baseline-{m}" for m in args.modes if args.baseline)]
    means = {mode: statistics.mean(figures[mode]) for mode in modes}
    ratios = {f"{a}/{b}": round(means[a] / means[b], 3) for a, b, _ in RATIOS if a in means and b in means}
    print(f"\nInstructions per request (callgrind Ir, user space, whole Tollgate process); "
          f"{args.requests} requests per phase, concurrency {args.concurrency}")
    print(f"{'mode':<16} " + " ".join(f"{'phase ' + str(i + 1):>10}" for i in range(args.phases)) + f" {'mean':>10}")
    for mode in modes:
        print(f"{mode:<16} " + " ".join(f"{v:>10,.0f}" for v in figures[mode]) + f" {means[mode]:>10,.0f}")
    for a, b, meaning in RATIOS:
        if f"{a}/{b}" in ratios:
            print(f"  {a + '/' + b:<23} {ratios[f'{a}/{b}']:.3f}  ({meaning})")
    print("Tollgate ran as (cwd: the repository" + (f"; baseline-*: {args.baseline} in the temp dir" if args.baseline
                                                     else "") + "):\n  " + "\n  ".join(commands))
    result = {
        "meta": {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command,
                 "tollgate_commands": commands, "baseline": args.baseline, "requests": args.requests,
                 "concurrency": args.concurrency,
                 "phases": args.phases, "warmup": WARMUP, "python": platform.python_version(),
                 "valgrind": subprocess.run([VALGRIND, "--version"], capture_output=True, text=True).stdout.strip(),
                 "machine": platform.machine(), "wall_seconds": round(time.monotonic() - started, 1)},
        "instructions_per_request": {mode: [round(v) for v in figures[mode]] for mode in modes},
        "mean": {mode: round(v) for mode, v in means.items()},
        "ratios": ratios,
    }
    write_result(args.output, result, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
