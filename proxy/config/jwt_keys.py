"""clients.jwt's verification keys: an HMAC secret from the environment, or a
JWKS or PEM file of public keys, loaded and checked at config load.

Each key is filed under the algorithms it can verify, so a token's `alg`
header can only ever select a key of the matching type: an RSA public key is
never handed to HMAC (the classic key-confusion forgery), and PyJWT never
sees a key it would have to guess about.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt import PyJWK, PyJWTError

from .checks import Checker

HMAC: Final = {"HS256": 32, "HS384": 48, "HS512": 64}  # minimum secret bytes: the hash's size (RFC 7518 3.2)
RSA: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
CURVES: Final = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
ALGORITHMS: Final = (*HMAC, *RSA, *CURVES, "EdDSA")
MIN_RSA_BITS: Final = 2048
MAX_KEY_FILE: Final = 1 << 20

KeyTable = dict[tuple[str | None, str], Any]


def fits(key: Any, alg: str) -> bool:
    """Whether `key` (bytes for HMAC, else a cryptography public key) verifies `alg`."""
    if alg in HMAC:
        return isinstance(key, bytes)
    if alg in RSA:
        return isinstance(key, rsa.RSAPublicKey)
    if alg in CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == CURVES[alg]
    return alg == "EdDSA" and isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))


def secret_keys(ck: Checker, path: str, name: Any, algorithms: tuple[str, ...],
                environ: Mapping[str, str]) -> KeyTable:
    """The HMAC secret named by secret_env; it must be as long as the longest hash it keys."""
    if not isinstance(name, str) or not name:
        ck.error(path, "must name an environment variable", name)
        return {}
    secret = environ.get(name)
    if not secret:
        ck.error(path, f"the environment variable {name} is not set or empty")
        return {}
    raw = secret.encode()
    need = max(HMAC[alg] for alg in algorithms)
    if len(raw) < need:
        # never the secret itself: only its length
        ck.error(path, f"the secret in {name} must hold at least {need} bytes for "
                 f"{', '.join(algorithms)}, got {len(raw)}")
        return {}
    return {(None, alg): raw for alg in algorithms}


def file_keys(ck: Checker, path: str, base: Path, name: str, algorithms: tuple[str, ...]) -> KeyTable:
    """The public keys of a JWKS or PEM file, by (kid, alg) and, where one key fits alg alone, (None, alg).

    `name` is the file as the config gives it, relative to `base` (the config's directory); errors show `name`.
    """
    file = name
    try:
        with (base / name).open("rb") as stream:
            data = stream.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        ck.error(path, f"cannot read {file}: {exc.strerror or exc}")
        return {}
    if len(data) > MAX_KEY_FILE:
        ck.error(path, f"{file} is larger than {MAX_KEY_FILE} bytes")
        return {}
    found = _jwks(ck, path, file, data) if data.lstrip()[:1] == b"{" else _pem(ck, path, file, data)
    if found is None:
        return {}
    table: KeyTable = {}
    for alg in algorithms:
        fitting = [(kid, key) for kid, key, only in found if fits(key, alg) and only in (None, alg)]
        if not fitting:
            ck.error(path, f"no key in {file} verifies {alg}")
        for kid, key in fitting:
            if kid is not None:
                table.setdefault((kid, alg), key)
        if len(fitting) == 1:
            table[(None, alg)] = fitting[0][1]
    for key in {id(k): k for k in table.values()}.values():
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
            ck.error(path, f"an RSA key in {file} has {key.key_size} bits; at least {MIN_RSA_BITS} are needed")
            return {}
    return table


Found = list[tuple[str | None, Any, str | None]]  # (kid, public key, the alg the JWK pins or None)


def _jwks(ck: Checker, path: str, file: str, data: bytes) -> Found | None:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        ck.error(path, f"{file} is neither a PEM public key nor a JWKS (invalid JSON)")
        return None
    jwks = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(jwks, list) or not jwks:
        ck.error(path, f"{file}: a JWKS needs a non-empty \"keys\" list")
        return None
    found: Found = []
    for i, jwk in enumerate(jwks):
        if not isinstance(jwk, dict) or jwk.get("kty") == "oct" or "d" in jwk:
            ck.error(path, f"{file}: keys[{i}] must be a public RSA, EC or OKP key (secrets go in secret_env)")
            continue
        if jwk.get("use", "sig") != "sig":
            continue  # an encryption key: not for signatures
        try:
            key = PyJWK(jwk).key
        except (PyJWTError, ValueError, TypeError, KeyError) as exc:
            ck.error(path, f"{file}: keys[{i}] is not a usable key: {exc}")
            continue
        kid, pinned = jwk.get("kid"), jwk.get("alg")
        found.append((kid if isinstance(kid, str) else None, key, pinned if isinstance(pinned, str) else None))
    return found


def _pem(ck: Checker, path: str, file: str, data: bytes) -> Found | None:
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except (ValueError, TypeError):
        ck.error(path, f"{file} is neither a PEM public key nor a JWKS")
        return None
    return [(None, key, None)]
