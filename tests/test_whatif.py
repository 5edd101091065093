"""POST /api/whatif: the record of limited requests, and its replay through a
candidate config, checked against a live Tollgate running that candidate on
the same requests at the same (fake) instants."""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import pytest
from harness import Tollgate, running
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import config as config_module
from proxy import whatif as whatif_module
from proxy.config import ConfigError
from proxy.identity import Client
from proxy.replay import Replay
from proxy.routes import Route
from proxy.whatif import Recorder

LIVE = """
upstream: {url: "{upstream}"}
clients: {unknown_key: anonymous, trusted_proxies: [127.0.0.1/32]}
tiers:
  anonymous:
    limits: [{algorithm: token_bucket, capacity: 3, refill_rate: 0.25}]
  free:
    limits:
      - {name: burst, algorithm: token_bucket, capacity: 4, refill_rate: 0.75}
      - {name: tenant, algorithm: fixed_window, limit: 40, window: 60, per: "header:X-Tenant"}
  ops: {unlimited: true}
api_keys:
  free-key-1: {tier: free, name: alice}
  free-key-2: {tier: free, name: bob}
  ops-key: {tier: ops, name: ops}
routes:
  - {path: /health, exempt: true}
  - {path: /search, cost: 2}
"""
CANDIDATE = """
upstream: {url: "{upstream}"}
clients: {unknown_key: reject, trusted_proxies: [127.0.0.1/32]}
tiers:
  anonymous:
    limits: [{algorithm: sliding_window, limit: 4, window: 10}]
  free:
    limits:
      - {name: burst, algorithm: token_bucket, capacity: 3, refill_rate: 0.5}
      - {name: tenant, algorithm: fixed_window, limit: 12, window: 30, per: ["header:X-Tenant", method]}
  ops:
    limits: [{algorithm: fixed_window, limit: 5, window: 20}]
api_keys:
  free-key-1: {tier: free, name: alice}
  ops-key: {tier: ops, name: ops}
  free-key-2: {tier: anonymous, name: bob}
routes:
  - {path: /health, exempt: true}  # exempt then: not recorded, so a replay cannot say what un-exempting does
  - {path: /search, cost: 2}
  - {path: /login, methods: [POST], limits: [{name: login, algorithm: sliding_window, limit: 2, window: 30,
                                             per: address}]}
"""
KEYS = ("free-key-1", "free-key-2", "ops-key", "not-a-key", None, None)
THEN_ID = {"free-key-1": "alice", "free-key-2": "bob", "ops-key": "ops"}


