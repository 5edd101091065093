"""Who is asking: request -> Client (API key name or address, and its tier).

The trusted-proxy walk follows aiohttp-remotes' XForwardedStrict: the
X-Forwarded-For header is believed only when the peer itself is a trusted
proxy, and then only up to the rightmost address that is not one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from multidict import CIMultiDictProxy

from .config import Config, Network, Tier, hash_key

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Client:
    """A resolved client. `identity` keys its limit state and never holds a raw key."""

    id: str  # key name, or address (IPv6: its prefix network's address)
    tier: Tier
    identity: str
    keyed: bool


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request cannot be attributed: answered with 401."""

    error: str
    message: str


def _parse(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, trusted: Sequence[Network]) -> bool:
    return any(address in net for net in trusted)


def client_address(peer: str, forwarded_for: Iterable[str], trusted: Sequence[Network]) -> IPAddress | None:
    """The client's address: the peer's, or behind trusted proxies the rightmost
    X-Forwarded-For entry that is not itself a trusted proxy."""
    address = _parse(peer)
    if address is None or not trusted or not _trusted(address, trusted):
        return address
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        candidate = _parse(hop)
        if candidate is None:
            break  # garbage in the chain: believe nothing left of it
        address = candidate
        if not _trusted(candidate, trusted):
            break
    return address


@lru_cache(maxsize=4096)
def address_id(address: IPAddress, ipv6_prefix: int) -> str:
    """An anonymous client's id: the IPv4 address, or the IPv6 prefix network."""
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False).network_address)
    return str(address)


def resolve(config: Config, headers: CIMultiDictProxy[str], peer: str | None) -> Client | Rejection:
    """Map a request to a Client of the config in force, or say why not."""
    clients = config.clients
    key = headers.get(clients.api_key_header)
    if key:
        entry = config.api_keys.get(hash_key(key))
        if entry is not None:
            return Client(entry.name, config.tiers[entry.tier], "k:" + entry.digest[:32], True)
        if clients.unknown_key == "reject":
            return Rejection("invalid_api_key", f"The {clients.api_key_header} header holds an unknown API key.")
    if clients.require_key and not key:
        return Rejection("missing_api_key", f"An API key is required in the {clients.api_key_header} header.")
    if "anonymous" not in config.tiers:  # unknown_key: anonymous, but no anonymous tier
        return Rejection("invalid_api_key", f"The {clients.api_key_header} header holds an unknown API key.")
    if peer is not None and not clients.trusted_proxies and ":" not in peer:
        ip = peer  # the common case, without parsing
    else:
        address = client_address(peer or "", headers.getall("X-Forwarded-For", ()), clients.trusted_proxies)
        ip = address_id(address, clients.ipv6_prefix) if address is not None else (peer or "unknown")
    return Client(ip, config.tiers["anonymous"], "a:" + ip, False)
