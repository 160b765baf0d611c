// The attribution-graph explorer's drawing (loaded before graph_panel.js, which holds the
// prompt form and the intervention panel): the page helpers both use, the preset layout and the
// Cytoscape.js elements and style of a graph (POST <api>/graph, spdjax/view/graph_api.py).
// Plain JavaScript, no build step; the graph is drawn by cytoscape.js
// (static/vendor/cytoscape.min.js, MIT, static/vendor/cytoscape.LICENSE).
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

  window.spdjaxGraphDraw = { el, fmt, post, injectStyle, layout, elements, CY_STYLE,
                             POS_COLOR, NEG_COLOR };
})();
