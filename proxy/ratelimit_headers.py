"""RateLimit / RateLimit-Policy (IETF httpapi-ratelimit-headers draft-10),
the legacy X-RateLimit-* trio, and Retry-After.

`RateLimit-Policy` is fixed per tier and built once at config load
(`Tier.policy_header`); only `RateLimit` depends on the request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .config import Tier
from .limits.algorithms import Outcome


def whole_seconds(seconds: float) -> int:
    """Seconds rounded up (a client told 1 s early would be refused again)."""
    return math.ceil(seconds - 1e-9) if seconds > 1e-9 else 0


def most_constraining(outcomes: Sequence[Outcome]) -> int:
    """Index of the limit with the least remaining (ties: the one freeing last)."""
    best = 0
    for i in range(1, len(outcomes)):
        o, b = outcomes[i], outcomes[best]
        if o.remaining < b.remaining or (o.remaining == b.remaining and o.reset > b.reset):
            best = i
    return best


def rate_limit_headers(tier: Tier, outcomes: Sequence[Outcome]) -> list[tuple[str, str]]:
    """The five headers of every limited answer, as pairs (what aiohttp takes whole)."""
    if len(outcomes) == 1:  # the common tier, without the joins and the search
        tight, o = 0, outcomes[0]
        remaining, reset = str(o.remaining), str(whole_seconds(o.reset))
        items = f'"{tier.limits[0].name}";r={remaining};t={reset}'
    else:
        items = ", ".join([
            f'"{limit.name}";r={o.remaining};t={whole_seconds(o.reset)}' for limit, o in zip(tier.limits, outcomes)
        ])
        tight = most_constraining(outcomes)
        o = outcomes[tight]
        remaining, reset = str(o.remaining), str(whole_seconds(o.reset))
    return [
        ("RateLimit-Policy", tier.policy_header),
        ("RateLimit", items),
        ("X-RateLimit-Limit", tier.capacity_texts[tight]),
        ("X-RateLimit-Remaining", remaining),
        ("X-RateLimit-Reset", reset),
    ]


def refusing_limit(outcomes: Sequence[Outcome]) -> int:
    """Index of the refusing limit that frees last: the one Retry-After waits for."""
    refused = [i for i, o in enumerate(outcomes) if not o.allowed]
    return max(refused, key=lambda i: outcomes[i].retry_after)


def retry_after_header(seconds: float) -> str:
    return str(max(1, whole_seconds(seconds)))
