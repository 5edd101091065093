"""Test helpers that are plain objects rather than fixtures.

Tollgate is tested against real things: the mock upstream and Redis run as
separate processes on free ports of 127.0.0.1, a test waits until they answer
(never a fixed sleep), and cleanup stops exactly the processes it started, by
pid. A test may kill, hang (SIGSTOP) or restart its own Redis to check what the
proxy does when storage fails. The machine's own Redis on 6379 is never used.

These live here, not in conftest.py, so that test modules can import them
(`from helpers import RedisServer`; pytest puts tests/ on sys.path) to
annotate fixtures and to build a second instance when one fixture is not
enough. conftest.py wraps them in fixtures.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import http.client
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final, TypeAlias

import pytest

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
LOCALHOST: Final = "127.0.0.1"
# The machine's own Redis (and its cluster bus port): never bind, connect or signal.
FORBIDDEN_PORTS: Final = frozenset({6379, 16379})
POLL_INTERVAL: Final = 0.02
STOP_TIMEOUT: Final = 5.0

_log_names = itertools.count(1)
# Every ProcessHandle not yet closed: whatever a failed or interrupted test left
# running is stopped when the test process exits (atexit), and if that process
# is killed outright, each child gets SIGKILL from the kernel (PR_SET_PDEATHSIG).
_RUNNING: set[ProcessHandle] = set()
PR_SET_PDEATHSIG: Final = 1


def _die_with_parent() -> None:
    """In the child, before exec: the kernel kills it when the test process dies."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@atexit.register
def stop_leftovers() -> None:
    """Stop every process a test started and did not stop, by its pid."""
    for handle in list(_RUNNING):
        handle.close()


