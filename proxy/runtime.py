"""The state a running Tollgate shares between its two ports.

`config` is one reference swapped whole on reload: a request reads it once
at its start and finishes under that config.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from aiohttp import web

from .accesslog import AccessLog
from .config import Config
from .forward import Upstream
from .limiter import Limiter
from .limits.memory import MemoryStore
from .limits.store import wall_clock
from .metrics import Metrics
from .penalty import PenaltyBox
from .records import Observer, RequestRecord
from .stats import Stats
from .tunnel import Tunnels
from .upstream import Pool
from .whatif import Recorder
from .wsgate import GateClosed

log = logging.getLogger("tollgate.websocket")


def upstream_of(config: Config) -> Upstream:
    u = config.upstream
    return Upstream.from_url(
        u.url, preserve_host=u.preserve_host, timeout=u.timeout, connect_timeout=u.connect_timeout,
        max_body_size=config.server.max_body_size, read_timeout=u.read_timeout, max_connections=u.max_connections,
    )


class Workers(Protocol):
    """A supervisor's workers (proxy.workers.Group), as the admin port asks them."""

    async def gather(self) -> list[dict[str, Any]]:
        """Each worker's {"pid", "stats": Stats.dump(), "metrics": Metrics.dump()}."""

    async def reset_stats(self) -> None: ...


@dataclass(slots=True)
class Runtime:
    config: Config
    limiter: Limiter
    pool: Pool = field(init=False)  # opened by the proxy app's cleanup_ctx
    upstream: Upstream = field(init=False)
    stats: Stats = field(default_factory=Stats)
    tunnels: Tunnels = field(default_factory=Tunnels)  # upgraded connections open now
    metrics: Metrics = field(init=False)
    observers: list[Observer] = field(init=False)
    penalties: PenaltyBox = field(init=False)  # strikes and bans (tiers.<name>.penalty)
    access_log: AccessLog | None = None  # None: one on stderr in config's log.format
    version: int = 1
    loaded_at: float = field(default_factory=time.time)
    last_error: str | None = None
    reloader: Any = None  # proxy.reload.Reloader, set by the composition root
    workers: Workers | None = None  # set in a supervisor: the admin port shows the sum over them
    recorder: Recorder = field(init=False)  # the limited requests POST /api/whatif replays

    def __post_init__(self) -> None:
        self.upstream = upstream_of(self.config)
        limiter = self.limiter
        self.metrics = Metrics(storage_errors=lambda: limiter.errors, storage_healthy=lambda: limiter.healthy)
        if self.access_log is None:
            self.access_log = AccessLog(self.config.log_format)
        # Recorded on the clock the decisions were made at, so a replay decides at the same instants.
        store = self.limiter.store
        self.recorder = Recorder(self.config, store.clock if isinstance(store, MemoryStore) else wall_clock)
        self.penalties = PenaltyBox(lambda: self.config, limiter, self.metrics.registry)
        self.observers = [self.stats.observe, self.metrics.observe, self.access_log, self.penalties.observe]

    def set_upstream(self, upstream: Upstream) -> None:
        """Forward to `upstream` from now on; a new origin gets a new pool (the old
        one's in-flight exchanges finish, its idle connections close)."""
        if not upstream.same_origin(self.upstream):
            self.pool.close_idle()
            self.pool = upstream.pool()
        self.upstream = upstream

    def observe(self, record: RequestRecord, total_seconds: float) -> None:
        """Finish a record (proxy-added time) and hand it to every observer."""
        upstream = record.upstream_seconds or 0.0
        record.proxy_seconds = max(0.0, total_seconds - upstream)
        for observer in self.observers:
            observer(record)

    def tunnel_closed(self, record: RequestRecord, closed: GateClosed) -> None:
        """A WebSocket the message gate closed: counted when a message was refused, and logged."""
        if closed.why != "malformed":
            self.stats.totals["websocket_messages_refused"] += 1
            self.metrics.websocket_refused[record.tier] = self.metrics.websocket_refused.get(record.tier, 0) + 1
        log.info("websocket closed (%s %d) client=%s tier=%s path=%s limit=%s", closed.why, closed.code,
                 record.client, record.tier, record.path, closed.limit or "-")


RUNTIME: Final = web.AppKey("RUNTIME", Runtime)
