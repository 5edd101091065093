"""clients.networks and clients.jwt: they name tiers, so they are read after the tiers;
and the check that `claim:` selectors have a clients.jwt to read claims from.

(clients.deny names none and is read with the rest of `clients` in sections.py.)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from ..routes import Route
from .checks import Checker, read_network
from .model import JwtConfig, Network, Tier

CLAIM_RE: Final = re.compile(r"[A-Za-z0-9_.:-]+\Z")
JWT_KEYS: Final = ("algorithms", "key_file", "secret_env", "issuer", "audience", "subject_claim",
                   "tier_claim", "default_tier")


def read_callers(ck: Checker, raw: Any, known: Mapping[str, Any], base: Path,
                 environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """ClientsConfig's `networks` and `jwt`, for the keys that are given."""
    clients = raw if isinstance(raw, dict) else {}
    out: dict[str, Any] = {}
    if clients.get("networks") is not None:
        out["networks"] = _networks(ck, clients["networks"], known)
    if clients.get("jwt") is not None:
        out["jwt"] = _jwt(ck, clients["jwt"], known, base, os.environ if environ is None else environ)
    return out


def _tier(ck: Checker, path: str, value: Any, known: Mapping[str, Any]) -> str | None:
    if not isinstance(value, str) or value not in known:
        ck.error(path, "must name a tier in tiers (" + ", ".join(sorted(known)) + ")", value)
        return None
    return value


def _networks(ck: Checker, value: Any, known: Mapping[str, Any]) -> tuple[tuple[Network, str], ...]:
    if not isinstance(value, list):
        ck.error("clients.networks", "must be a list of {cidr, tier} mappings", value)
        return ()
    out = []
    for i, item in enumerate(value):
        path = f"clients.networks[{i}]"
        entry = ck.mapping(path, item, {"cidr": None, "tier": None})
        if not isinstance(item, dict):
            continue
        missing = [key for key in ("cidr", "tier") if key not in entry]
        for key in missing:
            ck.error(f"{path}.{key}", "is required")
        if missing:
            continue
        net = read_network(ck, f"{path}.cidr", entry["cidr"])
        tier = _tier(ck, f"{path}.tier", entry["tier"], known)
        if net is not None and tier is not None:
            out.append((net, tier))
    return tuple(out)


def _optional_text(ck: Checker, path: str, value: Any, pattern: re.Pattern[str] | None = None) -> str | None:
    if value is None:
        return None
    text: str = ck.string(path, value, "", pattern=pattern,
                          what="a claim name ([A-Za-z0-9_.:-]+)" if pattern else "a non-empty string")
    return text or None


def _algorithms(ck: Checker, value: Any) -> tuple[str, ...]:
    from .jwt_keys import ALGORITHMS, HMAC

    path = "clients.jwt.algorithms"
    if not isinstance(value, list) or not value:
        ck.error(path, "must be a non-empty list of algorithms like [RS256]", value)
        return ()
    algorithms: list[str] = []
    for i, alg in enumerate(value):
        if isinstance(alg, str) and alg.lower() == "none":
            ck.error(f"{path}[{i}]", "unsigned tokens (none) are never accepted", alg)
        elif alg not in ALGORITHMS or not isinstance(alg, str):
            ck.error(f"{path}[{i}]", "must be one of " + ", ".join(ALGORITHMS), alg)
        elif alg not in algorithms:
            algorithms.append(alg)
    if len(algorithms) < len(value):
        return ()
    if any(a in HMAC for a in algorithms) and any(a not in HMAC for a in algorithms):
        ck.error(path, "HS* (a shared secret) and public-key algorithms cannot be mixed", value)
        return ()
    return tuple(algorithms)


def _jwt(ck: Checker, value: Any, known: Mapping[str, Any], base: Path,
         environ: Mapping[str, str]) -> JwtConfig | None:
    spec = ck.mapping("clients.jwt", value, dict.fromkeys(JWT_KEYS))
    if not isinstance(value, dict):
        return None
    before = len(ck.errors)
    for key in ("algorithms", "default_tier"):
        if key not in spec:
            ck.error(f"clients.jwt.{key}", "is required")
    algorithms = _algorithms(ck, spec["algorithms"]) if "algorithms" in spec else ()
    default_tier = _tier(ck, "clients.jwt.default_tier", spec.get("default_tier"), known) if "default_tier" in spec \
        else None
    issuer = _optional_text(ck, "clients.jwt.issuer", spec.get("issuer"))
    audience = _optional_text(ck, "clients.jwt.audience", spec.get("audience"))
    subject_claim = _optional_text(ck, "clients.jwt.subject_claim", spec.get("subject_claim", "sub"), CLAIM_RE)
    tier_claim = _optional_text(ck, "clients.jwt.tier_claim", spec.get("tier_claim"), CLAIM_RE)
    keys = _keys(ck, spec, algorithms, base, environ) if algorithms else {}
    if len(ck.errors) > before or default_tier is None:
        return None
    return JwtConfig(algorithms=algorithms, keys=keys, default_tier=default_tier, issuer=issuer,
                     audience=audience, subject_claim=subject_claim or "sub", tier_claim=tier_claim)


def _keys(ck: Checker, spec: Mapping[str, Any], algorithms: tuple[str, ...], base: Path,
          environ: Mapping[str, str]) -> dict[tuple[str | None, str], Any]:
    from .jwt_keys import HMAC, file_keys, secret_keys

    hmac = algorithms[0] in HMAC
    if "key_file" in spec and "secret_env" in spec:
        ck.error("clients.jwt", "give key_file (public keys) or secret_env (an HS* secret), not both")
    elif hmac and "secret_env" not in spec:
        ck.error("clients.jwt.secret_env", f"is required for {', '.join(algorithms)} (key_file holds public keys)")
    elif not hmac and "key_file" not in spec:
        ck.error("clients.jwt.key_file", f"is required for {', '.join(algorithms)} (secret_env is for HS*)")
    elif hmac:
        return secret_keys(ck, "clients.jwt.secret_env", spec["secret_env"], algorithms, environ)
    else:
        name = spec["key_file"]
        if not isinstance(name, str) or not name:
            ck.error("clients.jwt.key_file", "must be a file path", name)
            return {}
        return file_keys(ck, "clients.jwt.key_file", base, name, algorithms)
    return {}


def check_claim_selectors(ck: Checker, tiers: Mapping[str, Tier], routes: Sequence[Route],
                          jwt: JwtConfig | None) -> None:
    """`per: claim:<name>` reads a verified token's claims: without clients.jwt it would never see one.

    Run on a config read without errors, where each limit sits at its index as written.
    """
    if jwt is not None:
        return
    owners = [(f"tiers.{name}.limits", tier.limits) for name, tier in tiers.items()]
    owners += [(f"routes[{j}].limits", route.limits) for j, route in enumerate(routes)]
    for path, limits in owners:
        for i, limit in enumerate(limits):
            for selector in limit.per:
                if selector.startswith("claim:"):
                    ck.error(f"{path}[{i}].per", "claim:<name> selectors need clients.jwt", selector)
