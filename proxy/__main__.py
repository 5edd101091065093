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
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from . import config as config_module
from .accesslog import setup_logging
from .app import build_admin_app, build_proxy_app, build_runtime
from .config import Config, ConfigError
from .limits.factory import open_store
from .mockproc import MockStartError, mock_upstream
from .server import StartError, hostport, listen

log = logging.getLogger("tollgate")


SHIPPED_CONFIG: Final = Path(__file__).resolve().parent / "shipped" / "config.yaml"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py", description="Tollgate: a rate-limiting reverse proxy.")
    parser.add_argument("--config", help="configuration file (default: ./config.yaml if there is one, "
                        "else the demo config shipped with Tollgate)")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--no-mock", action="store_true", help="do not start the mock upstream")
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
        config = config_module.load(args.config)
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
        return _run(serve(config, start_mock=config.upstream.start_mock and not args.no_mock))
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


async def serve(config: Config, *, start_mock: bool) -> int:
    """Run until SIGTERM/SIGINT; return the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            # straight to stderr: os._exit skips the logging thread's last flush
            print(f"tollgate: second {signal.Signals(signum).name}: exiting now", file=sys.stderr, flush=True)
            os._exit(1)
        log.info("%s: stopping (draining up to %gs)", signal.Signals(signum).name,
                 config.server.shutdown_timeout)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
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
        await stack.enter_async_context(
            listen(build_proxy_app(runtime), config.server.host, config.server.port, "proxy",
                    shutdown_timeout=config.server.shutdown_timeout,
                    keepalive_timeout=config.server.keepalive_timeout)
        )
        await stack.enter_async_context(
            listen(build_admin_app(runtime), config.admin.host, config.admin.port, "admin",
                    shutdown_timeout=1.0)
        )
        await stack.enter_async_context(reloader.watching())
        loop.add_signal_handler(signal.SIGHUP, reloader.reload_soon, "SIGHUP")
        print(f"Tollgate proxy      http://{hostport(config.server.host, config.server.port)}/  ->  "
              f"{config.upstream.url}", flush=True)
        print(f"Tollgate dashboard  http://{hostport(config.admin.host, config.admin.port)}/", flush=True)
        await stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
