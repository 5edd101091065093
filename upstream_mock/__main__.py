"""Command line of the mock upstream: `python -m upstream_mock --host H --port P`.

It runs as its own process (Tollgate's `run.py` and the tests start it that way)
so that the proxy talks to it over a real socket. It prints one line once it
listens, so a parent can wait for it, and it exits 0 on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from aiohttp import web

from upstream_mock.app import create_app


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m upstream_mock", description="Mock upstream API for Tollgate."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=_port, default=9000, help="port to bind, 0 = any free (default 9000)"
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=_seconds,
        default=2.0,
        help="seconds in-flight requests get on SIGTERM (default 2)",
    )
    return parser.parse_args(argv)


class ListenError(Exception):
    """The address cannot be bound (in use, not local, no permission)."""


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(host: str, port: int, *, shutdown_timeout: float) -> None:
    """Listen until SIGTERM or SIGINT, then close the listener and finish in-flight requests."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(create_app(), shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {_url(host, port)}: {exc.strerror or exc}"
            ) from exc
        bound_port = runner.addresses[0][1]  # differs from `port` when port is 0
        print(f"upstream_mock listening on {_url(host, bound_port)}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="upstream_mock: %(levelname)s %(message)s")
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(args.host, args.port, shutdown_timeout=args.shutdown_timeout))
    except ListenError as exc:
        print(f"upstream_mock: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
