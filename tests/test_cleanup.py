"""A test that fails, or a test run that is killed, leaves no process behind.

The processes tests start (redis-server, upstream_mock, run.py) are stopped by
pid when the test process exits, and killed by the kernel if it dies outright.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO_ROOT

STARTS_A_REDIS = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from helpers import RedisServer
server = RedisServer(Path({directory!r}))
server.start()
print(server.pid, flush=True)
{then}
"""


def pid_gone(pid: int, within: float = 10.0) -> bool:
    """Poll until `pid` no longer runs (a zombie counts as gone), up to `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


def start_owner(tmp_path: Path, then: str) -> tuple[subprocess.Popen[str], int]:
    code = STARTS_A_REDIS.format(tests=str(REPO_ROOT / "tests"), directory=str(tmp_path / "redis"), then=then)
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    return owner, int(owner.stdout.readline())


def test_a_failing_owner_stops_what_it_started(tmp_path: Path) -> None:
    owner, redis_pid = start_owner(tmp_path, "raise AssertionError('the test failed')")
    assert owner.wait(30) == 1
    assert pid_gone(redis_pid)


def test_a_killed_owner_takes_its_processes_along(tmp_path: Path) -> None:
    owner, redis_pid = start_owner(tmp_path, "import signal; signal.pause()  # until killed")
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    assert pid_gone(redis_pid)
