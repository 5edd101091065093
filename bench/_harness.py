"""Process plumbing shared by bench/run.py and bench/memory.py.

Every server the bench starts is a `Server`: started on a free loopback port,
polled until it answers, measured from /proc, and stopped by its pid (never by
name). `Servers` is the one place that owns them: leaving its `with` block,
normally, on Ctrl-C, on SIGTERM or on an error, stops each one it started.
As a backstop for a bench that is itself killed with SIGKILL, every child gets
PR_SET_PDEATHSIG, so the kernel ends it when the bench's thread dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # the repository: cwd of `python run.py`
sys.path.insert(0, str(ROOT))  # for `proxy`, when the bench runs from a checkout
from proxy.mockproc import end_with_parent  # noqa: E402

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
WRK = shutil.which("wrk")
REDIS = shutil.which("redis-server")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class BenchError(Exception):
    """Something the bench needs is missing or did not start; the message says what."""


def _die_with_parent() -> None:
    end_with_parent(signal.SIGKILL)  # in the child between fork and exec


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------- /proc


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime + stime, stime) of one process (its threads included), in seconds; zeros
    if gone. stime is the kernel's part: system calls and what the kernel did in them."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    fields = text[text.rindex(")") + 2 :].split()
    user, kernel = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    return (user + kernel) / CLK_TCK, kernel / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its threads included), in seconds; 0 if gone."""
    return cpu_times(pid)[0]


def io_syscalls(pid: int) -> int:
    """read- plus write-type system calls so far (/proc/pid/io syscr + syscw; libuv's
    socket reads and writes are counted, epoll and sendmsg are not); 0 if gone."""
    try:
        lines = Path(f"/proc/{pid}/io").read_text().splitlines()
    except OSError:
        return 0
    fields = dict(line.split(": ", 1) for line in lines)
    return int(fields["syscr"]) + int(fields["syscw"])


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat), to spot other load."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLK_TCK


def children(pid: int) -> list[int]:
    """Direct children of `pid` (nginx: the master's workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry))
    return found


def status_kib(pid: int, field_name: str) -> int:
    """A `kB` line of /proc/pid/status (VmRSS, VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {field_name}")


def rss_kib(pid: int) -> int:
    """VmRSS via statm (cheaper than status: the 50 ms sampler reads it)."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE // 1024


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (clear_refs 5, Linux >= 4.0); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    log_path: Path | None = None  # where stdout+stderr go (None: /dev/null)
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    measure_children: bool = False  # nginx: CPU is the workers', not the master's
    measure_tree: bool = False  # Tollgate with server.workers > 1: the supervisor and its workers
    env: dict[str, str] | None = None
    _log: Any = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        # Open for the child's whole life; closed in stop().
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches only the bench, which then stops these by pid
            preexec_fn=_die_with_parent, env=self.env,
        )

    def measured_pids(self) -> list[int]:
        if self.measure_tree:
            return [self.pid, *children(self.pid)]
        if not self.measure_children:
            return [self.pid]
        workers = children(self.pid)
        if not workers:
            raise BenchError(f"{self.name}: master {self.pid} has no worker processes")
        return workers

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.measured_pids())

    def usage(self) -> tuple[float, float, int]:
        """CPU seconds, the kernel's part of them, and read/write system calls so far."""
        pids = self.measured_pids()
        times = [cpu_times(pid) for pid in pids]
        return sum(t[0] for t in times), sum(t[1] for t in times), sum(io_syscalls(pid) for pid in pids)

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited (code {self.proc.returncode if self.proc else '?'})"
                             f"{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"; last lines of {self.log_path}:\n    " + "\n    ".join(tail) if tail else ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; nginx workers are killed by pid too."""
        if self.proc is None:
            return
        workers = children(self.pid) if self.measure_children and self.proc.poll() is None else []
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(5)
        for pid in workers:  # normally already gone with their master
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "nginx":
                    os.kill(pid, signal.SIGKILL)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()


def wait_tcp(server: Server, deadline: float) -> None:
    while True:
        server.check_alive()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=0.5):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{server.name} did not listen on 127.0.0.1:{server.port} in time{server.log_tail()}")
        time.sleep(0.05)


def wait_http(server: Server, url: str, deadline: float) -> None:
    while True:
        server.check_alive()
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        if time.monotonic() > deadline:
            raise BenchError(f"{server.name} did not answer {url} in time{server.log_tail()}")
        time.sleep(0.1)