def traffic(seed: int, n: int) -> list[tuple[str, str, dict[str, str], float]]:
    """(method, path, headers, seconds to advance before it): the same list for both Tollgates."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        key = rng.choice(KEYS)
        headers = {"X-Forwarded-For": f"203.0.113.{rng.randrange(3)}"}
        if key:
            headers["X-API-Key"] = key
        if rng.random() < 0.7:
            headers["X-Tenant"] = rng.choice(("tenant-a", "tenant-b"))
        method, path = rng.choice((("GET", "/users"), ("GET", "/search?q=1"), ("POST", "/login"),
                                   ("GET", "/health"), ("GET", "/users/7")))
        out.append((method, path, headers, rng.choice((0.0, 0.0, 0.25, 0.5, 1.5))))
    return out


def then_of(headers: dict[str, str]) -> tuple[str, str]:
    key = headers.get("X-API-Key")
    if key in THEN_ID:
        return THEN_ID[key], "ops" if key == "ops-key" else "free"
    return headers["X-Forwarded-For"], "anonymous"


async def send(tg: Tollgate, method: str, path: str, headers: dict[str, str]) -> int:
    async with tg.session.request(method, tg.url + path, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_replay_refuses_exactly_what_the_candidate_refuses_live(upstream, fake_clock):
    expected: dict[tuple[str, str], Counter[str]] = {}
    async with running(LIVE, upstream.url, clock=fake_clock) as live, \
            running(CANDIDATE, upstream.url, clock=fake_clock) as candidate:
        for method, path, headers, wait in traffic(7, 240):
            fake_clock.advance(wait)
            then, now = await send(live, method, path, headers), await send(candidate, method, path, headers)
            if path == "/health":  # exempt then: never limited, so not recorded
                continue
            counts = expected.setdefault(then_of(headers), Counter())
            counts["requests"] += 1
            counts["allowed_then" if then < 400 else "refused_then"] += 1
            counts["allowed_candidate" if now < 400 else "refused_candidate"] += 1
        answer = await whatif(live, CANDIDATE.replace("{upstream}", upstream.url))
    assert answer["unrecorded_selectors"] == []
    got = {(row["id"], row["tier"]): Counter({k: v for k, v in row.items() if k not in ("id", "tier") and v})
           for row in answer["clients"]}
    for counts in got.values():
        counts["requests"] = sum(counts[k] for k in ("allowed_then", "refused_then"))
    assert got == expected  # fewer than 50 clients: every one is listed
    tiers: dict[str, Counter[str]] = {}
    for (_, tier), counts in expected.items():
        tiers.setdefault(tier, Counter()).update(counts)
    assert {name: dict(c) for name, c in tiers.items()} == {
        name: {k: v for k, v in row.items() if v} for name, row in answer["tiers"].items()}
    assert answer["requests"] == sum(c["requests"] for c in expected.values())
    assert sum(c["refused_candidate"] - c["refused_then"] for c in expected.values()) > 20  # a stricter candidate
    assert {c["refused_then"] > 0 for c in expected.values()} == {True, False}


async def whatif(tg: Tollgate, text: str, status: int = 200) -> Any:
    async with tg.session.post(tg.admin_url + "/api/whatif", data=text.encode(),
                               headers={"Content-Type": "application/yaml"}) as resp:
        assert resp.status == status, await resp.text()
        return await resp.json()


async def test_live_state_is_untouched_and_unrecorded_selectors_are_named(upstream, fake_clock):
    async with running(LIVE, upstream.url, clock=fake_clock) as tg:
        for _ in range(4):
            assert await send(tg, "GET", "/users", {"X-API-Key": "free-key-1"}) == 200
        before = tg.runtime.stats.totals["requests"], len(tg.runtime.recorder)
        extra = CANDIDATE.replace("per: address", "per: [address, 'cookie:sid', 'query:page']")
        answer = await whatif(tg, extra.replace("{upstream}", upstream.url))
        assert answer["unrecorded_selectors"] == ["cookie:sid", "query:page"]
        assert answer["tiers"]["free"] == {"requests": 4, "allowed_then": 4, "refused_then": 0,
                                           "allowed_candidate": 3, "refused_candidate": 1}
        assert answer["from"] == answer["to"] == "2023-11-14T22:13:20.000Z"  # FAKE_EPOCH: one instant
        # the replay charged its own store: alice still has exactly no token left, live
        assert await send(tg, "GET", "/users", {"X-API-Key": "free-key-1"}) == 429
        assert (tg.runtime.stats.totals["requests"], len(tg.runtime.recorder)) == (before[0] + 1, before[1] + 1)


async def test_a_broken_candidate_gets_every_error(upstream):
    broken = """
tiers:
  free:
    limits: [{algorithm: token_bucket, capacity: -1, refill_rate: fast}]
api_keys:
  k: {tier: gold, name: k}
