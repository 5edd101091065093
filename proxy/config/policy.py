"""Who gets which limits: tiers and their limits, API keys, routes."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any, Final

from ..limits.algorithms import ALGORITHMS, Algorithm, Concurrency
from ..limits.store import Limit
from ..routes import Route
from ..selectors import CLIENT
from ..selectors import parse as parse_selectors
from .checks import CONTROL_RE, MISSING, Checker, show
from .model import ApiKey, Tier
from .penalty import read_penalty
from .sections import HEADER_NAME_RE

NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]+\Z")


HEX64_RE: Final = re.compile(r"[0-9a-fA-F]{64}\Z")


DEFAULT_TIER: Final = {"limits": [{"algorithm": "token_bucket", "capacity": 100, "refill_rate": 10}]}


PARAM_MAX: Final = 1e9  # capacities, rates and windows beyond this are typos, and overflow w


PARAM_MIN_FRACTION: Final = 1e-6


LIMIT_OPTIONS: Final = ("name", "algorithm", "per", "shadow")
MESSAGE_ALGORITHMS: Final = ("token_bucket", "sliding_window", "fixed_window")


def _limit(ck: Checker, path: str, raw: Any, owner: str, taken: set[str], *, lease: float,
           algorithms: tuple[str, ...] = tuple(ALGORITHMS), what: str = "this tier") -> Limit | None:
    """One limit: its algorithm's parameters, plus `name`, `per`, `shadow` and
    (concurrency) `lease`; its state key under `owner`."""
    spec = ck.mapping(path, raw, None)
    if not spec:
        if raw is None or raw == {}:
            ck.error(path, "must be a mapping with an algorithm and its parameters", raw)
        return None
    algo_name = spec.get("algorithm", "token_bucket")
    cls = ALGORITHMS.get(algo_name) if isinstance(algo_name, str) and algo_name in algorithms else None
    if cls is None:
        ck.error(f"{path}.algorithm", "must be one of " + ", ".join(algorithms), algo_name)
        return None
    known = (*LIMIT_OPTIONS, *cls.PARAMS, *(("lease",) if cls is Concurrency else ()))
    for key in spec:
        if key not in known:
            ck.error(f"{path}.{key}", f"unknown key for {cls.name} (known: " + ", ".join(known) + ")")
    params = _params(ck, path, spec, cls)
    name = _limit_name(ck, path, spec.get("name"), cls.name, taken, what)
    per, why = parse_selectors(spec.get("per", "client"))
    if why is not None:
        ck.error(f"{path}.per", why, spec.get("per"))
    shadow = ck.boolean(f"{path}.shadow", spec.get("shadow", False), False)
    if "lease" in spec:
        lease = ck.number(f"{path}.lease", spec["lease"], lease)
    if params is None or name is None or per is None:
        return None
    algorithm: Algorithm = cls(**params)
    identity: tuple[Any, ...] = (cls.short, algorithm.params())
    if per != CLIENT:  # the default keeps the key it had before `per` existed, and so every state
        identity = (*identity, per)
    digest = hashlib.sha256(repr(identity).encode()).hexdigest()[:8]
    return Limit(name=name, algorithm=algorithm, key=f"{owner}.{name}.{cls.short}{digest}", per=per,
                 shadow=shadow, lease=lease if cls is Concurrency else None)


def _params(ck: Checker, path: str, spec: Mapping[str, Any], cls: type[Algorithm]) -> dict[str, Any] | None:
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
    return params if ok else None


def _limit_name(ck: Checker, path: str, name: Any, default: str, taken: set[str], what: str) -> str | None:
    if name is None:
        name, n = default, 2
        while name in taken:
            name, n = f"{default}-{n}", n + 1
    elif not isinstance(name, str) or not NAME_RE.match(name):
        ck.error(f"{path}.name", "must match [A-Za-z0-9_-]+", name)
        return None
    elif name in taken:
        ck.error(f"{path}.name", f"is already used by another limit of {what}", name)
        return None
    taken.add(name)
    return str(name)


def read_tiers(ck: Checker, raw: Any, require_key: bool, *, lease: float) -> dict[str, Tier]:
    """The tiers; `lease` is a concurrency slot's default lease (upstream.timeout + 5)."""
    specs = ck.mapping("tiers", raw, None)
    if raw is None:
        specs = {"anonymous": DEFAULT_TIER}
    tiers: dict[str, Tier] = {}
    for name, spec in specs.items():
        path = f"tiers.{name}"
        if not NAME_RE.match(name):
            ck.error(path, "tier names must match [A-Za-z0-9_-]+", name)
            continue
        body = ck.mapping(path, spec, {"limits": None, "unlimited": None, "penalty": None})
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
            limit = _limit(ck, f"{path}.limits[{i}]", item, name, taken, lease=lease)
            if limit is not None:
                limits.append(limit)
        penalty = read_penalty(ck, f"{path}.penalty", body.get("penalty"), name, unlimited=unlimited)
        tiers[name] = Tier(name=name, limits=tuple(limits), unlimited=unlimited, penalty=penalty)
    if "anonymous" not in specs and not require_key:
        ck.error("tiers.anonymous", "is required unless clients.require_key is true")
    return tiers


