"""Config reload: on SIGHUP, POST /api/reload, and when the file changes.

A new config is built aside and swapped in as one reference; an invalid one
leaves the old in force and is remembered as `last_error`. Limits whose
parameters are unchanged keep their state because state is keyed by a limit's
identity (tier, name, algorithm, parameters), not by the config version.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from . import config as config_module
from .config import Config, ConfigError
from .runtime import Runtime, upstream_of
from .tasks import every

log = logging.getLogger("tollgate.reload")

POLL_INTERVAL = 0.25  # seconds between looks at the file
SETTLE = 0.5  # a change is taken once the file stayed the same this long: within 1 s in all
EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()
RESTART_ONLY: tuple[tuple[str, Callable[[Config], object]], ...] = (
    ("server.host", lambda c: c.server.host), ("server.port", lambda c: c.server.port),
    ("server.workers", lambda c: c.server.workers),
    ("admin.host", lambda c: c.admin.host), ("admin.port", lambda c: c.admin.port),
    ("storage.backend", lambda c: c.storage.backend), ("storage.url", lambda c: c.storage.url),
    ("storage.cluster", lambda c: c.storage.cluster), ("storage.key_prefix", lambda c: c.storage.key_prefix),
    ("log.format", lambda c: c.log_format),
)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    version: int
    errors: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()


def _signature(path: str) -> tuple[int, int, int] | None:
    """What changes when the file is edited in place, renamed over, or its symlink swapped."""
    try:
        st = os.stat(path)  # follows symlinks, as a ConfigMap's ..data swap needs
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _digest(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return None


def _write_atomically(path: str, text: str) -> None:
    """Write beside the file, then rename over it: a reader sees the old or the new file, whole."""
    temporary = f"{path}.tollgate-{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(OSError):
            os.chmod(temporary, os.stat(path).st_mode & 0o7777)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _blank(path: str) -> bool:
    """Nothing but white space (YAML reads that as an empty config)."""
    try:
        with open(path, "rb") as fh:
            return not fh.read().strip()
    except OSError:
        return True


class Group(Protocol):
    """Other processes that must take the same config (proxy.workers): all or none."""

    async def swap(self, text: str) -> list[str]:
        """Give every process `text`; the errors of any that refused it (then none took it)."""


class Reloader:
    """Owns the reload of `runtime.config`; every trigger goes through `reload`."""

    def __init__(self, runtime: Runtime, on_result: Callable[[ReloadResult], None] | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runtime = runtime
        self.on_result = on_result
        self.clock = clock
        self.group: Group | None = None
        self._settling: tuple[tuple[int, int, int] | None, float] | None = None  # a change settling since
        self._lock = asyncio.Lock()
        path = runtime.config.path
        self._signature = _signature(path) if path else None
        self._digest = _digest(path) if path else None

    @property
    def lock(self) -> asyncio.Lock:
        """Held while a config is being swapped (a new worker starts under it too)."""
        return self._lock

    async def reload(self, trigger: str) -> ReloadResult:
        async with self._lock:
            return await self._reload(trigger)

    async def reload_with(self, text: str, trigger: str) -> ReloadResult:
        """Make `text` the config file's content, then reload it as any trigger does.

        The file, not only the running config, takes the candidate: otherwise
        the next SIGHUP, file change or restart would silently bring the old
        config back. An invalid candidate writes nothing; the file is replaced
        by a rename (never half-written), keeping its mode.
        """
        async with self._lock:
            path = self.runtime.config.path
            if path is None:
                return self._refused(trigger, ["no config file to write the candidate to (started without one)"])
            try:
                config_module.from_text(text, path)
            except ConfigError as exc:
                return self._refused(trigger, exc.errors)
            try:
                _write_atomically(path, text)
            except OSError as exc:
                return self._refused(trigger, [f"{path}: cannot write: {exc.strerror or exc}"])
            return await self._reload(trigger)

    async def _reload(self, trigger: str) -> ReloadResult:
        runtime = self.runtime
        path = runtime.config.path
        if path is None:
            return self._refused(trigger, ["no config file to reload (started without one)"])
        self._signature, self._digest = _signature(path), _digest(path)
        try:
            text, resolved = config_module.read(path)
            new = config_module.from_text(text, resolved)
        except ConfigError as exc:
            return self._refused(trigger, exc.errors)
        if self.group is not None:
            errors = await self.group.swap(text)
            if errors:
                return self._refused(trigger, errors)
        return self.take(new, trigger)

    def take(self, new: Config, trigger: str) -> ReloadResult:
        """Put a validated config in force (a worker takes its supervisor's this way)."""
        runtime = self.runtime
        restart = tuple(name for name, get in RESTART_ONLY if get(new) != get(runtime.config))
        if restart:
            log.warning("config reload (%s): %s changed; that takes effect only after a restart",
                        trigger, ", ".join(restart))
        self._apply(new)
        log.info("config reloaded (%s): version %d", trigger, runtime.version)
        result = ReloadResult(True, runtime.version, restart_needed=restart)
        self._count(result)
        return result

    def _count(self, result: ReloadResult) -> None:
        self.runtime.metrics.reloads.labels("success" if result.ok else "failure").inc()
        if self.on_result:
            self.on_result(result)

    def _apply(self, new: Config) -> None:
        runtime = self.runtime
        runtime.set_upstream(upstream_of(new))
        runtime.limiter.on_error = new.storage.on_error
        runtime.limiter.timeout = new.storage.timeout
        runtime.config = new  # the one swap that puts the new config in force
        runtime.version += 1
        runtime.loaded_at = time.time()
        runtime.last_error = None

    def _refused(self, trigger: str, errors: list[str]) -> ReloadResult:
        runtime = self.runtime
        runtime.last_error = "; ".join(errors)
        log.error("config reload (%s) refused, version %d stays in force:\n  %s",
                  trigger, runtime.version, "\n  ".join(errors))
        result = ReloadResult(False, runtime.version, tuple(errors))
        self._count(result)
        return result

    def reload_soon(self, trigger: str) -> None:
        """For signal handlers: schedule a reload on the loop."""
        task = asyncio.get_running_loop().create_task(self.reload(trigger))
        self._pending = task  # keep a reference until done

    async def poll(self) -> ReloadResult | None:
        """One look at the watched file: a change is taken once it has stayed the
        same for SETTLE seconds (an editor or a deploy may write it in steps), and
        an empty or unreadable file never replaces a config read from a non-empty
        one (a half-written file would otherwise swap in the defaults)."""
        path = self.runtime.config.path
        if path is None:
            return None
        signature = _signature(path)
        if signature == self._signature:
            self._settling = None
            return None
        now = self.clock()
        if self._settling is None or self._settling[0] != signature:
            self._settling = (signature, now)
            return None
        if now - self._settling[1] < SETTLE:
            return None
        self._settling = None
        digest = _digest(path)
        if (digest is None or _blank(path)) and self._digest not in (None, EMPTY_DIGEST):
            self._signature = signature  # warned once for this state of the file
            log.warning("config file %s is %s; the running config (version %d) stays in force",
                        path, "unreadable" if digest is None else "empty", self.runtime.version)
            return None
        self._signature = signature
        if digest == self._digest:
            return None
        return await self.reload("file change")

    def watching(self, interval: float = POLL_INTERVAL) -> contextlib.AbstractAsyncContextManager[None]:
        """Poll the file (stat is cheap and sees renames and symlink swaps alike)."""

        async def check() -> None:
            await self.poll()

        return every(interval, check, name="tollgate-config-watch")
