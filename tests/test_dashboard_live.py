"""The dashboard end to end: a real Tollgate, real traffic, real headless Chromium.

The README's picture comes from `python docs/make_screenshot.py` (the shipped
demo under a traffic loop), which drives Chromium the same way.
"""

from __future__ import annotations

import asyncio
import json

from harness import running

SCRIPT_NAME = "<script>alert(1)</script>"
CONFIG = f"""
upstream: {{url: "{{upstream}}"}}
clients: {{trusted_proxies: [127.0.0.1/32]}}
tiers:
  anonymous:
    limits: [{{algorithm: token_bucket, capacity: 30, refill_rate: 3}}]
  free:
    limits:
      - {{name: burst, algorithm: token_bucket, capacity: 5, refill_rate: 0.5}}
      - {{name: daily, algorithm: fixed_window, limit: 1000, window: 86400}}
  premium:
    limits: [{{algorithm: token_bucket, capacity: 1000, refill_rate: 100}}]
api_keys:
  evil-key: {{tier: free, name: {json.dumps(SCRIPT_NAME)}}}
  free-key: {{tier: free, name: demo-free}}
  premium-key: {{tier: premium, name: demo-premium}}
routes:
  - {{path: /health, exempt: true}}
"""


async def traffic(tg, rounds: int) -> None:
    for i in range(rounds):
        await asyncio.gather(
            tg.get("/users", headers={"X-API-Key": "evil-key"}),
            tg.get("/data", headers={"X-API-Key": "free-key"}),
            tg.get("/users", headers={"X-API-Key": "premium-key"}),
            tg.get("/users", headers={"X-Forwarded-For": f"203.0.113.{i % 7}"}),
            tg.get("/health"),
        )


async def test_live_page_follows_real_traffic(upstream, browser, tmp_path):
    async with running(CONFIG, upstream.url) as tg:
        await browser.navigate(tg.admin_url + "/")
        await browser.wait_for("document.getElementById('total-requests').textContent === '0'")
        scripts = await browser.evaluate("document.querySelectorAll('script').length")
        await traffic(tg, 12)
        # only a live update can have put these numbers and names on the page
        await browser.wait_for("document.getElementById('total-requests').textContent === '60'", timeout=5)
        blocked = tg.runtime.stats.totals["blocked"]
        assert blocked > 0
        await browser.wait_for(f"document.getElementById('total-blocked').textContent === '{blocked}'")
        names = await browser.evaluate(
            "[...document.querySelectorAll('#top-blocked tr[data-client-id]')].map(tr => tr.dataset.clientId)")
        assert SCRIPT_NAME in names and "demo-free" in names
        cell = await browser.evaluate(
            "[...document.querySelectorAll('#top-blocked tr[data-client-id]')]"
            f".find(tr => tr.dataset.clientId === {json.dumps(SCRIPT_NAME)}).cells[0].firstChild.textContent")
        assert cell == SCRIPT_NAME
        assert await browser.evaluate("document.querySelectorAll('script').length") == scripts
        assert browser.dialogs == [] and browser.errors == []
        shot = await browser.screenshot(tmp_path / "live.png", 1280, 900)
        assert shot.stat().st_size > 10_000


async def test_token_is_needed_and_the_cookie_carries_it(upstream, browser):
    async with running(CONFIG + "admin: {token: dash-secret}\n", upstream.url) as tg:
        await browser.navigate(tg.admin_url + "/")
        text = await browser.evaluate("document.body.innerText")
        assert "unauthorized" in text and await browser.evaluate("document.getElementById('total-requests')") is None
        await browser.navigate(tg.admin_url + "/?token=dash-secret")
        await browser.wait_for("location.search === '' && document.getElementById('total-requests') !== null")
        await traffic(tg, 2)
        await browser.wait_for("document.getElementById('total-requests').textContent === '10'", timeout=5)


