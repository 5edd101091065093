"""Logging setup and the access log: one line per request on stderr.

Both write from threads of their own so a slow stderr never blocks the
event loop; the access line carries a client name or address, never a key.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import logging.handlers
import queue
import re
import sys
import threading
import time
from typing import Any, Final, TextIO

from aiohttp.http_exceptions import HttpProcessingError

from .records import RequestRecord


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = getattr(record, "fields", None) or {}
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(),
                 "logger": record.name, **entry}
        if "fields" not in record.__dict__:
            entry["message"] = record.getMessage()
        return json.dumps(entry)


class DropClientParseErrors(logging.Filter):
    """aiohttp logs a traceback for every malformed request it answers with 400.

    Those are the client's mistakes (or a scanner's), already answered; a
    flood of them must not flood the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


class _HandOff(logging.handlers.QueueHandler):
    """Queue the record as it is: formatting happens on the listener thread,
    not on the event loop (QueueHandler.prepare would format here)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


def setup_logging(fmt: str, stream: Any = None) -> None:
    """Route all logging through a background thread to stderr in `fmt` (text|json)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(q, handler)
    root = logging.getLogger()
    root.handlers[:] = [_HandOff(q)]
    root.setLevel(logging.INFO)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(DropClientParseErrors())
    listener.start()
    atexit.register(listener.stop)


class AccessLog:
    """One line per request, written in batches by a thread of its own.

    The event loop only formats the line and appends it to a list; every
    0.1 s (or every 512 lines) the batch goes to a writer thread as one
    string. Per-request logging records and a thread wake-up per line cost
    about a fifth of the proxy's CPU under load (bench/, py-spy); this costs
    a few microseconds. A client name or address is logged, never a key.
    """

    FLUSH_SECONDS: Final = 0.1
    MAX_LINES: Final = 512

    def __init__(self, fmt: str = "text", stream: TextIO | None = None) -> None:
        self._json = fmt == "json"
        self._stream = stream
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._ms = -1
        self._second = -1
        self._date = ""
        self._stamp = ""
        self._queue: queue.SimpleQueue[str | threading.Event | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write_forever, name="tollgate-access-log", daemon=True)
        self._thread.start()

    def __call__(self, record: RequestRecord) -> None:
        """An observer: format `record` and queue its line.

        This runs once per request on the event loop, so it is written for
        Python calls, not looks: the stamp is rebuilt once per millisecond and
        the text line is one f-string (bench/instructions.py).
        """
        ms = int(time.time() * 1000)
        if ms != self._ms:
            self._ms = ms
            if ms // 1000 != self._second:
                self._second = ms // 1000
                self._date = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self._second))
            self._stamp = f"{self._date}.{ms % 1000:03d}Z"
        stamp = self._stamp
        if self._json:
            upstream_ms = None if record.upstream_seconds is None else round(record.upstream_seconds * 1000, 2)
            proxy_ms = round(record.proxy_seconds * 1000, 3)
            fields: dict[str, Any] = {
                "time": stamp, "level": "info", "logger": "tollgate.access",
                "client": record.client, "tier": record.tier, "decision": record.decision,
                "method": record.method, "path": record.path, "status": record.status,
                "proxy_ms": proxy_ms, "upstream_ms": upstream_ms,
            }
            if record.upstream_error:
                fields["upstream_error"] = record.upstream_error
            if record.limit:
                fields["limit"] = record.limit
            if record.shadow:
                fields["shadow"] = list(record.shadow)
            line = json.dumps(fields)
        else:
            upstream = "-" if record.upstream_seconds is None else f"{record.upstream_seconds * 1000:.2f}"
            line = (  # the method is a token: the parser let nothing else through
                f"{stamp} access client={_text(record.client)} tier={record.tier}"
                f" decision={record.decision} method={record.method}"
                f" path={_text(record.path)} status={record.status}"
                f" proxy_ms={record.proxy_seconds * 1000:.3f} upstream_ms={upstream}"
            )
            if record.upstream_error:
                line += f" upstream_error={record.upstream_error}"
            if record.limit:
                line += f" limit={record.limit}"
            if record.shadow:  # limit names are [A-Za-z0-9_-]: no quoting needed
                line += f" shadow={','.join(record.shadow)}"
        self._lines.append(line)
        if len(self._lines) >= self.MAX_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines:
            self._queue.put("\n".join(self._lines) + "\n")
            self._lines = []

    def sync(self, timeout: float = 5.0) -> None:
        """Flush and wait until the writer thread has written everything queued."""
        self.flush()
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def close(self) -> None:
        """Write what is buffered and stop the thread."""
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _write_forever(self) -> None:
        while (block := self._queue.get()) is not None:
            if isinstance(block, threading.Event):
                block.set()
                continue
            stream = self._stream or sys.stderr
            try:
                stream.write(block)
                stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed or full: losing access lines must not stop the proxy


_SAFE = re.compile(r'[\x21\x23-\x7e]+\Z')  # printable ASCII but '"': needs no quoting


def _text(value: Any) -> str:
    """A value for a text line: quoted (and escaped) unless plainly safe, so a
    path holding spaces or an encoded newline cannot forge a log line."""
    if value is None:
        return "-"
    text = str(value)
    return text if _SAFE.match(text) else json.dumps(text)
