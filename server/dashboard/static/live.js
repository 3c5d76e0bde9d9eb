// Live session monitor: one server-sent "snapshot" event per second updates the page.
(function () {
  "use strict";
  const root = document.getElementById("live");
  if (!root) return;
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  const text = (id, value) => { const el = $(id); if (el) el.textContent = value; };

  function el(tag, attrs, parent) {
    const node = document.createElementNS(SVG, tag);
    for (const k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }

  function colour(v, max) {  // white -> deep blue
    const t = max > 0 ? Math.min(1, v / max) : 0;
    const r = Math.round(255 - 218 * t), g = Math.round(255 - 156 * t), b = Math.round(255 - 20 * t);
    return "rgb(" + r + "," + g + "," + b + ")";
  }

  let heatCells = null;
  let siteLabels = [];
  function drawHeatmap(heat) {
    const holder = $("heatmap");
    const n = heat.mean_counts.length;
    if (!heatCells || heatCells.length !== n) {
      holder.innerHTML = "";
      heatCells = new Array(n);
      heat.arrays.forEach(function (arr) {
        const side = Math.ceil(Math.sqrt(arr.n_sites)), cell = 14;
        const wrap = document.createElement("div");
        wrap.className = "heat-array";
        const svg = el("svg", { width: side * cell, height: side * cell + 14, class: "heat" }, wrap);
        el("text", { x: 0, y: side * cell + 12, "font-size": 11 }, svg).textContent = arr.name + " (" + arr.area + ")";
        for (let i = 0; i < arr.n_sites; i++) {
          const rect = el("rect", { x: (i % side) * cell, y: Math.floor(i / side) * cell, width: cell - 1, height: cell - 1 }, svg);
          el("title", {}, rect);
          heatCells[arr.offset + i] = rect;
        }
        holder.appendChild(wrap);
      });
    }
    for (let i = 0; i < n; i++) {
      const rect = heatCells[i];
      if (!rect) continue;
      rect.setAttribute("fill", colour(heat.mean_counts[i], heat.max));
      rect.firstChild.textContent = (siteLabels[i] || "site " + (i + 1)) + ": " + heat.mean_counts[i] + " spikes";
    }
    text("heat-window", heat.window);
    text("heat-max", heat.max);
  }

  function drawPsth(items) {
    const holder = $("psth");
    if (!items.length) { holder.innerHTML = '<p class="muted">no rasters yet</p>'; return; }
    holder.innerHTML = "";
    items.forEach(function (item) {
      const w = 220, h = 110, pad = 24;
      const fig = document.createElement("figure");
      fig.style.display = "inline-block";
      fig.style.marginRight = "1rem";
      const svg = el("svg", { width: w, height: h, class: "plot" }, fig);
      const max = Math.max.apply(null, item.rate_hz.concat([1e-9]));
      const nb = item.rate_hz.length;
      const pts = item.rate_hz.map(function (v, i) {
        return (pad + (i + 0.5) / nb * (w - pad - 4)).toFixed(1) + "," + (h - pad - v / max * (h - pad - 8)).toFixed(1);
      }).join(" ");
      el("rect", { x: pad, y: 8, width: w - pad - 4, height: h - pad - 8, class: "frame" }, svg);
      const zero = -item.start_ms / (item.bin_ms * nb);
      if (zero > 0 && zero < 1) {
        const x = pad + zero * (w - pad - 4);
        el("line", { x1: x, x2: x, y1: 8, y2: h - pad, class: "diag" }, svg);
      }
      el("polyline", { points: pts, fill: "none", stroke: "#2563eb", "stroke-width": 1.5 }, svg);
      el("text", { x: pad, y: h - 8, class: "tick" }, svg).textContent = item.start_ms + " ms";
      el("text", { x: w - 4, y: h - 8, class: "tick", "text-anchor": "end" }, svg).textContent = (item.start_ms + item.bin_ms * nb) + " ms";
      el("text", { x: 2, y: 16, class: "tick" }, svg).textContent = Math.round(max) + " Hz";
      const cap = document.createElement("figcaption");
      cap.textContent = item.stimulus_id.slice(0, 10) + "… n=" + item.n;
      fig.appendChild(cap);
      holder.appendChild(fig);
    });
  }

  function rows(id, entries) {
    const body = $(id).querySelector("tbody");
    body.innerHTML = "";
    if (!entries.length) { const tr = body.insertRow(); tr.insertCell().textContent = "none"; return; }
    entries.forEach(function (cells) {
      const tr = body.insertRow();
      cells.forEach(function (c) { tr.insertCell().textContent = c; });
    });
  }

  function apply(snap) {
    text("presentations", snap.presentations);
    text("trials", snap.trials);
    text("valid", snap.valid);
    text("invalid", snap.invalid);
    text("fixation", snap.fixation_rate === null ? "–" : Math.round(100 * snap.fixation_rate) + " %");
    text("dropped", snap.dropped_frames);
    text("last", snap.last_received_at || "–");
    const state = $("live-state");
    state.textContent = snap.state;
    state.className = "state state-" + snap.state;
    rows("invalid-reasons", Object.entries(snap.invalid_by_reason));
    rows("live-blocks", snap.blocks.map(function (b) { return [(b.index + 1) + ". " + b.set_name, b.state, b.valid + " / " + b.target]; }));
    const ingest = $("ingest");
    const keys = Object.keys(snap.ingest);
    if (keys.length) {
      ingest.innerHTML = "";
      keys.forEach(function (k) {
        const dt = document.createElement("dt"); dt.textContent = k;
        const dd = document.createElement("dd"); dd.textContent = snap.ingest[k] === null ? "–" : String(snap.ingest[k]);
        ingest.appendChild(dt); ingest.appendChild(dd);
      });
    }
    drawHeatmap(snap.heatmap);
    drawPsth(snap.psth);
  }

  const initial = JSON.parse($("initial-snapshot").textContent);
  siteLabels = initial.heatmap.labels || [];
  apply(initial);
  let updates = 0;
  const source = new EventSource(root.dataset.stream);
  source.addEventListener("snapshot", function (event) {
    const snap = JSON.parse(event.data);
    apply(snap);
    updates += 1;
    text("live-status", "live · " + updates + " updates");
    root.dataset.updates = String(updates);
    if (snap.state !== "running" && snap.state !== "scheduled") {
      source.close();
      text("live-status", "session " + snap.state + "; stream closed");
    }
  });
  source.onerror = function () { text("live-status", "reconnecting…"); };
})();
