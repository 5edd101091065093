"""The one rule of Tollgate's caches of derived values: bounded, and started over when full.

A cache that starts over costs one clear per `limit` new keys (amortised
O(1)), needs no order kept per hit (the hot path only does dict.get), and a
flood of distinct keys can never grow it past `limit`.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def keep(cache: dict[K, V], key: K, value: V, limit: int) -> V:
    """Store `value` under `key`, first emptying `cache` if it holds `limit` entries; return `value`."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value
