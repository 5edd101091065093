"""Who is asking: request -> Client (API key name, JWT subject or address, and its tier).

The trusted-proxy walk follows aiohttp-remotes' XForwardedStrict: the
X-Forwarded-For header is believed only when the peer itself is a trusted
proxy, and then only up to the rightmost address that is not one.
"""

from __future__ import annotations

import ipaddress
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, Generic, NamedTuple, TypeVar

from multidict import CIMultiDictProxy

from .bounded import keep
from .config import ApiKey, Config, JwtConfig, Network, Tier, hash_key
from .limits.algorithms import new_tuple
from .tokens import LEEWAY, NO_CLAIMS, bearer, subject_identity, tier_name, verify

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_PEER_CLIENTS: Final = 4096
MAX_TOKEN_CLIENTS: Final = 4096


class Client(NamedTuple):
    """A resolved client. `identity` keys its limit state and never holds a raw key.

    A NamedTuple: one is made per request, and a tuple builds several times
    faster than a frozen dataclass.
    """

    id: str  # key name, "jwt:<subject>", or address (IPv6: its prefix network's address)
    tier: Tier
    identity: str
    claims: Mapping[str, Any] = NO_CLAIMS  # a verified JWT's claims (read-only), for `claim:<name>` selectors


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request cannot be attributed: answered with 401."""

    error: str
    message: str
    challenge: str | None = None  # the WWW-Authenticate value, for a refused Bearer token


INVALID_TOKEN: Final = Rejection(
    "invalid_token", "The bearer token is not valid.", 'Bearer error="invalid_token"')


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


def request_address(config: Config, headers: CIMultiDictProxy[str], peer: str | None) -> str:
    """The client address of a request (for `per: address`), whoever the client is."""
    clients = config.clients
    address = client_address(peer or "", headers.getall("X-Forwarded-For", ()), clients.trusted_proxies)
    return address_id(address, clients.ipv6_prefix) if address is not None else (peer or "unknown")


def key_identity(entry: ApiKey) -> str:
    """The limit-state key of an API key's client: from its digest, never the key."""
    return "k:" + entry.digest[:32]


def address_identity(client_id: str) -> str:
    """The limit-state key of an anonymous client, from its id (address or prefix)."""
    return "a:" + client_id


def find_client(config: Config, client_id: str, *, seen_tier: str | None = None) -> tuple[str, str] | None:
    """A client id as the admin API names it -> (tier name, identity), or None.

    The id is a key's `name`, `jwt:<subject>`, or an address (an IPv6 one maps
    to its prefix). A JWT client's tier is in its token, which is never kept:
    `seen_tier` (the one its last request had) or else default_tier.
    """
    entry = config.key_by_name(client_id)
    if entry is not None:
        return entry.tier, key_identity(entry)
    settings = config.clients.jwt
    if settings is not None and client_id.startswith("jwt:") and len(client_id) > 4:
        tier = seen_tier if seen_tier is not None and seen_tier in config.tiers else settings.default_tier
        return tier, subject_identity(client_id[4:])
    address = _parse(client_id)
    if "anonymous" not in config.tiers or address is None:
        return None
    return network_tier(config, address), address_identity(address_id(address, config.clients.ipv6_prefix))


def network_tier(config: Config, address: IPAddress | None) -> str:
    """An anonymous client's tier: that of the first clients.networks entry holding its address."""
    if address is not None:
        for net, tier in config.clients.networks:
            if address in net:
                return tier
    return "anonymous"


def denied(config: Config, headers: CIMultiDictProxy[str], peer: str | None) -> str | None:
    """The client's address (after the trusted-proxy walk) if clients.deny holds it, else None."""
    clients = config.clients
    address = client_address(peer or "", headers.getall("X-Forwarded-For", ()), clients.trusted_proxies)
    return str(address) if address is not None and any(address in net for net in clients.deny) else None


def visible_ascii(text: str) -> bool:
    """Only visible ASCII (0x21-0x7E), what a key, token or cookie may hold.

    aiohttp decodes header bytes as UTF-8 with surrogateescape, so a raw
    latin-1 byte arrives as a lone surrogate that no encoder takes; such
    input is refused before anything hashes it. `isascii` is O(1).
    """
    return text.isascii() and text.isprintable() and " " not in text


