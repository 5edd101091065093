"""One record per proxied request: what stats, metrics and the access log read.

The handler fills a record once and hands it to every observer, so counting
happens in one place and the three views cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class RequestRecord:
    method: str
    path: str
    client: str  # key name, jwt:<subject> or address: never a raw key or token
    tier: str
    # SPEC's decisions (allowed, blocked, unauthorized, exempt, unavailable), plus
    # "rejected": a declared body over server.max_body_size, or a request never forwarded
    # (CONNECT, HTTP/0.9 or 2.0: proxy.target), refused before the limiter; "denied": clients.deny's 403.
    decision: str
    identity: str = ""  # the limit-state key ("k:<sha256>" / "a:<address>"): never a raw key
    status: int = 0
    proxy_seconds: float = 0.0  # time Tollgate added (total minus upstream)
    upstream_seconds: float | None = None
    upstream_error: str | None = None  # kind: connect, timeout, protocol, broken
    limit: str | None = None  # refusing limit's name, when blocked
    shadow: tuple[str, ...] = ()  # shadow limits that would have refused this request
    remaining: int | None = None
    banned: float = 0.0  # refused by the tier's penalty ban: its seconds left (proxy.penalty)


Observer = Callable[[RequestRecord], None]