def wait_redis(server: Server, deadline: float) -> None:
    while True:
        server.check_alive()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            if s.recv(64).startswith(b"+PONG"):
                return
        if time.monotonic() > deadline:
            raise BenchError(f"redis-server did not answer PING on port {server.port}{server.log_tail()}")
        time.sleep(0.05)


class Interrupted(BaseException):
    """SIGTERM or the bench's own deadline: unwind through every `finally`."""


class Servers:
    """Owns the temp dir and every process; stops them all on exit, whatever the exit."""

    def __init__(self, deadline_seconds: float) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
        self.started: list[Server] = []
        self.deadline_seconds = deadline_seconds

    def __enter__(self) -> Servers:
        def on_signal(signum: int, frame: object) -> None:
            raise Interrupted(signal.Signals(signum).name)

        self._old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGALRM)}
        signal.alarm(int(self.deadline_seconds))  # the whole bench's deadline
        return self

    def __exit__(self, *exc: object) -> None:
        signal.alarm(0)
        # A second Ctrl-C or SIGTERM must not cut the cleanup short.
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for server in reversed(self.started):
                with contextlib.suppress(Exception):
                    server.stop()
            shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            for signum, handler in {**self._old, **previous}.items():
                signal.signal(signum, handler)

    def start(self, server: Server) -> Server:
        self.started.append(server)
        server.start()
        return server

    # -- the kinds of server the benches use

    def nginx(self, name: str, http_block: str) -> Server:
        if NGINX is None:
            raise BenchError("nginx is not installed")
        prefix = self.tmp / name
        (prefix / "tmp").mkdir(parents=True)
        conf = prefix / "nginx.conf"
        conf.write_text(_NGINX_MAIN.format(prefix=prefix, http=http_block))
        port = int(re.search(r"listen 127\.0\.0\.1:(\d+)", http_block).group(1))  # type: ignore[union-attr]
        server = Server(name, [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
                        port, log_path=prefix / "error.log", measure_children=True)
        self.start(server)
        wait_tcp(server, time.monotonic() + 10)
        return server

    def static_upstream(self) -> tuple[Server, bool]:
        """nginx answering 200 "ok\\n" to anything; else the Python mock. Returns (server, is_nginx)."""
        port = free_port()
        if NGINX is None:
            print("nginx not found: falling back to `python -m upstream_mock` as the static upstream "
                  "(much slower; the `direct` numbers are the mock's)", flush=True)
            return self.mock_upstream("upstream"), False
        block = f"""
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "ok\\n"; }}
    }}"""
        return self.nginx("upstream", block), True

    def nginx_peer(self, upstream_port: int) -> Server:
        port = free_port()
        block = f"""
    limit_req_zone $binary_remote_addr zone=z:10m rate=100000000r/s;
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            limit_req zone=z burst=100000000 nodelay;
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
        }}
    }}"""
        return self.nginx("nginx-peer", block)

    def mock_upstream(self, name: str = "upstream_mock") -> Server:
        port = free_port()
        server = Server(name, [sys.executable, "-m", "upstream_mock", "--host", "127.0.0.1", "--port", str(port)],
                        port, log_path=self.tmp / f"{name}.log", cwd=ROOT)
        self.start(server)
        wait_tcp(server, time.monotonic() + 15)
        return server

    def bare_proxy(self, upstream_port: int) -> Server:
        port = free_port()
        server = Server("aiohttp-bare", [sys.executable, str(ROOT / "bench" / "bare_proxy.py"), str(port),
                                         f"http://127.0.0.1:{upstream_port}"],
                        port, log_path=self.tmp / "aiohttp-bare.log", cwd=ROOT)
        self.start(server)
        wait_tcp(server, time.monotonic() + 15)
        return server

    def redis(self) -> Server:
        if REDIS is None:
            raise BenchError("redis-server is not on PATH")
        port = free_port()
        workdir = self.tmp / "redis"
        workdir.mkdir()
        server = Server("redis-server", [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no",
                                         "--logfile", ""],
                        port, log_path=self.tmp / "redis.log")
        self.start(server)
        wait_redis(server, time.monotonic() + 10)
        return server

    def tollgate(self, name: str, upstream_port: int, *, storage: str = "{backend: memory}",
                 anonymous: str = "{algorithm: token_bucket, capacity: 1000000000, refill_rate: 1000000000}",
                 extra: str = "", log_to_file: bool = True, script: str = "run.py",
                 wrapper: Sequence[str] = (), root: Path = ROOT, workers: int = 1) -> tuple[Server, int]:
        """One Tollgate process; returns (server, admin port). Its stderr (the access log) goes
        to a file in the temp dir, or to /dev/null when `log_to_file` is false. `wrapper` is
        prepended to the command line (valgrind: bench/instructions.py); `root` is the checkout
        whose run.py runs (bench/run.py --baseline: an older commit's). With `workers` > 1 its
        CPU is the supervisor's and every worker's."""
        port, admin = free_port(), free_port()
        config = self.tmp / f"{name}.yaml"
        config.write_text(
            f"server: {{host: 127.0.0.1, port: {port}{f', workers: {workers}' if workers > 1 else ''}}}\n"
            f"admin: {{host: 127.0.0.1, port: {admin}}}\n"
            f'upstream: {{url: "http://127.0.0.1:{upstream_port}", start_mock: false}}\n'
            "log: {format: text}\n"
            f"storage: {storage}\n"
            f"tiers:\n  anonymous:\n    limits: [{anonymous}]\n"
            "routes:\n  - {path: /exempt, exempt: true}\n"
            f"{extra}"
        )
        server = Server(name, [*wrapper, sys.executable, script, "--config", str(config), "--no-mock"], port,
                        log_path=self.tmp / f"{name}.log" if log_to_file else None, cwd=root,
                        measure_tree=workers > 1)
        self.start(server)
        return server, admin


def checkout(rev: str, tmp: Path) -> Path:
    """The tree of commit `rev` in the temp dir (git archive: no .git, nothing of the work tree)."""
    where = tmp / "baseline"
    where.mkdir()
    with step(f"baseline: git archive {rev}"):
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev],
                                 capture_output=True, timeout=60)
        if archive.returncode:
            raise BenchError(f"git archive {rev}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True, timeout=60)
    return where


_NGINX_MAIN = """\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
{http}
}}
"""


# ----------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    non_2xx: int
    socket_errors: dict[str, int]
    output: str


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise BenchError(f"cannot read a wrk latency: {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not total or not rps:
        raise BenchError(f"cannot parse wrk output:\n{output}")
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkResult(
        requests=int(total.group(1)), seconds=_ms(total.group(2) + total.group(3)) / 1000,
        rps=float(rps.group(1)),
        p50_ms=_ms(p50.group(1)) if p50 else None, p99_ms=_ms(p99.group(1)) if p99 else None,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=dict(zip(("connect", "read", "write", "timeout"), map(int, errors.groups())))
        if errors else {},
        output=output,
    )


def run_wrk(url: str, *, duration: float, connections: int, threads: int = 2,
            extra: Sequence[str] = (), script_args: Sequence[str] = (),
            stop_when: Callable[[], bool] | None = None) -> tuple[WrkResult, subprocess.Popen[bytes]]:
    """wrk for `duration` s, or until `stop_when()` (polled every 0.1 s): then SIGINT, and wrk
    reports what it did so far (its main thread otherwise sleeps the whole duration)."""
    if WRK is None:
        raise BenchError("wrk is not installed")
    argv = [WRK, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency", "--timeout", "5s",
            *extra, url]
    if script_args:
        argv += ["--", *script_args]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent, start_new_session=True)
    try:
        if stop_when is not None:
            deadline = time.monotonic() + duration
            while proc.poll() is None and time.monotonic() < deadline:
                if stop_when():
                    proc.send_signal(signal.SIGINT)
                    break
                time.sleep(0.1)
        out, _ = proc.communicate(timeout=duration + 30)  # wrk's own deadline
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"wrk exited {proc.returncode}:\n{out.decode(errors='replace')}")
    return parse_wrk(out.decode(errors="replace")), proc


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@contextlib.contextmanager
def step(text: str) -> Iterator[None]:
    print(f"  {text} ...", end="", flush=True)
    started = time.monotonic()
    yield
    print(f" {time.monotonic() - started:.1f}s", flush=True)


def guarded(body: Callable[[], int]) -> int:
    """Run a bench body; turn its failures and interruptions into one line and an exit code.

    Every process it started has been stopped by then (the Servers context).
    """
    try:
        return body()
    except BenchError as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: every process the bench started has been stopped", file=sys.stderr)
        return 130
    except Interrupted as exc:
        print(f"\nstopped by {exc} (deadline or SIGTERM): every process the bench started has been stopped",
              file=sys.stderr)
        return 124


def write_result(path: Path, result: dict[str, Any], started: float) -> None:
    """Save a bench's figures as JSON (bench/results/ is git-ignored) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path} ({time.monotonic() - started:.0f}s in all)")
