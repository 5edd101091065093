"""The admin port: stats, per-client state, the decision service, metrics, auth."""

from __future__ import annotations

import logging

import pytest
from harness import running
from prometheus_client.parser import text_string_to_metric_families

CONFIG = """
upstream: {url: "{upstream}", timeout: 2}
tiers:
  anonymous:
    limits: [{algorithm: token_bucket, capacity: 50, refill_rate: 1}]
  free:
    limits:
      - {name: burst, algorithm: token_bucket, capacity: 3, refill_rate: 1}
      - {name: daily, algorithm: fixed_window, limit: 100, window: 86400}
api_keys:
  demo-free-key: {tier: free, name: demo-free}
  other-secret-key: {tier: free, name: "<script>alert(1)</script>"}
routes:
  - {path: /health, exempt: true}
"""
FREE = {"X-API-Key": "demo-free-key"}
RAW_KEYS = ("demo-free-key", "other-secret-key")


async def known_mix(tg) -> None:
    """3 allowed + 2 blocked (free), 1 unauthorized, 2 exempt, 1 upstream error (anonymous)."""
    for _ in range(5):
        await tg.get("/users", headers=FREE)
    await tg.get("/users", headers={"X-API-Key": "wrong"})
    await tg.get("/health")
    await tg.get("/health")
    try:
        await tg.get("/drop/100")
    except Exception:  # the client sees a broken body: that is the point
        pass


async def admin_json(tg, method: str, path: str, **kwargs):
    async with tg.session.request(method, tg.admin_url + path, **kwargs) as resp:
        return resp.status, (await resp.json() if resp.content_length else None)


async def test_counters_equal_what_was_sent(upstream, fake_clock):
    async with running(CONFIG, upstream.url, clock=fake_clock) as tg:
        await known_mix(tg)
        status, stats = await admin_json(tg, "GET", "/api/stats")
    assert status == 200
    assert stats["totals"] == {"requests": 9, "allowed": 4, "blocked": 2, "unauthorized": 1, "exempt": 2,
                               "unavailable": 0, "rejected": 0, "upstream_errors": 1, "shadow_blocked": 0,
                               "websocket_messages_refused": 0}
    assert stats["success_rate_percent"] == round(100 * 7 / 9, 2)
    assert stats["tiers"] == {"free": {"requests": 5, "allowed": 3, "blocked": 2, "shadow_blocked": 0},
                              "anonymous": {"requests": 1, "allowed": 1, "blocked": 0, "shadow_blocked": 0}}
    assert stats["limits"] == {"routes": [], "tiers": {}}  # nothing beyond per-client limits here
    assert stats["top_clients"][0] == {"id": "demo-free", "tier": "free", "requests": 5, "allowed": 3,
                                       "blocked": 2, "remaining": 0}
    assert [c["id"] for c in stats["top_blocked"]] == ["demo-free"]
    assert sum(p["allowed"] for p in stats["timeline"]) == 4
    assert sum(p["blocked"] for p in stats["timeline"]) == 2
    assert stats["storage"] == {"backend": "memory", "healthy": True, "on_error": "allow", "last_error": None,
                                "down": []}
    assert stats["config"]["version"] == 1 and stats["config"]["last_error"] is None


async def test_prometheus_metrics_match_the_mix(upstream, fake_clock):
    async with running(CONFIG, upstream.url, clock=fake_clock) as tg:
        await known_mix(tg)
        async with tg.session.get(tg.admin_url + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }
    req = "tollgate_requests_total"
    assert samples[(req, (("decision", "allowed"), ("tier", "free")))] == 3
    assert samples[(req, (("decision", "blocked"), ("tier", "free")))] == 2
    assert samples[(req, (("decision", "unauthorized"), ("tier", "-")))] == 1
    assert samples[(req, (("decision", "exempt"), ("tier", "-")))] == 2
    assert samples[(req, (("decision", "allowed"), ("tier", "anonymous")))] == 1
    assert samples[("tollgate_upstream_errors_total", (("kind", "broken"),))] == 1
    assert samples[("tollgate_request_duration_seconds_count", ())] == 9
    assert samples[("tollgate_storage_errors_total", ())] == 0
    assert samples[("tollgate_config_reloads_total", (("result", "success"),))] == 0
    assert any(name == "process_resident_memory_bytes" for name, _ in samples)
    assert not any("client" in dict(labels) for _, labels in samples)


