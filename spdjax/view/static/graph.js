// The viewer's attribution-graph explorer: type a prompt, see its graph (POST <api>/graph,
// spdjax/view/graph_api.py), click subcomponents to keep or ablate them and see the predictions
// and KL change (POST <api>/intervene). Plain JavaScript, no build step; the graph is drawn by
// cytoscape.js (static/vendor/cytoscape.min.js, MIT, static/vendor/cytoscape.LICENSE).
//
//   window.spdjaxGraph.mount(element, apiBase)   // e.g. mount(div, "api")
//
// Layout: x is the prompt position, y the layer (the token inputs at the bottom, one row per
// decomposed site in the model's order, the output tokens on top); a subcomponent's size grows
// with its CI; edges are blue when positive and red when negative, wider when stronger.
(function () {
  "use strict";

  const STYLE = `
.sg { font-size: 13px; }
.sg-form { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; margin: 4px 0 8px; }
.sg-form input.sg-prompt { flex: 1 1 320px; min-width: 200px; padding: 4px 6px;
  font-family: ui-monospace, monospace; }
.sg-form details { font-size: 12px; }
.sg-form details label { margin-right: 10px; }
.sg-form details input[type=number] { width: 5em; }
.sg button { padding: 4px 10px; cursor: pointer; }
.sg button:disabled { cursor: wait; }
.sg-status { color: #444; margin: 2px 0 6px; min-height: 1.2em; }
.sg-error { background: #fde2e1; border: 1px solid #d33; padding: 6px 8px; margin: 4px 0; }
.sg-main { display: flex; gap: 12px; align-items: flex-start; }
.sg-canvas { flex: 1 1 auto; min-width: 300px; height: 620px; border: 1px solid #dde;
  border-radius: 4px; background: #fcfcfd; }
.sg-side { flex: 0 0 340px; max-width: 340px; }
.sg-side h4 { margin: 8px 0 4px; font-size: 13px; }
.sg-info { font-family: ui-monospace, monospace; font-size: 12px; background: #f5f6f8;
  padding: 6px; min-height: 4.5em; white-space: pre-wrap; word-break: break-all; }
.sg-legend { font-size: 12px; color: #555; margin: 6px 0; }
.sg-legend .k { color: #1f7a3a; font-weight: 600; } .sg-legend .a { color: #c02626; font-weight: 600; }
.sg-sel { font-family: ui-monospace, monospace; font-size: 12px; word-break: break-all; }
.sg-table { border-collapse: collapse; margin: 4px 0; font-size: 12px; width: 100%; }
.sg-table th, .sg-table td { padding: 2px 6px; border-bottom: 1px solid #eee; text-align: left; }
.sg-table td.p { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.sg-table td.changed { background: #fff3c4; font-weight: 600; }
.sg-kl { margin: 4px 0; font-variant-numeric: tabular-nums; }
.sg-busy { opacity: .55; }
`;

  const POS_COLOR = "#2563b0", NEG_COLOR = "#c62828";
  const KEEP_COLOR = "#1f9d4a", ABLATE_COLOR = "#d23c3c";
  const STATES = ["none", "keep", "ablate"];

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  }

  // Four significant digits (an intervention on a small model moves probabilities a little).
  function fmt(x) {
    if (x === null || x === undefined) return "-";
    const a = Math.abs(x);
    if (a === 0) return "0";
    if (a < 1e-3 || a >= 1e4) return x.toExponential(2);
    return x.toPrecision(4);
  }

  function injectStyle() {
    if (document.getElementById("spdjax-graph-style")) return;
    const s = el("style", { id: "spdjax-graph-style" });
    s.textContent = STYLE;
    document.head.append(s);
  }

  async function post(url, body) {
    let res;
    try {
      res = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
                               body: JSON.stringify(body) });
    } catch (e) {
      throw new Error(`Could not reach the viewer's server (${url}): ${e.message}`);
    }
    let data = null;
    try { data = await res.json(); } catch (e) { /* not JSON: reported below */ }
    if (!res.ok) {
      const msg = data && data.error ? data.error : `HTTP ${res.status} ${res.statusText}`;
      throw new Error(msg);
    }
    if (data === null) throw new Error(`${url} answered something that is not JSON.`);
    return data;
  }

  // Preset positions: columns per prompt position (as wide as their fullest layer cell), rows
  // per layer; returns {positions: {id: {x, y}}, rows: [names bottom to top], rowY, colX}.
  function layout(graph, aspect) {
    const used = new Set(graph.nodes.filter(n => n.kind === "component").map(n => n.site));
    const rows = ["input", ...graph.sites.filter(s => used.has(s)), "output"];
    const rowOf = n => n.kind === "component" ? rows.indexOf(n.site) :
      (n.kind === "input" ? 0 : rows.length - 1);
    const T = graph.tokens.length;
    const cells = new Map();
    for (const n of graph.nodes) {
      const key = `${n.position}|${rowOf(n)}`;
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(n);
    }
    // Each node takes a slot of its kind's width; a column is as wide as its widest cell.
    const slot = { component: 28, input: 50, output: 64 }, colPad = 30;
    const cellWidth = list => list.length * slot[list[0].kind];
    const width = new Array(T).fill(slot.input);
    for (const [key, list] of cells) {
      const p = Number(key.split("|")[0]);
      list.sort((a, b) => (b.prob ?? 0) - (a.prob ?? 0) ||
                (a.component ?? a.token_id) - (b.component ?? b.token_id));
      width[p] = Math.max(width[p], cellWidth(list));
    }
    const colX = [];
    let x = 0;
    for (let p = 0; p < T; p++) {
      colX.push(x + width[p] / 2);
      x += width[p] + colPad;
    }
    // Rows spaced so that the drawing has the canvas's shape (fit then fills it).
    const rowH = Math.max(60, Math.min(160, x * aspect / Math.max(1, rows.length - 1)));
    const positions = {};
    for (const [key, list] of cells) {
      const [p, r] = key.split("|").map(Number);
      const w = slot[list[0].kind];
      list.forEach((n, i) => {
        positions[n.id] = { x: colX[p] + (i - (list.length - 1) / 2) * w,
                            y: (rows.length - 1 - r) * rowH };
      });
    }
    const rowY = rows.map((_, r) => (rows.length - 1 - r) * rowH);
    return { positions, rows, rowY, colX, left: -slot.component };
  }

  function elements(graph, lay) {
    const out = [];
    const maxW = graph.edges.reduce((m, e) => Math.max(m, Math.abs(e.weight)), 1e-12);
    for (const n of graph.nodes) {
      let label = "", size = 14;
      if (n.kind === "component") {
        label = String(n.component);
        size = 9 + 21 * Math.max(0, Math.min(1, n.ci));
      } else if (n.kind === "input") {
        label = n.token;
      } else {
        label = `${n.token}\n${(100 * n.prob).toFixed(1)}%`;
      }
      out.push({ group: "nodes", data: { id: n.id, label, size, kind: n.kind },
                 position: lay.positions[n.id], classes: n.kind });
    }
    lay.rows.forEach((name, r) => {
      out.push({ group: "nodes", data: { id: `row:${name}`, label: name },
                 position: { x: lay.left, y: lay.rowY[r] }, classes: "rowlabel",
                 selectable: false, grabbable: false });
    });
    graph.tokens.forEach((tok, p) => {
      out.push({ group: "nodes", data: { id: `pos:${p}`, label: String(p) },
                 position: { x: lay.colX[p], y: lay.rowY[0] + 32 }, classes: "poslabel",
                 selectable: false, grabbable: false });
    });
    graph.edges.forEach((e, i) => {
      const s = Math.abs(e.weight) / maxW;
      out.push({ group: "edges", data: { id: `e${i}`, source: e.source, target: e.target,
                                         w: e.weight, width: 0.4 + 4.6 * s,
                                         alpha: 0.15 + 0.7 * s },
                 classes: e.weight >= 0 ? "pos" : "neg" });
    });
    return out;
  }

  const CY_STYLE = [
    { selector: "node", style: {
      "width": "data(size)", "height": "data(size)", "label": "data(label)",
      "font-size": 10, "color": "#333", "text-valign": "bottom", "text-margin-y": 1,
      "background-color": "#7f93ad", "border-width": 1, "border-color": "#4a5d75" } },
    { selector: "node.input", style: {
      "shape": "round-rectangle", "width": 44, "height": 26, "background-color": "#e4e9f0",
      "text-valign": "center", "text-margin-y": 0, "font-size": 15, "color": "#111" } },
    { selector: "node.output", style: {
      "shape": "round-rectangle", "width": 58, "height": 40, "background-color": "#f2e7c9",
      "border-color": "#b08a2e", "text-valign": "center", "text-margin-y": 0,
      "text-wrap": "wrap", "font-size": 14, "color": "#111" } },
    { selector: "node.rowlabel", style: {
      "width": 1, "height": 1, "background-opacity": 0, "border-width": 0,
      "text-valign": "center", "text-halign": "left", "font-size": 17, "color": "#556",
      "events": "no" } },
    { selector: "node.poslabel", style: {
      "width": 1, "height": 1, "background-opacity": 0, "border-width": 0,
      "text-valign": "center", "font-size": 13, "color": "#889", "events": "no" } },
    { selector: "node.keep", style: {
      "background-color": KEEP_COLOR, "border-color": "#0b5a27", "border-width": 3 } },
    { selector: "node.ablate", style: {
      "background-color": "#ffd0d0", "border-color": ABLATE_COLOR, "border-width": 4 } },
    { selector: "node.hover", style: { "border-color": "#000", "border-width": 2 } },
    { selector: "edge", style: {
      "width": "data(width)", "opacity": "data(alpha)", "curve-style": "straight",
      "line-color": POS_COLOR, "events": "no" } },
    { selector: "edge.neg", style: { "line-color": NEG_COLOR } },
    { selector: "edge.faded", style: { "opacity": 0.04 } },
    { selector: "edge.near", style: { "opacity": 0.9 } },
  ];

  class Explorer {
    constructor(root, apiBase) {
      this.api = String(apiBase === undefined || apiBase === null ? "api" : apiBase)
        .replace(/\/+$/, "");
      this.root = root;
      this.graph = null;
      this.cy = null;
      this.state = new Map();  // node id -> "keep" | "ablate"
      this.timer = null;
      this.seq = 0;
      this.build();
    }

    build() {
      const r = this.root;
      r.classList.add("sg");
      r.textContent = "";
      this.prompt = el("input", { class: "sg-prompt", type: "text", "aria-label": "prompt",
                                  placeholder: "a prompt, e.g. BOS 5 17 S 42 9 3 S" });
      this.button = el("button", { class: "sg-build", type: "submit", text: "Build graph" });
      this.threshold = el("input", { type: "number", step: "0.05", min: "0", max: "0.99",
                                     value: "0.1", class: "sg-threshold" });
      this.nodeThreshold = el("input", { type: "number", step: "0.01", min: "0.01", max: "1",
                                         value: "0.9", class: "sg-node-threshold" });
      this.topK = el("input", { type: "number", step: "1", min: "1", max: "20", value: "3",
                                class: "sg-topk" });
      this.positions = el("input", { type: "text", placeholder: "last", class: "sg-positions",
                                     style: "width: 6em" });
      this.prune = el("input", { type: "checkbox", class: "sg-prune" });
      this.prune.checked = true;
      const settings = el("details", {},
        el("summary", { text: "settings" }),
        el("label", {}, "CI threshold ", this.threshold),
        el("label", {}, "kept influence ", this.nodeThreshold),
        el("label", {}, "outputs per position ", this.topK),
        el("label", {}, "output positions ", this.positions),
        el("label", { title: "unchecked: every subcomponent above the CI threshold" },
           this.prune, " prune"));
      const form = el("form", { class: "sg-form" }, this.prompt, this.button, settings);
      form.addEventListener("submit", ev => { ev.preventDefault(); this.buildGraph(); });
      this.status = el("div", { class: "sg-status" });
      this.error = el("div", { class: "sg-error", role: "alert" });
      this.error.hidden = true;
      this.canvas = el("div", { class: "sg-canvas" });
      this.info = el("div", { class: "sg-info",
                              text: "Hover over a node for its details." });
      this.base = el("select", { class: "sg-base", "aria-label": "masks of the others" },
        el("option", { value: "", text: "default (0 with keeps, else 1)" }),
        el("option", { value: "ones", text: "1 (all components)" }),
        el("option", { value: "ci", text: "their CI" }),
        el("option", { value: "zeros", text: "0 (only the kept)" }));
      this.base.addEventListener("change", () => this.schedule());
      this.auto = el("input", { type: "checkbox", class: "sg-auto" });
      this.auto.checked = true;
      this.interveneButton = el("button", { class: "sg-intervene", type: "button",
                                            text: "Intervene" });
      this.interveneButton.addEventListener("click", () => this.intervene());
      const reset = el("button", { class: "sg-reset", type: "button", text: "Clear" });
      reset.addEventListener("click", () => { this.clearStates(); this.schedule(); });
      const fit = el("button", { class: "sg-fit", type: "button", text: "Fit" });
      fit.addEventListener("click", () => this.cy && this.cy.fit(undefined, 24));
      this.selection = el("div", { class: "sg-sel" });
      this.preds = el("div", { class: "sg-preds" });
      const legend = el("div", { class: "sg-legend" });
      legend.innerHTML = "x: position · y: layer (inputs at the bottom, outputs on top) · " +
        "node size: CI · edges: <span style='color:" + POS_COLOR + "'>positive</span> / " +
        "<span style='color:" + NEG_COLOR + "'>negative</span>, width: |weight|.<br>" +
        "Click a subcomponent to cycle <span class='k'>keep</span> → " +
        "<span class='a'>ablate</span> → none.";
      const side = el("div", { class: "sg-side" },
        el("h4", { text: "Node" }), this.info, legend,
        el("h4", { text: "Intervention" }),
        el("div", {}, "others at ", this.base),
        el("div", { style: "margin: 4px 0" }, this.interveneButton, " ", reset, " ", fit, " ",
           el("label", {}, this.auto, " on click")),
        this.selection,
        el("h4", { text: "Predictions" }), this.preds);
      r.append(form, this.status, this.error, el("div", { class: "sg-main" }, this.canvas, side));
      this.renderSelection();
    }

    showError(msg) {
      this.error.textContent = msg;
      this.error.hidden = !msg;
    }

    readPositions() {
      const text = this.positions.value.trim();
      if (!text) return [];
      return text.split(/[\s,]+/).map(t => {
        if (!/^-?\d+$/.test(t)) {
          throw new Error(`Output positions must be integers separated by commas; got ${t}.`);
        }
        return Number(t);
      });
    }

    async buildGraph() {
      this.showError("");
      let body;
      try {
        body = { prompt: this.prompt.value, threshold: Number(this.threshold.value),
                 node_threshold: Number(this.nodeThreshold.value),
                 top_k: Number(this.topK.value), positions: this.readPositions(),
                 prune: this.prune.checked };
      } catch (e) { this.showError(e.message); return; }
      this.button.disabled = true;
      this.root.classList.add("sg-busy");
      const previous = this.status.textContent;
      this.status.textContent = "Computing the graph… (a new prompt compiles its edge pass: " +
        "seconds on a CPU)";
      try {
        const graph = await post(`${this.api}/graph`, body);
        this.graph = graph;
        this.request = { prompt: body.prompt, positions: graph.positions };
        this.state.clear();
        this.draw();
        this.renderSummary();
        this.renderSelection();
        this.renderPredictions(null);
      } catch (e) {
        this.status.textContent = previous;  // the graph shown is still the last one built
        this.showError(e.message);
      } finally {
        this.button.disabled = false;
        this.root.classList.remove("sg-busy");
      }
    }

    renderSummary() {
      const g = this.graph;
      const comps = g.nodes.filter(n => n.kind === "component").length;
      this.status.textContent = `${comps} subcomponent nodes, ${g.edges.length} edges ` +
        `(before pruning ${g.unpruned.n_nodes}, ${g.unpruned.n_edges}) · output position` +
        `${g.positions.length > 1 ? "s" : ""} ${g.positions.join(", ")} · ` +
        `KL(target ‖ all components) ${fmt(g.kl_components)} · ` +
        `KL(target ‖ graph only) ${fmt(g.kl_graph_only)}`;
    }

    draw() {
      const g = this.graph;
      const box = this.canvas.getBoundingClientRect();
    const lay = layout(g, box.width > 0 ? box.height / box.width : 0.5);
      if (this.cy) this.cy.destroy();
      this.cy = window.cytoscape({
        container: this.canvas, elements: elements(g, lay), style: CY_STYLE,
        layout: { name: "preset" }, minZoom: 0.05, maxZoom: 6,
        boxSelectionEnabled: false, autoungrabify: true,
      });
      this.cy.fit(undefined, 24);
      const byId = new Map(g.nodes.map(n => [n.id, n]));
      this.cy.on("tap", "node.component", ev => this.cycle(ev.target.id()));
      this.cy.on("tap", "node.input, node.output", ev => {
        this.info.textContent = this.describe(byId.get(ev.target.id())) +
          "\n(only subcomponents can be kept or ablated)";
      });
      this.cy.on("mouseover", "node.component, node.input, node.output", ev => {
        const n = ev.target;
        n.addClass("hover");
        this.cy.edges().addClass("faded");
        n.connectedEdges().removeClass("faded").addClass("near");
        this.info.textContent = this.describe(byId.get(n.id()));
      });
      this.cy.on("mouseout", "node", ev => {
        ev.target.removeClass("hover");
        this.cy.edges().removeClass("faded near");
      });
      this.root.dataset.nodes = String(g.nodes.length);
    }

    describe(n) {
      if (!n) return "";
      const edgesIn = this.graph.edges.filter(e => e.target === n.id).length;
      const edgesOut = this.graph.edges.filter(e => e.source === n.id).length;
      const lines = [n.id];
      if (n.kind === "component") {
        lines.push(`site ${n.site}, subcomponent ${n.component}, position ${n.position} ` +
                   `(token ${n.token})`, `CI ${fmt(n.ci)}  activation ${fmt(n.activation)}`);
      } else if (n.kind === "input") {
        lines.push(`input token ${n.token} (id ${n.token_id}) at position ${n.position}`);
      } else {
        lines.push(`output token ${n.token} (id ${n.token_id}) at position ${n.position}`,
                   `target probability ${fmt(n.prob)}`);
      }
      lines.push(`influence ${fmt(n.influence)}  edges in ${edgesIn}, out ${edgesOut}`);
      const s = this.state.get(n.id);
      if (s) lines.push(`state: ${s}`);
      return lines.join("\n");
    }

    cycle(id) {
      const now = this.state.get(id) || "none";
      const next = STATES[(STATES.indexOf(now) + 1) % STATES.length];
      const node = this.cy.getElementById(id);
      node.removeClass("keep ablate");
      if (next === "none") this.state.delete(id);
      else { this.state.set(id, next); node.addClass(next); }
      this.info.textContent = this.describe(this.graph.nodes.find(n => n.id === id));
      this.renderSelection();
      this.schedule();
    }

    clearStates() {
      this.state.clear();
      if (this.cy) this.cy.nodes().removeClass("keep ablate");
      this.renderSelection();
    }

    ids(which) {
      return [...this.state].filter(([, s]) => s === which).map(([id]) => id).sort();
    }

    renderSelection() {
      const keep = this.ids("keep"), ablate = this.ids("ablate");
      this.selection.innerHTML = "";
      this.selection.append(
        el("div", { text: `keep (${keep.length}): ${keep.join(", ") || "-"}` }),
        el("div", { text: `ablate (${ablate.length}): ${ablate.join(", ") || "-"}` }));
    }

    schedule() {
      if (!this.graph || !this.auto.checked) return;
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.intervene(), 250);
    }

    async intervene() {
      if (!this.graph) { this.showError("Build a graph first."); return; }
      this.showError("");
      const body = { prompt: this.request.prompt, positions: this.request.positions,
                     keep: this.ids("keep"), ablate: this.ids("ablate"),
                     top_k: Math.max(5, Number(this.topK.value) || 5) };
      if (this.base.value) body.base = this.base.value;
      const seq = ++this.seq;
      this.interveneButton.disabled = true;
      try {
        const res = await post(`${this.api}/intervene`, body);
        if (seq === this.seq) { this.last = res; this.renderPredictions(res); }
      } catch (e) {
        if (seq === this.seq) this.showError(e.message);
      } finally {
        if (seq === this.seq) this.interveneButton.disabled = false;
      }
    }

    // res null: the graph's own predictions (target vs all components).
    renderPredictions(res) {
      const g = this.graph;
      const right = res ? res.intervened : g.predictions.components;
      const left = res ? res.target : g.predictions.target;
      const positions = res ? res.positions : g.positions;
      this.preds.innerHTML = "";
      const kl = res ? res.kl : g.kl_components;
      const klLine = el("div", { class: "sg-kl" });
      klLine.textContent = res
        ? `KL(target ‖ intervened) ${fmt(kl)} · ${res.n_kept} subcomponent-positions on ` +
          `(others at ${res.base}; keep ${res.keep.length}, ablate ${res.ablate.length})`
        : `KL(target ‖ all components) ${fmt(kl)} · click subcomponents to intervene`;
      this.preds.append(klLine);
      const rightName = res ? "intervened" : "all components";
      (positions || [null]).forEach((p, i) => {
        const table = el("table", { class: "sg-table", "data-position": String(p) });
        table.append(el("tr", {},
          el("th", { text: p === null ? "#" : `@${p} (${g.tokens[p]})` }),
          el("th", { text: "target" }), el("th", { text: "p" }),
          el("th", { text: rightName }), el("th", { text: "p" })));
        const L = left[i], R = right[i];
        for (let k = 0; k < Math.max(L.length, R.length); k++) {
          const a = L[k], b = R[k];
          const tr = el("tr", {}, el("td", { text: String(k + 1) }),
            el("td", { text: a ? (a.text ?? String(a.token)) : "" }),
            el("td", { class: "p", text: a ? fmt(a.prob) : "" }),
            el("td", { class: "tok" + (a && b && a.token !== b.token ? " changed" : ""),
                       text: b ? (b.text ?? String(b.token)) : "" }),
            el("td", { class: "p", text: b ? fmt(b.prob) : "" }));
          table.append(tr);
        }
        this.preds.append(table);
      });
      this.preds.dataset.kind = res ? "intervened" : "graph";
    }
  }

  const instances = [];

  function mount(element, apiBase) {
    if (!(element instanceof HTMLElement)) {
      throw new Error("spdjaxGraph.mount(element, apiBase): element must be a DOM element.");
    }
    injectStyle();
    if (typeof window.cytoscape !== "function") {
      element.textContent = "The graph explorer needs static/vendor/cytoscape.min.js, which " +
        "did not load.";
      return null;
    }
    const ex = new Explorer(element, apiBase);
    instances.push(ex);
    return ex;
  }

  window.spdjaxGraph = { mount, instances };
})();