async def test_the_dashboard_passes_the_origin_check_and_other_pages_do_not(upstream, browser):
    """Chromium sends Origin on the dashboard's own DELETE and POST: those pass;
    the same POST from a page of another origin (the upstream's port) is refused."""
    async with running(CONFIG, upstream.url) as tg:
        await traffic(tg, 1)
        await browser.navigate(tg.admin_url + "/")
        assert await browser.evaluate("fetch('api/clients/demo-free', {method: 'DELETE'}).then(r => r.status)") == 204
        assert await browser.evaluate("fetch('api/stats/reset', {method: 'POST'}).then(r => r.status)") == 204
        assert tg.runtime.stats.totals["requests"] == 0
        await traffic(tg, 1)
        await browser.navigate(upstream.url + "/health")
        reset = json.dumps(tg.admin_url + "/api/stats/reset")
        await browser.evaluate(f"fetch({reset}, {{method: 'POST', mode: 'no-cors'}}).then(() => 0, () => 1)")
        assert tg.runtime.stats.totals["requests"] == 5  # the cross-site POST changed nothing
        assert browser.errors == []


ODD_PATH = '/x"><img src=x onerror=alert(1)>'
LIMITS_CONFIG = f"""
upstream: {{url: "{{upstream}}"}}
clients: {{trusted_proxies: [127.0.0.1/32]}}
tiers:
  anonymous:
    limits:
      - {{name: burst, algorithm: token_bucket, capacity: 100, refill_rate: 1}}
      - {{name: trial, algorithm: fixed_window, limit: 1, window: 3600, shadow: true}}
      - {{name: inflight, algorithm: concurrency, max: 4}}
routes:
  - path: {json.dumps(ODD_PATH)}
    limits: [{{name: odd-all, algorithm: fixed_window, limit: 50, window: 3600, per: global}}]
  - path: /export
    limits: [{{name: export-all, algorithm: fixed_window, limit: 50, window: 3600, per: global}}]
"""


async def test_shadow_refusals_and_global_limit_states_show_live(upstream, browser, fake_clock, tmp_path):
    async with running(LIMITS_CONFIG, upstream.url, clock=fake_clock) as tg:
        await browser.navigate(tg.admin_url + "/")
        where = json.dumps(f"route {ODD_PATH}|odd-all")
        odd = f"[...document.querySelectorAll('#limit-states tr')].find(tr => tr.dataset.limit === {where})"
        row = "document.querySelector(`tr[data-limit='route /export|export-all']`)"
        await browser.wait_for(f"{row} !== null && {row}.cells[2].textContent === '50 / 50'")
        assert await browser.evaluate("document.getElementById('total-shadow-blocked').textContent") == "0"
        scripts = await browser.evaluate("document.querySelectorAll('script').length")
        for _ in range(3):  # the first passes the shadow limit, the next two it would have refused
            await tg.get("/export", headers={"X-Forwarded-For": "192.0.2.9"})
        await browser.wait_for("document.getElementById('total-shadow-blocked').textContent === '2'", timeout=5)
        await browser.wait_for(f"{row}.cells[2].textContent === '47 / 50'", timeout=5)
        assert await browser.evaluate(f"{odd}.cells[0].firstChild.textContent") == f"route {ODD_PATH}"
        assert await browser.evaluate(f"{odd}.cells[2].textContent") == "50 / 50"
        inflight = await browser.evaluate(
            "document.querySelector(`tr[data-limit='tier anonymous|inflight']`).cells[3].textContent")
        assert inflight == "0"
        policies = await browser.evaluate("[...document.querySelectorAll('#tiers .policy')].map(d => d.textContent)")
        assert any(p.startswith("trial") and p.endswith("shadow") for p in policies)
        await browser.evaluate("document.querySelector('#top-clients tr[data-client-id]').click()")
        panel = "[...document.querySelectorAll('#client-limits tbody tr')].map(tr => tr.cells[0].textContent)"
        await browser.wait_for(f"{panel}.some(t => t.startsWith('export-all') && t.endsWith('route /export'))")
        assert await browser.evaluate("document.querySelectorAll('img').length") == 0
        assert await browser.evaluate("document.querySelectorAll('script').length") == scripts
        assert browser.dialogs == [] and browser.errors == []
        shot = await browser.screenshot(tmp_path / "limits.png", 1280, 1400)
        assert shot.stat().st_size > 10_000
        async with tg.session.get(tg.admin_url + "/") as resp:
            page = await resp.text()
    assert ODD_PATH not in page and "route /x&#34;&gt;&lt;img" in page  # the server-rendered rows are escaped too