async def test_latency_percentiles_land_in_the_right_bucket(upstream):
    async with running(CONFIG, upstream.url) as tg:
        for _ in range(18):
            await tg.get("/delay/0.01")
        for _ in range(2):
            await tg.get("/delay/0.25")
        _, stats = await admin_json(tg, "GET", "/api/stats")
    upstream_ms = stats["latency_ms"]["upstream"]
    assert 10 <= upstream_ms["p50"] < 25
    assert 10 <= upstream_ms["p95"] < 25 or 250 <= upstream_ms["p95"] < 300
    assert 250 <= upstream_ms["p99"] < 300
    proxy_ms = stats["latency_ms"]["proxy"]
    assert 0 < proxy_ms["p50"] < 10  # Tollgate's own share is small, not the upstream's 10 ms


async def test_client_state_reset_and_unknown(upstream, fake_clock):
    async with running(CONFIG, upstream.url, clock=fake_clock) as tg:
        for _ in range(2):
            await tg.get("/users", headers=FREE)
        status, state = await admin_json(tg, "GET", "/api/clients/demo-free")
        assert status == 200
        assert state["tier"] == "free"
        assert state["limits"] == [
            {"name": "burst", "algorithm": "token_bucket", "limit": 3, "per": ["client"], "shadow": False,
             "remaining": 1, "reset_seconds": 2},
            {"name": "daily", "algorithm": "fixed_window", "limit": 100, "per": ["client"], "shadow": False,
             "remaining": 98, "reset_seconds": 86400 - int(fake_clock()) % 86400},
        ]
        async with tg.session.delete(tg.admin_url + "/api/clients/demo-free") as resp:
            assert resp.status == 204
        _, state = await admin_json(tg, "GET", "/api/clients/demo-free")
        assert [lim["remaining"] for lim in state["limits"]] == [3, 100]
        status, body = await admin_json(tg, "GET", "/api/clients/nobody")
        assert status == 404 and body["error"] == "unknown_client"
        _, fresh = await admin_json(tg, "GET", "/api/clients/192.0.2.44")
        assert fresh["tier"] == "anonymous" and fresh["limits"][0]["remaining"] == 50
        _, v6 = await admin_json(tg, "GET", "/api/clients/2001:db8::1")
        assert v6["limits"][0]["remaining"] == 50


async def test_stats_reset_zeroes_counters_but_not_limits(upstream, fake_clock):
    async with running(CONFIG, upstream.url, clock=fake_clock) as tg:
        await known_mix(tg)
        async with tg.session.post(tg.admin_url + "/api/stats/reset") as resp:
            assert resp.status == 204
        _, stats = await admin_json(tg, "GET", "/api/stats")
        assert stats["totals"]["requests"] == 0 and stats["top_clients"] == [] and stats["timeline"] == []
        assert (await tg.get("/users", headers=FREE))[0] == 429  # limits untouched


async def test_check_service_decides_in_its_own_namespace(upstream, fake_clock):
    async with running(CONFIG, upstream.url, clock=fake_clock) as tg:
        body = {"key": "demo-free-key", "tier": "free", "cost": 2}
        status, first = await admin_json(tg, "POST", "/api/check", json=body)
        assert status == 200
        assert first == {"allowed": True, "tier": "free", "limit": "burst", "remaining": 1,
                         "retry_after_seconds": 0, "delay_seconds": 0.0}
        _, second = await admin_json(tg, "POST", "/api/check", json=body)
        assert second["allowed"] is False and second["limit"] == "burst"
        assert second["retry_after_seconds"] == 1.0
        # the proxied client with the same key string is untouched
        assert (await tg.get("/users", headers=FREE))[0] == 200


