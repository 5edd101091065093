"""Shared fixtures: real subprocesses, readiness by polling, cleanup by pid.

`upstream` (session), `redis_server`, `redis_cluster`, `run_process` and
`fake_clock`. The classes behind them live in helpers.py so tests can import
them for annotations or for a second instance (`from helpers import
RedisServer, start_upstream`). Every fixture stops only the processes it
started, by pid; none touches the machine's own Redis on 6379.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from cdp import Browser
from helpers import (
    REPO_ROOT,
    FakeClock,
    ProcessHandle,
    RedisCluster,
    RedisServer,
    Upstream,
    start_redis_cluster,
    start_upstream,
)

from proxy.config import StorageConfig
from proxy.limits.memory import MemoryStore
from proxy.limits.redis import RedisStore
from proxy.limits.store import Store


@pytest.fixture
def run_process(tmp_path: Path) -> Iterator[Callable[..., ProcessHandle]]:
    """Factory: `run_process([sys.executable, "run.py", ...], env={...})` -> ProcessHandle.

    `env` entries are added to the current environment; `cwd` defaults to the
    repository root. Output goes to files under the test's tmp_path (read it
    with `.stdout_text()` / `.stderr_text()`). Every process still running at
    teardown is stopped by its pid: SIGCONT, SIGTERM, then SIGKILL after 5 s.
    """
    handles: list[ProcessHandle] = []

    def start(
        args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path = REPO_ROOT
    ) -> ProcessHandle:
        handle = ProcessHandle(args, cwd=cwd, env=env, log_dir=tmp_path)
        handles.append(handle)
        return handle

    yield start
    for handle in reversed(handles):
        handle.close()


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """`python -m upstream_mock` on a free port, answering `GET /health`, shared by the session.

    `.url` ("http://127.0.0.1:PORT"), `.port`, `.proc`. Do not stop or signal it
    in a test: start a private one with `start_upstream(tmp_path)` for that.
    """
    mock = start_upstream(tmp_path_factory.mktemp("upstream"))
    yield mock
    mock.proc.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh, empty, private Redis for one test.

    `.url` (redis://127.0.0.1:PORT/0), `.port`, `.pid`, and `kill()` (refused),
    `stop()` (hung), `cont()`, `restart()` (same port). Fails, never skips, when
    redis-server is not installed.
    """
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """Three cluster-enabled redis-server nodes joined into one cluster (`.url`, `.ports`)."""
    cluster = start_redis_cluster(tmp_path / "cluster")
    yield cluster
    cluster.close()


@pytest.fixture
def fake_clock() -> FakeClock:
    """A clock at 1_700_000_000.0 that moves only on `advance()` / `set()`."""
    return FakeClock()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, fake_clock: FakeClock) -> AsyncIterator[Store]:
    """Each store on the same fake clock: the behaviour tables run on both, and
    redis runs acquire.lua on a real server."""
    if request.param == "memory":
        yield MemoryStore(fake_clock)
        return
    server = request.getfixturevalue("redis_server")
    redis_store = RedisStore.from_config(StorageConfig(backend="redis", url=server.url, timeout=1.0), clock=fake_clock)
    yield redis_store
    await redis_store.close()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless Chromium with one page (tests/cdp.py); fails, never skips, without chromium."""
    b = await Browser.launch()
    try:
        yield b
    finally:
        await b.close()