def free_port(host: str = LOCALHOST) -> int:
    """A port that was free a moment ago (bound to 0, then released).

    Another process may take it before the caller binds it; starters that
    choose their own port retry with a new one when that happens.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in FORBIDDEN_PORTS:
            return port


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 10.0,
    *,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll until `host:port` accepts a TCP connection.

    `alive` (e.g. `ProcessHandle.is_running`) lets the wait fail at once when
    the process that should listen has already exited. Raises TimeoutError.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            last_error = exc
        if alive is not None and not alive():
            raise RuntimeError(f"process exited before {host}:{port} accepted connections")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} refused connections for {timeout}s: {last_error}")
        time.sleep(POLL_INTERVAL)


def _short_name(cmd: Sequence[str]) -> str:
    """`run.py` for `[python, run.py, ...]`, `proxy` for `[python, -m, proxy]`, else the program."""
    program = Path(cmd[0]).name
    if not program.startswith("python") or len(cmd) < 2:
        return program
    if cmd[1] == "-m" and len(cmd) > 2:
        return cmd[2]
    return Path(cmd[1]).name


class ProcessHandle:
    """A subprocess whose stdout/stderr go to files, stopped only by its own pid.

    `env` entries are added to (not substituted for) the current environment.
    The child gets its own session, so a Ctrl-C in the terminal reaches pytest
    only, and the test decides which signal the child gets.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        cwd: Path = REPO_ROOT,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        name: str | None = None,
    ) -> None:
        self.cmd = list(cmd)
        log_dir = log_dir if log_dir is not None else Path(tempfile.mkdtemp(prefix="tollgate-"))
        stem = f"{name or _short_name(self.cmd)}-{next(_log_names)}"
        self.stdout_path = log_dir / f"{stem}.stdout"
        self.stderr_path = log_dir / f"{stem}.stderr"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=cwd,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        _RUNNING.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status, or None while the process runs (negative: killed by a signal)."""
        return self.proc.poll()

    def is_running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def wait_for_port(self, port: int, host: str = LOCALHOST, timeout: float = 10.0) -> None:
        """Wait until the process listens on `port`; on failure, show its output."""
        try:
            wait_for_port(host, port, timeout, alive=self.is_running)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{self.describe()}: {exc}") from None

    def wait_for_output(self, text: str, timeout: float = 10.0, *, stderr: bool = False) -> None:
        """Wait until `text` appears in the process's stdout (or stderr)."""
        read = self.stderr_text if stderr else self.stdout_text
        deadline = time.monotonic() + timeout
        while text not in read():
            if not self.is_running():
                raise RuntimeError(f"{self.describe()}: exited without printing {text!r}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.describe()}: {text!r} not printed in {timeout}s")
            time.sleep(POLL_INTERVAL)

    def send_signal(self, signum: int) -> None:
        if self.is_running():
            os.kill(self.pid, signum)

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait up to `timeout`, then SIGKILL; returns the exit status."""
        self.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        self.send_signal(signal.SIGKILL)
        return self.proc.wait(STOP_TIMEOUT)

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def describe(self) -> str:
        """The command, its status and the tail of its output, for failure messages."""
        return (
            f"{' '.join(self.cmd)} (pid {self.pid}, returncode {self.returncode})\n"
            f"--- stdout ---\n{self.stdout_text()[-2000:]}\n"
            f"--- stderr ---\n{self.stderr_text()[-2000:]}"
        )

    def close(self) -> None:
        """Stop the process if it still runs (resuming it first if it was SIGSTOPped)."""
        if self.is_running():
            self.send_signal(signal.SIGCONT)
            self.terminate()
        _RUNNING.discard(self)

    def __enter__(self) -> ProcessHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- scripted raw-socket upstreams -----------------------------------------


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request from a client, as a scripted upstream reads it: the head (up
    to its blank line) and a Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


# --- mock upstream ----------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    """A running `python -m upstream_mock`."""

    url: str
    port: int
    proc: ProcessHandle
    host: str = LOCALHOST


def _answers_health(host: str, port: int) -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=0.5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def start_upstream(log_dir: Path, *, timeout: float = 10.0, attempts: int = 3) -> Upstream:
    """Start the mock on a free port and wait until `GET /health` answers 200.

    Retries on a new port if the chosen one was taken meanwhile. The caller
    owns the process (`upstream.proc.terminate()`).
    """
    for _ in range(attempts):
        port = free_port()
        cmd = [sys.executable, "-m", "upstream_mock", "--host", LOCALHOST, "--port", str(port)]
        proc = ProcessHandle(cmd, log_dir=log_dir)
        deadline = time.monotonic() + timeout
        while proc.is_running() and time.monotonic() < deadline:
            if _answers_health(LOCALHOST, port):
                return Upstream(url=f"http://{LOCALHOST}:{port}", port=port, proc=proc)
            time.sleep(POLL_INTERVAL)
        proc.close()
    raise RuntimeError(f"upstream_mock did not start: {proc.describe()}")


# --- Redis ------------------------------------------------------------------


class RedisReplyError(Exception):
    """Redis answered a command with an error reply (`-ERR ...`)."""


RespValue: TypeAlias = str | int | bytes | list["RespValue"] | None


def _read_reply(stream: BinaryIO) -> RespValue:
    line = stream.readline()
    if not line:
        raise ConnectionError("connection closed by Redis")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisReplyError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        return stream.read(size + 2)[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(stream) for _ in range(count)]
    raise ConnectionError(f"not a RESP reply: {line!r}")


def _encode(*args: str) -> bytes:
    encoded = [arg.encode() for arg in args]
    return b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in encoded)


def redis_command(port: int, *args: str, host: str = LOCALHOST, timeout: float = 1.0,
                  password: str | None = None, db: int = 0) -> RespValue:
    """Send one command over a fresh raw socket and return the decoded reply
    (after AUTH `password` and SELECT `db`, when given).

    Independent of redis-py on purpose: fixtures check readiness with it, and a
    hung server shows up as `TimeoutError` (an OSError) after `timeout` seconds.
    """
    if port in FORBIDDEN_PORTS:
        raise ValueError(f"port {port} belongs to the machine's own Redis")
    preamble = [("AUTH", password)] if password else []
    if db:
        preamble.append(("SELECT", str(db)))
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"".join(_encode(*command) for command in preamble) + _encode(*args))
        with sock.makefile("rb") as stream:
            for _ in preamble:
                _read_reply(stream)
            return _read_reply(stream)


def _redis_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found on PATH: install Redis (Debian: apt-get install redis-server) "
            "to run the storage tests; they are never skipped",
            pytrace=False,
        )
    return path


class RedisServer:
    """A private `redis-server` on 127.0.0.1, which a test may kill, hang or restart.

    No config file, no persistence (`--save "" --appendonly no`), data dir
    `directory`. `port=None` picks a free port (retrying if it was taken);
    the port then stays fixed, so `restart()` comes back at the same URL.
    """

    def __init__(
        self, directory: Path, *, port: int | None = None, extra_args: Sequence[str] = (),
        password: str | None = None,
    ) -> None:
        self.directory = directory
        self.password = password
        self.extra_args = list(extra_args) + (["--requirepass", password] if password else [])
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        if self.port in FORBIDDEN_PORTS:
            raise ValueError(f"port {self.port} belongs to the machine's own Redis")
        self._process: ProcessHandle | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        return self._handle().pid

    def _handle(self) -> ProcessHandle:
        if self._process is None:
            raise RuntimeError("redis-server was not started")
        return self._process

    def _command(self) -> list[str]:
        return [
            _redis_binary("redis-server"),
            "--port", str(self.port),
            "--bind", LOCALHOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait for PING; with a chosen-for-us port, retry on another if taken."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            self._process = ProcessHandle(self._command(), log_dir=self.directory)
            if self.wait_ready(timeout):
                return
            self._process.close()
            if self._fixed_port:
                break
            self.port = free_port()
        raise RuntimeError(f"redis-server did not answer PING: {self._handle().describe()}")

    def ping(self, timeout: float = 0.5) -> bool:
        try:
            return redis_command(self.port, "PING", timeout=timeout, password=self.password) == "PONG"
        except (OSError, RedisReplyError):
            return False

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Poll PING until it answers (True) or the process exits / time runs out (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._handle().is_running():
            if self.ping():
                return True
            time.sleep(POLL_INTERVAL)
        return False

    def kill(self) -> None:
        """SIGKILL: connections now fail with 'connection refused'."""
        self._handle().kill()

    def stop(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a hung Redis)."""
        self._handle().send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        """SIGCONT: resume after `stop()`."""
        self._handle().send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> None:
        """Kill if still running, then start again on the same port (empty data)."""
        if self._process is not None and self._process.is_running():
            self.kill()
        self._fixed_port = True
        self.start(timeout)

    def close(self) -> None:
        """Stop our own process only, resuming it first if it was SIGSTOPped."""
        if self._process is not None:
            self._process.close()

    def __enter__(self) -> RedisServer:
        """Started, and stopped on leaving the block whatever happens in it."""
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class RedisCluster:
    """A running three-master Redis Cluster on 127.0.0.1 (no replicas)."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def close(self) -> None:
        """Stop every node this cluster started, by pid."""
        for node in self.nodes:
            node.close()


def _cluster_ok(port: int) -> bool:
    try:
        info = redis_command(port, "CLUSTER", "INFO")
    except (OSError, RedisReplyError):
        return False
    return isinstance(info, bytes) and b"cluster_state:ok" in info


def _start_cluster_node(directory: Path, taken: set[int]) -> RedisServer:
    port = free_port()
    bus_port = free_port()
    while port in taken or bus_port in taken or bus_port == port:
        port, bus_port = free_port(), free_port()
    taken.update((port, bus_port))
    node_dir = directory / f"node-{port}"
    extra = [
        "--cluster-enabled", "yes",
        "--cluster-config-file", str(node_dir / f"nodes-{port}.conf"),
        # An explicit bus port: the default port+10000 may be above 65535.
        "--cluster-port", str(bus_port),
        "--cluster-node-timeout", "5000",
    ]  # fmt: skip
    node = RedisServer(node_dir, port=port, extra_args=extra)
    node.start()
    return node


def _create_cluster(ports: Sequence[int], timeout: float = 20.0) -> None:
    addresses = [f"{LOCALHOST}:{port}" for port in ports]
    cmd = [_redis_binary("redis-cli"), "--cluster", "create", *addresses]
    cmd += ["--cluster-replicas", "0", "--cluster-yes"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")
    deadline = time.monotonic() + timeout
    while not all(_cluster_ok(port) for port in ports):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"cluster on {addresses} not ok after {timeout}s")
        time.sleep(POLL_INTERVAL)


def start_redis_cluster(directory: Path, *, size: int = 3) -> RedisCluster:
    """Start `size` cluster-enabled nodes, join them (no replicas), wait for `cluster_state:ok`.

    The caller owns the nodes (`cluster.close()`); a failure stops those already started.
    """
    cluster = RedisCluster(nodes=[])
    taken: set[int] = set()
    try:
        for _ in range(size):
            cluster.nodes.append(_start_cluster_node(directory, taken))
        _create_cluster(cluster.ports)
    except BaseException:
        cluster.close()
        raise
    return cluster


# --- time -------------------------------------------------------------------


FAKE_EPOCH: Final = 1_700_000_000.0


class FakeClock:
    """A `Clock` (a callable returning seconds as a float) that moves only when told.

    Tollgate's limiters take the clock as an argument; tests pass this one and
    call `advance()` instead of sleeping, so a refill of ten seconds costs
    nothing and every expected value is exact (compare with `==`, not approx).
    Patching `loop.time` would do nothing under uvloop.
    """

    def __init__(self, start: float = FAKE_EPOCH) -> None:
        self._now = float(start)

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        """Move forward by `seconds` (never backwards) and return the new time."""
        if seconds < 0:
            raise ValueError(f"a clock does not go backwards: advance({seconds})")
        self._now += seconds
        return self._now

    def set(self, now: float) -> None:
        """Jump to an absolute time; unlike `advance`, backwards jumps are allowed
        so a test can simulate a host clock being corrected."""
        self._now = float(now)

    def __repr__(self) -> str:
        return f"FakeClock({self._now!r})"