@pytest.mark.parametrize("payload, message", [
    (b"{not json", "The body is not valid JSON."),
    (b"[1, 2]", 'the body must be a JSON object like {"key": "...", "tier": "...", "cost": 1}'),
    (b'{"tier": "free"}', "key: must be a non-empty string"),
    (b'{"key": 7, "tier": "free"}', "key: must be a non-empty string"),
    (b'{"key": "a", "tier": "gold"}', "tier: must be one of anonymous, free"),
    (b'{"key": "a", "tier": "free", "cost": 0}', "cost: must be an integer >= 1"),
    (b'{"key": "a", "tier": "free", "cost": "1"}', "cost: must be an integer >= 1"),
    (b'{"key": "a", "tier": "free", "cost": true}', "cost: must be an integer >= 1"),
    (b'{"key": "a", "tier": "free", "weight": 1}', "unknown field(s): weight"),
])
async def test_check_service_bad_input_is_400(upstream, payload, message):
    async with running(CONFIG, upstream.url) as tg:
        async with tg.session.post(tg.admin_url + "/api/check", data=payload) as resp:
            assert resp.status == 400
            assert resp.content_type == "application/problem+json"
            assert (await resp.json())["message"] == message


async def test_admin_token_bearer_and_cookie(upstream):
    cfg = CONFIG + "admin: {token: s3cret-admin}\n"
    async with running(cfg, upstream.url) as tg:
        s = tg.session
        async with s.get(tg.admin_url + "/api/stats") as resp:
            assert resp.status == 401 and resp.content_type == "application/problem+json"
        async with s.get(tg.admin_url + "/api/stats", headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
        async with s.get(tg.admin_url + "/api/stats", headers={"Authorization": "Bearer s3cret-admin"}) as resp:
            assert resp.status == 200
        for open_path in ("/healthz", "/readyz"):
            async with s.get(tg.admin_url + open_path) as resp:
                assert resp.status == 200
        async with s.get(tg.admin_url + "/metrics") as resp:
            assert resp.status == 401
        async with s.get(tg.admin_url + "/?token=wrong", allow_redirects=False) as resp:
            assert resp.status == 401
        async with s.get(tg.admin_url + "/?token=s3cret-admin", allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/"
            cookie = resp.headers["Set-Cookie"]
        assert "tollgate_admin=s3cret-admin" in cookie and "HttpOnly" in cookie
        async with s.get(tg.admin_url + "/api/stats", headers={"Cookie": "tollgate_admin=s3cret-admin"}) as resp:
            assert resp.status == 200


async def test_raw_keys_appear_nowhere(upstream, caplog):
    caplog.set_level(logging.INFO, logger="tollgate")
    async with running(CONFIG, upstream.url) as tg:
        await known_mix(tg)
        await tg.get("/users", headers={"X-API-Key": "other-secret-key"})
        texts = [record.getMessage() for record in caplog.records]
        access = tg.access_lines()
        assert len(access) == 10 and all(" access client=" in line for line in access)
        texts += access
        for path in ("/api/stats", "/metrics", "/", "/api/clients/demo-free"):
            async with tg.session.get(tg.admin_url + path) as resp:
                texts.append(await resp.text())
        async with tg.session.get(tg.url + "/x", headers={"X-API-Key": "nope-secret"}) as resp:
            texts.append(await resp.text())
    assert any("demo-free" in text for text in texts)  # names are there...
    for text in texts:
        for key in (*RAW_KEYS, "nope-secret"):
            assert key not in text  # ...keys never


async def test_access_line_quotes_what_could_forge_a_line(upstream):
    async with running(CONFIG, upstream.url) as tg:
        await tg.get("/a%0Afake%20line?x=1", headers=FREE)
        [line] = tg.access_lines()
    assert 'path="/a\\nfake line"' in line and "client=demo-free tier=free decision=allowed" in line
    assert "status=200" in line and "upstream_ms=" in line and "x=1" not in line
