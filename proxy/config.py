"""Load and validate config.yaml into frozen dataclasses.

Two passes over the YAML tree (unknown keys, then types and meaning) collect
every error at once, one a line, each naming the key path, what is wrong and
the value read: `tiers.free.limits[0].refill_rate: must be a number > 0, got "fast"`.
A config object is only ever built whole; a reload builds a new one aside.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import yaml

from .limits.algorithms import ALGORITHMS, Algorithm, Param
from .limits.store import Limit

NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]+\Z")
HEX64_RE: Final = re.compile(r"[0-9a-fA-F]{64}\Z")
DEFAULT_TIER: Final = {"limits": [{"algorithm": "token_bucket", "capacity": 100, "refill_rate": 10}]}
CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")
PARAM_MAX: Final = 1e9  # capacities, rates and windows beyond this are typos, and overflow w
PARAM_MIN_FRACTION: Final = 1e-6
HEADER_NAME_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
HOST_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?\Z")  # a DNS name or IPv4 address

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
class ClientsConfig:
    api_key_header: str = "X-API-Key"
    unknown_key: str = "reject"
    require_key: bool = False
    trusted_proxies: tuple[Network, ...] = ()
    ipv6_prefix: int = 64


@dataclass(frozen=True, slots=True)
class Tier:
    """A tier's limits; the header texts that never change are built once here, not per request."""

    name: str
    limits: tuple[Limit, ...]
    unlimited: bool = False
    policy_header: str = ""
    capacity_texts: tuple[str, ...] = ()  # X-RateLimit-Limit of each limit
    # proxy.ratelimit_headers' serialized header lines, by the state they show
    header_lines: dict[Any, bytes] = field(default_factory=dict, compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A configured key, known only by its SHA-256: the raw key is never kept."""

    name: str
    tier: str
    digest: str


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    methods: frozenset[str] | None = None
    exempt: bool = False
    cost: int = 1

    def matches(self, method: str, path: str) -> bool:
        """Prefix on whole segments: /search matches /search/x, not /searching."""
        if self.methods is not None and method not in self.methods:
            return False
        prefix = self.path
        if prefix == "/" or path == prefix:
            return True
        return path.startswith(prefix) and (prefix.endswith("/") or path[len(prefix)] == "/")

    def pattern(self) -> str:
        """`matches` as a regex over "METHOD path" (what RouteTable compiles)."""
        methods = "|".join(re.escape(m) for m in sorted(self.methods)) if self.methods is not None else "[^ ]*"
        prefix = self.path
        if prefix == "/":
            tail = ""
        elif prefix.endswith("/"):
            tail = re.escape(prefix)
        else:
            tail = re.escape(prefix) + r"(?:/|\Z)"
        return f"(?:{methods}) {tail}"


class RouteTable:
    """The routes in order, first match wins, compiled into one regex at load:
    a request costs one C call however many routes there are, where a loop
    over `Route.matches` cost a Python call per route."""

    __slots__ = ("_match", "_routes")

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self._routes = (None, *routes)  # lastindex counts groups from 1
        # One capturing group per route and no other: lastindex names the route that matched.
        pattern = "|".join(f"({route.pattern()})" for route in routes) or "(?!)"  # (?!): never matches
        self._match = re.compile(pattern).match

    def match(self, method: str, path: str) -> Route | None:
        found = self._match(f"{method} {path}")
        return None if found is None else self._routes[found.lastindex]  # type: ignore[index]


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    storage: StorageConfig = StorageConfig()
    clients: ClientsConfig = ClientsConfig()
    log_format: str = "text"
    tiers: Mapping[str, Tier] = field(default_factory=dict)
    api_keys: Mapping[str, ApiKey] = field(default_factory=dict)  # by sha256 hex
    routes: tuple[Route, ...] = ()
    path: str | None = None
    route_table: RouteTable = field(init=False, repr=False, compare=False)
    # proxy.identity's resolved anonymous clients, by peer address: this config's only
    peer_clients: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    # A request without a known key is keyed by its peer's address, as is: there is
    # an anonymous tier, no key is required and no proxy is trusted to name another.
    anonymous_by_peer: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "route_table", RouteTable(self.routes))
        object.__setattr__(self, "anonymous_by_peer", "anonymous" in self.tiers
                           and not self.clients.require_key and not self.clients.trusted_proxies)

    def all_limits(self) -> list[Limit]:
        return [limit for tier in self.tiers.values() for limit in tier.limits]

    def key_by_name(self, name: str) -> ApiKey | None:
        return next((k for k in self.api_keys.values() if k.name == name), None)


# --- YAML loading: duplicate keys are errors, not last-one-wins -------------


def _duplicates(node: yaml.Node | None, path: str, out: list[str]) -> None:
    """Report keys given twice in a mapping, by key path; API keys are never shown."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            child = f"{path}.{key}" if path else str(key)
            if path == "api_keys":
                child = "api_keys[...]"  # the mapping key is the secret itself
            if key is not None and key in seen:
                line = key_node.start_mark.line + 1
                what = "an API key is given twice" if path == "api_keys" else f"duplicate key {show(key)}"
                out.append(f"{path or 'top level'}: {what} (line {line}); the last one would win")
            if key is not None:
                seen.add(key)
            _duplicates(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _duplicates(item, f"{path}[{index}]", out)


def parse_yaml(text: str) -> tuple[Any, list[str]]:
    """YAML text -> (tree, duplicate-key errors); ConfigError for broken syntax.

    Duplicates are returned, not raised, so the rest of the file is still
    validated and every error is reported at once.
    """
    loader = yaml.SafeLoader(text)
    duplicates: list[str] = []
    try:
        node = loader.get_single_node()
        _duplicates(node, "", duplicates)
        tree = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}invalid YAML: {problem}"]) from exc
    finally:
        loader.dispose()
    return tree, duplicates


# --- validation --------------------------------------------------------------

T = TypeVar("T")
_MISSING: Final = object()


def show(value: Any) -> str:
    """A value as read, for error lines: strings quoted, booleans as YAML writes them."""
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return repr(value)


class _Checker:
    """Collects errors while reading one section; never stops at the first."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, path: str, message: str, value: Any = _MISSING) -> None:
        got = "" if value is _MISSING else f", got {show(value)}"
        path = CONTROL_RE.sub(lambda m: json.dumps(m.group())[1:-1], path)  # one error, one line
        self.errors.append(f"{path}: {message}{got}" if path else f"{message}{got}")

    def mapping(self, path: str, value: Any, allowed: Mapping[str, Any] | None) -> dict[str, Any]:
        """A mapping with known keys only; None (an empty section) is an empty mapping."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path, "must be a mapping", value)
            return {}
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.error(path, "keys must be strings", key)
            elif allowed is not None and key not in allowed:
                known = ", ".join(sorted(allowed))
                self.error(f"{path}.{key}" if path else key, f"unknown key (known: {known})")
            else:
                out[key] = item
        return out

    def number(
        self, path: str, value: Any, default: T, *, minimum: float = 0, exclusive: bool = True,
        integer: bool = False, nullable: bool = False,
    ) -> Any:
        if value is None and nullable:
            return None
        param = Param(integer=integer, minimum=minimum, exclusive=exclusive)
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or value != value:  # NaN != NaN
            self.error(path, param.describe() + (" or null" if nullable else ""), value)
            return default
        if value < minimum or (exclusive and value == minimum) or value == float("inf"):
            self.error(path, param.describe(), value)
            return default
        return value

    def boolean(self, path: str, value: Any, default: bool) -> bool:
        if not isinstance(value, bool):
            self.error(path, "must be true or false", value)
            return default
        return value

    def string(self, path: str, value: Any, default: str, *, pattern: re.Pattern[str] | None = None,
               what: str = "a non-empty string", nullable: bool = False) -> Any:
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value or (pattern and not pattern.match(value)):
            self.error(path, f"must be {what}", value)
            return default
        return value

    def choice(self, path: str, value: Any, default: str, options: tuple[str, ...]) -> str:
        if value not in options or not isinstance(value, str):
            self.error(path, "must be one of " + ", ".join(options), value)
            return default
        return value

    def port(self, path: str, value: Any, default: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
            self.error(path, "must be a port number 0-65535", value)
            return default
        return value


def _section(ck: _Checker, raw: dict[str, Any], name: str, cls: type[T],
             readers: Mapping[str, Callable[[str, Any, Any], Any]]) -> T:
    """Read one flat section: each key through its reader, defaults for the rest."""
    values = ck.mapping(name, raw.get(name), readers)
    defaults = cls()
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = readers[key](f"{name}.{key}", value, getattr(defaults, key))
    return cls(**kwargs)


def _host(ck: _Checker) -> Callable[[str, Any, Any], Any]:
    return lambda p, v, d: ck.string(p, v, d, what="a host name or address")


def _positive(ck: _Checker, **kw: Any) -> Callable[[str, Any, Any], Any]:
    return lambda p, v, d: ck.number(p, v, d, **kw)


def _url(ck: _Checker, path: str, value: Any, default: str, schemes: tuple[str, ...]) -> str:
    url = ck.string(path, value, default, what="a URL")
    if url is default:
        return url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        ck.error(path, "is not a valid URL", mask_url(url))
        return default
    if parts.scheme not in schemes or (parts.scheme != "unix" and not parts.hostname):
        ck.error(path, f"must be a {' or '.join(s + '://' for s in schemes)} URL with a host", mask_url(url))
        return default
    return str(url)


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        return url
    user = userinfo.split(":", 1)[0]
    masked = f"{user}:***" if ":" in userinfo and user else "***"
    return f"{scheme}://{masked}@{hostport}{slash}{tail}"


def _read_sections(ck: _Checker, raw: dict[str, Any]) -> dict[str, Any]:
    server = _section(ck, raw, "server", ServerConfig, {
        "host": _host(ck), "port": ck.port,
        "shutdown_timeout": _positive(ck, minimum=0, exclusive=False),
        "max_body_size": _positive(ck, minimum=0, exclusive=False, integer=True, nullable=True),
        "keepalive_timeout": _positive(ck, minimum=0, exclusive=False),
    })
    admin = _section(ck, raw, "admin", AdminConfig, {
        "host": _host(ck), "port": ck.port,
        "token": lambda p, v, d: ck.string(p, v, d, nullable=True, what="a non-empty string or null"),
        "allowed_hosts": lambda p, v, d: _host_names(ck, p, v),
    })
    upstream = _section(ck, raw, "upstream", UpstreamConfig, {
        "url": lambda p, v, d: _url(ck, p, v, d, ("http", "https")),
        "start_mock": ck.boolean, "preserve_host": ck.boolean,
        "connect_timeout": _positive(ck), "timeout": _positive(ck),
        "read_timeout": _positive(ck, nullable=True),
        "max_connections": _positive(ck, minimum=1, exclusive=False, integer=True),
    })
    storage = _section(ck, raw, "storage", StorageConfig, {
        "backend": lambda p, v, d: ck.choice(p, v, d, ("memory", "redis")),
        "url": lambda p, v, d: _url(ck, p, v, d, ("redis", "rediss", "unix")),
        "cluster": ck.boolean,
        "key_prefix": lambda p, v, d: v if isinstance(v, str) else ck.string(p, v, d, what="a string"),
        "timeout": _positive(ck),
        "on_error": lambda p, v, d: ck.choice(p, v, d, ("allow", "deny", "local")),
    })
    if storage.cluster and "url" in (raw.get("storage") or {}):
        parts = urlsplit(storage.url)
        if parts.scheme == "unix" or parts.path.strip("/") not in ("", "0"):
            ck.error("storage.url", "a Redis Cluster has only database 0 and is reached over TCP",
                     mask_url(storage.url))
    clients = _section(ck, raw, "clients", ClientsConfig, {
        "api_key_header": lambda p, v, d: ck.string(p, v, d, pattern=HEADER_NAME_RE, what="an HTTP header name"),
        "unknown_key": lambda p, v, d: ck.choice(p, v, d, ("reject", "anonymous")),
        "require_key": ck.boolean,
        "trusted_proxies": lambda p, v, d: _networks(ck, p, v),
        "ipv6_prefix": lambda p, v, d: _prefix(ck, p, v, d),
    })
    log = ck.mapping("log", raw.get("log"), {"format": None})
    log_format = ck.choice("log.format", log["format"], "text", ("text", "json")) if "format" in log else "text"
    return {"server": server, "admin": admin, "upstream": upstream, "storage": storage,
            "clients": clients, "log_format": log_format}


def _networks(ck: _Checker, path: str, value: Any) -> tuple[Network, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        ck.error(path, "must be a list of CIDRs", value)
        return ()
    nets = []
    for i, item in enumerate(value):
        try:
            nets.append(ipaddress.ip_network(str(item), strict=False))
            if not isinstance(item, str):
                raise ValueError
        except ValueError:
            ck.error(f"{path}[{i}]", "must be an IP address or CIDR like 10.0.0.0/8", item)
    return tuple(nets)


def _host_names(ck: _Checker, path: str, value: Any) -> tuple[str, ...]:
    """admin.allowed_hosts: names as a Host header carries them (no scheme, no port), lower-cased."""
    if value is None:
        return ()
    if not isinstance(value, list):
        ck.error(path, "must be a list of host names", value)
        return ()
    names = []
    for i, item in enumerate(value):
        if isinstance(item, str) and (HOST_NAME_RE.match(item) or _is_ipv6(item.removeprefix("[").removesuffix("]"))):
            names.append(item.lower().removeprefix("[").removesuffix("]"))
        else:
            ck.error(f"{path}[{i}]", "must be a host name or IP address, without scheme or port", item)
    return tuple(names)


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def _prefix(ck: _Checker, path: str, value: Any, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 128:
        ck.error(path, "must be an integer 1-128", value)
        return default
    return value


def _limit(ck: _Checker, path: str, raw: Any, tier: str, taken: set[str]) -> Limit | None:
    spec = ck.mapping(path, raw, None)
    if not spec:
        if raw is None or raw == {}:
            ck.error(path, "must be a mapping with an algorithm and its parameters", raw)
        return None
    algo_name = spec.get("algorithm", "token_bucket")
    cls = ALGORITHMS.get(algo_name) if isinstance(algo_name, str) else None
    if cls is None:
        ck.error(f"{path}.algorithm", "must be one of " + ", ".join(ALGORITHMS), algo_name)
        return None
    for key in spec:
        if key not in ("name", "algorithm", *cls.PARAMS):
            ck.error(f"{path}.{key}", f"unknown key for {cls.name} (known: "
                     + ", ".join(("name", "algorithm", *cls.PARAMS)) + ")")
    params: dict[str, Any] = {}
    ok = True
    for pname, param in cls.PARAMS.items():
        if pname not in spec:
            ck.error(f"{path}.{pname}", f"is required for {cls.name}")
            ok = False
            continue
        before = len(ck.errors)
        value = ck.number(f"{path}.{pname}", spec[pname], None, minimum=param.minimum,
                          exclusive=param.exclusive, integer=param.integer)
        if value is not None and (value > PARAM_MAX or 0 < value < PARAM_MIN_FRACTION):
            ck.error(f"{path}.{pname}", f"must be between {PARAM_MIN_FRACTION:g} and {PARAM_MAX:g}", value)
        params[pname] = value
        ok = ok and len(ck.errors) == before
    name = spec.get("name")
    if name is None:
        name = cls.name
        n = 2
        while name in taken:
            name, n = f"{cls.name}-{n}", n + 1
    elif not isinstance(name, str) or not NAME_RE.match(name):
        ck.error(f"{path}.name", "must match [A-Za-z0-9_-]+", name)
        return None
    elif name in taken:
        ck.error(f"{path}.name", "is already used by another limit of this tier", name)
        return None
    taken.add(name)
    if not ok:
        return None
    algorithm: Algorithm = cls(**params)
    digest = hashlib.sha256(repr((cls.short, algorithm.params())).encode()).hexdigest()[:8]
    return Limit(name=name, algorithm=algorithm, key=f"{tier}.{name}.{cls.short}{digest}")


def policy_item(limit: Limit) -> str:
    return f'"{limit.name}";q={limit.algorithm.capacity};w={limit.algorithm.window}'


def _tiers(ck: _Checker, raw: Any, require_key: bool) -> dict[str, Tier]:
    specs = ck.mapping("tiers", raw, None)
    if raw is None:
        specs = {"anonymous": DEFAULT_TIER}
    tiers: dict[str, Tier] = {}
    for name, spec in specs.items():
        path = f"tiers.{name}"
        if not NAME_RE.match(name):
            ck.error(path, "tier names must match [A-Za-z0-9_-]+", name)
            continue
        body = ck.mapping(path, spec, {"limits": None, "unlimited": None})
        unlimited = ck.boolean(f"{path}.unlimited", body.get("unlimited", False), False)
        raw_limits = body.get("limits")
        if unlimited and raw_limits:
            ck.error(f"{path}.limits", "an unlimited tier has no limits")
        if not unlimited and (not isinstance(raw_limits, list) or not raw_limits):
            ck.error(f"{path}.limits", "must be a non-empty list of limits (or set unlimited: true)",
                     raw_limits)
            continue
        limits: list[Limit] = []
        taken: set[str] = set()
        for i, item in enumerate(raw_limits or []):
            limit = _limit(ck, f"{path}.limits[{i}]", item, name, taken)
            if limit is not None:
                limits.append(limit)
        header = ", ".join(policy_item(limit) for limit in limits)
        tiers[name] = Tier(name=name, limits=tuple(limits), unlimited=unlimited, policy_header=header,
                           capacity_texts=tuple(str(limit.algorithm.capacity) for limit in limits))
    if "anonymous" not in specs and not require_key:
        ck.error("tiers.anonymous", "is required unless clients.require_key is true")
    return tiers


def _api_keys(ck: _Checker, raw: Any, tiers: Mapping[str, Tier], known: Mapping[str, Any]) -> dict[str, ApiKey]:
    entries = ck.mapping("api_keys", raw, None)
    keys: dict[str, ApiKey] = {}
    names: set[str] = set()
    for index, (key, spec) in enumerate(entries.items()):
        body = spec if isinstance(spec, dict) else {}
        name = body.get("name")
        named = isinstance(name, str) and name and not CONTROL_RE.search(name)
        path = f"api_keys.{name}" if named else f"api_keys[{index}]"
        body = ck.mapping(path, spec, {"tier": None, "name": None})
        if not isinstance(name, str) or not name or any(c in name for c in "\r\n\t"):
            ck.error(f"{path}.name", "is required: a non-empty single-line string naming the key",
                     name if "name" in body else _MISSING)
        elif name in names:
            ck.error(f"{path}.name", "must be unique among api_keys", name)
        else:
            names.add(name)
        tier = body.get("tier")
        if not isinstance(tier, str) or (tier not in tiers and tier not in known):
            ck.error(f"{path}.tier", "must name a tier in tiers (" + ", ".join(sorted(known)) + ")",
                     tier if "tier" in body else None)
        if not key:
            ck.error(path, "the API key must not be empty")
            continue
        if key.lower().startswith("sha256:"):
            hexpart = key[len("sha256:"):]
            if not HEX64_RE.match(hexpart):
                ck.error(f"{path}", "a sha256: key must be followed by 64 hex digits")
                continue
            digest = hexpart.lower()
        else:
            digest = hash_key(key)
        if digest in keys:
            ck.error(path, f"the same key is already configured for {keys[digest].name}")
            continue
        if isinstance(name, str) and isinstance(tier, str):
            keys[digest] = ApiKey(name=name, tier=tier, digest=digest)
    return keys


def hash_key(key: str) -> str:
    """SHA-256 hex of an API key: how keys are found, stored and keyed, never raw."""
    return hashlib.sha256(key.encode()).hexdigest()


def _routes(ck: _Checker, raw: Any, tiers: Mapping[str, Tier]) -> tuple[Route, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        ck.error("routes", "must be a list of routes", raw)
        return ()
    routes = []
    for i, spec in enumerate(raw):
        path = f"routes[{i}]"
        body = ck.mapping(path, spec, {"path": None, "methods": None, "exempt": None, "cost": None})
        prefix = body.get("path")
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            ck.error(f"{path}.path", "is required: a path prefix starting with /",
                     prefix if "path" in body else _MISSING)
            continue
        methods = body.get("methods")
        if methods is not None:
            if not isinstance(methods, list) or not methods or not all(
                isinstance(m, str) and HEADER_NAME_RE.match(m) for m in methods
            ):
                ck.error(f"{path}.methods", "must be a non-empty list of HTTP methods", methods)
                methods = None
            else:
                methods = frozenset(m.upper() for m in methods)
        exempt = ck.boolean(f"{path}.exempt", body.get("exempt", False), False)
        cost = ck.number(f"{path}.cost", body.get("cost", 1), 1, minimum=1, exclusive=False, integer=True)
        if "cost" in body and cost > 1:
            for tier in tiers.values():
                for limit in tier.limits:
                    if cost > limit.algorithm.capacity:
                        ck.error(f"{path}.cost", f"exceeds the capacity {limit.algorithm.capacity} of "
                                 f"tiers.{tier.name} limit {show(limit.name)}: such requests could never pass",
                                 cost)
        routes.append(Route(path=prefix, methods=methods, exempt=exempt, cost=cost))
    return tuple(routes)


TOP_KEYS: Final = ("server", "admin", "upstream", "storage", "clients", "log", "tiers", "api_keys", "routes")


def build(tree: Any, path: str | None = None, *, errors: list[str] | None = None) -> Config:
    """Validate a parsed YAML tree; raise ConfigError listing every problem."""
    ck = _Checker()
    ck.errors.extend(errors or ())
    raw = ck.mapping("", tree, dict.fromkeys(TOP_KEYS)) if tree is not None else {}
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(["the file must hold a mapping of sections, got " + show(tree)])
    sections = _read_sections(ck, raw)
    require_key = sections["clients"].require_key
    tiers = _tiers(ck, raw.get("tiers"), require_key)
    known = raw.get("tiers") if isinstance(raw.get("tiers"), dict) else {"anonymous": None}
    api_keys = _api_keys(ck, raw.get("api_keys"), tiers, known or {})
    routes = _routes(ck, raw.get("routes"), tiers)
    if ck.errors:
        raise ConfigError(ck.errors)
    return Config(tiers=tiers, api_keys=api_keys, routes=routes, path=path, **sections)


def load(path: str | Path) -> Config:
    """Read, parse and validate a config file; ConfigError says why it cannot be used."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}"]) from None
    return from_text(text, str(Path(path).resolve()))


def from_text(text: str, path: str | None = None) -> Config:
    """Parse and validate YAML text (what `load` and the tests use)."""
    tree, duplicates = parse_yaml(text)
    return build(tree, path, errors=duplicates)
