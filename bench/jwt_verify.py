"""What a Bearer JWT costs per request: proxy.identity.resolve in-process, one core.

    python bench/jwt_verify.py              # ~5 s
    python bench/jwt_verify.py --number 2000

Prints microseconds per resolve for an anonymous peer, an API key, and a
token of each of HS256, RS256 (2048-bit) and ES256 (P-256), the best of 5
repeats: sent again (proxy.identity's verified-token cache) and fresh
(verified). Keys and tokens are made here in a temp dir; nothing is served.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import timeit
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from multidict import CIMultiDict, CIMultiDictProxy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy import identity
from proxy.config import Config, load
from proxy.identity import Client, resolve

SECRET = "bench-secret-of-at-least-32-bytes-long"
TIERS = "tiers: {anonymous: {unlimited: true}, free: {unlimited: true}}\napi_keys: {bench-key: {name: b, tier: free}}\n"


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


def _best(config: Config, headers: CIMultiDictProxy[str], number: int, *, fresh: bool) -> float:
    """Microseconds per resolve; `fresh`: the verified-token cache emptied first, as a new token costs."""
    cache = identity._token_clients.of(config)

    def once() -> None:
        if fresh:
            cache.clear()
        resolve(config, headers, "10.0.0.1")
    return min(timeit.repeat(once, number=number, repeat=5)) / number * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=1000, help="resolves per repeat (default 1000)")
    args = parser.parse_args()
    number = max(1, min(args.number, 20000))
    os.environ["TG_BENCH_JWT_SECRET"] = SECRET
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    claims = {"sub": "bench", "exp": int(time.time()) + 3600}
    cases: dict[str, tuple[str, CIMultiDictProxy[str]]] = {
        "anonymous": ("{algorithms: [HS256], secret_env: TG_BENCH_JWT_SECRET, default_tier: free}", _headers()),
        "api-key": ("{algorithms: [HS256], secret_env: TG_BENCH_JWT_SECRET, default_tier: free}",
                    _headers(X_API_Key="bench-key")),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for alg, key, file in (("RS256", rsa_key, "rsa.pem"), ("ES256", ec_key, "ec.pem")):
            Path(tmp, file).write_bytes(_pem(key))
            token = jwt.encode(claims, key, algorithm=alg)
            cases[alg] = (f"{{algorithms: [{alg}], key_file: {file}, default_tier: free}}",
                          _headers(Authorization="Bearer " + token))
        token = jwt.encode(claims, SECRET, algorithm="HS256")
        cases["HS256"] = (cases["anonymous"][0], _headers(Authorization="Bearer " + token))
        print(f"resolve() per request, best of 5 x {number} (microseconds); fresh: the token not seen before")
        print(f"  {'client':10s} {'repeat':>8s} {'fresh':>8s}")
        for name, (jwt_yaml, headers) in cases.items():
            path = Path(tmp, "config.yaml")
            path.write_text(TIERS + "clients:\n  jwt: " + jwt_yaml + "\n")
            config = load(path)
            assert isinstance(resolve(config, headers, "10.0.0.1"), Client), name
            repeat, fresh = (_best(config, headers, number, fresh=f) for f in (False, True))
            print(f"  {name:10s} {repeat:8.1f} {fresh:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
