"""proxy.identity.resolve directly: the cache of anonymous clients by peer.

Over HTTP, identity is tested in test_limiting.py (keys, addresses, trusted
proxies, IPv6 prefixes); here, that the per-config cache of IPv4 peers gives
exactly what resolving afresh would, stays bounded, and dies with its config;
and, over sockets, that a malformed key is a 401, never a 500.
"""

from __future__ import annotations

import pytest
from harness import running
from multidict import CIMultiDict, CIMultiDictProxy
from recording import port_of, raw_request, recording_upstream

from proxy import identity
from proxy.config import from_text
from proxy.identity import Client, resolve, visible_ascii

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
        assert len(identity.peer_clients(config)) <= 3


def test_a_key_or_a_trusted_proxy_bypasses_the_peer_cache():
    config = from_text(TIER % 5 + "clients: {trusted_proxies: [127.0.0.1]}\n")
    forwarded = CIMultiDictProxy(CIMultiDict({"X-Forwarded-For": "203.0.113.9"}))
    assert resolve(config, forwarded, "127.0.0.1").identity == "a:203.0.113.9"
    assert not identity.peer_clients(config)


# --- malformed identity input, over real sockets --------------------------------

KEYED = """
tiers: {anonymous: {unlimited: true}, gold: {unlimited: true}}
api_keys: {good-key: {name: one, tier: gold}}
clients: {unknown_key: %s}
upstream: {url: "{upstream}"}
"""

# raw X-API-Key value bytes: none is visible ASCII, so none can be a key
MALFORMED_KEYS = {
    "utf-8": b"caf\xc3\xa9",
    "latin-1": b"caf\xe9",
    "lone-continuation": b"\x80key",
    "inner-tab": b"good\tkey",
    "inner-space": b"good key",
    "obs-text-only": b"\xff\xfe",
}


@pytest.mark.parametrize("unknown_key", ["reject", "anonymous"])
@pytest.mark.parametrize("name", list(MALFORMED_KEYS))
async def test_a_key_outside_visible_ascii_is_401_never_500(name, unknown_key):
    async with recording_upstream() as upstream, running(KEYED % unknown_key, upstream.url) as tg:
        answer = await raw_request(port_of(tg.url), b"GET /x HTTP/1.1\r\nHost: t\r\nX-API-Key: %s\r\n"
                                   b"Connection: close\r\n\r\n" % MALFORMED_KEYS[name])
        assert answer.status == 401
        assert answer.problem()["error"] == "invalid_api_key"
        assert upstream.heads == []
        good = await raw_request(port_of(tg.url), b"GET /x HTTP/1.1\r\nHost: t\r\nX-API-Key: good-key\r\n"
                                 b"Connection: close\r\n\r\n")
        assert good.status == 200 and len(upstream.heads) == 1


def test_visible_ascii():
    assert visible_ascii("!azAZ09~")
    for text in ("a b", "a\tb", "caf\xe9", "caf\udce9", "a\x7f", "a\x00"):
        assert not visible_ascii(text), repr(text)
