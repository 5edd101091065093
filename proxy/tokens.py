"""Bearer JWTs: verified against clients.jwt's keys, or refused without saying why.

Only the configured algorithms are accepted and each selects only a key of
its own type (proxy.config.jwt_keys), so neither `alg: none` nor an HS256
token signed with an RSA public key can pass. `exp` is required; `exp` and
`nbf` are checked with LEEWAY seconds of tolerance for clock skew between the
issuer and Tollgate. A token is never logged, stored or shown: the client is
known by its subject, and storage keys by the subject's digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from .config import JwtConfig

LEEWAY: Final = 30  # seconds; the usual allowance for clock skew (a token lives minutes, not seconds)
MAX_TOKEN: Final = 8192
MAX_SUBJECT: Final = 256

NO_CLAIMS: Final[Mapping[str, Any]] = MappingProxyType({})


def bearer(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` value, else None (another scheme)."""
    scheme, _, token = authorization.partition(" ")
    return token.strip(" ") if scheme.lower() == "bearer" else None


def verify(settings: JwtConfig, token: str, now: float) -> Mapping[str, Any] | None:
    """The token's claims, read-only, if its signature and times (at Unix time `now`) hold; else None.

    The caller has checked that the token is visible ASCII.
    """
    import jwt  # here, not at the top: PyJWT and cryptography load only for a config that verifies tokens

    if len(token) > MAX_TOKEN:
        return None
    try:
        header = jwt.get_unverified_header(token)
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in settings.algorithms or not (kid is None or isinstance(kid, str)):
            return None
        key = settings.keys.get((kid, alg)) or settings.keys.get((None, alg))
        if key is None:
            return None
        claims = jwt.decode(
            token, key, algorithms=[alg], leeway=LEEWAY, issuer=settings.issuer, audience=settings.audience,
            options={"require": ["exp"], "verify_aud": settings.audience is not None, "verify_sub": False,
                     # times are checked below, on the injected clock
                     "verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
    except (jwt.PyJWTError, ValueError, TypeError):  # malformed input of any kind: just "invalid"
        return None
    if not _in_time(claims, now):
        return None
    subject = claims.get(settings.subject_claim)
    if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT or not subject.isprintable():
        return None
    return MappingProxyType(claims)


def _in_time(claims: Mapping[str, Any], now: float) -> bool:
    """exp (required) not passed and nbf (optional) reached, give or take LEEWAY seconds."""
    exp, nbf = claims.get("exp"), claims.get("nbf", now)
    numbers = (int, float)
    if not isinstance(exp, numbers) or not isinstance(nbf, numbers) or isinstance(exp, bool) or isinstance(nbf, bool):
        return False
    return nbf - LEEWAY <= now < exp + LEEWAY


def tier_name(settings: JwtConfig, claims: Mapping[str, Any], tiers: Mapping[str, object]) -> str:
    """The tier the token's tier claim names, or default_tier when it is missing or unknown."""
    named = claims.get(settings.tier_claim) if settings.tier_claim else None
    return named if isinstance(named, str) and named in tiers else settings.default_tier


def subject_identity(subject: str) -> str:
    """The limit-state key of a JWT client: a digest of its subject."""
    return "j:" + hashlib.sha256(subject.encode()).hexdigest()[:32]
