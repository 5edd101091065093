"""What a limit counts (`per`): a request's subject for each of its limits.

A selector names one value of the request: `client` (its identity: key
digest, JWT subject or address), `address` (the client address even for
keyed clients), `global` (one state for everyone), `method`, `route` (the
matched route's path), `header:<Name>`, `query:<name>`, `cookie:<name>`,
`claim:<name>`. A list of selectors combines their values.

Only `client` alone passes its identity through as is (it never holds a raw
key, and keeping it keeps every state across the upgrade to `per`); any
other subject is a SHA-256 of the values, so a header, a query parameter or
a cookie never reaches storage raw. A missing value is one fixed marker: the
requests that lack it share one state, so leaving a header out never
escapes a limit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qsl

if TYPE_CHECKING:
    from aiohttp import web

    from .config import LimitSet
    from .limits.store import Limit

PLAIN: Final = ("client", "address", "global", "method", "route")
NAMED: Final = ("header", "query", "cookie", "claim")
MISSING: Final = "\x00"  # no header, query or cookie value can hold a NUL
CLIENT: Final = ("client",)
GLOBAL: Final = ("global",)
GLOBAL_SUBJECT: Final = "global"


def parse(value: object) -> tuple[tuple[str, ...] | None, str | None]:
    """`per` as written (a string or a list of them) -> (selectors, None) or (None, why)."""
    items = value if isinstance(value, list) else [value]
    if not items:
        return None, "must be a selector or a non-empty list of selectors"
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            return None, "selectors are strings"
        kind, colon, name = item.partition(":")
        if not colon and kind in PLAIN:
            out.append(kind)
        elif colon and kind in NAMED and name and name.isprintable() and " " not in name:
            out.append(f"header:{name.lower()}" if kind == "header" else item)
        else:
            return None, ("must be one of client, address, global, method, route, header:<Name>, "
                          "query:<name>, cookie:<name>, claim:<name>, or a list of them")
    if len(set(out)) != len(out):
        return None, "names the same selector twice"
    return tuple(out), None


class Facts:
    """The values selectors read, computed only when a selector asks."""

    __slots__ = ("_address", "_cookies", "_query", "claims", "identity", "request", "route")

    def __init__(self, request: web.BaseRequest, identity: str, route: str, address: str | Callable[[], str],
                 claims: Mapping[str, object] | None = None) -> None:
        self.request = request
        self.identity = identity
        self.route = route
        self._address = address  # a callable is asked once, when an `address` selector needs it
        self.claims = claims or {}
        self._query: dict[str, str] | None = None
        self._cookies: dict[str, str] | None = None

    @property
    def address(self) -> str:
        """The client address (proxy.identity's trusted-proxy walk), worked out on first use."""
        if callable(self._address):
            self._address = self._address()
        return self._address

    def value(self, selector: str) -> str:
        if selector == "client":
            return self.identity
        if selector == "address":
            return self.address
        if selector == "global":
            return GLOBAL_SUBJECT
        if selector == "method":
            return self.request.method
        if selector == "route":
            return self.route
        kind, _, name = selector.partition(":")
        if kind == "header":
            values = self.request.headers.getall(name, ())
            return ",".join(values) if values else MISSING
        if kind == "query":
            return self._queries().get(name, MISSING)
        if kind == "cookie":
            return self._cookie_jar().get(name, MISSING)
        claim = self.claims.get(name)
        return MISSING if claim is None else str(claim)

    def _queries(self) -> dict[str, str]:
        if self._query is None:
            query = self.request.raw_path.partition("?")[2]
            self._query = {}
            for key, val in parse_qsl(query, keep_blank_values=True):
                self._query.setdefault(key, val)  # the first wins, as most frameworks read it
        return self._query

    def _cookie_jar(self) -> dict[str, str]:
        if self._cookies is None:
            jar: SimpleCookie = SimpleCookie()
            for header in self.request.headers.getall("Cookie", ()):
                try:
                    jar.load(header)
                except CookieError:
                    continue  # a malformed Cookie header holds no value: the shared state
            self._cookies = {name: morsel.value for name, morsel in jar.items()}
        return self._cookies


def subject(per: tuple[str, ...], facts: Facts) -> str:
    """The state a request counts against in a limit with this `per`."""
    if per == CLIENT:
        return facts.identity
    if per == GLOBAL:
        return GLOBAL_SUBJECT
    return hashed([facts.value(selector) for selector in per])


def hashed(values: Sequence[str]) -> str:
    """The subject of these selector values: only their hash reaches storage."""
    joined = "\x1f".join(values)
    return "s:" + hashlib.sha256(joined.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def subjects(limits: Sequence[Limit], facts: Facts) -> tuple[str, ...]:
    """Each limit's subject, in order."""
    return tuple(subject(limit.per, facts) for limit in limits)


def subjects_of(limit_set: LimitSet, identity: str, facts: Callable[[], Facts]) -> tuple[str, ...]:
    """A request's subjects; `facts` is called only when some limit counts more than the client."""
    if limit_set.per_client:  # the common case: every limit counts the client
        n = len(limit_set.limits)
        return (identity,) if n == 1 else (identity,) * n
    return subjects(limit_set.limits, facts())
