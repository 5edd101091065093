"""The flat sections: server, admin, upstream, storage, clients, whatif and log."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit

from ..masking import mask_url
from .checks import (
    Checker,
    read_host,
    read_host_names,
    read_networks,
    read_positive,
    read_prefix_length,
    read_section,
    read_url,
)
from .model import AdminConfig, ClientsConfig, ServerConfig, StorageConfig, UpstreamConfig, WhatifConfig

WHATIF_MAX_MINUTES: Final = 1440  # a day: the record is for "what would my last change have done"
WHATIF_MAX_REQUESTS: Final = 100_000_000  # ~5 GB of record: beyond this a typo, not a plan
HEADER_NAME_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")


def read_sections(ck: Checker, raw: dict[str, Any]) -> dict[str, Any]:
    server = read_section(ck, raw, "server", ServerConfig, {
        "host": read_host(ck), "port": ck.port,
        "shutdown_timeout": read_positive(ck, minimum=0, exclusive=False),
        "max_body_size": read_positive(ck, minimum=0, exclusive=False, integer=True, nullable=True),
        "keepalive_timeout": read_positive(ck, minimum=0, exclusive=False),
        "workers": lambda p, v, d: read_workers(ck, p, v, d),
    })
    admin = read_section(ck, raw, "admin", AdminConfig, {
        "host": read_host(ck), "port": ck.port,
        "token": lambda p, v, d: ck.string(p, v, d, nullable=True, what="a non-empty string or null"),
        "allowed_hosts": lambda p, v, d: read_host_names(ck, p, v),
    })
    upstream = read_section(ck, raw, "upstream", UpstreamConfig, {
        "url": lambda p, v, d: read_url(ck, p, v, d, ("http", "https")),
        "start_mock": ck.boolean, "preserve_host": ck.boolean,
        "connect_timeout": read_positive(ck), "timeout": read_positive(ck),
        "read_timeout": read_positive(ck, nullable=True),
        "max_connections": read_positive(ck, minimum=1, exclusive=False, integer=True),
    })
    storage = read_section(ck, raw, "storage", StorageConfig, {
        "backend": lambda p, v, d: ck.choice(p, v, d, ("memory", "redis")),
        "url": lambda p, v, d: read_url(ck, p, v, d, ("redis", "rediss", "unix")),
        "cluster": ck.boolean,
        "key_prefix": lambda p, v, d: v if isinstance(v, str) else ck.string(p, v, d, what="a string"),
        "timeout": read_positive(ck),
        "on_error": lambda p, v, d: ck.choice(p, v, d, ("allow", "deny", "local")),
    })
    if storage.cluster and "url" in (raw.get("storage") or {}):
        parts = urlsplit(storage.url)
        if parts.scheme == "unix" or parts.path.strip("/") not in ("", "0"):
            ck.error("storage.url", "a Redis Cluster has only database 0 and is reached over TCP",
                     mask_url(storage.url))
    if server.workers > 1 and storage.backend == "memory":
        ck.error("server.workers", "more than one worker needs storage.backend: redis "
                 "(memory state is per process)", server.workers)
    if server.workers > 1 and server.port == 0:
        ck.error("server.workers", "more than one worker needs a fixed server.port "
                 "(with 0 each worker would get a port of its own)", server.workers)
    clients = read_section(ck, raw, "clients", ClientsConfig, {
        "api_key_header": lambda p, v, d: ck.string(p, v, d, pattern=HEADER_NAME_RE, what="an HTTP header name"),
        "unknown_key": lambda p, v, d: ck.choice(p, v, d, ("reject", "anonymous")),
        "require_key": ck.boolean,
        "trusted_proxies": lambda p, v, d: read_networks(ck, p, v),
        "ipv6_prefix": lambda p, v, d: read_prefix_length(ck, p, v, d),
        "deny": lambda p, v, d: read_networks(ck, p, v),
        # they name tiers: read after them, by proxy.config.callers
        "networks": lambda p, v, d: d, "jwt": lambda p, v, d: d,
    })
    whatif = read_section(ck, raw, "whatif", WhatifConfig, {
        "minutes": _bounded(ck, read_positive(ck), WHATIF_MAX_MINUTES),
        "max_requests": _bounded(ck, read_positive(ck, minimum=0, exclusive=False, integer=True),
                                 WHATIF_MAX_REQUESTS),
    })
    log = ck.mapping("log", raw.get("log"), {"format": None})
    log_format = ck.choice("log.format", log["format"], "text", ("text", "json")) if "format" in log else "text"
    return {"server": server, "admin": admin, "upstream": upstream, "storage": storage,
            "clients": clients, "whatif": whatif, "log_format": log_format}


def read_workers(ck: Checker, path: str, value: Any, default: int) -> int:
    """server.workers: a count, or "auto" for one per core."""
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        ck.error(path, 'must be an integer >= 1 or "auto"', value)
        return default
    return value



def _bounded(ck: Checker, read: Callable[[str, Any, Any], Any], most: int) -> Callable[[str, Any, Any], Any]:
    """`read`, then an upper bound (a number beyond it is a typo)."""
    def reader(path: str, value: Any, default: Any) -> Any:
        before = len(ck.errors)
        out = read(path, value, default)
        if len(ck.errors) == before and out > most:
            ck.error(path, f"must be at most {most}", value)
            return default
        return out
    return reader
