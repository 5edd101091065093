// Tollgate dashboard: keeps the server-rendered page live.
//
// Stats arrive as server-sent events on api/stats/stream; when the stream
// fails (or goes quiet) the page polls api/stats every second instead and
// tries the stream again every 30 s. Every value from the server reaches the
// DOM through textContent, dataset or numeric SVG attributes, never as markup.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const DASH = "\u2014";
  const WINDOW = 300; // seconds on the chart
  const SVG_NS = "http://www.w3.org/2000/svg";
  const FETCH = { credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } };
  const ON_ERROR = {
    allow: "requests pass without rate limiting",
    deny: "requests are refused with 503",
    local: "each instance limits from its own memory",
  };

  // Same output as the Jinja filters in proxy/dashboard.py.
  const nf = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  const fmt = {
    count: (v) => (v == null ? DASH : nf.format(Math.round(v))),
    percent: (v) => (v == null ? DASH : `${v.toFixed(1)}%`),
    ms: (v) => {
      if (v == null || !Number.isFinite(v)) return DASH;
      if (v < 10) return `${v.toFixed(2)} ms`;
      if (v < 100) return `${v.toFixed(1)} ms`;
      return `${nf.format(Math.round(v))} ms`;
    },
    duration: (sec) => {
      if (sec == null) return DASH;
      let s = Math.max(0, Math.floor(sec));
      const d = Math.floor(s / 86400); s -= d * 86400;
      const h = Math.floor(s / 3600); s -= h * 3600;
      const m = Math.floor(s / 60); s -= m * 60;
      if (d) return `${d}d ${h}h`;
      if (h) return `${h}h ${m}m`;
      if (m) return `${m}m ${s}s`;
      return `${s}s`;
    },
    seconds: (v) => (v == null ? DASH : v < 10 ? `${v.toFixed(1)} s` : `${nf.format(Math.round(v))} s`),
    clock: (date) => date.toLocaleTimeString([], { hour12: false }),
  };

  const body = document.body;
  const interval = Number(body.dataset.interval) || 1;
  // Server clock minus ours, so "now" on the chart is the server's second.
  let skew = Number(body.dataset.serverTime) - Date.now() / 1000 || 0;
  const serverNow = () => Date.now() / 1000 + skew;

  const state = { stats: null, lastAt: 0, hover: null, geometry: null };

  function setText(id, value) {
    const el = $(id);
    if (el && el.textContent !== value) el.textContent = value;
  }

  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "class") el.className = v;
      else if (k === "data") Object.assign(el.dataset, v);
      else el[k] = v;
    }
    el.append(...children.map((c) => (c instanceof Node ? c : String(c))));
    return el;
  }

  function svg(tag, attrs, text) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text != null) el.textContent = text;
    return el;
  }

  // ---- rendering ---------------------------------------------------------

  function render(s) {
    const t = s.totals || {};
    setText("uptime", fmt.duration(s.uptime_seconds));
    setText("total-requests", fmt.count(t.requests));
    setText("total-allowed", fmt.count(t.allowed));
    setText("total-blocked", fmt.count(t.blocked));
    setText("success-rate", fmt.percent(s.success_rate_percent));
    setText("total-shadow-blocked", fmt.count(t.shadow_blocked));
    setText("total-unauthorized", fmt.count(t.unauthorized));
    setText("total-exempt", fmt.count(t.exempt));
    setText("total-upstream-errors", fmt.count(t.upstream_errors));
    setText("total-unavailable", fmt.count(t.unavailable));
    for (const kind of ["proxy", "upstream"]) {
      const q = (s.latency_ms || {})[kind] || {};
      for (const p of ["p50", "p95", "p99"]) setText(`latency-${kind}-${p}`, fmt.ms(q[p]));
    }
    renderStorage(s.storage || {});
    renderConfig(s.config || {});
    renderTiers(s.tiers || {}, (s.config || {}).tiers || {});
    renderClients("top-clients", s.top_clients || []);
    renderClients("top-blocked", s.top_blocked || []);
    renderLimitStates(s.limits || {});
    renderBanned(s.banned || []);
    drawChart();
  }

  function renderStorage(st) {
    const bad = st.healthy === false;
    const status = $("storage-status");
    status.dataset.state = bad ? "unhealthy" : "healthy";
    setText("storage-backend", st.backend || DASH);
    setText("storage-health", bad ? "unhealthy" : "healthy");
    setText("storage-on-error", st.on_error || DASH);
    const err = $("storage-error");
    err.hidden = !st.last_error;
    setText("storage-error", st.last_error || "");
    $("storage-banner").hidden = !bad;
    const meaning = ON_ERROR[st.on_error];
    setText("storage-banner-text",
      `${st.backend} is failing; storage.on_error=${st.on_error} is in force` +
      (meaning ? ` (${meaning}).` : "."));
    document.title = bad ? "Storage unhealthy \u00b7 Tollgate" : "Tollgate dashboard";
  }

  function renderConfig(c) {
    setText("config-version", c.version == null ? DASH : String(c.version));
    setText("config-loaded-at", c.loaded_at || DASH);
    setText("config-path", c.path || DASH);
    const err = $("config-error");
    err.dataset.state = c.last_error ? "error" : "ok";
    setText("config-error", c.last_error ? c.last_error : "Last reload: no error");
  }

  function policyLines(conf) {
    if (!conf) return [];
    if (conf.unlimited) return ["unlimited"];
    return (conf.limits || []).map((l) => `${l.name} \u00b7 ${l.algorithm} \u00b7 ${l.policy}` +
      (l.per && l.per.join("+") !== "client" ? ` \u00b7 per ${l.per.join("+")}` : "") +
      (l.shadow ? " \u00b7 shadow" : ""));
  }

  // Same rows as the limit_row macro in dashboard.html.
  function limitRow(where, methods, l) {
    const name = h("td", {}, l.name);
    if (l.shadow) name.append(" ", h("span", { class: "badge" }, "shadow"));
    name.append(h("div", { class: "policy" }, `${l.algorithm} \u00b7 per ${(l.per || ["client"]).join("+")}`));
    const place = h("td", {}, where);
    if (methods) place.append(h("div", { class: "policy" }, methods.join(" ")));
    return h("tr", { data: { limit: `${where}|${l.name}` } }, place, name,
      h("td", { class: l.remaining === 0 && !l.shadow ? "num bad" : "num" },
        `${fmt.count(l.remaining)} / ${fmt.count(l.limit)}`),
      h("td", { class: "num" }, "in_flight" in l ? fmt.count(l.in_flight) : ""));
  }

  function renderLimitStates(ls) {
    const rows = [];
    for (const r of ls.routes || []) for (const l of r.limits || []) rows.push(limitRow(`route ${r.path}`, r.methods, l));
    for (const [name, limits] of Object.entries(ls.tiers || {})) for (const l of limits) rows.push(limitRow(`tier ${name}`, null, l));
    if (!rows.length) {
      rows.push(h("tr", { class: "empty" }, h("td", { colSpan: 4 }, "No route, global or concurrency limits configured")));
    }
    $("limit-states").tBodies[0].replaceChildren(...rows);
  }

  function renderTiers(tiers, configured) {
    const names = Object.keys(tiers);
    for (const n of Object.keys(configured)) if (!(n in tiers)) names.push(n);
    const rows = names.map((name) => {
      const t = tiers[name] || {};
      return h("tr", {},
        h("td", {}, h("span", { class: "tier" }, name),
          ...policyLines(configured[name]).map((line) => h("div", { class: "policy" }, line))),
        h("td", { class: "num" }, fmt.count(t.requests || 0)),
        h("td", { class: "num opt" }, fmt.count(t.allowed || 0)),
        h("td", { class: t.blocked ? "num bad" : "num" }, fmt.count(t.blocked || 0)));
    });
    if (!rows.length) rows.push(h("tr", { class: "empty" }, h("td", { colSpan: 4 }, "No requests yet")));
    $("tiers").tBodies[0].replaceChildren(...rows);
  }

  function renderClients(id, clients) {
    const rows = clients.map((c) => {
      const tr = h("tr", { tabIndex: 0, data: { clientId: c.id } },
        h("td", { class: "id", title: c.id }, c.id, h("div", { class: "sub-tier" }, c.tier || DASH)),
        h("td", { class: "opt" }, h("span", { class: "tier" }, c.tier || DASH)),
        h("td", { class: "num" }, fmt.count(c.requests)),
        h("td", { class: c.blocked ? "num bad" : "num" }, fmt.count(c.blocked)),
        h("td", { class: c.remaining === 0 ? "num bad" : "num" }, fmt.count(c.remaining)));
      if (c.id === panel.id) tr.classList.add("selected");
      return tr;
    });
    if (!rows.length) rows.push(h("tr", { class: "empty" }, h("td", { colSpan: 5 }, "No clients yet")));
    $(id).tBodies[0].replaceChildren(...rows);
  }

  function renderBanned(bans) {
    const rows = bans.map((b) => h("tr", { data: { clientId: b.id } },
      h("td", { class: "id", title: b.id }, b.id),
      h("td", { class: "opt" }, h("span", { class: "tier" }, b.tier || DASH)),
      h("td", { class: "num bad" }, fmt.count(b.seconds_left)),
      h("td", {}, h("time", {}, b.banned_until || DASH))));
    if (!rows.length) rows.push(h("tr", { class: "empty" }, h("td", { colSpan: 4 }, "No client is banned")));
    $("banned").tBodies[0].replaceChildren(...rows);
  }

  // ---- chart -------------------------------------------------------------

  function niceCeil(v) {
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function series() {
    const end = Math.floor(serverNow()) - 1; // the current second is still filling
    const start = end - WINDOW + 1;
    const allowed = new Array(WINDOW).fill(0);
    const blocked = new Array(WINDOW).fill(0);
    for (const p of (state.stats && state.stats.timeline) || []) {
      const i = p.t - start;
      if (i >= 0 && i < WINDOW) {
        allowed[i] = p.allowed || 0;
        blocked[i] = p.blocked || 0;
      }
    }
    return { start, allowed, blocked };
  }

  function drawChart() {
    const el = $("rps-chart");
    const W = Math.max(200, el.clientWidth);
    const H = Math.max(120, el.clientHeight);
    const pad = { l: 44, r: 10, t: 10, b: 24 };
    const { start, allowed, blocked } = series();
    const total = allowed.map((a, i) => a + blocked[i]);
    // Whole requests per tick, at most five ticks above zero.
    const peak = Math.max(1, ...total);
    const step = Math.max(1, niceCeil(peak / 5));
    const ticks = Math.ceil(peak / step);
    const yMax = step * ticks;
    const dx = (W - pad.l - pad.r) / (WINDOW - 1);
    const x = (i) => (pad.l + i * dx).toFixed(1);
    const y = (v) => (pad.t + (1 - v / yMax) * (H - pad.t - pad.b)).toFixed(1);
    const line = (vals) => vals.map((v, i) => `${x(i)},${y(v)}`).join(" L");
    const back = (vals) => vals.map((v, i) => `${x(i)},${y(v)}`).reverse().join(" L");

    const nodes = [];
    for (let k = 0; k <= ticks; k++) {
      const v = step * k;
      nodes.push(svg("line", { class: "grid", x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v) }));
      nodes.push(svg("text", { class: "axis", x: pad.l - 6, y: y(v), "text-anchor": "end", dy: "0.32em" }, nf.format(v)));
    }
    for (let ago = 0; ago < WINDOW; ago += 60) {
      const i = WINDOW - 1 - ago;
      nodes.push(svg("text", { class: "axis", x: x(i), y: H - 6, "text-anchor": ago ? "middle" : "end" },
        ago ? `-${ago / 60}m` : "now"));
    }
    nodes.push(svg("path", { class: "area ok", d: `M${line(allowed)} L${x(WINDOW - 1)},${y(0)} L${x(0)},${y(0)} Z` }));
    nodes.push(svg("path", { class: "area bad", d: `M${line(total)} L${back(allowed)} Z` }));
    nodes.push(svg("path", { class: "stroke ok", d: `M${line(allowed)}` }));
    nodes.push(svg("path", { class: "stroke bad", d: `M${line(total)}` }));

    if (state.hover != null) {
      const i = state.hover;
      const label = `${fmt.clock(new Date((start + i) * 1000))} \u00b7 ${nf.format(allowed[i])} allowed \u00b7 ${nf.format(blocked[i])} blocked`;
      nodes.push(svg("line", { class: "cursor", x1: x(i), x2: x(i), y1: pad.t, y2: H - pad.b }));
      // Pinned to the side away from the cursor, so it never leaves the plot.
      const right = i < WINDOW / 2;
      nodes.push(svg("text", { class: "tip", x: right ? W - pad.r - 4 : pad.l + 6, y: pad.t + 12, "text-anchor": right ? "end" : "start" }, label));
    }
    el.setAttribute("viewBox", `0 0 ${W} ${H}`);
    el.replaceChildren(...nodes);
    state.geometry = { left: pad.l, dx };

    const recent = total.slice(-10);
    setText("rate-now", (recent.reduce((a, b) => a + b, 0) / recent.length).toFixed(1));
  }

  function onPointer(ev) {
    const el = $("rps-chart");
    const g = state.geometry;
    if (!g) return;
    const px = ev.clientX - el.getBoundingClientRect().left;
    const i = Math.round((px - g.left) / g.dx);
    state.hover = i >= 0 && i < WINDOW ? i : null;
    drawChart();
  }

  // ---- live updates ------------------------------------------------------

  const conn = { es: null, timer: null, polls: 0 };

  function setConnection(mode, label) {
    const pill = $("connection");
    pill.dataset.state = mode;
    pill.textContent = label;
  }

  function onStats(s, mode) {
    state.stats = s;
    state.lastAt = Date.now();
    const last = s.timeline && s.timeline.length ? s.timeline[s.timeline.length - 1].t : 0;
    if (last > serverNow()) skew += last - serverNow(); // the server clock is ahead
    render(s);
    const lu = $("last-update");
    const now = new Date();
    lu.dateTime = now.toISOString();
    lu.textContent = fmt.clock(now);
    setConnection(mode, mode === "live" ? "live" : "polling");
    if (panel.id && Date.now() - panel.loadedAt > 2000) loadClient(true);
  }

  function connectStream() {
    if (!window.EventSource) return startPolling();
    clearTimeout(conn.timer);
    conn.timer = null;
    const es = new EventSource("api/stats/stream");
    conn.es = es;
    state.lastAt = Date.now();
    es.addEventListener("stats", (ev) => onStats(JSON.parse(ev.data), "live"));
    es.addEventListener("error", () => {
      es.close();
      if (conn.es === es) conn.es = null;
      startPolling();
    });
  }

  function startPolling() {
    if (conn.timer) return;
    conn.polls = 0;
    setConnection("polling", "polling");
    const tick = async () => {
      let ok = false;
      try {
        const r = await fetch("api/stats", FETCH);
        if (r.ok) {
          onStats(await r.json(), "polling");
          ok = true;
        } else if (r.status === 401 || r.status === 403) {
          setConnection("down", "unauthorized: reopen with ?token=");
        } else {
          setConnection("down", `error ${r.status}`);
        }
      } catch (e) {
        setConnection("down", "offline");
      }
      conn.polls += 1;
      if (ok && conn.polls % 30 === 0) {
        conn.timer = null;
        connectStream();
        return;
      }
      conn.timer = setTimeout(tick, 1000);
    };
    conn.timer = setTimeout(tick, 0);
  }

  // A stream that stays open but delivers nothing (a buffering proxy, a hung
  // server) is as bad as one that fails.
  setInterval(() => {
    const quiet = Date.now() - state.lastAt > Math.max(5000, 4000 * interval);
    if (quiet && conn.es) {
      conn.es.close();
      conn.es = null;
      startPolling();
    } else if (quiet && $("connection").dataset.state !== "down") {
      setConnection("down", "stale");
    }
    if (state.stats) drawChart(); // keep the time axis moving when idle
  }, 1000);

  // ---- client panel ------------------------------------------------------

  const panel = { id: null, seq: 0, loadedAt: 0 };
  const clientUrl = (id) => `api/clients/${encodeURIComponent(id)}`;

  function panelStatus(message, kind) {
    const el = $("client-panel-status");
    el.dataset.state = kind || "";
    el.textContent = message;
  }

  function markSelected() {
    for (const tr of document.querySelectorAll("tr[data-client-id]")) {
      tr.classList.toggle("selected", tr.dataset.clientId === panel.id);
    }
  }

  function openClient(id) {
    panel.id = id;
    $("client-panel").hidden = false;
    setText("client-panel-id", id);
    setText("client-panel-tier", "");
    $("client-limits").tBodies[0].replaceChildren();
    panelStatus("Loading\u2026");
    markSelected();
    $("client-panel-close").focus({ preventScroll: true });
    loadClient(false);
  }

  function closeClient() {
    panel.id = null;
    panel.seq += 1;
    $("client-panel").hidden = true;
    markSelected();
  }

  async function loadClient(quiet) {
    const id = panel.id;
    const seq = ++panel.seq;
    panel.loadedAt = Date.now();
    let r, c;
    try {
      r = await fetch(clientUrl(id), FETCH);
      c = r.ok ? await r.json() : null;
    } catch (e) {
      if (seq === panel.seq) panelStatus("Could not reach the proxy.", "bad");
      return;
    }
    if (seq !== panel.seq) return;
    if (!r.ok) {
      panelStatus(r.status === 404 ? "Unknown client (no such key)." : `Could not load: HTTP ${r.status}.`, "bad");
      return;
    }
    setText("client-panel-tier", c.tier || "");
    const own = (c.limits || []).map((l) => [l, ""]);
    const onRoutes = (c.routes || []).flatMap((r) => r.limits.map((l) => [l, ` \u00b7 route ${r.path}`]));
    const rows = [...own, ...onRoutes].map(([l, where]) => {
      const frac = l.limit ? Math.max(0, Math.min(1, (l.remaining ?? 0) / l.limit)) : 0;
      const bar = h("span", { class: "meter" }, h("span", {}));
      bar.firstChild.style.width = `${(frac * 100).toFixed(0)}%`;
      const per = l.per && l.per.join("+") !== "client" ? ` \u00b7 per ${l.per.join("+")}` : "";
      return h("tr", {},
        h("td", {}, l.name, h("div", { class: "algo" }, l.algorithm + per + (l.shadow ? " \u00b7 shadow" : "") + where)),
        h("td", { class: "num" }, fmt.count(l.limit)),
        h("td", { class: l.remaining === 0 ? "num bad" : "num" }, fmt.count(l.remaining), bar),
        h("td", { class: "num" }, fmt.seconds(l.reset_seconds)));
    });
    if (!rows.length) rows.push(h("tr", { class: "empty" }, h("td", { colSpan: 4 }, "No limits (unlimited tier)")));
    $("client-limits").tBodies[0].replaceChildren(...rows);
    if (!quiet) panelStatus(`Loaded at ${fmt.clock(new Date())}`);
  }

  async function resetClient() {
    const id = panel.id;
    const button = $("client-reset");
    button.disabled = true;
    panelStatus("Resetting\u2026");
    try {
      const r = await fetch(clientUrl(id), { method: "DELETE", credentials: "same-origin" });
      if (r.status === 204) {
        await loadClient(true);
        if (panel.id === id) panelStatus(`Limits reset at ${fmt.clock(new Date())}`, "ok");
      } else {
        panelStatus(`Reset failed: HTTP ${r.status}.`, "bad");
      }
    } catch (e) {
      panelStatus("Reset failed: could not reach the proxy.", "bad");
    } finally {
      button.disabled = false;
    }
  }

  function onRowActivate(ev) {
    if (ev.type === "keydown" && ev.key !== "Enter" && ev.key !== " ") return;
    const tr = ev.target.closest("tr[data-client-id]");
    if (!tr) return;
    ev.preventDefault();
    openClient(tr.dataset.clientId);
  }

  // ---- start -------------------------------------------------------------

  // The token has done its job once the page is served (it set the cookie);
  // keep it out of the address bar, history and screenshots.
  const params = new URLSearchParams(location.search);
  if (params.has("token")) {
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? `?${rest}` : "") + location.hash);
  }

  for (const id of ["top-clients", "top-blocked"]) {
    $(id).addEventListener("click", onRowActivate);
    $(id).addEventListener("keydown", onRowActivate);
  }
  $("client-panel-close").addEventListener("click", closeClient);
  $("client-refresh").addEventListener("click", () => loadClient(false));
  $("client-reset").addEventListener("click", resetClient);
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && panel.id) closeClient();
  });
  const chart = $("rps-chart");
  chart.addEventListener("pointermove", onPointer);
  chart.addEventListener("pointerleave", () => { state.hover = null; drawChart(); });
  if (window.ResizeObserver) new ResizeObserver(() => state.stats && drawChart()).observe(chart);

  try {
    state.stats = JSON.parse($("initial-stats").textContent);
    state.lastAt = Date.now();
    render(state.stats);
  } catch (e) {
    // A snapshot that does not parse only delays the first live update.
  }
  setConnection("connecting", "connecting");
  connectStream();
})();
