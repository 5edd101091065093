"""The built wheel, installed in a new venv, runs from a folder that is not the checkout.

What an `pip install .` user gets: the `tollgate` command and `python -m proxy`,
with the dashboard, the Lua script and the default config read from the
installed package, not from the repository.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import aiohttp
import pytest
import yaml
from helpers import REPO_ROOT, free_port

# What a wheel is built from (a CI clone has no more; a developer's checkout may).
SOURCES = ("proxy", "upstream_mock", "templates", "config.yaml", "setup.cfg", "pyproject.toml", "README.md")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv holding only the wheel; its dependencies come from this test run's
    environment through a .pth file, so the test needs no package index."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(work / "dist"), str(source)], check=True, timeout=120)
    wheel = next((work / "dist").glob("tollgate-*.whl"))
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Dependencies only: a path listed in a .pth file is added as it is, and the
    # .pth files inside it (an editable tollgate's among them) are not read.
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (Path(site) / "deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=120)
    return env_dir


def test_the_package_comes_from_the_venv_not_the_checkout(installed, tmp_path):
    out = subprocess.run([installed / "bin" / "python", "-c", "import proxy; print(proxy.__file__)"],
                         cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert out.startswith(str(installed)), out


def test_check_reads_the_shipped_config_from_any_folder(installed, tmp_path):
    for command in ([installed / "bin" / "tollgate", "--check"],
                    [installed / "bin" / "python", "-m", "proxy", "--check"]):
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert (done.returncode, done.stdout.strip()) == (0, "config OK"), done.stderr


async def test_the_installed_command_serves_the_demo(installed, tmp_path, run_process, redis_server):
    """Mock upstream, proxy, dashboard with its static files, and the Lua script over Redis."""
    ports = {"proxy": free_port(), "admin": free_port(), "mock": free_port()}
    shipped = (installed / "lib").glob("python*/site-packages/proxy/shipped/config.yaml")
    config = yaml.safe_load(next(shipped).read_text())
    config["server"]["port"] = ports["proxy"]
    config["admin"]["port"] = ports["admin"]
    config["upstream"]["url"] = f"http://127.0.0.1:{ports['mock']}"
    config["storage"] = {"backend": "redis", "url": redis_server.url, "on_error": "deny"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = run_process([str(installed / "bin" / "tollgate")], cwd=tmp_path)
    proc.wait_for_port(ports["proxy"], timeout=20)
    proc.wait_for_port(ports["admin"], timeout=20)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{ports['proxy']}/users") as resp:
            assert resp.status == 200, await resp.text()
            assert "RateLimit" in resp.headers  # decided by acquire.lua in Redis: the script shipped
        async with session.get(f"http://127.0.0.1:{ports['admin']}/") as resp:
            assert resp.status == 200
            assert "<html" in (await resp.text()).lower()
        async with session.get(f"http://127.0.0.1:{ports['admin']}/static/dashboard.js") as resp:
            assert resp.status == 200
        async with session.get(f"http://127.0.0.1:{ports['admin']}/api/stats") as resp:
            stats = await resp.json()
    assert (stats["storage"]["backend"], stats["storage"]["healthy"]) == ("redis", True)
    assert stats["config"]["path"].endswith("config.yaml")
    assert proc.terminate() == 0
