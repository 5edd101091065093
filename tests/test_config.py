"""config.yaml validation: every key's wrong value gives one exact error line.

The table below pins, for each key of SPEC's config.yaml, the line an operator
reads: the key path, what is wrong and the value as read, including the cases
that once crashed the loader or leaked a secret (a bad port in a redis URL, an
unhashable tier, an overflowing parameter, a duplicated API key). The rest checks what a valid file
means (defaults, tiers, key hashes, policy headers, limit identity) and what
`run.py --check` prints and returns, run as the operator runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy import config
from proxy.config import (
    AdminConfig,
    ClientsConfig,
    Config,
    ConfigError,
    ServerConfig,
    StorageConfig,
    UpstreamConfig,
    hash_key,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET = "super-secret-key-123"
TOP_KNOWN = "admin, api_keys, clients, log, routes, server, storage, tiers, upstream, whatif"
ALGOS = "token_bucket, sliding_window, fixed_window, leaky_bucket, concurrency"


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.from_text(text)
    return info.value.errors


def anon(*limits: str) -> str:
    """A config whose anonymous tier has these flow-mapping limits."""
    return "tiers:\n  anonymous:\n    limits:\n" + "".join(f"      - {{{lim}}}\n" for lim in limits)


def case(name: str, text: str, line: str, *marks: pytest.MarkDecorator) -> Any:
    return pytest.param(text, line, id=name, marks=marks)


LIM0 = "tiers.anonymous.limits[0]"

CASES = [
    # --- server ---------------------------------------------------------------
    case("server.host", "server: {host: 5}", "server.host: must be a host name or address, got 5"),
    case("server.host-empty", 'server: {host: ""}', 'server.host: must be a host name or address, got ""'),
    case("server.port-range", "server: {port: 70000}", "server.port: must be a port number 0-65535, got 70000"),
    case("server.port-string", 'server: {port: "80"}', 'server.port: must be a port number 0-65535, got "80"'),
    case("server.port-bool", "server: {port: yes}", "server.port: must be a port number 0-65535, got true"),
    case("server.workers-zero", "server: {workers: 0}", 'server.workers: must be an integer >= 1 or "auto", got 0'),
    case("server.workers-text", "server: {workers: many}",
         'server.workers: must be an integer >= 1 or "auto", got "many"'),
    case("server.workers-memory", "server: {workers: 2}",
         "server.workers: more than one worker needs storage.backend: redis (memory state is per process), got 2"),
    case("server.workers-port-0", "server: {workers: 2, port: 0}\nstorage: {backend: redis}",
         "server.workers: more than one worker needs a fixed server.port (with 0 each worker would get a port "
         "of its own), got 2"),
    case("server.shutdown_timeout", "server: {shutdown_timeout: -1}",
         "server.shutdown_timeout: must be a number >= 0, got -1"),
    case("server.shutdown_timeout-text", "server: {shutdown_timeout: 10s}",
         'server.shutdown_timeout: must be a number >= 0, got "10s"'),
    case("server.max_body_size-float", "server: {max_body_size: 1.5}",
         "server.max_body_size: must be an integer >= 0 or null, got 1.5"),
    case("server.max_body_size-negative", "server: {max_body_size: -1}",
         "server.max_body_size: must be an integer >= 0, got -1"),
    case("server.max_body_size-bool", "server: {max_body_size: yes}",
         "server.max_body_size: must be an integer >= 0 or null, got true"),
    case("server.keepalive_timeout", "server: {keepalive_timeout: -5}",
         "server.keepalive_timeout: must be a number >= 0, got -5"),
    case("server.keepalive_timeout-inf", "server: {keepalive_timeout: .inf}",
         "server.keepalive_timeout: must be a number >= 0, got Infinity"),
    case("server-not-mapping", "server: 8080", "server: must be a mapping, got 8080"),
    # --- admin ----------------------------------------------------------------
    case("admin.host", "admin: {host: [a]}", 'admin.host: must be a host name or address, got ["a"]'),
    case("admin.port", "admin: {port: -1}", "admin.port: must be a port number 0-65535, got -1"),
    case("admin.token-empty", 'admin: {token: ""}', 'admin.token: must be a non-empty string or null, got ""'),
    case("admin.token-number", "admin: {token: 123}", "admin.token: must be a non-empty string or null, got 123"),
    case("admin.allowed_hosts-list", "admin: {allowed_hosts: a.example}", 'admin.allowed_hosts: must be a list of host names, got "a.example"'),
    case("admin.allowed_hosts-port", 'admin: {allowed_hosts: [ok.example, "a.example:8081"]}', 'admin.allowed_hosts[1]: must be a host name or IP address, without scheme or port, got "a.example:8081"'),
    case("admin.allowed_hosts-url", 'admin: {allowed_hosts: ["http://a.example"]}', 'admin.allowed_hosts[0]: must be a host name or IP address, without scheme or port, got "http://a.example"'),
    # --- upstream -------------------------------------------------------------
    case("upstream.url-scheme", "upstream: {url: ftp://x}",
         'upstream.url: must be a http:// or https:// URL with a host, got "ftp://x"'),
    case("upstream.url-no-host", 'upstream: {url: "http://"}',
         'upstream.url: must be a http:// or https:// URL with a host, got "http://"'),
    case("upstream.url-number", "upstream: {url: 5}", "upstream.url: must be a URL, got 5"),
    case("upstream.url-port", 'upstream: {url: "http://h:99999"}',
         'upstream.url: is not a valid URL, got "http://h:99999"'),
    case("upstream.start_mock", 'upstream: {start_mock: "yes"}',
         'upstream.start_mock: must be true or false, got "yes"'),
    case("upstream.start_mock-int", "upstream: {start_mock: 1}", "upstream.start_mock: must be true or false, got 1"),
    case("upstream.connect_timeout", "upstream: {connect_timeout: 0}",
         "upstream.connect_timeout: must be a number > 0, got 0"),
    case("upstream.timeout", "upstream: {timeout: -1}", "upstream.timeout: must be a number > 0, got -1"),
    case("upstream.timeout-bool", "upstream: {timeout: yes}", "upstream.timeout: must be a number > 0, got true"),
    case("upstream.read_timeout", "upstream: {read_timeout: 0}", "upstream.read_timeout: must be a number > 0, got 0"),
    case("upstream.read_timeout-text", "upstream: {read_timeout: fast}",
         'upstream.read_timeout: must be a number > 0 or null, got "fast"'),
    case("upstream.max_connections", "upstream: {max_connections: 0}",
         "upstream.max_connections: must be an integer >= 1, got 0"),
    case("upstream.max_connections-float", "upstream: {max_connections: 2.5}",
         "upstream.max_connections: must be an integer >= 1, got 2.5"),
    case("upstream.max_connections-null", "upstream: {max_connections: null}",
         "upstream.max_connections: must be an integer >= 1, got null"),
    case("upstream.preserve_host", "upstream: {preserve_host: maybe}",
         'upstream.preserve_host: must be true or false, got "maybe"'),
    # --- storage --------------------------------------------------------------
    case("storage.backend", "storage: {backend: mongo}", 'storage.backend: must be one of memory, redis, got "mongo"'),
    case("storage.url", 'storage: {url: "http://127.0.0.1:6390"}',
         'storage.url: must be a redis:// or rediss:// or unix:// URL with a host, got "http://127.0.0.1:6390"'),
    case("storage.url-bad-port-with-password", 'storage: {url: "redis://:hunter2@10.0.0.5:99999/0"}',
         'storage.url: is not a valid URL, got "redis://***@10.0.0.5:99999/0"'),
    case("storage.url-text-port-with-password", 'storage: {url: "redis://:hunter2@host:port/0"}',
         'storage.url: is not a valid URL, got "redis://***@host:port/0"'),
    case("storage.cluster", 'storage: {cluster: "no"}', 'storage.cluster: must be true or false, got "no"'),
    case("storage.key_prefix", "storage: {key_prefix: 5}", "storage.key_prefix: must be a string, got 5"),
    case("storage.timeout", "storage: {timeout: 0}", "storage.timeout: must be a number > 0, got 0"),
    case("storage.on_error", "storage: {on_error: ignore}",
         'storage.on_error: must be one of allow, deny, local, got "ignore"'),
    # --- clients --------------------------------------------------------------
    case("clients.api_key_header", 'clients: {api_key_header: "X API Key"}',
         'clients.api_key_header: must be an HTTP header name, got "X API Key"'),
    case("clients.unknown_key", "clients: {unknown_key: allow}",
         'clients.unknown_key: must be one of reject, anonymous, got "allow"'),
    case("clients.require_key", "clients: {require_key: 1}", "clients.require_key: must be true or false, got 1"),
    case("clients.trusted_proxies", "clients: {trusted_proxies: 10.0.0.0/8}",
         'clients.trusted_proxies: must be a list of CIDRs, got "10.0.0.0/8"'),
    case("clients.trusted_proxies-item", "clients: {trusted_proxies: [10.0.0.0/8, not-an-ip]}",
         'clients.trusted_proxies[1]: must be an IP address or CIDR like 10.0.0.0/8, got "not-an-ip"'),
    case("clients.trusted_proxies-item-prefix", "clients: {trusted_proxies: [10.0.0.0/33]}",
         'clients.trusted_proxies[0]: must be an IP address or CIDR like 10.0.0.0/8, got "10.0.0.0/33"'),
    case("clients.trusted_proxies-item-number", "clients: {trusted_proxies: [5]}",
         "clients.trusted_proxies[0]: must be an IP address or CIDR like 10.0.0.0/8, got 5"),
    case("clients.unknown-key", "clients: {jwks: x}",
         "clients.jwks: unknown key (known: api_key_header, deny, ipv6_prefix, jwt, networks, require_key, "
         "trusted_proxies, unknown_key)"),
    case("clients.deny", "clients: {deny: 203.0.113.0/24}", 'clients.deny: must be a list of CIDRs, got "203.0.113.0/24"'),
    case("clients.deny-item", "clients: {deny: [203.0.113.0/24, 300.1.1.1]}",
         'clients.deny[1]: must be an IP address or CIDR like 10.0.0.0/8, got "300.1.1.1"'),
    case("clients.networks", "clients: {networks: 10.0.0.0/8}",
         'clients.networks: must be a list of {cidr, tier} mappings, got "10.0.0.0/8"'),
    case("clients.networks-item", "clients: {networks: [10.0.0.0/8]}",
         'clients.networks[0]: must be a mapping, got "10.0.0.0/8"'),
    case("clients.networks-cidr", "clients: {networks: [{cidr: ten, tier: anonymous}]}",
         'clients.networks[0].cidr: must be an IP address or CIDR like 10.0.0.0/8, got "ten"'),
    case("clients.networks-tier", "clients: {networks: [{cidr: 10.0.0.0/8, tier: gold}]}",
         'clients.networks[0].tier: must name a tier in tiers (anonymous), got "gold"'),
    case("clients.networks-missing", "clients: {networks: [{cidr: 10.0.0.0/8}]}", "clients.networks[0].tier: is required"),
    case("clients.networks-unknown", "clients: {networks: [{cidr: 10.0.0.0/8, tier: anonymous, name: x}]}",
         "clients.networks[0].name: unknown key (known: cidr, tier)"),
    case("clients.jwt", "clients: {jwt: [RS256]}", 'clients.jwt: must be a mapping, got ["RS256"]'),
    case("clients.jwt-unknown", "clients: {jwt: {algorithms: [RS256], key_file: k, default_tier: anonymous, iss: x}}",
         "clients.jwt.iss: unknown key (known: algorithms, audience, default_tier, issuer, key_file, secret_env, "
         "subject_claim, tier_claim)"),
    case("clients.jwt-required", "clients: {jwt: {key_file: k}}", "clients.jwt.algorithms: is required"),
    case("clients.jwt-default_tier-required", "clients: {jwt: {key_file: k, algorithms: [RS256]}}",
         "clients.jwt.default_tier: is required"),
    case("clients.jwt.default_tier", "clients: {jwt: {algorithms: [RS256], key_file: k, default_tier: gold}}",
         'clients.jwt.default_tier: must name a tier in tiers (anonymous), got "gold"'),
    case("clients.jwt.algorithms-empty", "clients: {jwt: {algorithms: [], key_file: k, default_tier: anonymous}}",
         "clients.jwt.algorithms: must be a non-empty list of algorithms like [RS256], got []"),
    case("clients.jwt.algorithms-unknown", "clients: {jwt: {algorithms: [RS257], key_file: k, default_tier: anonymous}}",
         'clients.jwt.algorithms[0]: must be one of HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, '
         'ES256, ES384, ES512, EdDSA, got "RS257"'),
    case("clients.jwt.algorithms-none", "clients: {jwt: {algorithms: [RS256, none], key_file: k, default_tier: anonymous}}",
         'clients.jwt.algorithms[1]: unsigned tokens (none) are never accepted, got "none"'),
    case("clients.jwt.algorithms-mixed", "clients: {jwt: {algorithms: [HS256, RS256], key_file: k, default_tier: anonymous}}",
         'clients.jwt.algorithms: HS* (a shared secret) and public-key algorithms cannot be mixed, got ["HS256", "RS256"]'),
    case("clients.jwt.hs-with-key_file", "clients: {jwt: {algorithms: [HS256], key_file: k, default_tier: anonymous}}",
         "clients.jwt.secret_env: is required for HS256 (key_file holds public keys)"),
    case("clients.jwt.rs-with-secret_env", "clients: {jwt: {algorithms: [RS256], secret_env: S, default_tier: anonymous}}",
         "clients.jwt.key_file: is required for RS256 (secret_env is for HS*)"),
    case("clients.jwt.both", "clients: {jwt: {algorithms: [ES256], secret_env: S, key_file: k, default_tier: anonymous}}",
         "clients.jwt: give key_file (public keys) or secret_env (an HS* secret), not both"),
    case("clients.jwt.secret_env-missing",
         "clients: {jwt: {algorithms: [HS256], secret_env: TOLLGATE_NO_SUCH_VARIABLE, default_tier: anonymous}}",
         "clients.jwt.secret_env: the environment variable TOLLGATE_NO_SUCH_VARIABLE is not set or empty"),
    case("clients.jwt.key_file-type", "clients: {jwt: {algorithms: [ES256], key_file: 5, default_tier: anonymous}}",
         "clients.jwt.key_file: must be a file path, got 5"),
    case("clients.jwt.tier_claim", "clients: {jwt: {algorithms: [ES256], key_file: k, default_tier: anonymous, "
         'tier_claim: "a b"}}', 'clients.jwt.tier_claim: must be a claim name ([A-Za-z0-9_.:-]+), got "a b"'),
    case("clients.jwt.issuer", "clients: {jwt: {algorithms: [ES256], key_file: k, default_tier: anonymous, "
         "issuer: 5}}", "clients.jwt.issuer: must be a non-empty string, got 5"),
    case("claim-selector-needs-jwt", "tiers:\n  anonymous: {limits: [{limit: 5, window: 60, algorithm: fixed_window, "
         "per: [client, claim:tenant]}]}", 'tiers.anonymous.limits[0].per: claim:<name> selectors need clients.jwt, '
         'got "claim:tenant"'),
    case("clients.ipv6_prefix-zero", "clients: {ipv6_prefix: 0}",
         "clients.ipv6_prefix: must be an integer 1-128, got 0"),
    case("clients.ipv6_prefix-big", "clients: {ipv6_prefix: 129}",
         "clients.ipv6_prefix: must be an integer 1-128, got 129"),
    case("clients.ipv6_prefix-float", "clients: {ipv6_prefix: 64.5}",
         "clients.ipv6_prefix: must be an integer 1-128, got 64.5"),
    # --- log ------------------------------------------------------------------
    case("log.format", "log: {format: xml}", 'log.format: must be one of text, json, got "xml"'),
    case("log-not-mapping", "log: json", 'log: must be a mapping, got "json"'),
    # --- tiers ----------------------------------------------------------------
    case("tiers.bad-name", 'tiers: {anonymous: {unlimited: true}, "bad tier": {unlimited: true}}',
         'tiers.bad tier: tier names must match [A-Za-z0-9_-]+, got "bad tier"'),
    case("tiers.missing-limits", "tiers: {anonymous: {}}",
         "tiers.anonymous.limits: must be a non-empty list of limits (or set unlimited: true), got null"),
    case("tiers.empty-limits", "tiers: {anonymous: {limits: []}}",
         "tiers.anonymous.limits: must be a non-empty list of limits (or set unlimited: true), got []"),
    case("tiers.limits-not-list", "tiers: {anonymous: {limits: {capacity: 5}}}",
         'tiers.anonymous.limits: must be a non-empty list of limits (or set unlimited: true), got {"capacity": 5}'),
    case("tiers.unlimited-with-limits",
         "tiers: {anonymous: {unlimited: true, limits: [{capacity: 1, refill_rate: 1}]}}",
         "tiers.anonymous.limits: an unlimited tier has no limits"),
    case("tiers.unlimited-not-bool", 'tiers: {anonymous: {unlimited: "yes"}}',
         'tiers.anonymous.unlimited: must be true or false, got "yes"'),
    case("tiers.anonymous-missing", "tiers: {free: {unlimited: true}}",
         "tiers.anonymous: is required unless clients.require_key is true"),
    case("tiers-not-mapping", "tiers: [anonymous]", 'tiers: must be a mapping, got ["anonymous"]'),
    case("tiers.limit-not-mapping", anon().rstrip() + " [token_bucket]",
         f'{LIM0}: must be a mapping, got "token_bucket"'),
    case("tiers.limit-empty", "tiers: {anonymous: {limits: [{}]}}",
         f"{LIM0}: must be a mapping with an algorithm and its parameters, got {{}}"),
    # token_bucket
    case("token_bucket.capacity-type", anon('capacity: "100", refill_rate: 10'),
         f'{LIM0}.capacity: must be an integer >= 1, got "100"'),
    case("token_bucket.capacity-float", anon("capacity: 10.5, refill_rate: 10"),
         f"{LIM0}.capacity: must be an integer >= 1, got 10.5"),
    case("token_bucket.capacity-zero", anon("capacity: 0, refill_rate: 10"),
         f"{LIM0}.capacity: must be an integer >= 1, got 0"),
    case("token_bucket.capacity-negative", anon("capacity: -1, refill_rate: 10"),
         f"{LIM0}.capacity: must be an integer >= 1, got -1"),
    case("token_bucket.capacity-bool", anon("capacity: yes, refill_rate: 10"),
         f"{LIM0}.capacity: must be an integer >= 1, got true"),
    case("token_bucket.capacity-missing", anon("refill_rate: 10"),
         f"{LIM0}.capacity: is required for token_bucket"),
    case("token_bucket.refill_rate-type", anon("capacity: 10, refill_rate: fast"),
         f'{LIM0}.refill_rate: must be a number > 0, got "fast"'),
    case("token_bucket.refill_rate-zero", anon("capacity: 10, refill_rate: 0"),
         f"{LIM0}.refill_rate: must be a number > 0, got 0"),
    case("token_bucket.refill_rate-negative", anon("capacity: 10, refill_rate: -1"),
         f"{LIM0}.refill_rate: must be a number > 0, got -1"),
    case("token_bucket.refill_rate-bool", anon("capacity: 10, refill_rate: on"),
         f"{LIM0}.refill_rate: must be a number > 0, got true"),
    case("token_bucket.refill_rate-nan", anon("capacity: 10, refill_rate: .nan"),
         f"{LIM0}.refill_rate: must be a number > 0, got NaN"),
    case("token_bucket.refill_rate-missing", anon("capacity: 10"),
         f"{LIM0}.refill_rate: is required for token_bucket"),
    case("token_bucket.unknown-param", anon("capacity: 10, refill_rate: 1, burst: 5"),
         f"{LIM0}.burst: unknown key for token_bucket (known: name, algorithm, per, shadow, capacity, refill_rate)"),
    # sliding_window
    case("sliding_window.limit-type", anon('algorithm: sliding_window, limit: "10", window: 60'),
         f'{LIM0}.limit: must be an integer >= 1, got "10"'),
    case("sliding_window.limit-zero", anon("algorithm: sliding_window, limit: 0, window: 60"),
         f"{LIM0}.limit: must be an integer >= 1, got 0"),
    case("sliding_window.limit-bool", anon("algorithm: sliding_window, limit: yes, window: 60"),
         f"{LIM0}.limit: must be an integer >= 1, got true"),
    case("sliding_window.limit-missing", anon("algorithm: sliding_window, window: 60"),
         f"{LIM0}.limit: is required for sliding_window"),
    case("sliding_window.window-type", anon("algorithm: sliding_window, limit: 10, window: 1m"),
         f'{LIM0}.window: must be a number > 0, got "1m"'),
    case("sliding_window.window-zero", anon("algorithm: sliding_window, limit: 10, window: 0"),
         f"{LIM0}.window: must be a number > 0, got 0"),
    case("sliding_window.window-negative", anon("algorithm: sliding_window, limit: 10, window: -60"),
         f"{LIM0}.window: must be a number > 0, got -60"),
    case("sliding_window.window-bool", anon("algorithm: sliding_window, limit: 10, window: no"),
         f"{LIM0}.window: must be a number > 0, got false"),
    case("sliding_window.window-missing", anon("algorithm: sliding_window, limit: 10"),
         f"{LIM0}.window: is required for sliding_window"),
    case("sliding_window.unknown-param", anon("algorithm: sliding_window, limit: 10, window: 60, capacity: 5"),
         f"{LIM0}.capacity: unknown key for sliding_window (known: name, algorithm, per, shadow, limit, window)"),
    # fixed_window
    case("fixed_window.limit-float", anon("algorithm: fixed_window, limit: 1.5, window: 60"),
         f"{LIM0}.limit: must be an integer >= 1, got 1.5"),
    case("fixed_window.limit-negative", anon("algorithm: fixed_window, limit: -3, window: 60"),
         f"{LIM0}.limit: must be an integer >= 1, got -3"),
    case("fixed_window.limit-bool", anon("algorithm: fixed_window, limit: true, window: 60"),
         f"{LIM0}.limit: must be an integer >= 1, got true"),
    case("fixed_window.limit-missing", anon("algorithm: fixed_window, window: 60"),
         f"{LIM0}.limit: is required for fixed_window"),
    case("fixed_window.window-type", anon("algorithm: fixed_window, limit: 10, window: day"),
         f'{LIM0}.window: must be a number > 0, got "day"'),
    case("fixed_window.window-zero", anon("algorithm: fixed_window, limit: 10, window: 0"),
         f"{LIM0}.window: must be a number > 0, got 0"),
    case("fixed_window.window-bool", anon("algorithm: fixed_window, limit: 10, window: off"),
         f"{LIM0}.window: must be a number > 0, got false"),
    case("fixed_window.window-missing", anon("algorithm: fixed_window, limit: 10"),
         f"{LIM0}.window: is required for fixed_window"),
    case("fixed_window.unknown-param", anon("algorithm: fixed_window, limit: 10, window: 60, refill_rate: 1"),
         f"{LIM0}.refill_rate: unknown key for fixed_window (known: name, algorithm, per, shadow, limit, window)"),
    # leaky_bucket
    case("leaky_bucket.rate-type", anon('algorithm: leaky_bucket, rate: "1/s", queue: 10'),
         f'{LIM0}.rate: must be a number > 0, got "1/s"'),
    case("leaky_bucket.rate-zero", anon("algorithm: leaky_bucket, rate: 0, queue: 10"),
         f"{LIM0}.rate: must be a number > 0, got 0"),
    case("leaky_bucket.rate-negative", anon("algorithm: leaky_bucket, rate: -2, queue: 10"),
         f"{LIM0}.rate: must be a number > 0, got -2"),
    case("leaky_bucket.rate-bool", anon("algorithm: leaky_bucket, rate: yes, queue: 10"),
         f"{LIM0}.rate: must be a number > 0, got true"),
    case("leaky_bucket.rate-missing", anon("algorithm: leaky_bucket, queue: 10"),
         f"{LIM0}.rate: is required for leaky_bucket"),
    case("leaky_bucket.queue-float", anon("algorithm: leaky_bucket, rate: 1, queue: 2.5"),
         f"{LIM0}.queue: must be an integer >= 0, got 2.5"),
    case("leaky_bucket.queue-negative", anon("algorithm: leaky_bucket, rate: 1, queue: -1"),
         f"{LIM0}.queue: must be an integer >= 0, got -1"),
    case("leaky_bucket.queue-bool", anon("algorithm: leaky_bucket, rate: 1, queue: yes"),
         f"{LIM0}.queue: must be an integer >= 0, got true"),
    case("leaky_bucket.queue-missing", anon("algorithm: leaky_bucket, rate: 1"),
         f"{LIM0}.queue: is required for leaky_bucket"),
    case("leaky_bucket.unknown-param", anon("algorithm: leaky_bucket, rate: 1, queue: 5, capacity: 5"),
         f"{LIM0}.capacity: unknown key for leaky_bucket (known: name, algorithm, per, shadow, rate, queue)"),
    # algorithm and limit names
    case("algorithm-unknown", anon("algorithm: gcra, rate: 1"),
         f'{LIM0}.algorithm: must be one of {ALGOS}, got "gcra"'),
    case("algorithm-case", anon("algorithm: Token_Bucket, capacity: 1, refill_rate: 1"),
         f'{LIM0}.algorithm: must be one of {ALGOS}, got "Token_Bucket"'),
    case("algorithm-not-string", anon("algorithm: 5"), f"{LIM0}.algorithm: must be one of {ALGOS}, got 5"),
    case("algorithm-typo-key", anon("capacity: 1, refill_rate: 1, algoritm: leaky_bucket"),
         f"{LIM0}.algoritm: unknown key for token_bucket (known: name, algorithm, per, shadow, capacity, refill_rate)"),
    case("limit.name-bad", anon('name: "my limit", capacity: 1, refill_rate: 1'),
         f'{LIM0}.name: must match [A-Za-z0-9_-]+, got "my limit"'),
    case("limit.name-number", anon("name: 5, capacity: 1, refill_rate: 1"),
         f"{LIM0}.name: must match [A-Za-z0-9_-]+, got 5"),
    case("limit.name-duplicate", anon("name: a, capacity: 1, refill_rate: 1", "name: a, capacity: 2, refill_rate: 1"),
         'tiers.anonymous.limits[1].name: is already used by another limit of this tier, got "a"'),
    case("limit.name-duplicate-of-default",
         anon("capacity: 1, refill_rate: 1", "name: token_bucket, capacity: 2, refill_rate: 1"),
         'tiers.anonymous.limits[1].name: is already used by another limit of this tier, got "token_bucket"'),
    # --- api_keys -------------------------------------------------------------
    case("api_keys.name-missing", "api_keys: {k1: {tier: anonymous}}",
         "api_keys[0].name: is required: a non-empty single-line string naming the key"),
    case("api_keys.name-empty", 'api_keys: {k1: {tier: anonymous, name: ""}}',
         'api_keys[0].name: is required: a non-empty single-line string naming the key, got ""'),
    case("api_keys.name-multiline", 'api_keys: {k1: {tier: anonymous, name: "a\\nb"}}',
         'api_keys[0].name: is required: a non-empty single-line string naming the key, got "a\\nb"'),
    case("api_keys.name-duplicate", "api_keys: {k1: {tier: anonymous, name: dup}, k2: {tier: anonymous, name: dup}}",
         'api_keys.dup.name: must be unique among api_keys, got "dup"'),
    case("api_keys.tier-unknown", "api_keys: {k1: {tier: gold, name: a}}",
         'api_keys.a.tier: must name a tier in tiers (anonymous), got "gold"'),
    case("api_keys.tier-missing", "api_keys: {k1: {name: a}}",
         "api_keys.a.tier: must name a tier in tiers (anonymous), got null"),
    case("api_keys.tier-list", "api_keys: {k1: {tier: [anonymous], name: a}}",
         'api_keys.a.tier: must name a tier in tiers (anonymous), got ["anonymous"]'),
    case("api_keys.tier-mapping", "api_keys: {k1: {tier: {name: free}, name: a}}",
         'api_keys.a.tier: must name a tier in tiers (anonymous), got {"name": "free"}'),
    case("api_keys.unknown-field", "api_keys: {k1: {tier: anonymous, name: a, teir: x}}",
         "api_keys.a.teir: unknown key (known: name, tier)"),
    case("api_keys.entry-not-mapping", "api_keys: {k1: free}", 'api_keys[0]: must be a mapping, got "free"'),
    case("api_keys-not-mapping", "api_keys: [k1]", 'api_keys: must be a mapping, got ["k1"]'),
    case("api_keys.sha256-short", 'api_keys: {"sha256:abc": {tier: anonymous, name: a}}',
         "api_keys.a: a sha256: key must be followed by 64 hex digits"),
    case("api_keys.sha256-not-hex", "api_keys: {sha256:" + "z" * 64 + ": {tier: anonymous, name: a}}",
         "api_keys.a: a sha256: key must be followed by 64 hex digits"),
    case("api_keys.plain-and-sha256",
         f"api_keys:\n  {SECRET}: {{tier: anonymous, name: a}}\n"
         f"  sha256:{hash_key(SECRET)}: {{tier: anonymous, name: b}}\n",
         "api_keys.b: the same key is already configured for a"),
    case("api_keys.sha256-upper-and-plain",
         f"api_keys:\n  sha256:{hash_key(SECRET).upper()}: {{tier: anonymous, name: b}}\n"
         f"  {SECRET}: {{tier: anonymous, name: a}}\n",
         "api_keys.a: the same key is already configured for b"),
    case("api_keys.empty-key", 'api_keys: {"": {tier: anonymous, name: a}}',
         "api_keys.a: the API key must not be empty"),
    # --- routes ---------------------------------------------------------------
    case("routes.path-missing", "routes: [{exempt: true}]",
         "routes[0].path: is required: a path prefix starting with /"),
    case("routes.path-no-slash", "routes: [{path: health}]",
         'routes[0].path: is required: a path prefix starting with /, got "health"'),
    case("routes.path-number", "routes: [{path: 5}]",
         "routes[0].path: is required: a path prefix starting with /, got 5"),
    case("routes.methods-string", "routes: [{path: /x, methods: GET}]",
         'routes[0].methods: must be a non-empty list of HTTP methods, got "GET"'),
    case("routes.methods-empty", "routes: [{path: /x, methods: []}]",
         "routes[0].methods: must be a non-empty list of HTTP methods, got []"),
    case("routes.methods-bad-item", "routes: [{path: /x, methods: [GET, 5]}]",
         'routes[0].methods: must be a non-empty list of HTTP methods, got ["GET", 5]'),
    case("routes.cost-zero", "routes: [{path: /x, cost: 0}]", "routes[0].cost: must be an integer >= 1, got 0"),
    case("routes.cost-negative", "routes: [{path: /x, cost: -1}]", "routes[0].cost: must be an integer >= 1, got -1"),
    case("routes.cost-float", "routes: [{path: /x, cost: 1.5}]", "routes[0].cost: must be an integer >= 1, got 1.5"),
    case("routes.cost-bool", "routes: [{path: /x, cost: yes}]", "routes[0].cost: must be an integer >= 1, got true"),
    case("routes.cost-over-capacity", "routes: [{path: /x, cost: 101}]",
         'routes[0].cost: exceeds the capacity 100 of tiers.anonymous limit "token_bucket": '
         "such requests could never pass, got 101"),
    case("routes.cost-over-second-limit",
         anon("name: burst, capacity: 200, refill_rate: 2",
              "name: daily, algorithm: fixed_window, limit: 50, window: 86400")
         + "routes: [{path: /x, cost: 60}]",
         'routes[0].cost: exceeds the capacity 50 of tiers.anonymous limit "daily": '
         "such requests could never pass, got 60"),
    case("routes.cost-over-leaky-queue",
         anon("algorithm: leaky_bucket, rate: 1, queue: 3") + "routes: [{path: /x, cost: 4}]",
         'routes[0].cost: exceeds the capacity 3 of tiers.anonymous limit "leaky_bucket": '
         "such requests could never pass, got 4"),
    case("routes.exempt", 'routes: [{path: /x, exempt: "true"}]',
         'routes[0].exempt: must be true or false, got "true"'),
    case("routes.exempt-int", "routes: [{path: /x, exempt: 1}]", "routes[0].exempt: must be true or false, got 1"),
    case("routes.unknown-key", "routes: [{path: /x, tier: free}]",
         "routes[0].tier: unknown key (known: cost, exempt, limits, messages, methods, path)"),
    case("routes-not-list", "routes: {path: /x}", 'routes: must be a list of routes, got {"path": "/x"}'),
    case("routes.item-not-mapping", "routes: [/x]", 'routes[0]: must be a mapping, got "/x"'),
    # --- file-level -----------------------------------------------------------
    case("unknown-top-level", "servre: {port: 80}", f"servre: unknown key (known: {TOP_KNOWN})"),
    case("typo-nested-server", "server: {prot: 80}",
         "server.prot: unknown key (known: host, keepalive_timeout, max_body_size, port, shutdown_timeout, workers)"),
    case("typo-nested-storage", "storage: {on_eror: deny}",
         "storage.on_eror: unknown key (known: backend, cluster, key_prefix, on_error, timeout, url)"),
    case("typo-nested-log", "log: {fromat: json}", "log.fromat: unknown key (known: format)"),
    case("typo-nested-tier", "tiers: {anonymous: {unlimted: true}}",
         "tiers.anonymous.unlimted: unknown key (known: limits, penalty, unlimited)"),
    case("top-level-non-string-key", "1: 2", "keys must be strings, got 1"),
    case("duplicate-key", "server:\n  port: 1\n  port: 2\n", 'server: duplicate key "port" (line 3); the last one would win'),
    case("duplicate-section", "server: {port: 1}\nadmin: {}\nserver: {port: 2}\n", 'top level: duplicate key "server" (line 3); the last one would win'),
    case("duplicate-tier", "tiers:\n  anonymous: {unlimited: true}\n  anonymous: {unlimited: true}\n",
         'tiers: duplicate key "anonymous" (line 3); the last one would win'),
    case("yaml-syntax", "server: {port: 1\n",
         "line 2, column 1: invalid YAML: expected ',' or '}', but got '<stream end>'"),
    case("yaml-indentation", "server:\n  port: 1\n host: x\n",
         "line 3, column 2: invalid YAML: expected <block end>, but found '<block mapping start>'"),
    case("yaml-undefined-alias", "server: *nothing\n",
         "line 1, column 9: invalid YAML: found undefined alias 'nothing'"),
    case("file-is-list", "- a\n- b\n", 'the file must hold a mapping of sections, got ["a", "b"]'),
    case("file-is-string", "just a string\n", 'the file must hold a mapping of sections, got "just a string"'),
    case("file-is-number", "42\n", "the file must hold a mapping of sections, got 42"),
]


@pytest.mark.parametrize(("text", "line"), CASES)
def test_error_line(text: str, line: str) -> None:
    errors = errors_of(text)
    assert line in errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("limit", "where", "value"),
    [
        pytest.param("capacity: 100, refill_rate: 1.0e-320", "refill_rate", "1e-320", id="token_bucket-tiny-rate"),
        pytest.param("algorithm: leaky_bucket, rate: 1.0e-320, queue: 10", "rate", "1e-320",
                     id="leaky_bucket-tiny-rate"),
        pytest.param("algorithm: sliding_window, limit: 10, window: 1.0e+305", "window", "1e+305",
                     id="sliding-huge-window"),
        pytest.param("algorithm: fixed_window, limit: 10, window: 1.0e+305", "window", "1e+305",
                     id="fixed-huge-window"),
    ],
)
def test_extreme_parameter_is_an_error_not_a_crash(limit: str, where: str, value: str) -> None:
    # The bound is the loader's to choose; the line must name the key and the value.
    errors = errors_of(anon(limit))
    assert any(e.startswith(f"{LIM0}.{where}: ") and e.endswith(f"got {value}") for e in errors), errors


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('server: {"a\\nb": 1}', id="unknown-key"),
        pytest.param('tiers: {anonymous: {unlimited: true}, "a\\nb": {unlimited: true}}', id="tier-name"),
        pytest.param('api_keys: {k1: {tier: gold, name: "a\\nb"}}', id="api-key-name"),
    ],
)
def test_every_error_is_one_line(text: str) -> None:
    errors = errors_of(text)
    assert errors and all("\n" not in e and "\r" not in e for e in errors), errors


# --- several errors at once ----------------------------------------------------


def test_every_error_is_reported_at_once() -> None:
    text = """\
