#!/usr/bin/env python3
"""Throughput bench: Tollgate against nginx and against no proxy at all.

    python bench/run.py [--duration 8] [--rounds 3] [--connections 50] [--quick] [--profile]

Starts, on 127.0.0.1 only and on free ports: a static upstream (nginx
answering "ok\\n"), nginx as a peer rate-limiting proxy, a private
redis-server and three Tollgate processes (limiter off, memory store, Redis
store). Then for each round runs wrk against every target in turn (the order
alternates each round, so drift spreads evenly), measures each server's CPU
time from /proc, and prints per-target medians and the ratios that matter.
Results also go to bench/results/latest.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from _harness import (
    ROOT,
    BenchError,
    Server,
    Servers,
    checkout,
    guarded,
    machine_busy_seconds,
    run_wrk,
    step,
    wait_http,
    write_result,
)

TARGETS = ("direct", "nginx", "tollgate-off", "tollgate-memory", "tollgate-redis")
# Opt-in (--targets ...,aiohttp-bare): a minimal aiohttp forwarder, the framework's floor.
# and tollgate-nostats: memory store with Stats.observe a no-op (bench/no_stats.py), the cost of stats;
# and tollgate-workers2: tollgate-redis with server.workers 2 (a supervisor and two SO_REUSEPORT workers).
ALL_TARGETS = ("direct", "nginx", "aiohttp-bare", "tollgate-off", "tollgate-memory", "tollgate-nostats",
               "tollgate-redis", "tollgate-workers2")
RATIOS = (
    ("tollgate-memory", "nginx"),
    ("tollgate-memory", "direct"),
    ("tollgate-memory", "tollgate-off"),
    ("tollgate-redis", "tollgate-memory"),
    ("tollgate-workers2", "tollgate-redis"),
    ("tollgate-off", "aiohttp-bare"),
    ("tollgate-memory", "tollgate-nostats"),
    ("tollgate-off", "baseline-off"),
    ("tollgate-memory", "baseline-memory"),
    ("tollgate-redis", "baseline-redis"),
    ("baseline-memory", "nginx"),
    ("baseline-memory", "baseline-off"),
    ("baseline-redis", "baseline-memory"),
)
METRICS = ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8, help="seconds of wrk per target per round (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all targets (default 3)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="duration 2, rounds 1, 1 s warm-up: well under a minute")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated, from {','.join(ALL_TARGETS)} "
                        "(default: all but aiohttp-bare and tollgate-nostats)")
    parser.add_argument("--access-log", choices=("file", "devnull"), default="file",
                        help="where Tollgate's stderr (one access line per request) goes (default: a file)")
    parser.add_argument("--redis-timeout", type=float, default=0.05,
                        help="storage.timeout of tollgate-redis, seconds (default 0.05, the shipped default)")
    parser.add_argument("--profile", action="store_true",
                        help="afterwards, py-spy record tollgate-memory under wrk and print the hottest functions")
    parser.add_argument("--baseline", metavar="REV",
                        help="also run an older commit's Tollgate (git archive REV into the temp dir) as "
                        "baseline-off/-memory/-redis next to each tollgate- target: before vs after in one run")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 2, 1
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(ALL_TARGETS)
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}; choose from {', '.join(ALL_TARGETS)}")
    if args.duration < 1 or args.rounds < 1 or args.connections < 1:
        parser.error("--duration, --rounds and --connections must be >= 1")
    return args


class Target:
    """A URL to load and the processes whose CPU is measured while it is loaded."""

    def __init__(self, name: str, url: str, server: Server, *, others: dict[str, Server] | None = None,
                 metrics_url: str | None = None) -> None:
        self.name, self.url, self.server = name, url, server
        self.others = others or {}  # upstream / redis: reported, not charged to the target
        self.metrics_url = metrics_url
        self.runs: list[dict[str, Any]] = []


def start_all(servers: Servers, args: argparse.Namespace) -> dict[str, Target]:
    wanted = set(args.targets)
    log_to_file = args.access_log == "file"
    with step("static upstream"):
        upstream, is_nginx = servers.static_upstream()
    targets: dict[str, Target] = {}
    if "direct" in wanted:
        targets["direct"] = Target("direct", f"http://127.0.0.1:{upstream.port}/bench", upstream)
    if "nginx" in wanted:
        if is_nginx:
            with step("nginx peer proxy"):
                peer = servers.nginx_peer(upstream.port)
            targets["nginx"] = Target("nginx", f"http://127.0.0.1:{peer.port}/bench", peer,
                                      others={"upstream": upstream})
        else:
            print("  nginx is missing: the `nginx` target is skipped", flush=True)
    if "aiohttp-bare" in wanted:
        with step("bare aiohttp forwarder"):
            bare = servers.bare_proxy(upstream.port)
        targets["aiohttp-bare"] = Target("aiohttp-bare", f"http://127.0.0.1:{bare.port}/bench", bare,
                                         others={"upstream": upstream})
    redis = None
    if wanted & {"tollgate-redis", "tollgate-workers2"}:
        with step("private redis-server"):
            redis = servers.redis()
    baseline = checkout(args.baseline, servers.tmp) if args.baseline else None
    with step("Tollgate processes"):
        pending = []
        modes = [("tollgate", mode, ROOT) for mode in ("off", "memory", "nostats", "redis", "workers2")]
        if baseline is not None:
            modes += [("baseline", mode, baseline) for mode in ("off", "memory", "redis")]
        for prefix, mode, root in modes:
            name = f"{prefix}-{mode}"
            if f"tollgate-{mode}" not in wanted:
                continue
            storage = "{backend: memory}"
            if mode in ("redis", "workers2"):
                assert redis is not None
                storage = (f'{{backend: redis, url: "redis://127.0.0.1:{redis.port}/0", '
                           f"timeout: {args.redis_timeout:g}}}")
            script = "bench/no_stats.py" if mode == "nostats" else "run.py"
            server, admin = servers.tollgate(name, upstream.port, storage=storage, log_to_file=log_to_file,
                                             script=script, root=root, workers=2 if mode == "workers2" else 1)
            path = "/exempt/bench" if mode == "off" else "/bench"
            others = {"upstream": upstream, **({"redis": redis} if redis and mode in ("redis", "workers2") else {})}
            targets[name] = Target(name, f"http://127.0.0.1:{server.port}{path}", server, others=others,
                                   metrics_url=f"http://127.0.0.1:{admin}/metrics")
            pending.append((server, admin))
        for server, admin in pending:
            wait_http(server, f"http://127.0.0.1:{admin}/healthz", time.monotonic() + 30)
    where = "a file in the bench's temp dir" if log_to_file else "/dev/null"
    print(f"  Tollgate's stderr (access log, one line per request) -> {where}", flush=True)
    for target in targets.values():
        sanity_check(target)
    order = [*ALL_TARGETS, *(f"baseline-{mode}" for mode in ("off", "memory", "redis"))]
    return {name: targets[name] for name in order if name in targets}


def sanity_check(target: Target) -> None:
    """One request: 200 "ok", and the limiter really ran (or really did not)."""
    with urllib.request.urlopen(target.url, timeout=5) as response:
        body = response.read()
        policy = response.headers.get("RateLimit-Policy")
    if response.status != 200:
        raise BenchError(f"{target.name}: {target.url} answered {response.status} {body[:80]!r}")
    limited = target.name.endswith(("-memory", "-nostats", "-redis", "-workers2"))
    if limited and not policy:
        raise BenchError(f"{target.name}: no RateLimit-Policy header: the limiter did not run")
    if target.name.endswith("-off") and policy:
        raise BenchError(f"{target.name}: RateLimit-Policy present on the exempt route")


def storage_errors(target: Target) -> float | None:
    if target.metrics_url is None:
        return None
    with urllib.request.urlopen(target.metrics_url, timeout=5) as response:
        text = response.read().decode()
    match = re.search(r"^tollgate_storage_errors_total(?:\{[^}]*\})?\s+([\d.e+]+)", text, re.M)
    return float(match.group(1)) if match else None


def measure(target: Target, args: argparse.Namespace, *, duration: float) -> dict[str, Any]:
    target.server.check_alive()
    cpu0, kernel0, syscalls0 = target.server.usage()
    others0 = {k: s.cpu() for k, s in target.others.items()}
    errors0 = storage_errors(target)
    wrk0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0 = machine_busy_seconds()
    started = time.monotonic()
    result, _ = run_wrk(target.url, duration=duration, connections=args.connections, threads=args.threads)
    wall = time.monotonic() - started
    busy = machine_busy_seconds() - busy0
    wrk1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1, kernel1, syscalls1 = target.server.usage()
    cpu, kernel, syscalls = cpu1 - cpu0, kernel1 - kernel0, syscalls1 - syscalls0
    others = {k: s.cpu() - others0[k] for k, s in target.others.items()}
    errors1 = storage_errors(target)
    target.server.check_alive()
    n = max(result.requests, 1)
    wrk_cpu = wrk1.ru_utime + wrk1.ru_stime - wrk0.ru_utime - wrk0.ru_stime
    # CPU the machine spent on anything but these processes and wrk: other people's load.
    foreign = max(0.0, busy - cpu - sum(others.values()) - wrk_cpu)
    run: dict[str, Any] = {
        "requests": result.requests, "seconds": result.seconds, "rps": result.rps,
        "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
        "cpu_seconds": round(cpu, 3), "cpu_us_per_req": round(cpu / n * 1e6, 2),
        "cpu_percent_of_one_core": round(100 * cpu / wall, 1),
        "kernel_cpu_us_per_req": round(kernel / n * 1e6, 2), "io_syscalls_per_req": round(syscalls / n, 3),
        "wrk_cpu_us_per_req": round(wrk_cpu / n * 1e6, 2),
        "foreign_cpu_percent": round(100 * foreign / wall, 1),
        "non_2xx": result.non_2xx, "socket_errors": result.socket_errors,
    }
    for key, seconds in others.items():
        run[f"{key}_cpu_us_per_req"] = round(seconds / n * 1e6, 2)
    if errors0 is not None and errors1 is not None:
        run["storage_errors"] = int(errors1 - errors0)
    return run


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(targets: dict[str, Target]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, target in targets.items():
        keys = [k for k in target.runs[0] if isinstance(target.runs[0][k], (int, float))]
        med = {k: median([run.get(k) for run in target.runs]) for k in keys}
        med["non_2xx_total"] = sum(run["non_2xx"] for run in target.runs)
        med["socket_errors_total"] = sum(sum(run["socket_errors"].values()) for run in target.runs)
        summary[name] = med
    return summary


def ratios(summary: dict[str, Any], targets: dict[str, Target]) -> dict[str, dict[str, float | None]]:
    """A/B of the medians per metric, plus `rps_paired`: the median over rounds of
    A/B within each round, where A and B ran seconds apart. On a shared machine
    whose speed drifts by tens of percent within minutes, that pairing cancels
    the drift that a ratio of medians keeps; `rps_paired_min`/`_max` show the spread."""
    out: dict[str, dict[str, float | None]] = {}
    for a, b in RATIOS:
        if a in summary and b in summary:
            row: dict[str, float | None] = {
                m: (round(summary[a][m] / summary[b][m], 3) if summary[a].get(m) and summary[b].get(m) else None)
                for m in METRICS
            }
            paired = [ra["rps"] / rb["rps"] for ra, rb in zip(targets[a].runs, targets[b].runs) if rb["rps"]]
            row["rps_paired"] = round(statistics.median(paired), 3) if paired else None
            row["rps_paired_min"] = round(min(paired), 3) if paired else None
            row["rps_paired_max"] = round(max(paired), 3) if paired else None
            out[f"{a}/{b}"] = row
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_report(summary: dict[str, Any], ratio_table: dict[str, dict[str, float | None]], rounds: int) -> None:
    print(f"\nMedians over {rounds} round(s); CPU is the server's own (nginx: its worker), per request;"
          " 'of it sys': its kernel part; 'I/O calls': its read and write system calls")
    header = (f"{'target':<17} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11} "
              f"{'of it sys':>9} {'I/O calls':>9} {'CPU %core':>9} {'upstr us/req':>12} {'redis us/req':>12} "
              f"{'wrk us/req':>10} {'non-2xx':>8}")
    print(header)
    print("-" * len(header))
    for name, med in summary.items():
        print(f"{name:<17} {_fmt(med['rps'], 0):>10} {_fmt(med['p50_ms']):>8} {_fmt(med['p99_ms']):>8} "
              f"{_fmt(med['cpu_us_per_req'], 1):>11} {_fmt(med.get('kernel_cpu_us_per_req'), 1):>9} "
              f"{_fmt(med.get('io_syscalls_per_req'), 2):>9} {_fmt(med['cpu_percent_of_one_core'], 0):>9} "
              f"{_fmt(med.get('upstream_cpu_us_per_req'), 1):>12} {_fmt(med.get('redis_cpu_us_per_req'), 1):>12} "
              f"{_fmt(med['wrk_cpu_us_per_req'], 1):>10} {med['non_2xx_total']:>8}")
    print("\nRatios of medians (A/B); 'paired': median over rounds of req/s A/B within the round [min-max]")
    print(f"{'A/B':<32} {'req/s':>7} {'p50':>7} {'p99':>7} {'CPU/req':>8}   {'paired req/s':<20}")
    for name, values in ratio_table.items():
        paired = (f"{_fmt(values['rps_paired'], 3)} [{_fmt(values['rps_paired_min'], 2)}-"
                  f"{_fmt(values['rps_paired_max'], 2)}]")
        print(f"{name:<32} " + " ".join(f"{_fmt(values[m], 2):>7}" if m != "cpu_us_per_req"
                                        else f"{_fmt(values[m], 2):>8}" for m in METRICS) + f"   {paired}")
    bad = {n: (m["non_2xx_total"], m["socket_errors_total"]) for n, m in summary.items()
           if m["non_2xx_total"] or m["socket_errors_total"]}
    if bad:
        print("\nWARNING: non-2xx responses / socket errors (should be 0): "
              + ", ".join(f"{n}: {a} non-2xx, {b} socket errors" for n, (a, b) in bad.items()))
    else:
        print("\nNon-2xx or 3xx responses: 0 for every target; socket errors: 0")
    noisy = {n: m["foreign_cpu_percent"] for n, m in summary.items() if m["foreign_cpu_percent"] >= 15}
    if noisy:
        print("WARNING: other processes used CPU during the runs (median % of one core): "
              + ", ".join(f"{n} {p:.0f}%" for n, p in noisy.items()) + "; numbers are noisier than usual")
    for name in ("tollgate-redis", "baseline-redis"):
        redis_errors = summary.get(name, {}).get("storage_errors")
        if redis_errors:
            print(f"WARNING: {name} had storage errors (median {redis_errors:g} per run): "
                  "those requests were decided by storage.on_error, not by Redis")


# ------------------------------------------------------------------ profile


def profile(target: Target, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """py-spy record (non-blocking, by function) while wrk loads `target`; top functions by own time."""
    if shutil.which("py-spy") is None:
        raise BenchError("--profile needs py-spy (pip install py-spy)")
    raw = tmp / "profile.txt"
    seconds = max(3, int(args.duration))
    pyspy = subprocess.Popen(
        ["py-spy", "record", "--nonblocking", "--function", "--threads", "--format", "raw", "--rate", "200",
         "-d", str(seconds + 1), "-o", str(raw), "--pid", str(target.server.pid)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        time.sleep(0.5)
        run = measure(target, args, duration=seconds)
        _, err = pyspy.communicate(timeout=seconds + 30)
    finally:
        if pyspy.poll() is None:
            pyspy.kill()
            pyspy.wait()
    if not raw.exists():
        raise BenchError(f"py-spy wrote no profile: {err.decode(errors='replace')}")
    kept = ROOT / "bench" / "results" / "profile-collapsed.txt"  # flamegraph.pl / speedscope input
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(raw, kept)
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        thread, *frames = stack.split(";")  # --threads: the first frame names the thread
        samples += count
        threads["main (event loop)" if "MainThread" in thread else
                "logging QueueListener" if "_monitor" in thread else thread] += count
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    return {"target": target.name, "under_load": run, "samples": samples,
            "threads": [(t, c, round(100 * c / samples, 1)) for t, c in threads.most_common()],
            "own": [(f, c, round(100 * c / samples, 1)) for f, c in own.most_common(15)],
            "total": [(f, c, round(100 * c / samples, 1)) for f, c in total.most_common(15)]}


def print_profile(prof: dict[str, Any]) -> None:
    run = prof["under_load"]
    print(f"\nProfile of {prof['target']} (py-spy, {prof['samples']} non-idle samples, "
          f"{run['rps']:,.0f} req/s, process at {run['cpu_percent_of_one_core']:.0f}% of one core)")
    print("  samples by thread: " + ", ".join(f"{t} {p:.1f}%" for t, _, p in prof["threads"]))
    for title, rows in (("own time", prof["own"]), ("inclusive time", prof["total"])):
        print(f"  top 15 by {title}:")
        for frame, _, percent in rows:
            print(f"    {percent:5.1f}%  {frame}")


# --------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n_targets = len(args.targets)
    if args.baseline:
        n_targets += sum(t in args.targets for t in ("tollgate-off", "tollgate-memory", "tollgate-redis"))
    warmup = 1
    budget = 90 + n_targets * (warmup + 8) + args.rounds * n_targets * (args.duration + 10)
    if args.profile:
        budget += args.duration + 40
    started = time.monotonic()
    print(f"Tollgate bench: {n_targets} targets x {args.rounds} round(s) x {args.duration:g}s, "
          f"wrk -t{args.threads} -c{args.connections}; deadline {budget:.0f}s", flush=True)
    out: dict[str, Any] = {}

    def body() -> int:
        with Servers(budget) as servers:
            targets = start_all(servers, args)
            with step(f"warm-up, {warmup}s per target"):
                for target in targets.values():
                    run_wrk(target.url, duration=warmup, connections=args.connections, threads=args.threads)
            order = list(targets.values())
            for round_index in range(args.rounds):
                sequence = order if round_index % 2 == 0 else order[::-1]
                print(f"  round {round_index + 1}/{args.rounds}: " + " ".join(t.name for t in sequence), flush=True)
                for target in sequence:
                    run = measure(target, args, duration=args.duration)
                    target.runs.append(run)
                    print(f"    {target.name:<16} {run['rps']:>9,.0f} req/s  p50 {_fmt(run['p50_ms'])} ms  "
                          f"p99 {_fmt(run['p99_ms'])} ms  {run['cpu_us_per_req']:.1f} us CPU/req"
                          + (f"  [other load {run['foreign_cpu_percent']:.0f}% of a core]"
                             if run["foreign_cpu_percent"] >= 15 else "")
                          + (f"  non-2xx {run['non_2xx']}" if run["non_2xx"] else "")
                          + (f"  storage errors {run['storage_errors']}" if run.get("storage_errors") else ""),
                          flush=True)
            summary = summarize(targets)
            ratio_table = ratios(summary, targets)
            prof = None
            if args.profile and "tollgate-memory" in targets:
                with step("py-spy profile of tollgate-memory under wrk"):
                    prof = profile(targets["tollgate-memory"], args, servers.tmp)
            log_sizes = {name: (servers.tmp / f"{name}.log").stat().st_size
                         for name in targets if name.startswith(("tollgate", "baseline"))
                         and (servers.tmp / f"{name}.log").exists()}
            out.update(summary=summary, ratio_table=ratio_table, prof=prof, log_sizes=log_sizes, targets=targets)
        return 0

    code = guarded(body)
    if code:
        return code
    summary, ratio_table, prof, log_sizes = out["summary"], out["ratio_table"], out["prof"], out["log_sizes"]
    targets = out["targets"]

    print_report(summary, ratio_table, args.rounds)
    if prof:
        print_profile(prof)
    if log_sizes:
        print("\nTollgate access logs written during the bench: "
              + ", ".join(f"{n} {s / 1e6:.1f} MB" for n, s in log_sizes.items()))
    result = {
        "meta": {
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "duration": args.duration, "rounds": args.rounds, "connections": args.connections,
            "threads": args.threads, "access_log": args.access_log, "redis_timeout": args.redis_timeout,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpus": len(__import__("os").sched_getaffinity(0)),
            "wall_seconds": round(time.monotonic() - started, 1),
        },
        "median": summary,
        "ratios": ratio_table,
        "runs": {name: t.runs for name, t in targets.items()},
        "profile": prof,
    }
    write_result(args.output, result, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