whatif: {minutes: 0}
"""
    with pytest.raises(ConfigError) as raised:
        config_module.from_text(broken)
    async with running(LIVE, upstream.url) as tg:
        answer = await whatif(tg, broken, status=422)
        assert answer == {"errors": raised.value.errors}
        assert "tiers.free.limits[0].refill_rate: must be a number > 0, got \"fast\"" in answer["errors"]
        assert "whatif.minutes: must be a number > 0, got 0" in answer["errors"]
        assert len(answer["errors"]) == 5
        assert await whatif(tg, "", status=422) == {
            "errors": ["the body is empty: send the candidate config.yaml ({} for the defaults)"]}
        async with tg.session.post(tg.admin_url + "/api/whatif", data=b"tiers: \xff\n") as resp:
            assert resp.status == 422
            assert await resp.json() == {"errors": ["the body must be a config.yaml in UTF-8"]}


async def test_the_record_holds_no_raw_key_nor_selected_value(upstream, fake_clock):
    async with running(LIVE, upstream.url, clock=fake_clock) as tg:
        for method, path, headers, wait in traffic(3, 60):
            fake_clock.advance(wait)
            await send(tg, method, path, headers)
        recorder = tg.runtime.recorder
        spans = recorder.snapshot()
        assert sum(end - start for _, start, end in spans) == len(recorder) > 40
        dump = repr([(c.words, c.index, bytes(c.values), c.plan.keys, c.plan.digest_of, c.plan.names)
                     for c, _, _ in spans]).encode()
        assert b"-key" not in dump  # free-key-1, ops-key, not-a-key: keys are there only as digests
        assert b"tenant-" not in dump and b"x-tenant" in dump  # the selector is named, its values hashed
        assert config_module.hash_key("not-a-key").encode() in dump  # an unknown key, as its digest


def test_the_record_is_bounded_by_count_and_by_age(fake_clock, monkeypatch):
    monkeypatch.setattr(whatif_module, "CHUNK", 1000)  # several chunks, dropped whole by age
    config = config_module.from_text("whatif: {minutes: 1, max_requests: 5000}")
    recorder = Recorder(config, fake_clock)
    tier = config.tiers["anonymous"]

    class Request:  # what the record reads of an aiohttp request
        method, remote, headers = "GET", "192.0.2.1", CIMultiDictProxy(CIMultiDict[str]())

    client, route = Client("192.0.2.1", tier, "a:192.0.2.1"), Route(path="/")
    for n in range(6000):
        recorder.record(config, Request(), client, route, f"/p{n}", True)  # type: ignore[arg-type]
    spans = recorder.snapshot()
    assert len(recorder) == 5000 and sum(e - s for _, s, e in spans) == 5000
    first, start, _ = spans[0]
    assert first.words[first.paths[start]] == "/p1000"  # the oldest went first
    fake_clock.advance(30)
    for _ in range(10):
        recorder.record(config, Request(), client, route, "/late", False)  # type: ignore[arg-type]
    fake_clock.advance(30.5)  # the 6000 are now older than a minute; the 10 are not
    assert [sum(e - s for _, s, e in recorder.snapshot())] == [10]
    for _ in range(1000):  # the next chunk begins: the old ones go
        recorder.record(config, Request(), client, route, "/later", True)  # type: ignore[arg-type]
    assert len(recorder) == 1010 and len(recorder.snapshot()) == 2
    smaller = config_module.from_text("whatif: {minutes: 1, max_requests: 3}")  # a reload shrinks it at once
    recorder.record(smaller, Request(), client, route, "/after", True)  # type: ignore[arg-type]
    assert len(recorder) == 3
    off = config_module.from_text("whatif: {max_requests: 0}")
    recorder.record(off, Request(), client, route, "/off", True)  # type: ignore[arg-type]
    assert len(recorder) == 0


def test_whatif_section_errors_name_the_key():
    with pytest.raises(ConfigError) as raised:
        config_module.from_text("whatif: {minutes: 2000, max_requests: -1, keep: 1}")
    assert raised.value.errors == [
        "whatif.keep: unknown key (known: max_requests, minutes)",
        "whatif.minutes: must be at most 1440, got 2000",
        "whatif.max_requests: must be an integer >= 0, got -1",
    ]
    assert config_module.from_text("").whatif.minutes == 10 and config_module.from_text("").whatif.max_requests \
        == 1_000_000


async def test_the_dashboard_runs_a_candidate_and_reloads_with_it(upstream, browser, fake_clock, tmp_path):
    live = LIVE + "admin: {token: dash-secret}\n"
    stricter = CANDIDATE.replace("{upstream}", upstream.url) + "admin: {token: dash-secret}\n"
    config_path = tmp_path / "config.yaml"
    async with running(live, upstream.url, clock=fake_clock, config_path=config_path) as tg:
        for _ in range(4):
            await send(tg, "GET", "/users", {"X-API-Key": "free-key-1"})
        await browser.navigate(tg.admin_url + "/?token=dash-secret")
        await browser.wait_for("document.getElementById('whatif-run') !== null")
        js_text = json.dumps("tiers: {free: {limits: 3}}\n")
        await browser.evaluate(f"(() => {{ const t = document.getElementById('whatif-config'); t.value = {js_text};"
                               " t.dispatchEvent(new Event('input')); document.getElementById('whatif-run').click()"
                               " })()")
        await browser.wait_for("!document.getElementById('whatif-errors').hidden")
        errors = await browser.evaluate("[...document.querySelectorAll('#whatif-errors li')].map(li => li.textContent)")
        assert "tiers.free.limits: must be a non-empty list of limits (or set unlimited: true), got 3" in errors
        assert await browser.evaluate("document.getElementById('whatif-reload').disabled") is True

        await browser.evaluate(f"(() => {{ const t = document.getElementById('whatif-config'); "
                               f"t.value = {json.dumps(stricter)}; document.getElementById('whatif-run').click() }})()")
        await browser.wait_for("document.querySelector('#whatif-tiers tr[data-tier=\"free\"]') !== null")
        cells = await browser.evaluate("[...document.querySelector('#whatif-tiers tr[data-tier=\"free\"]').cells]"
                                       ".map(td => td.textContent)")
        assert cells == ["free", "4", "4", "0", "3", "1"]
        assert await browser.evaluate("document.querySelectorAll('#whatif-chart rect').length") == 2  # then, now
        assert await browser.evaluate("document.querySelector('#whatif-clients tbody tr').dataset.clientId") == "alice"
        assert tg.runtime.version == 1  # a what-if changes nothing live

        await browser.evaluate("document.getElementById('whatif-reload').click()")
        await browser.wait_for("document.getElementById('whatif-status').textContent.startsWith('Reloaded')")
        assert tg.runtime.version == 2 and config_path.read_text() == stricter
        assert tg.runtime.config.tiers["free"].limits[0].algorithm.capacity == 3
        assert browser.errors == [] and browser.dialogs == []


async def test_reload_with_a_body_writes_nothing_unless_valid(upstream, tmp_path):
    config_path = tmp_path / "config.yaml"
    async with running(LIVE, upstream.url, config_path=config_path) as tg:
        before = config_path.read_text()
        async with tg.session.post(tg.admin_url + "/api/reload", data=b"tiers: {free: {limits: 3}}\n") as resp:
            assert resp.status == 422
            assert (await resp.json())["errors"] == [
                "tiers.free.limits: must be a non-empty list of limits (or set unlimited: true), got 3",
                "tiers.anonymous: is required unless clients.require_key is true"]
        assert config_path.read_text() == before and tg.runtime.version == 1
        assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left behind
    async with running(LIVE, upstream.url) as tg:  # no file: nothing to write to
        async with tg.session.post(tg.admin_url + "/api/reload", data=b"{}\n") as resp:
            assert resp.status == 422
            assert (await resp.json())["errors"] == ["no config file to write the candidate to (started without one)"]


def test_a_concurrency_limit_sees_each_recorded_request_end_before_the_next(fake_clock):
    live = config_module.from_text("tiers: {anonymous: {unlimited: true}}")
    recorder = Recorder(live, fake_clock)

    class Request:
        method, remote, headers = "GET", "192.0.2.1", CIMultiDictProxy(CIMultiDict[str]())

    client = Client("192.0.2.1", live.tiers["anonymous"], "a:192.0.2.1")
    for _ in range(5):
        recorder.record(live, Request(), client, Route(path="/"), "/x", True)  # type: ignore[arg-type]
    candidate = config_module.from_text(
        "tiers: {anonymous: {limits: [{algorithm: concurrency, max: 1}, {algorithm: fixed_window, limit: 3, "
        "window: 60}]}}")
    run = Replay(candidate)
    for _ in run.steps(recorder.snapshot()):
        pass
    assert run.answer(fake_clock())["tiers"] == {"anonymous": {
        "requests": 5, "allowed_then": 5, "refused_then": 0, "allowed_candidate": 3, "refused_candidate": 2}}
