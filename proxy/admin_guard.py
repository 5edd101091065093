"""The admin port refuses cross-site and DNS-rebinding requests, with or without a token.

Without `admin.token` (the default) any page a browser opens could POST to
`http://127.0.0.1:8081/api/reload` (a "simple" cross-site request needs no
CORS preflight), and a page on a name that its owner re-points at 127.0.0.1
(DNS rebinding) could even read the answers. Two checks close both:

- Host (421 `misdirected_request`): the host part of `Host` must be the
  address the connection arrived at (so a listener on 0.0.0.0 answers to
  each of its interface addresses, e.g. a Kubernetes probe's pod IP),
  `localhost`, `admin.host`, or a name in `admin.allowed_hosts`. A rebinding
  page's Host is the attacker's name, never one of these. The port is not
  compared: port forwarding (`kubectl port-forward 9999:8081`) and reverse
  proxies change it, and it adds nothing against rebinding. /healthz and
  /readyz are not checked: they change nothing and reveal little, and probes
  name hosts in many ways. A request without Host (no browser sends one) passes.
- Origin (403 `cross_origin`): a request with any method but GET and HEAD
  whose `Origin` is present must be the admin port's own origin: `http` or
  `https` (behind a TLS proxy) and the same host and port as its `Host`,
  default ports dropped. `Origin: null` is not. Without Origin (curl,
  scripts) it passes; `Sec-Fetch-Site: cross-site` or `same-site` (another
  port of the same host) is refused too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .config import AdminConfig
from .problems import problem
from .runtime import RUNTIME

SAFE_METHODS: Final = frozenset({"GET", "HEAD"})
FOREIGN_FETCH: Final = frozenset({"cross-site", "same-site"})
DEFAULT_PORTS: Final = {"http": ":80", "https": ":443"}
WILDCARDS: Final = frozenset({"", "0.0.0.0", "::"})


def host_name(host: str) -> str:
    """The host part of a Host value, lower-cased: `[::1]:8081` -> `::1`, `Localhost:80` -> `localhost`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.partition("%")[0])  # drop an IPv6 zone
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped  # a dual-stack listener sees ::ffff:127.0.0.1
    return address


def host_allowed(host: str | None, local: str | None, admin: AdminConfig) -> bool:
    """May a request with this Host, arrived at `local` (the listener's address), be answered?"""
    if host is None:
        return True
    name = host_name(host)
    if name == "localhost" or name in admin.allowed_hosts:
        return True
    if name == admin.host.lower() and name not in WILDCARDS:
        return True
    address = _address(name)
    return address is not None and local is not None and address == _address(local)


def own_origin(origin: str, host: str | None) -> bool:
    """Is `origin` the admin port's own, as reached through `host`?"""
    scheme, sep, authority = origin.strip().lower().partition("://")
    default = DEFAULT_PORTS.get(scheme)
    if not sep or default is None or host is None:
        return False  # `null`, another scheme, or no Host to compare with

    def plain(value: str) -> str:
        return value.strip().lower().removesuffix(default)

    return plain(authority) == plain(host)


def _local_address(request: web.Request) -> str | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    return sockname[0] if isinstance(sockname, tuple) else None


def refuse_foreign(open_paths: Collection[str]) -> Middleware:
    """The middleware: 421 for a foreign Host (except on `open_paths`), 403 for a foreign Origin."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        admin = request.app[RUNTIME].config.admin
        host = request.headers.get("Host")
        if request.path not in open_paths and not host_allowed(host, _local_address(request), admin):
            return problem(421, "misdirected_request", f"The admin port does not answer to Host {host!r}; "
                           "name it in admin.allowed_hosts if it is yours.")
        if request.method not in SAFE_METHODS:
            origin = request.headers.get("Origin")
            if (origin is not None and not own_origin(origin, host)) or \
                    request.headers.get("Sec-Fetch-Site") in FOREIGN_FETCH:
                return problem(403, "cross_origin", "The admin port refuses state-changing requests "
                               "from other sites.")
        return await handler(request)

    return middleware
