"""`tiers.<name>.penalty`: how many strikes, within how long, ban for how long."""

from __future__ import annotations

import hashlib
from typing import Any, Final

from ..limits.algorithms import Ban, SlidingWindow
from ..limits.store import Limit
from .checks import Checker
from .model import Penalty

PENALTY_KEYS: Final = dict.fromkeys(("after", "within", "ban", "statuses"))
MAX_AFTER: Final = 1_000_000  # strikes are a log in the store: a bound on its size
MAX_SECONDS: Final = 1e9


def read_penalty(ck: Checker, path: str, raw: Any, tier: str, *, unlimited: bool) -> Penalty | None:
    """A tier's penalty, or None (absent or invalid: every problem is reported).

    The ban's state key derives from the tier and the ban's length, the
    strikes' from the tier, `after` and `within`: a reload that keeps them
    keeps every ban and count (changing `statuses` keeps both too).
    """
    if raw is None:
        return None
    if unlimited:
        ck.error(path, "an unlimited tier is never refused, so it has no penalty")
        return None
    body = ck.mapping(path, raw, PENALTY_KEYS)
    if not isinstance(raw, dict):
        return None  # mapping() said so
    before = len(ck.errors)
    for key in ("after", "within", "ban"):
        if key not in body:
            ck.error(f"{path}.{key}", "is required")
    after = ck.number(f"{path}.after", body.get("after", 1), 1, minimum=1, exclusive=False, integer=True)
    if after > MAX_AFTER:
        ck.error(f"{path}.after", f"must be at most {MAX_AFTER}", after)
    within = ck.number(f"{path}.within", body.get("within", 1), 1.0)
    ban = ck.number(f"{path}.ban", body.get("ban", 1), 1.0)
    for key, value in (("within", within), ("ban", ban)):
        if value > MAX_SECONDS:
            ck.error(f"{path}.{key}", f"must be at most {MAX_SECONDS:g} seconds", value)
    statuses = _statuses(ck, f"{path}.statuses", body.get("statuses", []))
    if len(ck.errors) > before:
        return None
    counted = hashlib.sha256(repr(("st", after, within)).encode()).hexdigest()[:8]
    banned = hashlib.sha256(repr(("bn", ban)).encode()).hexdigest()[:8]
    return Penalty(
        after=after, within=within, statuses=statuses,
        strikes=Limit(name="strikes", algorithm=SlidingWindow(after - 1, within), key=f"{tier}.penalty.st{counted}"),
        ban=Limit(name="banned", algorithm=Ban(ban), key=f"{tier}.penalty.bn{banned}"),
    )


def _statuses(ck: Checker, path: str, raw: Any) -> frozenset[int]:
    if not isinstance(raw, list):
        ck.error(path, "must be a list of HTTP statuses (100-599)", raw)
        return frozenset()
    out = set()
    for i, status in enumerate(raw):
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            ck.error(f"{path}[{i}]", "must be an HTTP status 100-599", status)
        else:
            out.add(status)
    return frozenset(out)
