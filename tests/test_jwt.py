"""clients.jwt: verified Bearer tokens, minted here with PyJWT on real keys.

First `resolve` directly on a fixed clock (every way a token can be wrong is
the same 401, and the right key is picked by kid), then over HTTP through a
real Tollgate and upstream_mock: the 401's wire form, an API key winning over
a token, no trace of a token in the access log, /api/stats or /metrics, and a
reload that re-reads (or, broken, refuses) the key file.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from harness import running
from helpers import free_port
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from multidict import CIMultiDict, CIMultiDictProxy
from recording import port_of, raw_request

from proxy import config as config_module
from proxy import identity
from proxy.config import Config, ConfigError
from proxy.identity import INVALID_TOKEN, Client, resolve
from proxy.tokens import LEEWAY

NOW = 1_900_000_000.0
SECRET = "hs256-test-secret-of-at-least-32-bytes"
RSA_A = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_B = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_STRANGER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())

TIERS = """
tiers:
  anonymous: {limits: [{algorithm: token_bucket, capacity: 5, refill_rate: 1}]}
  free: {limits: [{algorithm: token_bucket, capacity: 3, refill_rate: 1}]}
  gold: {unlimited: true}
  silver: {limits: [{algorithm: token_bucket, capacity: 7, refill_rate: 1}]}
"""


def clock() -> float:
    return NOW


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def jwks(*keys: tuple[str, Any]) -> str:
    out = []
    for kid, key in keys:
        jwk = (RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm).to_jwk(key.public_key(),
                                                                                       as_dict=True)
        out.append({**jwk, "kid": kid, "use": "sig"})
    return json.dumps({"keys": out})


def mint(key: Any, alg: str, *, kid: str | None = None, **claims: Any) -> str:
    body = {"sub": "alice", "exp": NOW + 600, "iss": "https://auth.test", "aud": "api", **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=alg,
                      headers={"kid": kid} if kid else None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_by_hand(secret: bytes, claims: dict[str, Any], kid: str | None = None) -> str:
    """An HS256 token PyJWT would refuse to make (it will not use a PEM as a secret)."""
    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    signing = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    return signing + "." + b64(hmac.new(secret, signing.encode(), hashlib.sha256).digest())


def headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


def bearer(token: str) -> CIMultiDictProxy[str]:
    return headers(Authorization="Bearer " + token)


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "jwks.json").write_text(jwks(("a", RSA_A), ("b", RSA_B)))
    (tmp_path / "keys" / "ec.pem").write_bytes(public_pem(EC_KEY))
    return tmp_path


def load(directory: Path, clients: str) -> Config:
    path = directory / "config.yaml"
    path.write_text(TIERS + "clients:\n" + clients)
    return config_module.load(path)


RS_JWT = """  jwt:
    algorithms: [RS256]
    key_file: keys/jwks.json
    issuer: https://auth.test
    audience: api
    tier_claim: plan
    default_tier: free
