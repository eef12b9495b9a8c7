"use strict";
// tc view's page: nodes are SVG elements (one <g data-node-id> each), edges are drawn on a canvas under
// them (fast at 50,000 edges). The data (tc-data) comes from tccli/view/page.py. No library, no network.
(function () {
  const DATA = JSON.parse(document.getElementById("tc-data").textContent);
  const GRAPH = DATA.graph;
  const NODES = GRAPH.nodes; // node-link records: id and the node's attributes, as tc wrote them
  const PLACES = DATA.places; // same order: x, y (px, y down), w (box width), name, key (L2.F57)
  const H = DATA.node_height;
  const N = NODES.length;
  const COLOURS = {feature: "#cfe2f3", head: "#fff2cc", embed: "#d9ead3", pos: "#d9ead3", error: "#e0e0e0",
    skip: "#e6d0ec", target: "#f4cccc"};
  const SVG_NS = "http://www.w3.org/2000/svg";

  const indexOf = new Map();
  NODES.forEach((n, i) => indexOf.set(String(n.id), i));
  const links = GRAPH.links;
  const M = links.length;
  const src = new Int32Array(M), dst = new Int32Array(M), weight = new Float64Array(M);
  const incoming = Array.from({length: N}, () => []), outgoing = Array.from({length: N}, () => []);
  let largest = 0;
  links.forEach((l, e) => {
    src[e] = indexOf.get(String(l.source));
    dst[e] = indexOf.get(String(l.target));
    weight[e] = l.weight || 0;
    outgoing[src[e]].push(e);
    incoming[dst[e]].push(e);
    largest = Math.max(largest, Math.abs(weight[e]));
  });
  largest = largest || 1;
  const byWeight = Array.from({length: M}, (_, e) => e).sort((a, b) => Math.abs(weight[b]) - Math.abs(weight[a]));

  const stage = document.getElementById("stage");
  const canvas = document.getElementById("edges");
  const ctx = canvas.getContext("2d");
  const svg = document.getElementById("nodes");
  const viewport = document.getElementById("viewport");
  const tooltip = document.getElementById("tooltip");
  const slider = document.getElementById("threshold");
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const fmt = (v) => (typeof v === "number" ? Number(v.toPrecision(4)).toString() : v == null ? "–" : String(v));
  const label = (i) => (PLACES[i].key && DATA.labels[PLACES[i].key]) || NODES[i].clerp || "";

  // ------------------------------------------------------------------ nodes (SVG)
  function drawNodes() {
    const parts = [];
    for (const [name, y] of DATA.rows) parts.push(`<text class="guide" x="${DATA.row_label_x}" y="${y + 4}" text-anchor="middle">${esc(name)}</text>`);
    for (const [position, x, token] of DATA.columns) {
      parts.push(`<text class="guide" x="${x}" y="${DATA.token_row_y}" text-anchor="middle">${esc(token)}</text>`);
      parts.push(`<text class="guide" x="${x}" y="${DATA.token_row_y + 13}" text-anchor="middle">${position}</text>`);
    }
    document.getElementById("guides").innerHTML = parts.join("");
    const nodes = [];
    for (let i = 0; i < N; i++) {
      const p = PLACES[i], kind = NODES[i].kind, text = label(i);
      const chars = Math.max(4, Math.floor(p.w / 4.6));
      const short = text.length > chars ? text.slice(0, chars - 1) + "…" : text;
      nodes.push(`<g class="node kind-${esc(kind)}" data-node-id="${esc(NODES[i].id)}" transform="translate(${p.x},${p.y})">` +
        `<rect x="${-p.w / 2}" y="${-H / 2}" width="${p.w}" height="${H}" rx="4" fill="${COLOURS[kind] || "#fff"}"/>` +
        `<text class="name" y="${text ? -1 : 4}">${esc(p.name)}</text>` +
        (text ? `<text class="flabel" y="${H / 2 - 4}">${esc(short)}</text>` : "") + "</g>");
    }
    document.getElementById("node-layer").innerHTML = nodes.join("");
  }
  // tc's layout is wide and flat for long prompts: spread the rows apart (boxes keep their size) until the
  // graph's shape is the stage's, at most 6 times
  (function stretchRows() {
    let bottom = 0, left = Infinity, right = -Infinity; // loops, not Math.max(...): no argument limit
    for (const p of PLACES) { bottom = Math.max(bottom, p.y); left = Math.min(left, p.x); right = Math.max(right, p.x); }
    for (const c of DATA.columns) { left = Math.min(left, c[1]); right = Math.max(right, c[1]); }
    const below = DATA.token_row_y - bottom, width = right - left + 200, height = DATA.token_row_y + 40;
    const stretch = Math.max(1, Math.min(6, ((stage.clientHeight / Math.max(stage.clientWidth, 1)) * width) / height));
    for (const p of PLACES) p.y *= stretch;
    for (const row of DATA.rows) row[1] *= stretch;
    DATA.token_row_y = bottom * stretch + below;
  })();
  drawNodes();
  const elements = Array.from(document.querySelectorAll("#node-layer > g"));

  // ------------------------------------------------------------------ view transform: pan and zoom
  const view = {k: 1, x: 0, y: 0};
  function bounds() {
    let x0 = DATA.row_label_x - 40, x1 = -Infinity, y0 = Infinity, y1 = DATA.token_row_y + 20;
    for (const p of PLACES) { x1 = Math.max(x1, p.x + p.w / 2); y0 = Math.min(y0, p.y - H); }
    for (const [, x] of DATA.columns) x1 = Math.max(x1, x + 30);
    return [x0, y0, x1, y1];
  }
  function fit() {
    const [x0, y0, x1, y1] = bounds();
    const w = stage.clientWidth, h = stage.clientHeight;
    view.k = Math.min(w / (x1 - x0), h / (y1 - y0)) * 0.96;
    view.x = (w - (x1 - x0) * view.k) / 2 - x0 * view.k;
    view.y = (h - (y1 - y0) * view.k) / 2 - y0 * view.k;
    redraw();
  }
  // While the view moves (drag, wheel) only the strongest MOVING_EDGES edges are drawn, all of them once
  // it rests; node names too small to read are not drawn at all (painting 5,000 texts costs most).
  const MOVING_EDGES = 4000;
  let pending = false, moving = false, restTimer = 0;
  function redraw() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      viewport.setAttribute("transform", `translate(${view.x},${view.y}) scale(${view.k})`);
      svg.classList.toggle("tiny", view.k * 11 < 4);
      drawEdges();
    });
  }
  function moved() {
    moving = true;
    clearTimeout(restTimer);
    restTimer = setTimeout(() => { moving = false; redraw(); }, 150);
    redraw();
  }
  let drag = null;
  stage.addEventListener("mousedown", (ev) => { if (!ev.target.closest("[data-node-id]")) { drag = {x: ev.clientX - view.x, y: ev.clientY - view.y}; stage.classList.add("dragging"); } });
  window.addEventListener("mousemove", (ev) => { if (drag) { view.x = ev.clientX - drag.x; view.y = ev.clientY - drag.y; moved(); } });
  window.addEventListener("mouseup", () => { drag = null; stage.classList.remove("dragging"); });
  stage.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const r = stage.getBoundingClientRect(), mx = ev.clientX - r.left, my = ev.clientY - r.top;
    const f = Math.exp(-ev.deltaY * 0.0015);
    view.x = mx - (mx - view.x) * f; view.y = my - (my - view.y) * f; view.k *= f;
    moved();
  }, {passive: false});
  document.getElementById("fit").addEventListener("click", fit);

  // ------------------------------------------------------------------ edges (canvas) and the threshold
  // slider 0..100 -> fraction of |target| 0 (everything) or 10^(-4 .. 0)
  const fractionOf = (v) => (v <= 0 ? 0 : Math.pow(10, -4 + (4 * v) / 100));
  const sliderOf = (f) => (f <= 0 ? 0 : Math.max(1, Math.min(100, Math.round(((Math.log10(f) + 4) * 100) / 4))));
  let threshold = 0, visible = [];
  function setThreshold() {
    const fraction = fractionOf(Number(slider.value));
    threshold = fraction * DATA.reference;
    visible = [];
    const degree = new Int32Array(N);
    for (const e of byWeight) {
      if (Math.abs(weight[e]) < threshold) break;
      visible.push(e); degree[src[e]]++; degree[dst[e]]++;
    }
    for (let i = 0; i < N; i++) elements[i].classList.toggle("faded", degree[i] === 0 && NODES[i].kind !== "target");
    document.getElementById("threshold-value").textContent = fraction ? fraction.toPrecision(2) : "0";
    const count = document.getElementById("edge-count");
    count.textContent = `${visible.length} of ${M} edges`;
    count.dataset.visible = String(visible.length);
    count.dataset.threshold = String(threshold);
    redraw();
  }
  slider.value = String(sliderOf(DATA.min_edge));
  slider.addEventListener("input", setThreshold);

  function ends(e) {
    const a = PLACES[src[e]], b = PLACES[dst[e]];
    if (b.y < a.y - 1) return [a.x, a.y - H / 2, b.x, b.y + H / 2];
    if (b.y > a.y + 1) return [a.x, a.y + H / 2, b.x, b.y - H / 2];
    return [a.x, a.y, b.x, b.y];
  }
  const LEVELS = 6, LABELLED = 12;
  function drawEdges() {
    const dpr = window.devicePixelRatio || 1, w = stage.clientWidth, h = stage.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) { canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr); }
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.setTransform(dpr * view.k, 0, 0, dpr * view.k, dpr * view.x, dpr * view.y);
    const focus = selected >= 0;
    // one path per (sign, width level): a few strokes for every edge
    const paths = Array.from({length: 2 * LEVELS}, () => new Path2D());
    const drawn = moving ? visible.slice(0, MOVING_EDGES) : visible; // visible runs strongest first
    for (const e of drawn) {
      if (focus && (src[e] === selected || dst[e] === selected)) continue;
      const level = Math.min(LEVELS - 1, Math.floor((Math.abs(weight[e]) / largest) * LEVELS));
      const [x1, y1, x2, y2] = ends(e), path = paths[(weight[e] >= 0 ? 0 : LEVELS) + level];
      path.moveTo(x1, y1); path.lineTo(x2, y2);
    }
    ctx.globalAlpha = focus ? 0.15 : 0.55;
    for (let s = 0; s < 2; s++) for (let level = 0; level < LEVELS; level++) {
      ctx.strokeStyle = s === 0 ? "#1f5fbf" : "#c0392b";
      ctx.lineWidth = (0.6 + (4.4 * (level + 0.5)) / LEVELS) / view.k;
      ctx.stroke(paths[s * LEVELS + level]);
    }
    if (!focus) return;
    ctx.globalAlpha = 0.95;
    ctx.font = `${11 / view.k}px system-ui,sans-serif`;
    const mine = incoming[selected].concat(outgoing[selected]).sort((a, b) => Math.abs(weight[a]) - Math.abs(weight[b]));
    mine.forEach((e, rank) => {
      const [x1, y1, x2, y2] = ends(e);
      ctx.strokeStyle = ctx.fillStyle = weight[e] >= 0 ? "#1f5fbf" : "#c0392b";
      ctx.lineWidth = (1.5 + (4 * Math.abs(weight[e])) / largest) / view.k;
      ctx.beginPath(); ctx.moveTo(x1, y1); ctx.lineTo(x2, y2); ctx.stroke();
      // the weights of the strongest few, written near the far end (the panel lists them all)
      const far = src[e] === selected ? 0.75 : 0.25;
      if (rank >= mine.length - LABELLED) ctx.fillText(fmt(weight[e]), x1 + (x2 - x1) * far + 3 / view.k, y1 + (y2 - y1) * far);
    });
  }

  // ------------------------------------------------------------------ hover
  function figures(i) {
    const n = NODES[i], rows = [`${n.id}`, `kind ${n.kind}, layer ${fmt(n.layer)}, position ${fmt(n.position)} (${JSON.stringify(n.token == null ? "" : n.token)})`];
    for (const key of DATA.figures) if (typeof n[key] === "number") rows.push(`${key} ${fmt(n[key])}`);
    if (label(i)) rows.push(label(i));
    return rows;
  }
  const nodeOf = (ev) => { const g = ev.target.closest && ev.target.closest("[data-node-id]"); return g ? indexOf.get(g.getAttribute("data-node-id")) : undefined; };
  svg.addEventListener("mouseover", (ev) => {
    const i = nodeOf(ev);
    if (i === undefined) return;
    tooltip.textContent = figures(i).join("\n");
    tooltip.hidden = false;
  });
  svg.addEventListener("mousemove", (ev) => {
    if (tooltip.hidden) return;
    const r = stage.getBoundingClientRect();
    tooltip.style.left = `${Math.min(ev.clientX - r.left + 14, r.width - 300)}px`;
    tooltip.style.top = `${ev.clientY - r.top + 14}px`;
  });
  svg.addEventListener("mouseout", (ev) => { if (nodeOf(ev) !== undefined) tooltip.hidden = true; });

  // ------------------------------------------------------------------ click: edges and card
  let selected = -1;
  const nodeLink = (i) => `<a data-go="${i}">${esc(NODES[i].id)}</a>`;
  function edgeTable(title, list, other) {
    const sorted = list.slice().sort((a, b) => Math.abs(weight[b]) - Math.abs(weight[a]));
    const rows = sorted.slice(0, 40).map((e) => `<tr><td>${nodeLink(other(e))}</td><td>${esc(label(other(e)).slice(0, 40))}</td>` +
      `<td class="v ${weight[e] >= 0 ? "pos" : "neg"}">${fmt(weight[e])}</td></tr>`).join("");
    const more = sorted.length > 40 ? `<p class="hint">and ${sorted.length - 40} more</p>` : "";
    return `<h3>${title} (${list.length})</h3><table class="edges">${rows}</table>${more}`;
  }
  function select(i) {
    if (selected >= 0) { elements[selected].classList.remove("selected"); for (const e of incoming[selected]) elements[src[e]].classList.remove("neighbor"); for (const e of outgoing[selected]) elements[dst[e]].classList.remove("neighbor"); }
    selected = i;
    const panel = document.getElementById("node-panel"), card = document.getElementById("card");
    const edges = document.getElementById("node-edges");
    if (i < 0) { panel.innerHTML = card.innerHTML = edges.innerHTML = ""; redraw(); return; }
    elements[i].classList.add("selected");
    for (const e of incoming[i]) elements[src[e]].classList.add("neighbor");
    for (const e of outgoing[i]) elements[dst[e]].classList.add("neighbor");
    panel.innerHTML = `<h3>${esc(NODES[i].id)} <button type="button" id="pin">${pinned.has(i) ? "unpin" : "pin"}</button></h3>` +
      `<div id="figures">${figures(i).slice(1).map(esc).join("<br>")}</div>`;
    edges.innerHTML = edgeTable("inputs", incoming[i], (e) => src[e]) + edgeTable("outputs", outgoing[i], (e) => dst[e]);
    document.getElementById("pin").addEventListener("click", () => { togglePin(i); select(i); });
    const key = PLACES[i].key;
    card.innerHTML = !key ? "" : DATA.cards[key] ? DATA.cards[key]
      : DATA.card_url ? `<p class="hint">loading ${esc(key)}'s card…</p>`
      : `<p class="hint">${Object.keys(DATA.cards).length ? `${esc(key)} is not in the features file` : "no feature cards: tc view --features FEATURES.h5 adds them"}</p>`;
    if (key && !DATA.cards[key] && DATA.card_url) fetchCard(key, i);
    redraw();
  }
  // tc serve: cards come from the server when asked for, and are kept
  function fetchCard(key, i) {
    fetch(DATA.card_url + encodeURIComponent(key)).then((r) => r.json().then((body) => [r.ok, body])).then(([ok, body]) => {
      if (ok) DATA.cards[key] = body.html;
      if (selected === i) document.getElementById("card").innerHTML = ok ? body.html : `<p class="hint">${esc(body.error || "no card")}</p>`;
    }).catch((error) => { if (selected === i) document.getElementById("card").innerHTML = `<p class="hint">${esc(String(error))}</p>`; });
  }
  svg.addEventListener("click", (ev) => { const i = nodeOf(ev); if (i !== undefined) select(i); });
  document.getElementById("side").addEventListener("click", (ev) => {
    const a = ev.target.closest("[data-go]");
    if (a) { const i = Number(a.dataset.go); select(i); centre(i); }
  });
  function centre(i) {
    view.x = stage.clientWidth / 2 - PLACES[i].x * view.k;
    view.y = stage.clientHeight / 2 - PLACES[i].y * view.k;
    redraw();
  }

  // ------------------------------------------------------------------ search
  const search = document.getElementById("search");
  let matches = [];
  function runSearch() {
    for (const i of matches) elements[i].classList.remove("match");
    const q = search.value.trim().toLowerCase();
    matches = [];
    if (q) for (let i = 0; i < N; i++) {
      const n = NODES[i];
      const hay = [String(n.id), PLACES[i].name, PLACES[i].key, n.token == null ? "" : String(n.token), label(i)].join("\u0001").toLowerCase();
      if (hay.includes(q)) matches.push(i);
    }
    for (const i of matches) elements[i].classList.add("match");
    document.getElementById("search-count").textContent = q ? `${matches.length} found` : "";
    document.getElementById("search-results").innerHTML = !q ? "" :
      `<h3>search: ${matches.length} nodes</h3><ul>${matches.slice(0, 50).map((i) => `<li>${nodeLink(i)} ${esc(label(i))}</li>`).join("")}</ul>`;
  }
  search.addEventListener("input", runSearch);
  search.addEventListener("keydown", (ev) => { if (ev.key === "Enter" && matches.length) { select(matches[0]); centre(matches[0]); } });

  // ------------------------------------------------------------------ pins, supernodes, saving
  const pinned = new Set();
  const supernodes = []; // {name, members: [node ids]}
  function togglePin(i) {
    if (pinned.has(i)) pinned.delete(i); else pinned.add(i);
    elements[i].classList.toggle("pinned", pinned.has(i));
    showPinned();
  }
  function showPinned() {
    document.getElementById("pinned-count").textContent = `(${pinned.size})`;
    document.getElementById("pinned").innerHTML = Array.from(pinned).map((i) =>
      `<li><input type="checkbox" class="tick" value="${i}"> ${nodeLink(i)} <button type="button" data-unpin="${i}" title="unpin">×</button></li>`).join("");
    document.getElementById("supernodes").innerHTML = supernodes.map((s, k) =>
      `<li><b>${esc(s.name)}</b>: ${s.members.map(esc).join(", ")} <button type="button" data-ungroup="${k}" title="remove">×</button></li>`).join("");
    const grouped = new Set(supernodes.flatMap((s) => s.members));
    elements.forEach((el, i) => el.classList.toggle("in-supernode", grouped.has(String(NODES[i].id))));
  }
  document.getElementById("pinned-panel").addEventListener("click", (ev) => {
    const u = ev.target.closest("[data-unpin]"), g = ev.target.closest("[data-ungroup]");
    if (u) togglePin(Number(u.dataset.unpin));
    if (g) { supernodes.splice(Number(g.dataset.ungroup), 1); showPinned(); }
  });
  function group(name, ids) {
    name = String(name || "").trim();
    ids = ids.map(String).filter((id) => indexOf.has(id));
    if (!name || !ids.length) return false;
    for (const id of ids) if (!pinned.has(indexOf.get(id))) togglePin(indexOf.get(id));
    supernodes.push({name, members: ids});
    showPinned();
    return true;
  }
  document.getElementById("group").addEventListener("click", () => {
    const ids = Array.from(document.querySelectorAll("#pinned .tick:checked")).map((t) => String(NODES[Number(t.value)].id));
    if (group(document.getElementById("supernode-name").value, ids)) document.getElementById("supernode-name").value = "";
  });
  // The pinned nodes and every target, with the edges among them, as tc writes a circuit graph (node ids
  // and attributes unchanged); the supernodes go into the metadata.
  function subgraph() {
    const keep = new Set(pinned);
    NODES.forEach((n, i) => { if (n.kind === "target") keep.add(i); });
    const ids = new Set(Array.from(keep).map((i) => String(NODES[i].id)));
    const out = {};
    for (const key of Object.keys(GRAPH)) if (key !== "nodes" && key !== "links") out[key] = GRAPH[key];
    const meta = Object.assign({}, (GRAPH.graph && GRAPH.graph.metadata) || {});
    meta.supernodes = supernodes.map((s) => ({name: s.name, members: s.members.slice()}));
    meta.pinned = Array.from(pinned).map((i) => String(NODES[i].id));
    meta.subgraph_of = {nodes: N, edges: M};
    out.graph = Object.assign({}, GRAPH.graph || {}, {metadata: meta});
    out.nodes = NODES.filter((n, i) => keep.has(i));
    out.links = links.filter((l) => ids.has(String(l.source)) && ids.has(String(l.target)));
    return out;
  }
  function save() {
    const blob = new Blob([JSON.stringify(subgraph(), null, 1) + "\n"], {type: "application/json"});
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "subgraph.json";
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  }
  document.getElementById("save").addEventListener("click", save);

  // ------------------------------------------------------------------ start
  if (DATA.prompt != null) document.getElementById("prompt").textContent = "prompt: " + JSON.stringify(DATA.prompt);
  window.addEventListener("resize", redraw);
  setThreshold();
  fit();
  // for tests and users' scripts
  window.tcView = {
    select: (id) => select(indexOf.has(String(id)) ? indexOf.get(String(id)) : -1),
    selected: () => (selected >= 0 ? String(NODES[selected].id) : null),
    pinned: () => Array.from(pinned).map((i) => String(NODES[i].id)),
    node: (id) => (indexOf.has(String(id)) ? NODES[indexOf.get(String(id))] : null),
    pin: (id) => { const i = indexOf.get(String(id)); if (i !== undefined && !pinned.has(i)) togglePin(i); },
    group, subgraph, save,
    visibleEdges: () => visible.length,
    threshold: () => threshold,
    search: (q) => { search.value = q; runSearch(); return matches.map((i) => String(NODES[i].id)); },
  };
  // pins and supernodes the graph brings (a subgraph tc view saved, a Neuronpedia graph's qParams)
  const given = (GRAPH.graph && GRAPH.graph.metadata) || {};
  for (const id of Array.isArray(given.pinned) ? given.pinned : []) window.tcView.pin(id);
  for (const s of Array.isArray(given.supernodes) ? given.supernodes : []) if (s && Array.isArray(s.members)) group(s.name, s.members);
  // page.html#select=NODE_ID&search=TEXT&zoom=K opens with that node clicked, that search made, and the
  // view K times closer than the whole graph, centred on the node (links, screenshots)
  const opening = new URLSearchParams(location.hash.slice(1));
  if (opening.get("search")) { search.value = opening.get("search"); runSearch(); }
  if (indexOf.has(opening.get("select"))) select(indexOf.get(opening.get("select")));
  const zoom = Number(opening.get("zoom"));
  if (zoom > 0 && Number.isFinite(zoom)) { view.k *= zoom; if (selected >= 0) centre(selected); else redraw(); }
  document.body.dataset.ready = "1";
})();
