// Tollgate dashboard, "What if" panel: a candidate config.yaml (pasted or
// chosen from a file) is replayed against the recorded traffic
// (POST api/whatif); the answer shows as a per-tier table, a before/after
// bar chart and the most affected clients. "Reload with this config" sends
// the very text that was replayed to POST api/reload, which writes it to the
// config file and reloads. Values reach the DOM as textContent and numeric
// SVG attributes only, as in dashboard.js.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const SVG_NS = "http://www.w3.org/2000/svg";
  const YAML = { "Content-Type": "application/yaml", Accept: "application/json" };
  const nf = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  const count = (v) => nf.format(v);
  let replayed = null; // the text of the last successful replay: what the reload button sends

  function status(message, kind) {
    const el = $("whatif-status");
    el.textContent = message;
    el.dataset.state = kind || "";
  }

  function showErrors(errors) {
    const list = $("whatif-errors");
    list.replaceChildren(...(errors || []).map((e) => {
      const li = document.createElement("li");
      li.textContent = e;
      return li;
    }));
    list.hidden = !errors || errors.length === 0;
  }

  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  function change(then, now) {
    return now > then ? "num worse" : now < then ? "num better" : "num";
  }

  function renderTiers(tiers) {
    const rows = Object.entries(tiers).map(([name, t]) => {
      const tr = document.createElement("tr");
      tr.dataset.tier = name;
      tr.append(cell(name, "tier-name"), cell(count(t.requests), "num"), cell(count(t.allowed_then), "num"),
        cell(count(t.refused_then), "num"), cell(count(t.allowed_candidate), "num"),
        cell(count(t.refused_candidate), change(t.refused_then, t.refused_candidate)));
      return tr;
    });
    if (!rows.length) {
      const tr = document.createElement("tr");
      tr.className = "empty";
      const td = cell("No limited requests recorded yet");
      td.colSpan = 6;
      tr.append(td);
      rows.push(tr);
    }
    $("whatif-tiers").tBodies[0].replaceChildren(...rows);
  }

  function renderClients(clients) {
    $("whatif-clients").tBodies[0].replaceChildren(...clients.map((c) => {
      const tr = document.createElement("tr");
      tr.dataset.clientId = c.id;
      tr.append(cell(c.id, "id"), cell(c.tier, "opt"), cell(count(c.refused_then), "num"),
        cell(count(c.refused_candidate), change(c.refused_then, c.refused_candidate)));
      return tr;
    }));
  }

  function bar(x, y, w, h, cls) {
    const r = document.createElementNS(SVG_NS, "rect");
    for (const [k, v] of Object.entries({ x, y, width: w, height: Math.max(h, 0.5) })) r.setAttribute(k, v);
    r.setAttribute("class", cls);
    return r;
  }

  function label(x, y, text) {
    const t = document.createElementNS(SVG_NS, "text");
    t.setAttribute("x", x);
    t.setAttribute("y", y);
    t.setAttribute("text-anchor", "middle");
    t.textContent = text;
    return t;
  }

  function drawChart(tiers) {
    const chart = $("whatif-chart");
    const width = chart.clientWidth || 600;
    const height = 160;
    const base = height - 18;
    chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const entries = Object.entries(tiers);
    const top = Math.max(1, ...entries.map(([, t]) => Math.max(t.refused_then, t.refused_candidate)));
    const slot = width / Math.max(1, entries.length);
    const w = Math.min(28, slot / 3);
    const parts = [];
    entries.forEach(([name, t], i) => {
      const mid = slot * i + slot / 2;
      const then = ((base - 14) * t.refused_then) / top;
      const now = ((base - 14) * t.refused_candidate) / top;
      parts.push(bar(mid - w - 2, base - then, w, then, "then"), bar(mid + 2, base - now, w, now, "now"),
        label(mid, height - 4, name), label(mid, base - Math.max(then, now) - 3,
          `${count(t.refused_then)} \u2192 ${count(t.refused_candidate)}`));
    });
    chart.replaceChildren(...parts);
  }

  function render(answer) {
    $("whatif-result").hidden = false;
    const span = answer.requests
      ? `${count(answer.requests)} requests from ${answer.from} to ${answer.to}`
      : "No limited requests recorded yet";
    const unrecorded = answer.unrecorded_selectors.length
      ? `; not recorded, replayed as missing: ${answer.unrecorded_selectors.join(", ")}` : "";
    $("whatif-span").textContent = span + unrecorded;
    renderTiers(answer.tiers);
    renderClients(answer.clients);
    drawChart(answer.tiers);
  }

  async function post(url, text) {
    const r = await fetch(url, { method: "POST", body: text, headers: YAML, credentials: "same-origin",
      cache: "no-store" });
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    return [r.status, body];
  }

  async function run() {
    const text = $("whatif-config").value;
    replayed = null;
    $("whatif-reload").disabled = true;
    $("whatif-run").disabled = true;
    showErrors([]);
    status("Replaying\u2026");
    try {
      const [code, body] = await post("api/whatif", text);
      if (code === 200 && body) {
        replayed = text;
        $("whatif-reload").disabled = false;
        render(body);
        status("Replayed: compare, then reload with it if it is what you want.", "ok");
      } else if (code === 422 && body) {
        status("The candidate is invalid:", "bad");
        showErrors(body.errors);
      } else {
        status(`The what-if failed (HTTP ${code})${body && body.message ? `: ${body.message}` : ""}.`, "bad");
      }
    } catch (e) {
      status("The what-if failed: the admin port did not answer.", "bad");
    } finally {
      $("whatif-run").disabled = false;
    }
  }

  async function reload() {
    if (replayed === null) return;
    $("whatif-reload").disabled = true;
    showErrors([]);
    try {
      const [code, body] = await post("api/reload", replayed);
      if (code === 200 && body) {
        const restart = body.restart_needed ? `; after a restart only: ${body.restart_needed.join(", ")}` : "";
        status(`Reloaded: config version ${body.version} is in force and written to the file${restart}.`, "ok");
        replayed = null;
      } else {
        status(`Not reloaded (HTTP ${code}); the running config stays in force.`, "bad");
        showErrors(body && body.errors);
        $("whatif-reload").disabled = false;
      }
    } catch (e) {
      status("Not reloaded: the admin port did not answer.", "bad");
      $("whatif-reload").disabled = false;
    }
  }

  $("whatif-file").addEventListener("change", async (ev) => {
    const file = ev.target.files && ev.target.files[0];
    if (file) $("whatif-config").value = await file.text();
  });
  $("whatif-config").addEventListener("input", () => {
    if (replayed !== null && $("whatif-config").value !== replayed) {
      $("whatif-reload").disabled = true; // only a replayed text may be reloaded
      status("Changed since the replay: run it again before reloading.");
    }
  });
  $("whatif-run").addEventListener("click", run);
  $("whatif-reload").addEventListener("click", reload);
})();
