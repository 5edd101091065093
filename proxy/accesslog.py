"""Logging setup and the access log: one line per request on stderr.

Lines go through a QueueHandler so a slow stderr never blocks the event
loop; the record carries a client name or address, never a raw API key.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from .records import RequestRecord

access_log = logging.getLogger("tollgate.access")


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


def log_request(record: RequestRecord) -> None:
    """The access line: who, tier, decision, status, latencies. An observer."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    upstream_ms = None if record.upstream_seconds is None else round(record.upstream_seconds * 1000, 2)
    fields = {
        "client": record.client, "tier": record.tier, "decision": record.decision,
        "method": record.method, "path": record.path, "status": record.status,
        "proxy_ms": round(record.proxy_seconds * 1000, 3), "upstream_ms": upstream_ms,
    }
    if record.upstream_error:
        fields["upstream_error"] = record.upstream_error
    if record.limit:
        fields["limit"] = record.limit
    message = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
    access_log.info(message, extra={"fields": fields})


def _text(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    return json.dumps(text) if (" " in text or '"' in text or not text) else text
