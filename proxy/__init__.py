"""Tollgate: a rate-limiting reverse proxy on aiohttp."""
