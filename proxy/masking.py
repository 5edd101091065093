"""Secrets out of what Tollgate prints: URLs with their password masked."""

from __future__ import annotations


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        return url
    user = userinfo.split(":", 1)[0]
    masked = f"{user}:***" if ":" in userinfo and user else "***"
    return f"{scheme}://{masked}@{hostport}{slash}{tail}"
