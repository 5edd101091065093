"""Command line: `python -m proxy` == `python run.py`.

Parses arguments, loads the config, starts the mock upstream when asked, the
proxy and admin listeners, and on SIGTERM/SIGINT stops accepting at once and
drains in-flight requests up to `server.shutdown_timeout`. A user's mistake
(bad config, port in use) is one clear line and exit 1, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from . import config as config_module
from .accesslog import setup_logging
from .app import build_admin_app, build_proxy_app, build_runtime
from .config import Config, ConfigError
from .control import serve_control
from .limits.factory import open_store
from .mockproc import MockStartError, mock_upstream
from .runtime import Runtime
from .server import StartError, hostport, listen, stop_event
from .workers import worker_group

SHIPPED_CONFIG: Final = Path(__file__).resolve().parent / "shipped" / "config.yaml"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py", description="Tollgate: a rate-limiting reverse proxy.")
    parser.add_argument("--config", help="configuration file (default: ./config.yaml if there is one, "
                        "else the demo config shipped with Tollgate)")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--no-mock", action="store_true", help="do not start the mock upstream")
    parser.add_argument("--worker", metavar="SOCKET", help=argparse.SUPPRESS)  # a supervisor's worker (proxy.workers)
    return parser.parse_args(argv)


def default_config_path() -> Path:
    """./config.yaml where there is one (a checkout, an operator's folder), else
    the shipped demo config, so an installed `tollgate` runs from any folder."""
    here = Path("config.yaml")
    return here if here.exists() else SHIPPED_CONFIG


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.config is None:
        args.config = str(default_config_path())
    try:
        text, path = config_module.read(args.config) if args.worker is None else (sys.stdin.read(), args.config)
        config = config_module.from_text(text, path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        if args.check:
            print(f"{args.config}: {len(exc.errors)} error(s)", file=sys.stderr)
        return 1
    if args.check:
        print("config OK")
        return 0
    setup_logging(config.log_format)
    try:
        if args.worker is not None:
            return _run(serve_worker(config, args.worker))
        return _run(serve(config, text, start_mock=config.upstream.start_mock and not args.no_mock))
    except StartError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _run(coro: asyncio.Future[int] | object) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


def _listen_proxy(runtime: Runtime, *, reuse_port: bool = False) -> contextlib.AbstractAsyncContextManager[int]:
    server = runtime.config.server
    return listen(build_proxy_app(runtime), server.host, server.port, "proxy", shutdown_timeout=server.shutdown_timeout,
                  keepalive_timeout=server.keepalive_timeout, reuse_port=reuse_port)


async def serve(config: Config, text: str, *, start_mock: bool) -> int:
    """Run until SIGTERM/SIGINT; return the exit code. With `server.workers` > 1 this
    process is the supervisor: workers serve the proxy port, it serves the admin port."""
    stop = stop_event(config.server.shutdown_timeout, signal.SIGTERM, signal.SIGINT)
    async with contextlib.AsyncExitStack() as stack:
        if start_mock:
            try:
                await stack.enter_async_context(mock_upstream(config.upstream.url))
            except MockStartError as exc:
                raise StartError(str(exc)) from None
        store = await stack.enter_async_context(open_store(config.storage))
        runtime = build_runtime(config, store)
        await runtime.limiter.start()
        reloader = runtime.reloader
        if config.server.workers == 1:
            await stack.enter_async_context(_listen_proxy(runtime))
        else:
            group = await stack.enter_async_context(worker_group(
                config.path or "", text, config.server.workers, shutdown_timeout=config.server.shutdown_timeout,
                lock=reloader.lock))
            runtime.workers = reloader.group = group
        await stack.enter_async_context(
            listen(build_admin_app(runtime), config.admin.host, config.admin.port, "admin",
                    shutdown_timeout=1.0)
        )
        await stack.enter_async_context(reloader.watching())
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.reload_soon, "SIGHUP")
        print(f"Tollgate proxy      http://{hostport(config.server.host, config.server.port)}/  ->  "
              f"{config.upstream.url}", flush=True)
        print(f"Tollgate dashboard  http://{hostport(config.admin.host, config.admin.port)}/", flush=True)
        await stop.wait()
    return 0


async def serve_worker(config: Config, control: str) -> int:
    """One of a supervisor's workers: the proxy port (shared by SO_REUSEPORT) and its
    control socket. Only SIGTERM from the supervisor stops it: a terminal's Ctrl-C
    and SIGHUP reach the supervisor, which passes on what the workers must do."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stop = stop_event(config.server.shutdown_timeout, signal.SIGTERM)
    async with contextlib.AsyncExitStack() as stack:
        store = await stack.enter_async_context(open_store(config.storage))
        runtime = build_runtime(config, store)
        await runtime.limiter.start()
        await stack.enter_async_context(_listen_proxy(runtime, reuse_port=True))
        await stack.enter_async_context(serve_control(runtime, control))
        await stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
