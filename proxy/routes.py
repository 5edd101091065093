"""Which route a request is on: prefix routes, first match wins, one regex for all."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .limits.store import Limit


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    methods: frozenset[str] | None = None
    exempt: bool = False
    cost: int = 1
    limits: tuple[Limit, ...] = ()  # applied with the tier's, all or nothing
    messages: tuple[Limit, ...] = ()  # per WebSocket message the client sends
    index: int = -1  # position in routes: Config.limit_set's key

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
