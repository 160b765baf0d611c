// The attribution-graph explorer's page (after graph_draw.js, its drawing): type a prompt, see
// its graph (POST <api>/graph), click subcomponents to keep or ablate them and see the
// predictions and KL change (POST <api>/intervene, spdjax/view/graph_api.py). Plain
// JavaScript, no build step.
//
//   window.spdjaxGraph.mount(element, apiBase)   // e.g. mount(div, "api")
(function () {
  "use strict";

  const { el, fmt, post, injectStyle, layout, elements, CY_STYLE, POS_COLOR, NEG_COLOR } =
    window.spdjaxGraphDraw;
  const STATES = ["none", "keep", "ablate"];

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
      this.attribution = el("select", { class: "sg-attribution", "aria-label": "edge weights" },
        el("option", { value: "gradient", text: "gradient x activation" }),
        el("option", { value: "integrated", text: "integrated gradients (slower)" }));
      const settings = el("details", {},
        el("summary", { text: "settings" }),
        el("label", {}, "CI threshold ", this.threshold),
        el("label", {}, "kept influence ", this.nodeThreshold),
        el("label", {}, "outputs per position ", this.topK),
        el("label", {}, "output positions ", this.positions),
        el("label", { title: "integrated gradients sees through saturated attention" },
           "edges ", this.attribution),
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
                 prune: this.prune.checked, attribution: this.attribution.value };
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