def read_api_keys(ck: Checker, raw: Any, tiers: Mapping[str, Tier], known: Mapping[str, Any]) -> dict[str, ApiKey]:
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
                     name if "name" in body else MISSING)
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


def read_routes(ck: Checker, raw: Any, tiers: Mapping[str, Tier], *, lease: float) -> tuple[Route, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        ck.error("routes", "must be a list of routes", raw)
        return ()
    routes = []
    for i, spec in enumerate(raw):
        path = f"routes[{i}]"
        body = ck.mapping(path, spec, dict.fromkeys(("path", "methods", "exempt", "cost", "limits", "messages")))
        prefix = body.get("path")
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            ck.error(f"{path}.path", "is required: a path prefix starting with /",
                     prefix if "path" in body else MISSING)
            continue
        methods = _methods(ck, f"{path}.methods", body.get("methods"))
        exempt = ck.boolean(f"{path}.exempt", body.get("exempt", False), False)
        cost = ck.number(f"{path}.cost", body.get("cost", 1), 1, minimum=1, exclusive=False, integer=True)
        owner = "route-" + hashlib.sha256(repr((prefix, sorted(methods or ()))).encode()).hexdigest()[:8]
        limits = _route_limits(ck, f"{path}.limits", body.get("limits"), owner, tiers, exempt=exempt, lease=lease)
        messages = _route_limits(ck, f"{path}.messages", body.get("messages"), owner + "-ws", {},
                                 exempt=exempt, lease=lease, algorithms=MESSAGE_ALGORITHMS)
        if "cost" in body and cost > 1:
            _check_cost(ck, f"{path}.cost", cost, tiers, limits)
        routes.append(Route(path=prefix, methods=methods, exempt=exempt, cost=cost, limits=limits,
                            messages=messages, index=i))
    return tuple(routes)


def _methods(ck: Checker, path: str, methods: Any) -> frozenset[str] | None:
    if methods is None:
        return None
    if not isinstance(methods, list) or not methods or not all(
        isinstance(m, str) and HEADER_NAME_RE.match(m) for m in methods
    ):
        ck.error(path, "must be a non-empty list of HTTP methods", methods)
        return None
    return frozenset(m.upper() for m in methods)


def _route_limits(ck: Checker, path: str, raw: Any, owner: str, tiers: Mapping[str, Tier], *,
                  exempt: bool, lease: float, algorithms: tuple[str, ...] = tuple(ALGORITHMS)) -> tuple[Limit, ...]:
    """A route's limits (or its WebSocket message limits). Their names may not
    repeat a tier's: one request's RateLimit header names each limit once."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        ck.error(path, "must be a non-empty list of limits", raw)
        return ()
    if exempt:
        ck.error(path, "an exempt route is never limited")
        return ()
    tier_names = {limit.name: tier.name for tier in tiers.values() for limit in tier.limits}
    taken: set[str] = set()
    limits = []
    for i, item in enumerate(raw):
        limit = _limit(ck, f"{path}[{i}]", item, owner, taken, lease=lease, algorithms=algorithms,
                       what="this route")
        if limit is None:
            continue
        if limit.name in tier_names:
            ck.error(f"{path}[{i}].name", f"is already the name of a limit of tiers.{tier_names[limit.name]}; "
                     "name the route's limit apart", limit.name)
            continue
        limits.append(limit)
    return tuple(limits)


def _check_cost(ck: Checker, path: str, cost: int, tiers: Mapping[str, Tier], limits: tuple[Limit, ...]) -> None:
    """A cost no limit could ever grant is a typo, not a policy."""
    owned = [(f"tiers.{tier.name}", limit) for tier in tiers.values() for limit in tier.limits]
    owned += [("this route", limit) for limit in limits]
    for owner, limit in owned:
        if not limit.concurrent and cost > limit.algorithm.capacity:
            ck.error(path, f"exceeds the capacity {limit.algorithm.capacity} of "
                     f"{owner} limit {show(limit.name)}: such requests could never pass", cost)
