"""proxy.identity.resolve directly: the cache of anonymous clients by peer.

Over HTTP, identity is tested in test_limiting.py (keys, addresses, trusted
proxies, IPv6 prefixes); here, that the per-config cache of IPv4 peers gives
exactly what resolving afresh would, stays bounded, and dies with its config.
"""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from proxy import identity
from proxy.config import from_text
from proxy.identity import Client, resolve

TIER = "tiers:\n  anonymous:\n    limits: [{algorithm: token_bucket, capacity: %d, refill_rate: 1}]\n"
NO_HEADERS = CIMultiDictProxy(CIMultiDict())


def test_a_peer_resolves_to_its_address_and_is_kept_per_config():
    config = from_text(TIER % 5)
    first = resolve(config, NO_HEADERS, "10.0.0.7")
    assert first == Client("10.0.0.7", config.tiers["anonymous"], "a:10.0.0.7")
    assert resolve(config, NO_HEADERS, "10.0.0.7") is first
    reloaded = from_text(TIER % 9)  # a reload builds a new Config: nothing carries over
    again = resolve(reloaded, NO_HEADERS, "10.0.0.7")
    assert again.tier is reloaded.tiers["anonymous"] and again.tier.limits[0].algorithm.capacity == 9


def test_the_peer_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(identity, "MAX_PEER_CLIENTS", 3)
    config = from_text(TIER % 5)
    for i in range(10):
        client = resolve(config, NO_HEADERS, f"10.0.0.{i}")
        assert (client.id, client.identity) == (f"10.0.0.{i}", f"a:10.0.0.{i}")
        assert len(config.peer_clients) <= 3


def test_a_key_or_a_trusted_proxy_bypasses_the_peer_cache():
    config = from_text(TIER % 5 + "clients: {trusted_proxies: [127.0.0.1]}\n")
    forwarded = CIMultiDictProxy(CIMultiDict({"X-Forwarded-For": "203.0.113.9"}))
    assert resolve(config, forwarded, "127.0.0.1").identity == "a:203.0.113.9"
    assert not config.peer_clients
