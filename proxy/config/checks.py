"""Reading YAML values with every error collected, each naming its key path and the value read."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from ..limits.algorithms import Param
from ..masking import mask_url
from .model import Network

CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")


HOST_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?\Z")  # a DNS name or IPv4 address


T = TypeVar("T")


MISSING: Final = object()


def show(value: Any) -> str:
    """A value as read, for error lines: strings quoted, booleans as YAML writes them."""
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return repr(value)


class Checker:
    """Collects errors while reading one section; never stops at the first."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, path: str, message: str, value: Any = MISSING) -> None:
        got = "" if value is MISSING else f", got {show(value)}"
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


def read_section(ck: Checker, raw: dict[str, Any], name: str, cls: type[T],
             readers: Mapping[str, Callable[[str, Any, Any], Any]]) -> T:
    """Read one flat section: each key through its reader, defaults for the rest."""
    values = ck.mapping(name, raw.get(name), readers)
    defaults = cls()
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = readers[key](f"{name}.{key}", value, getattr(defaults, key))
    return cls(**kwargs)


def read_host(ck: Checker) -> Callable[[str, Any, Any], Any]:
    return lambda p, v, d: ck.string(p, v, d, what="a host name or address")


def read_positive(ck: Checker, **kw: Any) -> Callable[[str, Any, Any], Any]:
    return lambda p, v, d: ck.number(p, v, d, **kw)


def read_url(ck: Checker, path: str, value: Any, default: str, schemes: tuple[str, ...]) -> str:
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


def read_networks(ck: Checker, path: str, value: Any) -> tuple[Network, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        ck.error(path, "must be a list of CIDRs", value)
        return ()
    nets = (read_network(ck, f"{path}[{i}]", item) for i, item in enumerate(value))
    return tuple(net for net in list(nets) if net is not None)


def read_network(ck: Checker, path: str, value: Any) -> Network | None:
    """One CIDR (or a bare address: its /32 or /128)."""
    try:
        if not isinstance(value, str):
            raise ValueError
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        ck.error(path, "must be an IP address or CIDR like 10.0.0.0/8", value)
        return None


def read_host_names(ck: Checker, path: str, value: Any) -> tuple[str, ...]:
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


def read_prefix_length(ck: Checker, path: str, value: Any, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 128:
        ck.error(path, "must be an integer 1-128", value)
        return default
    return value
