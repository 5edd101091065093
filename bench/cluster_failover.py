"""What a Redis Cluster master's death costs the clients, under `on_error: deny`.

Six redis-server processes (3 masters, 3 replicas, cluster-node-timeout 1 s),
the upstream, and one Tollgate on this checkout (or on `--baseline REV`, a
commit's tree). Many API-key clients are driven round-robin by a bounded
number of concurrent requests; after `--kill-at` seconds one master gets
SIGKILL, and its replica takes over about two seconds later. The report is
the share of requests answered 503, for the clients whose hash-tag slot was on
the killed master and for the others, over the whole run and after the kill.

    python bench/cluster_failover.py                  # this tree
    python bench/cluster_failover.py --baseline main  # before
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiohttp
from _harness import ROOT, BenchError, Server, Servers, checkout, free_port, guarded, step, wait_redis, wait_tcp
from redis import Redis
from redis.crc import key_slot

REDIS = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", metavar="REV", help="run Tollgate from this commit's tree instead")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the load (default 10)")
    parser.add_argument("--kill-at", type=float, default=2.0, help="SIGKILL a master after this many seconds")
    parser.add_argument("--clients", type=int, default=60, help="API-key clients (default 60)")
    parser.add_argument("--concurrency", type=int, default=12, help="requests in flight at once (default 12)")
    parser.add_argument("--max-requests", type=int, default=40000, help="stop after this many (default 40000)")
    parser.add_argument("--full-coverage", action="store_true",
                        help="cluster-require-full-coverage yes (Redis's default; the bench's is no)")
    parser.add_argument("--timeout", type=float, default=0.1, help="storage.timeout (default 0.1)")
    return parser.parse_args(argv)


def cluster_node(servers: Servers, index: int, *, full_coverage: bool) -> Server:
    assert REDIS is not None
    port, bus = free_port(), free_port()
    workdir = servers.tmp / f"node-{index}"
    workdir.mkdir()
    server = Server(f"redis-{index}", [
        REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(workdir), "--daemonize", "no", "--cluster-enabled", "yes",
        "--cluster-config-file", str(workdir / "nodes.conf"), "--cluster-port", str(bus),
        "--cluster-node-timeout", "1000",
        # yes (Redis's default): while a failed master's slots are uncovered, the
        # healthy masters refuse every command too (CLUSTERDOWN)
        "--cluster-require-full-coverage", "yes" if full_coverage else "no",
    ], port, log_path=workdir / "redis.log")  # fmt: skip
    servers.start(server)
    wait_redis(server, time.monotonic() + 10)
    return server


def start_cluster(servers: Servers, *, full_coverage: bool = False) -> list[Server]:
    if REDIS is None or REDIS_CLI is None:
        raise BenchError("redis-server and redis-cli must be on PATH")
    nodes = [cluster_node(servers, i, full_coverage=full_coverage) for i in range(6)]
    create = subprocess.run([REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
                             "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, text=True, timeout=60)
    if create.returncode:
        raise BenchError(f"redis-cli --cluster create failed: {create.stdout[-500:]} {create.stderr[-500:]}")
    deadline = time.monotonic() + 30
    while not all(_settled(n.port) for n in nodes):
        if time.monotonic() > deadline:
            raise BenchError("the cluster did not settle (state ok, replicas in sync) within 30 s")
        time.sleep(0.2)
    return nodes


def _settled(port: int) -> bool:
    with Redis(port=port, socket_timeout=1) as r:
        if b"cluster_state:ok" not in r.execute_command("CLUSTER", "INFO"):
            return False
        info = r.info("replication")
        return info["role"] == "master" or info.get("master_link_status") == "up"


def slot_owners(port: int) -> dict[int, int]:
    """slot -> the port of the master serving it now."""
    owners = {}
    with Redis(port=port, socket_timeout=1) as r:
        for start, end, master, *_ in r.execute_command("CLUSTER", "SLOTS"):
            for slot in range(start, end + 1):
                owners[slot] = int(master[1])
    return owners


def client_slot(key: str) -> int:
    """The slot of an API key's state: identity "k:" + 32 hex of its SHA-256, keys
    tagged with 16 hex of the identity's SHA-256 (proxy/identity.py, limits/redis.py)."""
    identity = "k:" + hashlib.sha256(key.encode()).hexdigest()[:32]
    return key_slot(hashlib.sha256(identity.encode()).hexdigest()[:16].encode())


