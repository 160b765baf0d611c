"""Plots that any decomposition has: CI heatmaps, max cosine per feature, training curves.

Every ``plot_*`` function takes arrays (or a metrics file) and an output path, writes one image
and returns the path. Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas,
never through ``pyplot``, so they touch no global matplotlib state (safe in scripts, tests and
notebooks alike). Family-specific figures (TMS vectors, ResidMLP neuron contributions) live with
their family in :mod:`spdjax.families`, built from the helpers here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PathLike = str | os.PathLike


def save_figure(fig: Figure, path: PathLike, dpi: int) -> Path:
    """Saves ``fig`` at ``path`` (creating its directory), trimmed to its content; returns the
    path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def heatmap(ax: Axes, m: np.ndarray, vmax: float, cmap: str = "bwr"):
    """Draws ``m`` on ``ax`` with a colour scale symmetric in ``[-vmax, vmax]`` and no ticks;
    returns the image."""
    im = ax.imshow(m, cmap=cmap, vmin=-vmax, vmax=vmax)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def sym_colorbar(fig: Figure, vmax: float, cmap: str, label: str) -> None:
    """Adds a colour bar for ``[-vmax, vmax]`` in ``cmap``, labelled ``label``, at the right of
    ``fig``."""
    cax = fig.add_axes((0.92, 0.15, 0.015, 0.7))
    sm = ScalarMappable(norm=Normalize(-vmax, vmax), cmap=cmap)
    fig.colorbar(sm, cax=cax).set_label(label)


def plot_ci_heatmaps(
    ci_by_site: Mapping[str, Any],
    path: PathLike,
    *,
    title: str = "Importance values - Input magnitude: 0.75",
    cmap: str = "Reds",
    site_titles: Sequence[str] | None = None,
    dpi: int = 150,
) -> Path:
    """One heatmap per site of CI ``(n_features, C)`` on one-hot inputs (already permuted).

    Rows are input features, columns subcomponents, stacked top to bottom with one colour bar on
    ``[0, 1]`` (paper Figs 12-13: ``"Reds"`` for upper-leaky CI, ``"Blues"`` for lower-leaky).
    """
    names = list(ci_by_site)
    if not names:
        raise ValueError("plot_ci_heatmaps needs at least one site.")
    titles = list(site_titles) if site_titles is not None else names
    cis = [np.asarray(ci_by_site[n], dtype=np.float64) for n in names]
    width = float(np.clip(max(c.shape[1] for c in cis) / 25, 3.5, 9.0))
    heights = [float(np.clip(width * c.shape[0] / c.shape[1], 1.2, width)) for c in cis]
    fig = Figure(figsize=(width + 1.2, sum(heights) + 0.9 * len(cis) + 0.4), layout="constrained")
    axs = fig.subplots(len(cis), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, ci, t in zip(axs, cis, titles):
        im = ax.imshow(ci, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        ax.set_title(t)
        ax.set_xlabel("Subcomponent index")
        ax.set_ylabel("Input feature index")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=list(axs), fraction=0.05, pad=0.02, aspect=30)
    fig.suptitle(title)
    return save_figure(fig, path, dpi)


def plot_max_cosine(max_cos: Any, path: PathLike, *, dpi: int = 150) -> Path:
    """Bar chart of ``max_c cos[c, f]`` per input feature (the terms of MMCS)."""
    max_cos = np.asarray(max_cos, dtype=np.float64)
    fig = Figure(figsize=(max(3.0, 0.15 * max_cos.size + 1.5), 2.8))
    ax = fig.add_subplot()
    ax.bar(np.arange(max_cos.size), max_cos)
    ax.axhline(1.0, color="grey", ls="--")
    ax.set_xlabel("Input feature index")
    ax.set_ylabel("Max cosine similarity")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return save_figure(fig, path, dpi)


def plot_training_curves(metrics_path: PathLike, path: PathLike, *, dpi: int = 120) -> Path:
    """Every logged loss term (log scale), the learning rate and CI-L0 per site vs step.

    Reads a run's ``metrics.jsonl`` (one JSON object per log step, keys ``loss/<term>``,
    ``lr``, ``ci_l0/<site>``).
    """
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines()
            if line.strip()]
    if not rows:
        raise ValueError(f"{metrics_path} holds no metric lines to plot.")
    steps = np.array([r["step"] for r in rows])
    groups = {"loss": [k for k in rows[-1] if k.startswith("loss/")],
              "CI-L0": [k for k in rows[-1] if k.startswith("ci_l0/")],
              "learning rate": [k for k in rows[-1] if k == "lr"]}
    groups = {g: keys for g, keys in groups.items() if keys}
    fig = Figure(figsize=(4.2 * len(groups), 3.4), layout="constrained")
    for ax, (title, keys) in zip(fig.subplots(1, len(groups), squeeze=False)[0], groups.items()):
        for k in sorted(keys):
            y = np.array([r.get(k, math.nan) for r in rows], dtype=float)
            ax.plot(steps, np.abs(y) if title == "loss" else y, label=k.split("/", 1)[-1], lw=1.2)
        if title == "loss":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    return save_figure(fig, path, dpi)
