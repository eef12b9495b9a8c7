"use strict";
// tc serve's panel, run after tc view's page script (window.tcView is its handle on the page; SERVE, set just
// before this script, names the graph shown). Everything here asks the server it came from: no other network.
(function () {
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const fmt = (v) => (typeof v === "number" ? Number(v.toPrecision(5)).toString() : v == null ? "–" : String(v));
  const view = window.tcView;

  // POST JSON; resolves to the answer's JSON, rejects with its one-line error
  async function call(method, url, body) {
    const response = await fetch(url, {method, headers: {"Content-Type": "application/json"},
      body: body === undefined ? undefined : JSON.stringify(body)});
    let answer = {};
    try { answer = await response.json(); } catch (e) { answer = {error: `${response.status} ${response.statusText}`}; }
    if (!response.ok) throw new Error(answer.error || `${response.status} ${response.statusText}`);
    return answer;
  }
  function status(text, error) {
    $("serve-status").textContent = text;
    $("serve-status").classList.toggle("error", !!error);
  }

  // ------------------------------------------------------------------ a graph for a prompt
  const kind = $("serve-target-kind");
  function showTargetInputs() {
    $("serve-target-a").hidden = kind.value === "logits";
    $("serve-target-b").hidden = kind.value !== "logit_diff";
    $("serve-target-a").placeholder = kind.value === "feature" ? "L2.F57" : kind.value === "logit_diff" ? "token A" : "token";
  }
  kind.addEventListener("change", showTargetInputs);
  // the form starts as the shown graph was asked for
  if (SERVE.prompt != null) $("serve-prompt").value = SERVE.prompt;
  const asked = SERVE.target || {};
  if (asked.logit != null) { kind.value = "logit"; $("serve-target-a").value = asked.logit; }
  if (Array.isArray(asked.logit_diff) && asked.logit_diff.length === 2) {
    kind.value = "logit_diff"; $("serve-target-a").value = asked.logit_diff[0]; $("serve-target-b").value = asked.logit_diff[1];
  }
  if (asked.feature != null) { kind.value = "feature"; $("serve-target-a").value = asked.feature; }
  if (typeof asked.pos === "number") $("serve-pos").value = String(asked.pos);

  function graphRequest() {
    const request = {prompt: $("serve-prompt").value, pos: Number($("serve-pos").value || -1)};
    const a = $("serve-target-a").value, b = $("serve-target-b").value;
    if (kind.value === "logit") request.target = {logit: a};
    if (kind.value === "logit_diff") request.target = {logit_diff: [a, b]};
    if (kind.value === "feature") request.target = {feature: a};
    return request;
  }
  async function follow(job) {
    const bar = $("serve-progress");
    bar.hidden = false;
    for (;;) {
      const state = await call("GET", `/api/jobs/${job}`);
      if (state.state === "queued") { bar.removeAttribute("value"); status(`queued: ${state.ahead} ahead`); }
      if (state.state === "running") {
        if (state.total > 0) { bar.max = state.total; bar.value = state.done; } else bar.removeAttribute("value");
        status(`${state.stage}${state.total > 0 ? ` ${state.done}/${state.total}` : ""}…`);
      }
      if (state.state === "done") return state.result;
      if (state.state === "failed") throw new Error(state.error);
      await new Promise((done) => setTimeout(done, 250));
    }
  }
  $("serve-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("serve-run").disabled = true;
    try {
      if (kind.value !== "logits" && !$("serve-target-a").value) throw new Error(`type the target's ${kind.value === "feature" ? "feature (L2.F57)" : "token"}`);
      if (kind.value === "logit_diff" && !$("serve-target-b").value) throw new Error("type the target's token B");
      status("sending…");
      const queued = await call("POST", "/api/graph", graphRequest());
      const result = await follow(queued.job);
      status(`graph ${result.graph}: ${result.nodes} nodes, ${result.edges} edges; opening…`);
      location.href = `/graph/${encodeURIComponent(result.graph)}`;
    } catch (error) {
      status(error.message, true);
    } finally {
      $("serve-progress").hidden = true;
      $("serve-run").disabled = false;
    }
  });
  call("GET", "/api/graphs").then((answer) => {
    $("serve-graphs").innerHTML = answer.graphs.map((g) =>
      `<a href="/graph/${encodeURIComponent(g.id)}" title="${esc(g.prompt)}">${g.id === SERVE.graph ? "<b>" : ""}${esc(g.id)}${g.id === SERVE.graph ? "</b>" : ""}</a>`).join("") +
      (SERVE.graph != null ? ` <a href="/api/graphs/${encodeURIComponent(SERVE.graph)}" download="graph-${esc(SERVE.graph)}.json">JSON</a>` : "");
  }).catch(() => {});

  // ------------------------------------------------------------------ interventions
  const interventions = []; // {node, op, value}
  function showInterventions() {
    $("serve-interventions").innerHTML = interventions.map((item, k) =>
      `<li data-index="${k}"><code>${esc(item.node)}</code><select class="op">${["ablate", "set", "scale"].map((op) =>
        `<option${op === item.op ? " selected" : ""}>${op}</option>`).join("")}</select>` +
      `<input class="value" type="number" step="any" value="${esc(item.value)}" size="6"${item.op === "ablate" ? " hidden" : ""}>` +
      `<button type="button" class="remove" title="remove">×</button></li>`).join("");
  }
  function add(id) {
    if (id == null || interventions.some((item) => item.node === id)) return;
    interventions.push({node: id, op: "ablate", value: 0});
    showInterventions();
  }
  $("serve-interventions").addEventListener("change", (ev) => {
    const li = ev.target.closest("li"), item = interventions[Number(li.dataset.index)];
    if (ev.target.classList.contains("op")) { item.op = ev.target.value; if (item.op === "scale" && !item.value) item.value = 2; showInterventions(); }
    if (ev.target.classList.contains("value")) item.value = Number(ev.target.value);
  });
  $("serve-interventions").addEventListener("click", (ev) => {
    if (ev.target.classList.contains("remove")) { interventions.splice(Number(ev.target.closest("li").dataset.index), 1); showInterventions(); }
  });
  $("serve-add").addEventListener("click", () => add(view.selected()));
  $("serve-add-pinned").addEventListener("click", () => view.pinned().forEach(add));

  function tops(result) {
    const rows = result.top_before.map((before, k) => {
      const after = result.top_after[k];
      return `<tr><td>${esc(JSON.stringify(before.token))} ${fmt(before.probability)}</td><td>${esc(JSON.stringify(after.token))} ${fmt(after.probability)}</td></tr>`;
    }).join("");
    return `<table class="tops"><tr><th>before</th><th>after</th></tr>${rows}</table>`;
  }
  $("serve-intervene").addEventListener("click", async () => {
    const out = $("serve-intervene-result");
    if (SERVE.graph == null) { out.innerHTML = `<p class="error">compute a graph first</p>`; return; }
    if (!interventions.length) { out.innerHTML = `<p class="error">add a node first (click one, then "add clicked node")</p>`; return; }
    out.innerHTML = `<p class="hint">running…</p>`;
    delete out.dataset.after;
    try {
      const result = await call("POST", "/api/intervene", {graph: SERVE.graph, interventions: interventions.map((item) =>
        item.op === "ablate" ? {node: item.node, op: "ablate"} : {node: item.node, op: item.op, value: Number(item.value)}),
        mode: $("serve-mode").value, ablation: $("serve-ablation").value});
      const t = result.target;
      out.innerHTML = `<p>${esc(result.interventions.join("; "))} (${esc(result.mode)} mode)</p>` +
        (t ? `<p>target <code>${esc(result.target_label || result.target_node)}</code>: <span id="serve-before">${fmt(t.before)}</span> → ` +
          `<b id="serve-after">${fmt(t.after)}</b> (change ${fmt(t.change)})</p>` : "") +
        `<p>KL(before ‖ after) ${fmt(result.kl)} nats</p>` + tops(result);
      if (t) { out.dataset.before = String(t.before); out.dataset.after = String(t.after); }
    } catch (error) {
      out.innerHTML = `<p class="error">${esc(error.message)}</p>`;
    }
  });

  // ------------------------------------------------------------------ validation
  $("serve-validate").addEventListener("click", async () => {
    const out = $("serve-validate-result");
    if (SERVE.graph == null) { out.innerHTML = `<p class="error">compute a graph first</p>`; return; }
    out.innerHTML = `<p class="hint">validating ${view.pinned().length} pinned nodes…</p>`;
    delete out.dataset.necessity;
    try {
      const answer = await call("POST", "/api/validate", {graph: SERVE.graph, nodes: view.pinned(), mode: $("serve-validate-mode").value,
        ablation: $("serve-ablation").value});
      out.innerHTML = `<pre>${esc(answer.summary.join("\n"))}</pre>`;
      out.dataset.necessity = String(answer.results.circuit.necessity);
      out.dataset.sufficiency = String(answer.results.circuit.sufficiency);
    } catch (error) {
      out.innerHTML = `<p class="error">${esc(error.message)}</p>`;
    }
  });

  showTargetInputs();
  window.tcServe = {graph: SERVE.graph, add, interventions};
  document.body.dataset.serveReady = "1";
})();