"""
ES_JWT = "  jwt: {algorithms: [ES256], key_file: keys/ec.pem, default_tier: free}\n"
HS_JWT = "  jwt: {algorithms: [HS256], secret_env: TG_TEST_JWT_SECRET, default_tier: free, tier_claim: plan}\n"


# --- resolve, on a fixed clock ------------------------------------------------------


def test_hs256_from_secret_env_names_the_subject_and_reads_the_tier_claim(keydir, monkeypatch):
    monkeypatch.setenv("TG_TEST_JWT_SECRET", SECRET)
    config = load(keydir, HS_JWT)
    client = resolve(config, bearer(mint(SECRET, "HS256", plan="gold")), "10.0.0.1", clock=clock)
    assert isinstance(client, Client)
    assert (client.id, client.tier.name) == ("jwt:alice", "gold")
    assert "alice" not in client.identity and client.identity.startswith("j:")
    assert client.claims["plan"] == "gold"
    with pytest.raises(TypeError):
        client.claims["plan"] = "free"  # type: ignore[index]  # read-only, for later claim: selectors
    for plan in (None, "platinum", 7):  # missing or unknown tier claim: default_tier
        other = resolve(config, bearer(mint(SECRET, "HS256", plan=plan)), "10.0.0.1", clock=clock)
        assert isinstance(other, Client) and other.tier.name == "free"
    anonymous = resolve(config, headers(), "10.0.0.1", clock=clock)
    assert isinstance(anonymous, Client) and anonymous.id == "10.0.0.1" and not anonymous.claims


def test_rs256_jwks_picks_the_key_by_kid(keydir):
    config = load(keydir, RS_JWT)
    for kid, key in (("a", RSA_A), ("b", RSA_B)):
        client = resolve(config, bearer(mint(key, "RS256", kid=kid)), "10.0.0.1", clock=clock)
        assert isinstance(client, Client) and client.id == "jwt:alice", kid
    # key A's signature under kid b, an unknown kid, or no kid with two candidate keys: refused
    for token in (mint(RSA_A, "RS256", kid="b"), mint(RSA_A, "RS256", kid="zz"), mint(RSA_A, "RS256")):
        assert resolve(config, bearer(token), "10.0.0.1", clock=clock) is INVALID_TOKEN


def test_es256_pem_key_and_a_lone_key_serves_tokens_without_kid(keydir):
    config = load(keydir, ES_JWT)
    for kid in (None, "any"):
        client = resolve(config, bearer(mint(EC_KEY, "ES256", kid=kid, sub="svc-7")), "10.0.0.1", clock=clock)
        assert isinstance(client, Client) and (client.id, client.tier.name) == ("jwt:svc-7", "free")


def test_exp_and_nbf_allow_the_documented_leeway(keydir):
    config = load(keydir, RS_JWT)
    inside = [{"exp": NOW - LEEWAY + 1}, {"nbf": NOW + LEEWAY - 1}]
    outside = [{"exp": NOW - LEEWAY}, {"nbf": NOW + LEEWAY + 1}]
    for claims in inside:
        assert isinstance(resolve(config, bearer(mint(RSA_A, "RS256", kid="a", **claims)), None, clock=clock), Client)
    for claims in outside:
        assert resolve(config, bearer(mint(RSA_A, "RS256", kid="a", **claims)), None, clock=clock) is INVALID_TOKEN


def _none_token() -> str:
    return b64(b'{"alg":"none","typ":"JWT"}') + "." + b64(json.dumps({"sub": "x", "exp": NOW + 60}).encode()) + "."


def _tampered() -> str:
    head, _, sig = mint(RSA_A, "RS256", kid="a").split(".")
    return ".".join((head, b64(json.dumps({"sub": "admin", "exp": NOW + 600, "iss": "https://auth.test",
                                           "aud": "api"}).encode()), sig))


REFUSED = {
    "expired": lambda: mint(RSA_A, "RS256", kid="a", exp=NOW - 3600),
    "not-yet-valid": lambda: mint(RSA_A, "RS256", kid="a", nbf=NOW + 3600),
    "no-exp": lambda: mint(RSA_A, "RS256", kid="a", exp=None),
    "exp-not-a-number": lambda: mint(RSA_A, "RS256", kid="a", exp="tomorrow"),
    "no-subject": lambda: mint(RSA_A, "RS256", kid="a", sub=None),
    "subject-not-a-string": lambda: mint(RSA_A, "RS256", kid="a", sub=12),
    "wrong-signature": lambda: mint(RSA_STRANGER, "RS256", kid="a"),
    "tampered-payload": _tampered,
    "wrong-issuer": lambda: mint(RSA_A, "RS256", kid="a", iss="https://evil.test"),
    "no-issuer": lambda: mint(RSA_A, "RS256", kid="a", iss=None),
    "wrong-audience": lambda: mint(RSA_A, "RS256", kid="a", aud="other"),
    "alg-none": _none_token,
    "alg-not-configured": lambda: mint(RSA_A, "RS512", kid="a"),
    "key-confusion-hs256-with-the-public-pem": lambda: hs256_by_hand(
        public_pem(RSA_A), {"sub": "alice", "exp": NOW + 600, "iss": "https://auth.test", "aud": "api"}, kid="a"),
    "empty": lambda: "",
    "one-part": lambda: "abc",
    "dots": lambda: "..",
    "three-garbage-parts": lambda: "a.b.c",
    "header-not-json": lambda: b64(b"{nope") + ".e30.sig",
    "header-a-list": lambda: b64(b"[1]") + ".e30.sig",
    "kid-a-list": lambda: b64(b'{"alg":"RS256","kid":[1]}') + ".e30.sig",
    "huge": lambda: "a" * 9000 + ".b.c",
    "not-ascii": lambda: mint(RSA_A, "RS256", kid="a") + "\u00e9",
    "inner-space": lambda: mint(RSA_A, "RS256", kid="a").replace(".", " .", 1),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_every_bad_token_gets_the_same_answer(keydir, name):
    config = load(keydir, RS_JWT)
    assert resolve(config, bearer(REFUSED[name]()), "10.0.0.1", clock=clock) is INVALID_TOKEN


def test_the_refusal_says_nothing_that_helps_forge_a_token():
    assert (INVALID_TOKEN.error, INVALID_TOKEN.message) == ("invalid_token", "The bearer token is not valid.")
    assert INVALID_TOKEN.challenge == 'Bearer error="invalid_token"'


def test_other_schemes_and_no_jwt_config_leave_authorization_alone(keydir):
    config = load(keydir, RS_JWT)
    basic = resolve(config, headers(Authorization="Basic dXNlcjpwdw=="), "10.0.0.1", clock=clock)
    assert isinstance(basic, Client) and basic.id == "10.0.0.1"
    plain = config_module.from_text(TIERS)
    client = resolve(plain, bearer("not-even-a-jwt"), "10.0.0.1", clock=clock)
    assert isinstance(client, Client) and client.id == "10.0.0.1"


def test_an_api_key_wins_over_a_token(keydir):
    config = config_module.load(_write(keydir, TIERS + "api_keys: {k-1: {tier: gold, name: ops}}\nclients:\n"
                                       + RS_JWT))
    for token in ("garbage", mint(RSA_A, "RS256", kid="a")):
        client = resolve(config, headers(X_API_Key="k-1", Authorization="Bearer " + token), None, clock=clock)
        assert isinstance(client, Client) and client.id == "ops"


def _write(directory: Path, text: str) -> Path:
    path = directory / "config.yaml"
    path.write_text(text)
    return path


def test_a_verified_token_is_kept_per_config_bounded_and_never_beyond_exp(keydir, monkeypatch):
    monkeypatch.setattr(identity, "MAX_TOKEN_CLIENTS", 3)
    config = load(keydir, RS_JWT)
    token = mint(RSA_A, "RS256", kid="a", exp=NOW + 100)
    first = resolve(config, bearer(token), None, clock=clock)
    assert isinstance(first, Client) and resolve(config, bearer(token), None, clock=clock) is first
    assert resolve(config, bearer(token), None, clock=lambda: NOW + 100 + LEEWAY - 1) is first
    assert resolve(config, bearer(token), None, clock=lambda: NOW + 100 + LEEWAY) is INVALID_TOKEN
    reloaded = load(keydir, RS_JWT)  # a reload verifies again, with the keys it loaded
    again = resolve(reloaded, bearer(token), None, clock=clock)
    assert isinstance(again, Client) and again is not first
    for i in range(6):
        assert isinstance(resolve(config, bearer(mint(RSA_A, "RS256", kid="a", sub=f"u{i}")), None, clock=clock),
                          Client)
        assert len(identity._token_clients.of(config)) <= 3


# --- config errors that need files or the environment ----------------------------------


def jwt_errors(directory: Path, jwt_yaml: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(directory, "  jwt: " + jwt_yaml + "\n")
    return info.value.errors


def test_key_file_errors_name_the_key_path(keydir):
    (keydir / "keys" / "junk.pem").write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    (keydir / "keys" / "bad.json").write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    (keydir / "keys" / "small.pem").write_bytes(
        public_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    base = "{algorithms: [%s], default_tier: free, key_file: %s}"
    assert jwt_errors(keydir, base % ("RS256", "keys/missing.json")) == [
        "clients.jwt.key_file: cannot read keys/missing.json: No such file or directory"]
    assert jwt_errors(keydir, base % ("RS256", "keys/junk.pem")) == [
        "clients.jwt.key_file: keys/junk.pem is neither a PEM public key nor a JWKS"]
    assert jwt_errors(keydir, base % ("RS256", "keys/bad.json")) == [
        "clients.jwt.key_file: keys/bad.json: keys[0] must be a public RSA, EC or OKP key "
        "(secrets go in secret_env)", "clients.jwt.key_file: no key in keys/bad.json verifies RS256"]
    assert jwt_errors(keydir, base % ("ES256", "keys/jwks.json")) == [
        "clients.jwt.key_file: no key in keys/jwks.json verifies ES256"]
    assert jwt_errors(keydir, base % ("RS256", "keys/small.pem")) == [
        "clients.jwt.key_file: an RSA key in keys/small.pem has 1024 bits; at least 2048 are needed"]


def test_secret_env_errors_never_show_the_secret(keydir, monkeypatch):
    monkeypatch.delenv("TG_TEST_JWT_SECRET", raising=False)
    base = "{algorithms: [HS256], default_tier: free, secret_env: TG_TEST_JWT_SECRET}"
    assert jwt_errors(keydir, base) == [
        "clients.jwt.secret_env: the environment variable TG_TEST_JWT_SECRET is not set or empty"]
    monkeypatch.setenv("TG_TEST_JWT_SECRET", "short-secret")
    errors = jwt_errors(keydir, base)
    assert errors == ["clients.jwt.secret_env: the secret in TG_TEST_JWT_SECRET must hold at least 32 bytes "
                      "for HS256, got 12"]


# --- over HTTP: a real Tollgate in front of upstream_mock ------------------------------------


HTTP_CONFIG = TIERS + """
upstream: {url: "{upstream}"}
api_keys: {k-1: {tier: gold, name: ops}}
clients:
""" + RS_JWT


async def test_tokens_over_http_and_no_trace_of_them_anywhere(keydir, upstream):
    good = mint(RSA_A, "RS256", kid="a", exp=NOW * 2)  # the proxy runs on the wall clock
    forged = mint(RSA_STRANGER, "RS256", kid="a", exp=NOW * 2)
    async with running(HTTP_CONFIG, upstream.url, config_path=keydir / "config.yaml") as tg:
        status, head, _ = await tg.get("/users", headers={"Authorization": "Bearer " + good})
        assert status == 200 and head["RateLimit-Policy"].endswith(";q=3;w=3")  # free: the default tier
        status, head, body = await tg.get("/users", headers={"Authorization": "Bearer " + forged})
        assert status == 401 and head["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        assert head["Content-Type"].startswith("application/problem+json")
        assert json.loads(body)["error"] == "invalid_token" and forged not in body.decode()
        status, _, _ = await tg.get("/users", headers={"Authorization": "Bearer " + forged, "X-API-Key": "k-1"})
        assert status == 200  # the API key wins
        answer = await raw_request(port_of(tg.url), b"GET /x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
                                   + good.encode() + b"\xe9\r\nConnection: close\r\n\r\n")
        assert answer.status == 401 and answer.problem()["error"] == "invalid_token"
        async with tg.session.get(tg.admin_url + "/api/stats") as resp:
            stats = await resp.text()
        async with tg.session.get(tg.admin_url + "/metrics") as resp:
            metrics = await resp.text()
        log = "\n".join(tg.access_lines())
    assert "jwt:alice" in stats and "jwt:alice" in log
    for seen in (stats, metrics, log):
        for secret in (good, forged, good.rsplit(".", 1)[1], forged.rsplit(".", 1)[1]):
            assert secret not in seen


async def test_a_reload_rereads_the_key_file_and_a_broken_one_keeps_the_old(keydir, upstream):
    token_a = mint(RSA_A, "RS256", kid="a", exp=NOW * 2)
    token_c = mint(RSA_B, "RS256", kid="c", exp=NOW * 2)
    key_file = keydir / "keys" / "jwks.json"
    async with running(HTTP_CONFIG, upstream.url, config_path=keydir / "config.yaml") as tg:
        auth_a = {"Authorization": "Bearer " + token_a}
        auth_c = {"Authorization": "Bearer " + token_c}
        key_file.write_text("{broken")
        result = await tg.runtime.reloader.reload("test")
        assert not result.ok and result.errors == (
            "clients.jwt.key_file: keys/jwks.json is neither a PEM public key nor a JWKS (invalid JSON)",)
        assert (await tg.get("/users", headers=auth_a))[0] == 200  # the old keys still in force
        key_file.write_text(jwks(("c", RSA_B)))
        assert (await tg.runtime.reloader.reload("test")).ok
        assert (await tg.get("/users", headers=auth_a))[0] == 401
        assert (await tg.get("/users", headers=auth_c))[0] == 200


CLAIMS_CONFIG = """
upstream: {url: "{upstream}"}
clients:
  jwt: {algorithms: [HS256], secret_env: TG_TEST_JWT_SECRET, default_tier: free}
