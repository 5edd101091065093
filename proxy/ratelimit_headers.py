"""RateLimit / RateLimit-Policy (IETF httpapi-ratelimit-headers draft-10),
the legacy X-RateLimit-* trio, and Retry-After.

`RateLimit-Policy` is fixed per LimitSet (a tier's limits, then its
route's) and built once at config load. The rest depends only on each shown
limit's (remaining, whole seconds to reset), which repeat from request to
request: the five headers go out as header lines serialized once per
distinct state and kept in the LimitSet (`rate_limit_lines`, sent by
`proxy.responses`). Shadow and concurrency limits are never shown.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

from .bounded import keep
from .config import LimitSet
from .limits.algorithms import Outcome

MAX_LINES_PER_TIER: Final = 4096  # distinct states kept; a full cache starts over


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


def rate_limit_lines(limit_set: LimitSet, outcomes: Sequence[Outcome]) -> bytes:
    """The five headers of every limited answer as header lines, each ending CRLF
    (nothing when no limit is shown).

    Looked up by what they show: a single limit's (remaining, whole seconds
    to reset); for several, each one's and which is the tightest.
    """
    shown = limit_set.shown
    if len(outcomes) == 1 and shown:  # the common tier: no search, no generator
        o = outcomes[0]
        key: tuple[Any, int] = (o.remaining, whole_seconds(o.reset))  # cannot equal a many-limit key
        lines = limit_set.header_lines.get(key)
        return lines if lines is not None else _serialize(limit_set, (key,), 0, key)
    if not shown:
        return b""
    visible = [outcomes[i] for i in shown]
    states = tuple((o.remaining, whole_seconds(o.reset)) for o in visible)
    key = (states, most_constraining(visible))
    lines = limit_set.header_lines.get(key)
    return lines if lines is not None else _serialize(limit_set, states, key[1], key)


def _serialize(limit_set: LimitSet, states: tuple[tuple[int, int], ...], tight: int, key: tuple[Any, int]) -> bytes:
    remaining, reset = states[tight]
    names = (limit_set.limits[i].name for i in limit_set.shown)
    items = ", ".join(f'"{name}";r={r};t={t}' for name, (r, t) in zip(names, states))
    lines = (
        f"RateLimit-Policy: {limit_set.policy_header}\r\n"
        f"RateLimit: {items}\r\n"
        f"X-RateLimit-Limit: {limit_set.capacity_texts[tight]}\r\n"
        f"X-RateLimit-Remaining: {remaining}\r\n"
        f"X-RateLimit-Reset: {reset}\r\n"
    ).encode("ascii")  # names passed NAME_RE, the rest are digits
    kept: bytes = keep(limit_set.header_lines, key, lines, MAX_LINES_PER_TIER)
    return kept


def refusing_limit(limit_set: LimitSet, outcomes: Sequence[Outcome]) -> int:
    """Index of the enforced refusing limit that frees last: the one Retry-After waits for."""
    limits = limit_set.limits
    refused = [i for i, o in enumerate(outcomes) if not o.allowed and not limits[i].shadow]
    return max(refused, key=lambda i: outcomes[i].retry_after)


def retry_after_header(seconds: float) -> str:
    return str(max(1, whole_seconds(seconds)))
