// spdjax viewer: the run, its sites and figures, from the JSON views of spdjax/view/data.py.
// Plain JS, no build step. Live: data from api/*.json; a static export (window.SPDJAX_STATIC):
// data/*.js scripts that call spdjaxData(name, value), which browsers also load from file://.
"use strict";

(function () {
  const STATIC = !!window.SPDJAX_STATIC;
  const cache = {};
  const pending = {};

  window.spdjaxData = function (name, value) {
    if (pending[name]) pending[name].resolve(value);
  };

  function load(name) {
    if (!cache[name]) {
      cache[name] = STATIC ? loadScript(name) : fetch(`api/${name}.json`).then(async (r) => {
        const body = await r.json().catch(() => ({}));
        if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
        return body;
      });
      cache[name].catch(() => delete cache[name]);
    }
    return cache[name];
  }

  function loadScript(name) {
    return new Promise((resolve, reject) => {
      pending[name] = { resolve };
      const s = document.createElement("script");
      s.src = `data/${name}.js`;
      s.onerror = () => reject(new Error(`cannot read data/${name}.js of this export`));
      document.head.appendChild(s);
    });
  }

  // --- small DOM helpers ---------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      e.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function fmt(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v === "number") {
      if (Number.isInteger(v)) return String(v);
      const a = Math.abs(v);
      return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(3) : v.toPrecision(4);
    }
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }

  function fmtAxis(v) { // a chart's axis label: short enough for its margin
    const a = Math.abs(v);
    if (Number.isInteger(v) && a < 1e5) return String(v);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(1) : v.toPrecision(3);
  }

  function pct(v) { return v === null || v === undefined ? "–" : (100 * v).toPrecision(3) + "%"; }

  function hint(text) {
    // "no harvest yet: python -m ..." with the command set as code
    const i = text.indexOf(": ");
    return el("div", { class: "hint" }, i < 0 ? text : [text.slice(0, i + 2),
      el("code", {}, text.slice(i + 2))]);
  }

  function showError(err) {
    const box = document.getElementById("error");
    box.hidden = false;
    box.textContent = String(err && err.message ? err.message : err);
  }

  // --- SVG charts ------------------------------------------------------------------------------
  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, ...children) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    for (const c of children) e.appendChild(typeof c === "object" ? c : document.createTextNode(c));
    return e;
  }

  function lineChart(points, { width = 260, height = 140 } = {}) {
    const pts = points.filter((p) => p[1] !== null && Number.isFinite(p[1]));
    const root = svg("svg", { width, height, class: "chart" });
    if (!pts.length) return root;
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    const ymin0 = Math.min(...ys), ymax0 = Math.max(...ys);
    const log = ymin0 > 0 && ymax0 / ymin0 > 100;
    const ty = log ? Math.log10 : (v) => v;
    let y0 = ty(ymin0), y1 = ty(ymax0);
    if (y1 === y0) { y0 -= 1; y1 += 1; }
    const x0 = Math.min(...xs), x1 = Math.max(...xs) === x0 ? x0 + 1 : Math.max(...xs);
    const L = 50, R = 6, T = 6, B = 18;
    const X = (v) => L + (v - x0) / (x1 - x0) * (width - L - R);
    const Y = (v) => height - B - (ty(v) - y0) / (y1 - y0) * (height - T - B);
    root.appendChild(svg("rect", { x: L, y: T, width: width - L - R, height: height - T - B,
      fill: "#fafbfc", stroke: "#ccd" }));
    const d = pts.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`);
    root.appendChild(svg("path", { d: d.join(""), fill: "none", stroke: "#2a6fdb",
      "stroke-width": 1.5 }));
    if (pts.length === 1) {
      root.appendChild(svg("circle", { cx: X(pts[0][0]), cy: Y(pts[0][1]), r: 3,
        fill: "#2a6fdb" }));
    }
    root.appendChild(svg("text", { x: L - 3, y: T + 8, "text-anchor": "end" }, fmtAxis(ymax0)));
    root.appendChild(svg("text", { x: L - 3, y: height - B, "text-anchor": "end" },
      fmtAxis(ymin0)));
    if (log) root.appendChild(svg("text", { x: L + 3, y: T + 10 }, "log"));
    root.appendChild(svg("text", { x: L, y: height - 4 }, fmt(x0)));
    root.appendChild(svg("text", { x: width - R, y: height - 4, "text-anchor": "end" },
      `step ${fmt(x1)}`));
    return root;
  }

  function histogram(h, { width = 260, height = 120, xlabel = "" } = {}) {
    const root = svg("svg", { width, height, class: "hist" });
    const n = h.counts.length, top = Math.max(1, ...h.counts);
    const L = 30, R = 6, T = 6, B = 18, bw = (width - L - R) / n;
    h.counts.forEach((c, i) => {
      const bh = c / top * (height - T - B);
      const bar = svg("rect", { x: L + i * bw + 0.5, y: height - B - bh, width: Math.max(bw - 1, 1),
        height: bh, fill: "#e08a1e" });
      bar.appendChild(svg("title", {}, `[${fmt(h.edges[i])}, ${fmt(h.edges[i + 1])}): ${c}`));
      root.appendChild(bar);
    });
    root.appendChild(svg("line", { x1: L, x2: width - R, y1: height - B, y2: height - B,
      stroke: "#999" }));
    root.appendChild(svg("text", { x: L - 3, y: T + 8, "text-anchor": "end" }, String(top)));
    root.appendChild(svg("text", { x: L, y: height - 4 }, fmt(h.edges[0])));
    root.appendChild(svg("text", { x: width - R, y: height - 4, "text-anchor": "end" },
      fmt(h.edges[n])));
    root.appendChild(svg("text", { x: (L + width) / 2, y: height - 4, "text-anchor": "middle" },
      xlabel));
    return root;
  }

  function card(title, body) { return el("div", { class: "card" }, el("div", { class: "title" }, title), body); }

  // --- views -----------------------------------------------------------------------------------
  let RUN = null;

  function renderRun(run) {
    const root = document.getElementById("view-run");
    root.replaceChildren();
    root.appendChild(el("h2", {}, `${run.name}: ${run.family_title}`
      + (run.variant ? ` (${run.variant})` : "") + `, ${run.method_label}`));
    const ck = run.checkpoints.length ? run.checkpoints[run.checkpoints.length - 1] : "none";
    root.appendChild(el("p", {}, `workdir `, el("code", {}, run.workdir),
      ` · ${fmt(run.steps)} steps configured · latest checkpoint: step ${ck}`));
    for (const m of Object.values(run.missing)) root.appendChild(hint(m));

    root.appendChild(el("h3", {}, "Evaluation"));
    if (run.evaluation.length) {
      root.appendChild(el("table", { id: "eval-table" },
        el("tr", {}, el("th", {}, "metric"), el("th", {}, "value")),
        run.evaluation.map(([k, v]) => el("tr", {}, el("td", {}, k),
          el("td", { class: "num" }, fmt(v))))));
    } else {
      root.appendChild(el("p", {}, "No evaluation yet."));
    }

    root.appendChild(el("h3", {}, "Training curves"));
    const names = Object.keys(run.curves);
    if (!names.length) root.appendChild(el("p", {}, "No metrics.jsonl lines yet."));
    root.appendChild(el("div", { class: "cards", id: "curves" },
      names.map((k) => card(k, lineChart(run.curves[k])))));

    root.appendChild(el("h3", {}, "Sites"));
    root.appendChild(el("div", { class: "sitelinks", id: "run-sites" }, run.sites.map((s, i) =>
      el("a", { href: `#sites/${i}` }, s.name + (s.C === null ? "" : ` (C=${s.C})`)))));
    if (run.clustering) {
      const c = run.clustering;
      root.appendChild(el("p", {}, `Clustering (seeds ${c.seeds.join(", ")}): ${c.clusters} `
        + `clusters on the first seed, ${c.multi_member_clusters} of two or more, the largest `
        + `${c.largest_cluster}; mean distance between seeds ${fmt(c.distance_hamming_mean)}.`));
    }
    root.appendChild(el("details", {}, el("summary", {}, "Config"),
      el("pre", { class: "config" }, JSON.stringify(run.config, null, 1))));
  }

  function tokensTable(rows, title, quote) {
    if (!rows || !rows.length) return el("p", {}, `${title}: none`);
    return el("table", {}, el("tr", {}, el("th", {}, title), el("th", {}, "PMI"),
      el("th", {}, "precision"), el("th", {}, "recall")),
      rows.map((t) => el("tr", {}, el("td", {},
        el("code", {}, quote ? JSON.stringify(t.text) : t.text)),
        el("td", { class: "num" }, fmt(t.pmi)), el("td", { class: "num" }, fmt(t.precision)),
        el("td", { class: "num" }, fmt(t.recall)))));
  }

  function exampleRow(e, view) {
    const head = el("span", { class: "ci" }, `CI ${e.ci.toFixed(2)}`);
    if (e.tokens) {
      const ids = e.tokens.every((t) => /^\d+$/.test(t));
      const spans = e.tokens.map((t, j) => {
        const c = e.token_ci[j] === null ? 0 : Math.max(0, Math.min(1, e.token_ci[j]));
        const text = t.replace(/\n/g, "↵").replace(/\t/g, "→");
        return el("span", { class: "tok" + (j === e.center ? " center" : ""),
          style: `background: rgba(255,160,0,${c.toFixed(2)})`,
          title: `CI ${e.token_ci[j] === null ? "–" : e.token_ci[j].toFixed(3)}` },
        ids ? text + " " : text);
      });
      return el("div", { class: "ex" }, head, spans);
    }
    const parts = e.inputs.map(([i, x]) => `x${i}=${x.toFixed(2)}`).join("  ");
    return el("div", { class: "ex" }, head, parts || "(no active input)");
  }

  function renderDetail(view, comp, siteIndex) {
    const box = el("div", { class: "detail", id: "sub-detail" });
    const lm = view.kind === "tokens";
    box.appendChild(el("h3", {}, comp.name));
    box.appendChild(el("p", {}, `fires on ${comp.count} of ${view.n} `
      + `${view.kind === "tokens" ? "tokens" : "examples"} (density ${pct(comp.density)}), `
      + `mean CI ${fmt(comp.mean_ci)}` + (comp.cluster === null ? "" : `, cluster ${comp.cluster}`)));
    if (!comp.count) {
      box.appendChild(el("p", {}, "It never fired in the harvest (CI never above "
        + `${view.threshold}).`));
      return box;
    }
    box.appendChild(el("div", { class: "cols" },
      tokensTable(comp.input_tokens, lm ? "input token" : "active input", lm),
      tokensTable(comp.output_tokens, lm ? "predicted token" : "largest output", lm)));
    if (comp.partners.length) {
      box.appendChild(el("p", {}, "fires with: ", comp.partners.map((p) =>
        el("span", {}, `${p.name} (${pct(p.p)})  `))));
    }
    if (comp.cluster !== null) {
      const members = view.clusters.members[String(comp.cluster)] || [];
      box.appendChild(el("p", {}, `cluster ${comp.cluster} (seed ${view.clusters.seed}, `
        + `${members.length} members): ${members.slice(0, 40).join(", ")}`
        + (members.length > 40 ? ", ..." : "")));
    }
    box.appendChild(el("h3", {}, `Sampled firings (${comp.examples.length}), largest CI first`));
    if (view.kind === "tokens") {
      box.appendChild(el("p", { class: "legend" }, "Each token shaded by this subcomponent's "
        + "CI there (white 0, orange 1); the firing token outlined."));
    }
    box.appendChild(el("div", { id: "examples" }, comp.examples.map((e) => exampleRow(e, view))));
    return box;
  }

  const SHOWN = 300; // subcomponents listed at once

  function renderSite(view, i, sel) {
    const root = document.getElementById("site-body");
    root.replaceChildren();
    root.appendChild(el("h2", {}, view.site));
    if (!view.harvest) {
      for (const m of Object.values(view.missing)) root.appendChild(hint(m));
      return;
    }
    root.appendChild(el("p", {}, `${view.C} subcomponents, ${view.firing} fired in the harvest `
      + `(${view.n} ${view.kind === "tokens" ? "tokens" : "examples"}, `
      + `${fmt(view.harvest.n_batches)} batches of ${fmt(view.harvest.batch_size)}, checkpoint step `
      + `${fmt(view.harvest.step)}; fires: CI > ${view.threshold}).`));
    for (const m of Object.values(view.missing)) root.appendChild(hint(m));
    const h = view.histograms;
    root.appendChild(el("div", { class: "cards", id: "site-hists" },
      card("density (log10), subcomponents that fired", histogram(h.log10_density)),
      card("mean CI over all examples", histogram(h.mean_ci)),
      card("CI at the sampled firings", histogram(h.firing_ci))));

    const comps = view.subcomponents;
    const selected = comps.find((c) => c.c === sel) || comps[0];
    const rows = comps.slice(0, SHOWN).map((c, rank) => el("tr", {
      class: c === selected ? "selected" : "", "data-c": c.c,
      onclick: () => { location.hash = `#sites/${i}/${c.c}`; },
    }, el("td", { class: "num" }, rank + 1), el("td", {}, c.name),
    el("td", { class: "num" }, pct(c.density)), el("td", { class: "num" }, fmt(c.mean_ci)),
    el("td", { class: "num" }, c.cluster === null ? "" : c.cluster)));
    const list = el("div", { class: "sublist" }, el("table", { id: "sub-list" },
      el("tr", {}, el("th", {}, "#"), el("th", {}, "subcomponent"), el("th", {}, "density"),
        el("th", {}, "mean CI"), el("th", {}, "cluster")), rows),
    comps.length > SHOWN ? el("p", {}, `... and ${comps.length - SHOWN} more (never fired or `
      + "rarest)") : null);
    root.appendChild(el("h3", {}, "Subcomponents by use"));
    root.appendChild(el("div", { class: "cols" }, list, renderDetail(view, selected, i)));
  }

  function renderSites(run, i, sel) {
    const root = document.getElementById("view-sites");
    if (!root.dataset.ready) {
      root.replaceChildren(el("div", { class: "sitelinks", id: "site-links" },
        "Sites: ", run.sites.map((s, j) => el("a", { href: `#sites/${j}` }, s.name))),
      el("div", { id: "site-body" }));
      root.dataset.ready = "1";
    }
    const body = document.getElementById("site-body");
    if (i === undefined) {
      if (!run.sites.length) {
        body.replaceChildren(run.missing.ci ? hint(run.missing.ci)
          : el("p", {}, "This run lists no sites."));
      }
      else location.hash = "#sites/0";
      return;
    }
    body.replaceChildren(el("p", {}, "Loading..."));
    load(`sites/${i}`).then((view) => renderSite(view, i, sel)).catch(showError);
  }

  function renderFigures(run) {
    const root = document.getElementById("view-figures");
    root.replaceChildren();
    if (!run.figures.length) {
      root.appendChild(hint(run.missing.figures || "no figures"));
      return;
    }
    const group = (title, figs) => figs.length ? [el("h2", {}, title), el("div", { class: "figs" },
      figs.map((f) => el("figure", {}, el("img", { src: `figures/${f.file}`, alt: f.file }),
        el("figcaption", {}, f.file))))] : [];
    root.append(...group(`The ${run.family_title} family's figures`,
      run.figures.filter((f) => f.family)),
    ...group("Common figures", run.figures.filter((f) => !f.family)));
  }

  let graphMounted = false;
  function renderGraph(run) {
    const note = document.getElementById("graph-note");
    const say = (text) => { note.hidden = false; note.textContent = text; };
    if (!run.is_lm) {
      return say("The attribution-graph explorer is for language-model runs; this run is a "
        + `${run.family_title} (its per-site pages and figures show what it learned).`);
    }
    if (STATIC) {
      return say("This is a static copy: the attribution-graph explorer computes graphs on the "
        + `live server. Run: python -m spdjax.view --workdir=${run.workdir}`);
    }
    if (!window.spdjaxGraph) {
      return say("The graph explorer's scripts (static/graph_draw.js, static/graph_panel.js) "
        + "are not installed with this spdjax.");
    }
    if (!graphMounted) {
      graphMounted = true;
      window.spdjaxGraph.mount(document.getElementById("graph-view"), "api");
    }
  }

  // --- routing ---------------------------------------------------------------------------------
  function route() {
    const parts = (location.hash.replace(/^#/, "") || "run").split("/");
    const view = ["run", "sites", "figures", "graph"].includes(parts[0]) ? parts[0] : "run";
    for (const v of ["run", "sites", "figures", "graph"]) {
      document.getElementById(`view-${v}`).hidden = v !== view;
    }
    for (const a of document.querySelectorAll("#tabs a")) {
      a.classList.toggle("active", a.dataset.view === view);
    }
    if (!RUN) return;
    if (view === "sites") {
      const i = parts[1] === undefined ? undefined : Number(parts[1]);
      const sel = parts[2] === undefined ? undefined : Number(parts[2]);
      renderSites(RUN, i, sel);
    } else if (view === "figures") renderFigures(RUN);
    else if (view === "graph") renderGraph(RUN);
  }

  window.addEventListener("hashchange", route);
  route();
  load("run").then((run) => {
    RUN = run;
    document.getElementById("run-title").textContent =
      `${run.name} · ${run.family_title} · ${run.method_label}`;
    renderRun(run);
    route();
  }).catch(showError);
})();