async def drive(url: str, keys: list[str], args: argparse.Namespace,
                on_kill: Callable[[], None]) -> list[tuple[float, str, int]]:
    """Requests round-robin over `keys`, `concurrency` at a time, bounded in count and time."""
    results: list[tuple[float, str, int]] = []
    started = time.monotonic()
    end = started + args.seconds
    turn = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal turn
        while time.monotonic() < end and len(results) < args.max_requests:
            key = keys[turn % len(keys)]
            turn += 1
            try:
                async with session.get(url, headers={"X-API-Key": key}) as resp:
                    await resp.read()
                    status = resp.status
            except aiohttp.ClientError:
                status = 0
            results.append((time.monotonic() - started, key, status))

    async def killer() -> None:
        await asyncio.sleep(args.kill_at)
        on_kill()

    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=args.concurrency)) as s:
        await asyncio.gather(killer(), *(worker(s) for _ in range(args.concurrency)))
    return results


def report(results: list[tuple[float, str, int]], victims: set[str], kill_at: float) -> None:
    print(f"\n{len(results)} requests; statuses {dict(Counter(s for _, _, s in results))}")
    for window, rows in (("whole run", results), ("after the kill", [r for r in results if r[0] >= kill_at])):
        for group, members in (("on the killed master", True), ("on healthy masters", False)):
            mine = [status for _, key, status in rows if (key in victims) == members]
            share = sum(status == 503 for status in mine) / len(mine) if mine else 0.0
            print(f"  {window:15} clients {group:21}: {share:6.1%} of {len(mine)} got 503")
    recovered = [t for t, key, status in results if key in victims and t >= kill_at and status == 200]
    failed = [t for t, key, status in results if key in victims and t >= kill_at and status == 503]
    if failed:
        last = max(failed)
        back = min((t for t in recovered if t > last), default=None)
        print(f"  the killed master's clients: last 503 at +{last - kill_at:.2f}s after the kill"
              + (f", served again from +{back - kill_at:.2f}s" if back is not None else ""))


def bench(args: argparse.Namespace) -> int:
    with Servers(deadline_seconds=180) as servers:
        root = checkout(args.baseline, servers.tmp) if args.baseline else ROOT
        with step(f"cluster: 3 masters + 3 replicas, require-full-coverage {'yes' if args.full_coverage else 'no'}"):
            nodes = start_cluster(servers, full_coverage=args.full_coverage)
        upstream = servers.mock_upstream()
        keys = [f"bench-key-{i}" for i in range(args.clients)]
        extra = "api_keys:\n" + "".join(f"  {k}: {{tier: anonymous, name: client-{i}}}\n" for i, k in enumerate(keys))
        storage = (f"{{backend: redis, cluster: true, url: 'redis://127.0.0.1:{nodes[0].port}/0', "
                   f"timeout: {args.timeout}, on_error: deny}}")
        tollgate, _ = servers.tollgate("tollgate", upstream.port, storage=storage, extra=extra, root=root)
        wait_tcp(tollgate, time.monotonic() + 20)
        owners = slot_owners(nodes[0].port)
        victim_port = owners[client_slot(keys[0])]
        victim = next(n for n in nodes if n.port == victim_port)
        victims = {k for k in keys if owners[client_slot(k)] == victim_port}
        print(f"  {'baseline ' + args.baseline if args.baseline else 'this tree'}: {len(victims)} of "
              f"{len(keys)} clients on master :{victim_port}, killed at +{args.kill_at:g}s")

        def kill() -> None:
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGKILL)

        url = f"http://127.0.0.1:{tollgate.port}/users"
        results = asyncio.run(drive(url, keys, args, kill))
        tollgate.check_alive()
        report(results, victims, args.kill_at)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(guarded(lambda: bench(parse_args())))