server: {port: 70000}
upstream: {timeout: 0}
storage: {backend: mongo}
tiers:
  anonymous:
    limits:
      - {capacity: yes, refill_rate: 10}
routes:
  - {path: /x, cost: 0}
"""
    assert sorted(errors_of(text)) == sorted([
        "server.port: must be a port number 0-65535, got 70000",
        "upstream.timeout: must be a number > 0, got 0",
        'storage.backend: must be one of memory, redis, got "mongo"',
        f"{LIM0}.capacity: must be an integer >= 1, got true",
        "routes[0].cost: must be an integer >= 1, got 0",
    ])


def test_a_duplicate_key_does_not_hide_other_errors() -> None:
    text = "server:\n  port: 1\n  port: 2\nadmin: {port: x}\n"
    assert errors_of(text) == [
        'server: duplicate key "port" (line 3); the last one would win',
        'admin.port: must be a port number 0-65535, got "x"',
    ]


# --- what a valid file means ---------------------------------------------------


def assert_default_anonymous(cfg: Config) -> None:
    assert list(cfg.tiers) == ["anonymous"]
    tier = cfg.tiers["anonymous"]
    assert not tier.unlimited
    [limit] = tier.limits
    assert (limit.name, limit.algorithm.name) == ("token_bucket", "token_bucket")
    assert limit.algorithm.params() == (100, 10)
    assert tier.limit_set.policy_header == '"token_bucket";q=100;w=10'


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("# nothing here\n\n   # still nothing\n", id="only-comments"),
        pytest.param("---\n", id="empty-document"),
        pytest.param("server:\nadmin:\nlog:\n", id="empty-sections"),
    ],
)
def test_empty_file_is_valid_with_the_default_anonymous_tier(text: str) -> None:
    assert_default_anonymous(config.from_text(text))


def test_defaults_are_specs() -> None:
    cfg = config.from_text("")
    assert cfg.server == ServerConfig(host="127.0.0.1", port=8080, shutdown_timeout=10, max_body_size=None,
                                      keepalive_timeout=75)
    assert cfg.admin == AdminConfig(host="127.0.0.1", port=8081, token=None)
    assert cfg.upstream == UpstreamConfig(url="http://127.0.0.1:9000", start_mock=True, connect_timeout=2,
                                          timeout=30, preserve_host=False, read_timeout=None, max_connections=1024)
    assert cfg.storage == StorageConfig(backend="memory", url="redis://127.0.0.1:6379/0", cluster=False,
                                        key_prefix="tollgate:", timeout=0.05, on_error="allow")
    assert cfg.clients == ClientsConfig(api_key_header="X-API-Key", unknown_key="reject", require_key=False,
                                        trusted_proxies=(), ipv6_prefix=64)
    assert cfg.log_format == "text"
    assert cfg.api_keys == {}
    assert cfg.routes == ()


def test_require_key_needs_no_anonymous_tier() -> None:
    cfg = config.from_text("clients: {require_key: true}\ntiers: {free: {unlimited: true}}\n")
    assert cfg.clients.require_key
    assert list(cfg.tiers) == ["free"]


def test_values_are_read() -> None:
    cfg = config.from_text("""\
