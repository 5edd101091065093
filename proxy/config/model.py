"""What a loaded config is: frozen dataclasses, one per section, built whole or not at all."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..limits.store import Limit
from ..routes import Route, RouteTable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """The file cannot be used; `errors` holds every problem, one line each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    shutdown_timeout: float = 10.0
    max_body_size: int | None = None
    keepalive_timeout: float = 75.0
    workers: int = 1  # processes serving the proxy port ("auto" is read as os.cpu_count())


@dataclass(frozen=True, slots=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 8081
    token: str | None = None
    allowed_hosts: tuple[str, ...] = ()  # Host names the admin port answers to besides its own (proxy.admin_guard)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = "http://127.0.0.1:9000"
    start_mock: bool = True
    connect_timeout: float = 2.0
    timeout: float = 30.0
    preserve_host: bool = False
    read_timeout: float | None = None  # silence allowed mid-body; None: the same as timeout
    max_connections: int = 1024


@dataclass(frozen=True, slots=True)
class StorageConfig:
    backend: str = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool = False
    key_prefix: str = "tollgate:"
    timeout: float = 0.05
    on_error: str = "allow"


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """clients.jwt with its keys loaded, so a reload re-reads the key file (proxy.tokens verifies)."""

    algorithms: tuple[str, ...]
    # (kid, alg) -> a key object (bytes for HS*); (None, alg): the only key that fits alg
    keys: Mapping[tuple[str | None, str], Any] = field(repr=False, compare=False)
    default_tier: str
    issuer: str | None = None
    audience: str | None = None
    subject_claim: str = "sub"
    tier_claim: str | None = None


@dataclass(frozen=True, slots=True)
class ClientsConfig:
    api_key_header: str = "X-API-Key"
    unknown_key: str = "reject"
    require_key: bool = False
    trusted_proxies: tuple[Network, ...] = ()
    ipv6_prefix: int = 64
    deny: tuple[Network, ...] = ()
    networks: tuple[tuple[Network, str], ...] = ()  # (cidr, tier name), first match wins
    jwt: JwtConfig | None = None


@dataclass(frozen=True, slots=True)
class WhatifConfig:
    """How much recent traffic POST /api/whatif can replay (proxy.whatif)."""

    minutes: float = 10.0
    max_requests: int = 1_000_000  # 0: record nothing


def policy_item(limit: Limit) -> str:
    return f'"{limit.name}";q={limit.algorithm.capacity};w={limit.algorithm.window}'


@dataclass(frozen=True, slots=True, eq=False)
class LimitSet:
    """The limits one request is decided on together (a tier's, then its
    route's), with what the headers say of them built once, not per request.

    `shown` indexes the limits the RateLimit headers list: the enforced
    quotas. Shadow limits are not shown to clients, and concurrency limits
    are no quota over time, nor is a penalty's ban (first when the tier
    has one: decided in the same store call as the limits, at no cost).
    """

    limits: tuple[Limit, ...]
    shown: tuple[int, ...] = field(init=False)
    policy_header: str = field(init=False)
    capacity_texts: tuple[str, ...] = field(init=False)  # X-RateLimit-Limit of each shown limit
    per_client: bool = field(init=False)  # every limit counts the client: subjects are its identity
    shadow: bool = field(init=False)  # some limit is a shadow
    concurrent: tuple[int, ...] = field(init=False)  # indexes of concurrency limits (slots to give back)
    banning: bool = field(init=False)  # limit 0 is the tier's penalty ban (proxy.penalty)
    # proxy.ratelimit_headers' serialized header lines, by the state they show
    header_lines: dict[Any, bytes] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        shown = tuple(i for i, limit in enumerate(self.limits)
                      if not limit.shadow and not limit.concurrent and limit.algorithm.short != "bn")
        set_ = object.__setattr__
        set_(self, "banning", bool(self.limits) and self.limits[0].algorithm.short == "bn")
        set_(self, "shown", shown)
        set_(self, "policy_header", ", ".join(policy_item(self.limits[i]) for i in shown))
        set_(self, "capacity_texts", tuple(str(self.limits[i].algorithm.capacity) for i in shown))
        set_(self, "per_client", all(limit.per == ("client",) for limit in self.limits))
        set_(self, "shadow", any(limit.shadow for limit in self.limits))
        set_(self, "concurrent", tuple(i for i, limit in enumerate(self.limits) if limit.concurrent))


@dataclass(frozen=True, slots=True)
class Penalty:
    """`tiers.<name>.penalty`: `after` strikes (refusals, or upstream answers
    with one of `statuses`) within `within` seconds ban a client for the
    ban's seconds. `strikes` counts them (a sliding window of `after` - 1:
    the one it refuses bans) and `ban` is the LimitSet's first limit."""

    after: int
    within: float
    statuses: frozenset[int]
    strikes: Limit
    ban: Limit


@dataclass(frozen=True, slots=True)
class Tier:
    """A tier's limits, and the LimitSet of a request on a route without limits of its own."""

    name: str
    limits: tuple[Limit, ...]
    unlimited: bool = False
    penalty: Penalty | None = None
    limit_set: LimitSet = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "limit_set", LimitSet(self.decided))

    @property
    def decided(self) -> tuple[Limit, ...]:
        """What a request of this tier is decided on: its ban first, if any, then its limits."""
        return self.limits if self.penalty is None else (self.penalty.ban, *self.limits)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A configured key, known only by its SHA-256: the raw key is never kept."""

    name: str
    tier: str
    digest: str


@dataclass(frozen=True, slots=True, weakref_slot=True)  # proxy.identity caches per config
class Config:
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    storage: StorageConfig = StorageConfig()
    clients: ClientsConfig = ClientsConfig()
    whatif: WhatifConfig = WhatifConfig()
    log_format: str = "text"
    tiers: Mapping[str, Tier] = field(default_factory=dict)
    api_keys: Mapping[str, ApiKey] = field(default_factory=dict)  # by sha256 hex
    routes: tuple[Route, ...] = ()
    path: str | None = None
    route_table: RouteTable = field(init=False, repr=False, compare=False)
    # A request without a known key is keyed by its peer's address, as is: there is
    # an anonymous tier, no key is required and no proxy is trusted to name another.
    anonymous_by_peer: bool = field(init=False, repr=False, compare=False)

    # The LimitSet of each (tier, route with limits of its own): tier's limits, then the route's.
    route_sets: Mapping[tuple[str, int], LimitSet] = field(init=False, repr=False, compare=False)
    # The LimitSet of each route with WebSocket message limits (`routes[].messages`), by route index.
    message_sets: Mapping[int, LimitSet] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "route_table", RouteTable(self.routes))
        object.__setattr__(self, "route_sets", {
            (tier.name, index): LimitSet(tier.decided + route.limits)
            for index, route in enumerate(self.routes) if route.limits
            for tier in self.tiers.values() if not tier.unlimited
        })
        object.__setattr__(self, "message_sets", {
            index: LimitSet(route.messages) for index, route in enumerate(self.routes) if route.messages
        })
        object.__setattr__(self, "anonymous_by_peer", "anonymous" in self.tiers
                           and not self.clients.require_key and not self.clients.trusted_proxies)

    def limit_set(self, tier: Tier, route: Route) -> LimitSet:
        """What a request of `tier` on `route` is decided on (not for unlimited tiers)."""
        if not route.limits:
            return tier.limit_set
        return self.route_sets[tier.name, route.index]

    def all_limits(self) -> list[Limit]:
        """Every limit whose state the stores keep, tiers' and routes' alike."""
        return ([limit for tier in self.tiers.values() for limit in tier.limits]
                + [limit for tier in self.tiers.values() if tier.penalty
                   for limit in (tier.penalty.strikes, tier.penalty.ban)]
                + [limit for route in self.routes for limit in (*route.limits, *route.messages)])

    def key_by_name(self, name: str) -> ApiKey | None:
        return next((k for k in self.api_keys.values() if k.name == name), None)
