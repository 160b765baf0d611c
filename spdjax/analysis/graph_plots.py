"""The figure of an attribution graph (:mod:`spdjax.analysis.graphs`): positions on x, one row
per site (inputs at the bottom, outputs at the top), edges as lines whose width is the edge's
share of the largest ``|weight|`` (blue positive, red negative)."""

from __future__ import annotations

import pathlib
from typing import Sequence

from matplotlib.figure import Figure
import numpy as np

from spdjax.analysis.graphs import COMPONENT, INPUT, OUTPUT, Graph

SPREAD = 0.7  # the width of one position's column the nodes of one row share


def node_xy(graph: Graph, site_order: Sequence[str]) -> np.ndarray:
    """``(N, 2)`` node coordinates: ``x`` the position (nodes of one row and position side by
    side), ``y`` 0 for inputs, ``1 + site index`` for components, ``len(sites) + 1`` outputs."""
    rows = {s: i + 1 for i, s in enumerate(site_order)}
    y = np.array([0 if n.kind == INPUT else len(rows) + 1 if n.kind == OUTPUT else rows[n.site]
                  for n in graph.nodes], float)
    x = np.array([n.position for n in graph.nodes], float)
    cells: dict = {}
    for i in range(len(graph.nodes)):
        cells.setdefault((x[i], y[i]), []).append(i)
    for members in cells.values():
        k = len(members)
        offsets = np.linspace(-SPREAD / 2, SPREAD / 2, k) if k > 1 else [0.0]
        for i, dx in zip(members, offsets):
            x[i] += dx
    return np.stack([x, y], axis=1)


def plot_graph(graph: Graph, path, *, site_order: Sequence[str] | None = None,
               tokens: Sequence[str] | None = None, title: str = "") -> pathlib.Path:
    """Draws ``graph`` into ``path`` (PNG); ``site_order``: the rows bottom to top (default:
    the sites in the order they appear); ``tokens``: the input's text per position."""
    if site_order is None:
        site_order = list(dict.fromkeys(n.site for n in graph.nodes if n.kind == COMPONENT))
    xy = node_xy(graph, site_order)
    positions = sorted({n.position for n in graph.nodes})
    T = max(positions) + 1 if positions else 1
    fig = Figure(figsize=(max(6.0, 0.8 * T + 2.5), 1.0 + 0.55 * (len(site_order) + 2)))
    ax = fig.subplots()
    w = np.abs(graph.weights)
    top = w.max() if len(w) else 1.0
    for e in np.argsort(w):  # strongest drawn last, on top
        s, t = graph.sources[e], graph.targets[e]
        ax.plot(xy[[s, t], 0], xy[[s, t], 1], lw=0.3 + 3.5 * w[e] / top, alpha=0.25 + 0.6 * w[e]
                / top, color="tab:blue" if graph.weights[e] > 0 else "tab:red", zorder=1,
                solid_capstyle="round")
    style = {INPUT: ("s", "0.35"), COMPONENT: ("o", "tab:orange"), OUTPUT: ("D", "tab:green")}
    for kind, (marker, color) in style.items():
        sel = [i for i, n in enumerate(graph.nodes) if n.kind == kind]
        ax.scatter(xy[sel, 0], xy[sel, 1], marker=marker, s=70, c=color, edgecolors="k",
                   linewidths=0.5, zorder=2)
    for i, n in enumerate(graph.nodes):
        if n.kind == COMPONENT:
            ax.annotate(str(n.index), xy[i], xytext=(0, 6), textcoords="offset points",
                        fontsize=7, ha="center")
        elif n.kind == OUTPUT:
            ax.annotate(f"{n.label or n.index}\np={n.ci:.2f}", xy[i], xytext=(0, 7),
                        textcoords="offset points", fontsize=7, ha="center")
    ax.set_yticks(range(len(site_order) + 2), ["input", *site_order, "output"], fontsize=8)
    ticks = list(range(T))
    labels = [f"{p}\n{tokens[p]}" if tokens is not None and p < len(tokens) else str(p)
              for p in ticks]
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_xlim(-0.7, T - 0.3)
    ax.set_ylim(-0.6, len(site_order) + 1.9)
    ax.set_xlabel("position (token)")
    ax.grid(axis="y", lw=0.3, alpha=0.5)
    ax.set_title(title or f"{sum(n.kind == COMPONENT for n in graph.nodes)} subcomponents, "
                 f"{len(graph.weights)} edges", fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=130)
    return path