tiers:
  anonymous: {limits: [{algorithm: token_bucket, capacity: 50, refill_rate: 1}]}
  free:
    limits:
      - {name: tenant, algorithm: fixed_window, limit: 2, window: 60, per: "claim:tenant"}
"""


async def test_claim_selectors_count_the_verified_tokens_claim(upstream, monkeypatch, fake_clock):
    monkeypatch.setenv("TG_TEST_JWT_SECRET", SECRET)
    async with running(CLAIMS_CONFIG, upstream.url, clock=fake_clock) as tg:
        def auth(sub: str, tenant: str) -> dict[str, str]:
            return {"Authorization": "Bearer " + mint(SECRET, "HS256", sub=sub, tenant=tenant, exp=NOW * 2)}

        statuses = [(await tg.get("/users", headers=auth(sub, tenant)))[0]
                    for sub, tenant in (("alice", "t1"), ("bob", "t1"), ("carol", "t1"), ("dave", "t2"))]
    assert statuses == [200, 200, 429, 200]  # alice and bob share tenant t1's window


async def test_the_admin_api_finds_a_jwt_client_under_the_tier_its_token_gave(keydir, upstream, fake_clock):
    token = mint(RSA_A, "RS256", kid="a", plan="silver", exp=NOW * 2)
    async with running(HTTP_CONFIG, upstream.url, config_path=keydir / "config.yaml", clock=fake_clock) as tg:
        assert (await tg.get("/users", headers={"Authorization": "Bearer " + token}))[0] == 200

        async def remaining(client_id: str) -> tuple[str, int]:
            async with tg.session.get(f"{tg.admin_url}/api/clients/{client_id}") as resp:
                body = await resp.json()
            return body["tier"], body["limits"][0]["remaining"]

        assert await remaining("jwt:alice") == ("silver", 6)
        assert await remaining("jwt:nobody") == ("free", 3)  # never seen: default_tier
        async with tg.session.delete(tg.admin_url + "/api/clients/jwt:alice") as resp:
            assert resp.status == 204
        assert await remaining("jwt:alice") == ("silver", 7)


async def test_workers_each_load_the_key_file_beside_the_config(run_process, keydir, redis_server):
    """server.workers: every worker builds the config from the text and the file's path, so
    key_file resolves beside the config file in each of them."""
    ports = {"port": free_port(), "admin": free_port(), "mock": free_port()}
    config = keydir / "workers.yaml"
    config.write_text(TIERS + f"server: {{host: 127.0.0.1, port: {ports['port']}, workers: 2, shutdown_timeout: 2}}\n"
                      f"admin: {{host: 127.0.0.1, port: {ports['admin']}}}\n"
                      f"upstream: {{url: 'http://127.0.0.1:{ports['mock']}', start_mock: true}}\n"
                      f"storage: {{backend: redis, url: '{redis_server.url}'}}\nclients:\n" + ES_JWT)
    proc = run_process([sys.executable, "run.py", "--config", str(config)])
    proc.wait_for_port(ports["admin"], timeout=15)  # once every worker answers
    good = mint(EC_KEY, "ES256", exp=NOW * 2)
    connector = aiohttp.TCPConnector(force_close=True, limit=0)  # a connection each: both workers serve
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(token: str) -> tuple[int, str]:
            async with session.get(f"http://127.0.0.1:{ports['port']}/users",
                                   headers={"Authorization": "Bearer " + token}) as resp:
                return resp.status, resp.headers.get("RateLimit-Policy", "")
        answers = await asyncio.gather(*(one(good) for _ in range(3)), one("x.y.z"))
        async with session.get(f"http://127.0.0.1:{ports['admin']}/api/stats") as resp:
            stats = await resp.json()
    assert sorted(answers) == [(200, '"token_bucket";q=3;w=3')] * 3 + [(401, "")]
    assert sum(w["requests"] for w in stats["workers"]) == 4