server: {host: 0.0.0.0, port: 0, max_body_size: 1048576}
storage: {backend: redis, url: "rediss://u:p@r.example:6380/1", on_error: local, timeout: 0.2}
clients: {trusted_proxies: [10.0.0.0/8, "::1"], ipv6_prefix: 48, unknown_key: anonymous}
log: {format: json}
admin: {allowed_hosts: [Admin.Example, 10.0.0.5, "[fd00::1]"]}
routes:
  - {path: /search, methods: [get, POST], cost: 5}
  - {path: /health, exempt: true}
""")
    assert (cfg.server.host, cfg.server.port, cfg.server.max_body_size) == ("0.0.0.0", 0, 1048576)
    assert cfg.admin.allowed_hosts == ("admin.example", "10.0.0.5", "fd00::1")  # as host_name() reads a Host
    assert (cfg.storage.backend, cfg.storage.on_error, cfg.storage.timeout) == ("redis", "local", 0.2)
    assert [str(n) for n in cfg.clients.trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    assert (cfg.clients.ipv6_prefix, cfg.clients.unknown_key, cfg.log_format) == (48, "anonymous", "json")
    search, health = cfg.routes
    assert (search.methods, search.cost, search.exempt) == (frozenset({"GET", "POST"}), 5, False)
    assert (health.methods, health.cost, health.exempt) == (None, 1, True)


def test_shipped_config_loads() -> None:
    cfg = config.load(REPO_ROOT / "config.yaml")
    assert set(cfg.tiers) == {"anonymous", "free", "premium", "internal"}
    assert cfg.tiers["free"].limit_set.policy_header == ('"burst";q=20;w=10, "daily";q=1000;w=86400, '
                                                          '"tenant";q=5;w=3600')  # not inflight, not trial
    assert cfg.tiers["premium"].limit_set.policy_header == '"token_bucket";q=1000;w=10'
    assert cfg.tiers["internal"].unlimited and cfg.tiers["internal"].limits == ()
    assert cfg.api_keys[hash_key("demo-free-key")].tier == "free"
    assert cfg.api_keys[hash_key("demo-internal-key")].name == "demo-internal"
    assert "demo-free-key" not in repr(cfg)  # only hashes are kept


@pytest.mark.parametrize("upper", [False, True], ids=["lower-hex", "upper-hex"])
def test_sha256_key_is_found_by_the_raw_keys_hash(upper: bool) -> None:
    digest = hash_key("my-raw-key")
    written = digest.upper() if upper else digest
    cfg = config.from_text(f"api_keys:\n  sha256:{written}: {{tier: anonymous, name: svc}}\n")
    entry = cfg.api_keys[hash_key("my-raw-key")]
    assert (entry.name, entry.tier, entry.digest) == ("svc", "anonymous", digest)
    assert cfg.key_by_name("svc") is entry


def test_default_limit_names_are_made_unique() -> None:
    cfg = config.from_text(anon(
        "capacity: 10, refill_rate: 1",
        "algorithm: sliding_window, limit: 5, window: 1",
        "capacity: 20, refill_rate: 1",
        "capacity: 30, refill_rate: 1",
    ))
    names = [limit.name for limit in cfg.tiers["anonymous"].limits]
    assert names == ["token_bucket", "sliding_window", "token_bucket-2", "token_bucket-3"]


def test_default_limit_name_skips_a_name_given_explicitly() -> None:
    cfg = config.from_text(anon(
        "name: token_bucket-2, capacity: 10, refill_rate: 1",
        "capacity: 20, refill_rate: 1",
        "capacity: 30, refill_rate: 1",
    ))
    names = [limit.name for limit in cfg.tiers["anonymous"].limits]
    assert names == ["token_bucket-2", "token_bucket", "token_bucket-3"]


@pytest.mark.parametrize(
    ("limit", "item"),
    [
        pytest.param("capacity: 20, refill_rate: 2", '"token_bucket";q=20;w=10', id="tb-exact"),
        pytest.param("capacity: 10, refill_rate: 3", '"token_bucket";q=10;w=4', id="tb-rounded-up"),
        pytest.param("capacity: 3, refill_rate: 0.1", '"token_bucket";q=3;w=30', id="tb-float-noise-not-rounded-up"),
        pytest.param("capacity: 1, refill_rate: 100", '"token_bucket";q=1;w=1', id="tb-at-least-1"),
        pytest.param("algorithm: leaky_bucket, rate: 2, queue: 5", '"leaky_bucket";q=5;w=3', id="lb-rounded-up"),
        pytest.param("algorithm: leaky_bucket, rate: 0.5, queue: 10", '"leaky_bucket";q=10;w=20', id="lb-slow"),
        pytest.param("algorithm: leaky_bucket, rate: 1, queue: 0", '"leaky_bucket";q=0;w=1', id="lb-at-least-1"),
        pytest.param("algorithm: sliding_window, limit: 10, window: 0.5", '"sliding_window";q=10;w=1',
                     id="sw-at-least-1"),
        pytest.param("algorithm: fixed_window, limit: 7, window: 90.5", '"fixed_window";q=7;w=91', id="fw-rounded-up"),
    ],
)
def test_policy_header_item(limit: str, item: str) -> None:
    assert config.from_text(anon(limit)).tiers["anonymous"].limit_set.policy_header == item


def limit_keys(text: str) -> dict[str, str]:
    cfg = config.from_text(text)
    return {f"{tier.name}.{limit.name}": limit.key for tier in cfg.tiers.values() for limit in tier.limits}


def test_limit_key_changes_only_with_the_limit() -> None:
    burst = "name: burst, capacity: 20, refill_rate: 2"
    daily = "name: daily, algorithm: fixed_window, limit: 1000, window: 86400"
    before = limit_keys(anon(burst, daily))
    assert limit_keys(anon(burst, daily)) == before
    after = limit_keys(anon(burst.replace("refill_rate: 2", "refill_rate: 3"), daily))
    assert after["anonymous.burst"] != before["anonymous.burst"]
    assert after["anonymous.daily"] == before["anonymous.daily"]
    moved = limit_keys(anon(daily.replace("fixed_window", "sliding_window"), burst))
    assert moved["anonymous.burst"] == before["anonymous.burst"]  # its position does not matter
    assert moved["anonymous.daily"] != before["anonymous.daily"]


def test_the_same_limit_in_two_tiers_has_two_keys() -> None:
    keys = limit_keys("tiers:\n  anonymous: {limits: [{capacity: 5, refill_rate: 1}]}\n"
                      "  free: {limits: [{capacity: 5, refill_rate: 1}]}\n")
    assert keys["anonymous.token_bucket"] != keys["free.token_bucket"]


# --- secrets never reach an error line -----------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(f"api_keys: {{{SECRET}: {{tier: gold, name: leaky}}}}", id="bad-tier"),
        pytest.param(f"api_keys: {{{SECRET}: {{tier: gold}}}}", id="no-name"),
        pytest.param(f"api_keys: {{{SECRET}: {{tier: anonymous, name: 5}}}}", id="bad-name"),
        pytest.param(f"api_keys: {{{SECRET}: free}}", id="entry-not-mapping"),
        pytest.param(f"api_keys: {{{SECRET}: {{tier: anonymous, name: a, limit: 5}}}}", id="unknown-field"),
        pytest.param(f"api_keys: {{sha256:{SECRET}: {{tier: anonymous, name: a}}}}", id="bad-sha256"),
        pytest.param(f"api_keys: {{{SECRET}: {{tier: anonymous, name: a}}, sha256:{hash_key(SECRET)}: "
                     "{tier: anonymous, name: b}}", id="plain-and-sha256"),
        pytest.param(f"api_keys: {{{SECRET}: {{tier: anonymous, name: a}}, k2: {{tier: anonymous, name: a}}}}",
                     id="duplicate-name"),
        pytest.param(f"api_keys:\n  {SECRET}: {{tier: anonymous, name: a}}\n  {SECRET}: {{tier: anonymous, name: b}}\n",
                     id="duplicate-yaml-key"),
    ],
)
def test_no_error_line_holds_a_raw_key(text: str) -> None:
    errors = errors_of(text)
    assert errors
    assert [e for e in errors if SECRET in e or hash_key(SECRET) in e] == []


@pytest.mark.parametrize(
    ("url", "line"),
    [
        pytest.param("http://admin:hunter2@10.0.0.5:6390/0",
                     'storage.url: must be a redis:// or rediss:// or unix:// URL with a host, '
                     'got "http://admin:***@10.0.0.5:6390/0"', id="user-and-password"),
        pytest.param("redis://:hunter2@",
                     'storage.url: must be a redis:// or rediss:// or unix:// URL with a host, got "redis://***@"',
                     id="password-only"),
        pytest.param("redis://:hunter2@10.0.0.5:99999/0",
                     'storage.url: is not a valid URL, got "redis://***@10.0.0.5:99999/0"',
                     id="bad-port"),
    ],
)
def test_storage_url_error_masks_the_password(url: str, line: str) -> None:
    errors = errors_of(f'storage: {{url: "{url}"}}')
    assert errors == [line]
    assert "hunter2" not in errors[0]


# --- run.py --check --------------------------------------------------------------


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "run.py", "--check", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=30, check=False)


def test_check_good_file(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text("tiers:\n  anonymous: {limits: [{capacity: 5, refill_rate: 1}]}\n")
    result = check("--config", str(path))
    assert (result.returncode, result.stdout, result.stderr) == (0, "config OK\n", "")


def test_check_bad_file_prints_every_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("server: {port: 70000}\nservre: {}\n"
                    "tiers:\n  anonymous: {limits: [{capacity: 0, refill_rate: 1}]}\n")
    result = check("--config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    for expected in (
        "server.port: must be a port number 0-65535, got 70000",
        f"servre: unknown key (known: {TOP_KNOWN})",
        f"{LIM0}.capacity: must be an integer >= 1, got 0",
    ):
        assert expected in lines
    assert "Traceback" not in result.stdout + result.stderr


def test_check_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    result = check("--config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines()[0] == f"{path}: no such file"
    assert "Traceback" not in result.stderr


def test_check_shipped_config() -> None:
    result = check("--config", "config.yaml")
    assert (result.returncode, result.stdout, result.stderr) == (0, "config OK\n", "")


def test_server_workers_reads_a_count_or_auto():
    redis = "storage: {backend: redis}\n"
    assert config.from_text("server: {}\n").server.workers == 1
    assert config.from_text("server: {workers: 3}\n" + redis).server.workers == 3
    assert config.from_text("server: {workers: auto}\n" + redis).server.workers == (os.cpu_count() or 1)
    assert config.from_text("server: {workers: 1}\nstorage: {backend: memory}\n").server.workers == 1
