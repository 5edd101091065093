"""proxy.identity.resolve directly: the cache of anonymous clients by peer.

Over HTTP, identity is tested in test_limiting.py (keys, addresses, trusted
proxies, IPv6 prefixes); here, that the per-config cache of IPv4 peers gives
exactly what resolving afresh would, stays bounded, and dies with its config;
clients.deny and clients.networks over HTTP behind trusted proxies (upstream_mock);
and, over sockets, that a malformed key is a 401, never a 500.
"""

from __future__ import annotations

import gc
import json

import pytest
from harness import running
from multidict import CIMultiDict, CIMultiDictProxy
from recording import port_of, raw_request, recording_upstream
from test_openapi import Conformance

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


# --- clients.deny and clients.networks -----------------------------------------

CALLERS = """
upstream: {url: "{upstream}"}
clients:
  trusted_proxies: [127.0.0.1/32, 10.0.0.0/8]
  deny: [203.0.113.0/24, 2001:db8:bad::/48]
  networks:
    - {cidr: 198.51.100.0/25, tier: internal}
    - {cidr: 198.51.100.0/24, tier: partner}
tiers:
  anonymous: {limits: [{algorithm: token_bucket, capacity: 50, refill_rate: 1}]}
  partner: {limits: [{algorithm: token_bucket, capacity: 20, refill_rate: 1}]}
  internal: {unlimited: true}
api_keys: {good-key: {name: ops, tier: internal}}
routes:
  - {path: /health, exempt: true}
"""


async def test_deny_comes_first_on_the_walked_address_behind_trusted_proxies(upstream):
    async with running(CALLERS, upstream.url) as tg:
        for xff in ("203.0.113.7", "203.0.113.7, 10.0.0.1", "192.0.2.1, 203.0.113.9, 10.9.9.9", "2001:db8:bad:1::5"):
            for path, extra in (("/users", {}), ("/health", {}), ("/users", {"X-API-Key": "good-key"})):
                status, head, body = await tg.get(path, headers={"X-Forwarded-For": xff, **extra})
                assert status == 403, (xff, path, extra)
                assert head["Content-Type"].startswith("application/problem+json")
                assert json.loads(body)["error"] == "forbidden" and "RateLimit" not in head
        # the walk stops at the first untrusted hop: a denied address left of it is not the client
        assert (await tg.get("/users", headers={"X-Forwarded-For": "203.0.113.7, 192.0.2.1"}))[0] == 200
        assert (await tg.get("/health"))[0] == 200
        log = "\n".join(tg.access_lines())
        status, stats = await Conformance().call(tg, "GET", "/api/stats")  # checked against the OpenAPI document
    assert "client=203.0.113.7" in log and "decision=denied" in log
    assert status == 200 and stats["totals"]["denied"] == 12


async def test_networks_give_anonymous_clients_their_tier_first_match_wins(upstream):
    async with running(CALLERS, upstream.url) as tg:
        policies = {}
        for xff in ("198.51.100.5", "198.51.100.200", "192.0.2.1", "198.51.100.5, 10.0.0.2"):
            status, head, _ = await tg.get("/users", headers={"X-Forwarded-For": xff})
            assert status == 200
            policies[xff] = head.get("RateLimit-Policy")
    assert policies == {"198.51.100.5": None, "198.51.100.200": '"token_bucket";q=20;w=20',
                        "192.0.2.1": '"token_bucket";q=50;w=50', "198.51.100.5, 10.0.0.2": None}


def test_the_peer_fast_path_honours_networks_and_deny():
    config = from_text(TIER % 5 + "  gold: {unlimited: true}\nclients:\n  networks: [{cidr: 10.1.0.0/16, tier: gold}]\n"
                       "  deny: [10.2.0.0/16]\n")
    assert config.anonymous_by_peer  # no trusted proxies: the peer is the client
    for _ in range(2):  # resolved, then from the cache
        inside, outside = resolve(config, NO_HEADERS, "10.1.2.3"), resolve(config, NO_HEADERS, "10.3.2.1")
        assert isinstance(inside, Client) and inside.tier.name == "gold"
        assert isinstance(outside, Client) and outside.tier.name == "anonymous"
    assert identity.denied(config, NO_HEADERS, "10.2.0.9") == "10.2.0.9"
    assert identity.denied(config, NO_HEADERS, "10.1.2.3") is None


def test_the_peer_cache_lives_outside_the_config_and_dies_with_it():
    config = from_text(TIER % 5)
    resolve(config, NO_HEADERS, "10.0.0.7")
    key = id(config)
    assert key in identity._peer_clients
    del config
    gc.collect()
    assert key not in identity._peer_clients