def resolve(config: Config, headers: CIMultiDictProxy[str], peer: str | None, *,
            clock: Callable[[], float] = time.time) -> Client | Rejection:
    """Map a request to a Client of the config in force, or say why not.

    An API key wins over a Bearer token; a token is looked at only when clients.jwt is set.
    """
    clients = config.clients
    key = headers.get(clients.api_key_header)
    if key:
        if not visible_ascii(key):  # never a configured key, and a 401 even under unknown_key: anonymous
            return Rejection("invalid_api_key", f"The {clients.api_key_header} header holds bytes outside "
                             "visible ASCII.")
        entry = config.api_keys.get(hash_key(key))
        if entry is not None:
            return Client(entry.name, config.tiers[entry.tier], key_identity(entry))
        if clients.unknown_key == "reject":
            return Rejection("invalid_api_key", f"The {clients.api_key_header} header holds an unknown API key.")
    if clients.jwt is not None:
        token = bearer(headers.get("Authorization", ""))
        if token is not None:
            return _token_client(config, clients.jwt, token, clock())
    if config.anonymous_by_peer and peer is not None and ":" not in peer:
        # The common case: an IPv4 peer is the client. Its Client is kept:
        # building one was almost half of resolving (4.4k -> 2.4k instructions).
        client = _peer_clients.of(config).get(peer)
        return client if client is not None else _remember(config, peer)
    if clients.require_key and not key:
        return Rejection("missing_api_key", f"An API key is required in the {clients.api_key_header} header.")
    if "anonymous" not in config.tiers:  # unknown_key: anonymous, but no anonymous tier
        return Rejection("invalid_api_key", f"The {clients.api_key_header} header holds an unknown API key.")
    address = client_address(peer or "", headers.getall("X-Forwarded-For", ()), clients.trusted_proxies)
    ip = address_id(address, clients.ipv6_prefix) if address is not None else (peer or "unknown")
    tier = config.tiers[network_tier(config, address)] if clients.networks else config.tiers["anonymous"]
    return new_tuple(Client, (ip, tier, address_identity(ip), NO_CLAIMS))  # see Outcome on new_tuple


def _token_client(config: Config, settings: JwtConfig, token: str, now: float) -> Client | Rejection:
    """A Bearer token's client, or the one answer every bad token gets (nothing that helps forge one).

    A verified token's Client is kept (per config, so a reload's new keys
    apply at once) until its exp + LEEWAY: a client sends the same token for
    minutes, and verifying it again cost 30-90 µs a request (bench/jwt_verify.py).
    """
    cache = _token_clients.of(config)
    hit = cache.get(token)
    if hit is not None and now < hit[1]:
        return hit[0]
    claims = verify(settings, token, now) if visible_ascii(token) else None
    if claims is None:
        return INVALID_TOKEN
    subject: str = claims[settings.subject_claim]
    tier = config.tiers[tier_name(settings, claims, config.tiers)]
    client = Client("jwt:" + subject, tier, subject_identity(subject), claims)
    keep(cache, token, (client, claims["exp"] + LEEWAY), MAX_TOKEN_CLIENTS)
    return client


V = TypeVar("V")


class PerConfig(Generic[V]):
    """Caches of values derived from one Config, kept here rather than in the frozen
    Config, and dropped with it (a reload starts afresh)."""

    def __init__(self) -> None:
        self._caches: dict[int, dict[str, V]] = {}

    def of(self, config: Config) -> dict[str, V]:
        cache = self._caches.get(id(config))
        if cache is None:
            cache = self._caches[id(config)] = {}
            weakref.finalize(config, self._caches.pop, id(config), None)
        return cache

    def __contains__(self, config_id: int) -> bool:
        return config_id in self._caches


_peer_clients: PerConfig[Client] = PerConfig()  # anonymous clients by IPv4 peer address
_token_clients: PerConfig[tuple[Client, float]] = PerConfig()  # verified tokens' clients, and until when


def peer_clients(config: Config) -> dict[str, Client]:
    """The anonymous clients of `config` resolved so far, by IPv4 peer address."""
    return _peer_clients.of(config)


def _remember(config: Config, peer: str) -> Client:
    tier = network_tier(config, _parse(peer)) if config.clients.networks else "anonymous"
    client = Client(peer, config.tiers[tier], address_identity(peer))
    kept: Client = keep(_peer_clients.of(config), peer, client, MAX_PEER_CLIENTS)
    return kept
