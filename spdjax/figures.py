"""Paper-style figures (SPD paper Figs 2-7, 10-13): TMS vectors, subcomponents, CI heatmaps,
ResidMLP neuron contributions.

Every function takes arrays and an output path, writes one image and returns the path. Figures
are built on :class:`matplotlib.figure.Figure` with the Agg canvas, never through ``pyplot``, so
they touch no global matplotlib state (safe in scripts, tests and notebooks alike).

Layout conventions: ``W (n_features, n_hidden)`` is a TMS ``linear1`` weight in Flax layout
(row ``f`` is the hidden-space vector of feature ``f``); ``V (n_features, C)``, ``U (C, n_hidden)``
are its factors; ``P[c, f, :] = V[f, c] U[c, :]`` is row ``f`` of subcomponent ``c``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from spdjax.evaluation import subnet_tensor

PathLike = str | os.PathLike

# Reference plotting defaults (tms/plotting.py PlotConfig).
SUBNET_NORM_THRESHOLD = 0.017  # min Σ_f |P[c, f]| for a TMS subcomponent to get its own panel
HIDDEN_NORM_THRESHOLD = 0.009  # min Frobenius norm for a hidden-layer subcomponent panel
PANEL_BG = "#f6f6f6"


def _save(fig: Figure, path: PathLike, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _feature_colors(n: int) -> np.ndarray:
    from matplotlib import colormaps

    return colormaps["viridis"](np.linspace(0, 1, n))


def _draw_vectors(ax: Axes, vecs: np.ndarray, colors: np.ndarray, lim: float) -> None:
    """Rows of ``vecs (n, 2)`` as lines from the origin ending in dots (the TMS polygon)."""
    ax.add_collection(LineCollection([[(0, 0), tuple(v)] for v in vecs], colors=colors, lw=1.5))
    ax.scatter(vecs[:, 0], vecs[:, 1], c=colors, s=28, zorder=3)
    ax.set_aspect("equal")
    ax.set_facecolor(PANEL_BG)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.tick_params(labelleft=False, labelbottom=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("bottom", "left"):
        ax.spines[side].set_position("zero")


def _draw_network(ax: Axes, w: np.ndarray, w_max: float, labels: bool) -> None:
    """Input -> hidden -> output diagram of ``|w| (n_features, n_hidden)`` and its tied ``wᵀ``."""
    from matplotlib import colormaps

    cmap = colormaps["gray_r"]
    n_f, n_h = w.shape
    xf, xh = np.linspace(0.05, 0.95, n_f), np.linspace(0.25, 0.75, n_h)
    ax.add_patch(Rectangle((0.1, -1.2), 0.8, 0.4, facecolor="#e4e4e4", alpha=0.33, lw=0))
    for f in range(n_f):
        for h in range(n_h):
            s = float(abs(w[f, h]) / w_max)
            for ys, xs in (((0, -1), (xf[f], xh[h])), ((-1, -2), (xh[h], xf[f]))):
                ax.plot(xs, ys, color=cmap(s), lw=0.5 + 1.5 * s, alpha=0.3 + 0.7 * s)
    for y, xs in ((0, xf), (-1, xh), (-2, xf)):
        ax.scatter(xs, [y] * len(xs), s=160, color="grey", edgecolors="k", zorder=3)
    if labels:
        ax.text(0.0, 0.3, "Inputs", ha="left", va="bottom")
        ax.text(0.0, -2.3, "Outputs (before bias & ReLU)", ha="left", va="top")
    ax.set_xlim(-0.1, 1.1)
    ax.set_ylim(-2.5, 0.5)
    ax.set_axis_off()


def _heatmap(ax: Axes, m: np.ndarray, vmax: float, cmap: str = "bwr"):
    im = ax.imshow(m, cmap=cmap, vmin=-vmax, vmax=vmax)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _sym_colorbar(fig: Figure, vmax: float, cmap: str, label: str) -> None:
    cax = fig.add_axes((0.92, 0.15, 0.015, 0.7))
    sm = ScalarMappable(norm=Normalize(-vmax, vmax), cmap=cmap)
    fig.colorbar(sm, cax=cax).set_label(label)


def significant_subnets(
    V: Any, U: Any, *, threshold: float = SUBNET_NORM_THRESHOLD, max_components: int | None = None
) -> np.ndarray:
    """Indices of the subcomponents to draw: ``Σ_f |P[c, f]| > threshold``, largest first."""
    P = subnet_tensor(V, U)
    mass = np.linalg.norm(P, axis=-1).sum(axis=-1)
    order = np.argsort(-mass, kind="stable")
    order = order[mass[order] > threshold]
    return order if max_components is None else order[:max_components]


def plot_tms_vectors(
    W: Any, path: PathLike, *, title: str = "Target model", dpi: int = 150
) -> Path:
    """The rows of a TMS ``W (n_features, n_hidden)`` as vectors from the origin (n_hidden = 2),
    else a heatmap of the feature overlaps ``W Wᵀ (n_features, n_features)``."""
    W = np.asarray(W, dtype=np.float64)
    if W.shape[1] == 2:
        fig = Figure(figsize=(3.2, 3.2))
        ax = fig.add_subplot()
        lim = 1.15 * max(float(np.abs(W).max()), 1e-6)
        _draw_vectors(ax, W, _feature_colors(W.shape[0]), lim)
    else:
        fig = Figure(figsize=(4.4, 3.6))
        ax = fig.add_subplot()
        gram = W @ W.T
        im = _heatmap(ax, gram, float(np.abs(gram).max()) or 1.0)
        fig.colorbar(im, ax=ax)
        ax.set_xlabel("Feature")
        ax.set_ylabel("Feature")
        title = f"{title}: $W W^T$"
    ax.set_title(title, pad=10)
    return _save(fig, path, dpi)


def plot_tms_combined(
    W: Any,
    V: Any,
    U: Any,
    path: PathLike,
    *,
    threshold: float = SUBNET_NORM_THRESHOLD,
    max_components: int | None = 12,
    network: bool = True,
    dpi: int = 150,
) -> Path:
    """Target, sum of components ``V @ U`` and each large subcomponent, one panel each.

    Subcomponents are ordered by ``Σ_f |P[c, f]|`` and kept above ``threshold`` (paper Fig 2).
    For n_hidden = 2 the panels draw the ``n_features`` vectors, with (``network=True``) a
    network diagram of ``|P[c]|`` below each; otherwise the matrices are heatmaps.
    """
    W = np.asarray(W, dtype=np.float64)
    P = subnet_tensor(V, U)
    keep = significant_subnets(V, U, threshold=threshold, max_components=max_components)
    mats = [W, P.sum(axis=0)] + [P[c] for c in keep]
    titles = ["Target model", "Sum of components"] + [f"Subcomponent {c}" for c in keep]
    n = len(mats)
    if W.shape[1] == 2:
        rows = 2 if network else 1
        fig = Figure(figsize=(2.6 * n, 2.6 * rows + (0.6 if network else 0.0)))
        axs = fig.subplots(rows, n, squeeze=False, gridspec_kw={"hspace": 0.05})
        colors = _feature_colors(W.shape[0])
        lim = 1.15 * max(float(np.abs(W).max()), 1e-6)
        w_max = max(float(np.abs(np.stack(mats)).max()), 1e-12)
        for i, (m, t) in enumerate(zip(mats, titles)):
            _draw_vectors(axs[0, i], m, colors, lim)
            axs[0, i].set_title(t, pad=10)
            if network:
                _draw_network(axs[1, i], m, w_max, labels=i == 0)
    else:
        fig = Figure(figsize=(1.9 * n + 0.6, 0.12 * W.shape[0] + 1.2))
        axs = fig.subplots(1, n, squeeze=False)
        vmax = max(float(np.abs(np.stack(mats)).max()), 1e-12)
        for i, (m, t) in enumerate(zip(mats, titles)):
            _heatmap(axs[0, i], m, vmax)
            axs[0, i].set_title(t, fontsize="small")
        axs[0, 0].set_ylabel("Input feature")
        axs[0, 0].set_xlabel("Hidden dim")
        _sym_colorbar(fig, vmax, "bwr", "Weight")
    return _save(fig, path, dpi)


def plot_hidden_layer_components(
    W_hidden: Any,
    V: Any,
    U: Any,
    path: PathLike,
    *,
    threshold: float = HIDDEN_NORM_THRESHOLD,
    max_components: int = 8,
    dpi: int = 150,
) -> Path:
    """Heatmaps of a hidden layer ``W_hidden (d, d)``, of ``V @ U`` and of each rank-one
    subcomponent ``V[:, c] ⊗ U[c, :]`` with Frobenius norm above ``threshold``, largest first
    (paper Fig 4, TMS 5-2 + identity). Shared symmetric colour scale."""
    W = np.asarray(W_hidden, dtype=np.float64)
    V, U = np.asarray(V, dtype=np.float64), np.asarray(U, dtype=np.float64)
    norms = np.linalg.norm(V, axis=0) * np.linalg.norm(U, axis=1)
    order = np.argsort(-norms, kind="stable")
    keep = order[norms[order] > threshold][:max_components]
    mats = [W, V @ U] + [np.outer(V[:, c], U[c]) for c in keep]
    titles = ["Target model", "Sum of components"] + [f"Subcomponent {c}" for c in keep]
    n = len(mats)
    fig = Figure(figsize=(2.6 * n, 2.6))
    axs = fig.subplots(1, n, squeeze=False)[0]
    vmax = max(float(np.abs(np.stack(mats)).max()), 1e-12)
    for ax, m, t in zip(axs, mats, titles):
        _heatmap(ax, m, vmax)
        ax.set_title(t, pad=10)
    _sym_colorbar(fig, vmax, "bwr", "Weight magnitude")
    return _save(fig, path, dpi)


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
    return _save(fig, path, dpi)


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
    return _save(fig, path, dpi)


def _neuron_strip(ax: Axes, contrib: np.ndarray, labels: Sequence[str], n_label: int) -> None:
    """One column of dots per row of ``contrib (k, d_mlp)``; the largest neurons are numbered."""
    from matplotlib import colormaps

    colors = colormaps["tab10"](np.arange(contrib.shape[1]) % 10)
    for i, row in enumerate(contrib):
        ax.scatter(np.full(row.size, i), row, s=8, color="blue", alpha=0.4)
        for rank, n in enumerate(np.argsort(-row)[:n_label]):
            ax.annotate(str(n), (i, row[n]), xytext=(-12 if rank % 2 == 0 else 4, 0),
                        textcoords="offset points", fontsize=8, color=colors[n], va="center")
        if i:
            ax.axvline(i - 0.5, color="grey", ls=":", lw=0.6)
    ax.axhline(0.0, color="grey", ls="--", lw=0.8)
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set_ylabel("Neuron contribution")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def plot_neuron_contributions(
    target: Any, spd: Any, chosen: Any, path: PathLike, *, n_features: int = 10,
    n_label: int = 2, dpi: int = 150,
) -> Path:
    """Paper Fig 6: neuron contributions of the target (top) and of each feature's chosen ``W_in``
    subcomponent (bottom) for the first ``n_features`` features; ``(n_features_total, d_mlp)``
    arrays, ``chosen`` the subcomponent index per feature."""
    target, spd = np.asarray(target, np.float64), np.asarray(spd, np.float64)
    k = min(n_features, target.shape[0])
    fig = Figure(figsize=(11, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharey=True)
    _neuron_strip(top, target[:k], [str(i) for i in range(k)], n_label)
    top.set_title("Target model")
    top.set_xlabel(f"Input feature index (first {k} shown)")
    _neuron_strip(bottom, spd[:k], [str(int(c)) for c in np.asarray(chosen)[:k]], n_label)
    bottom.set_title("Individual SPD subcomponents")
    bottom.set_xlabel("Subcomponent index")
    return _save(fig, path, dpi)


def plot_contribution_scatter(
    target: Any, spd: Any, path: PathLike, *, title: str, dpi: int = 150
) -> Path:
    """Paper Figs 7, 10, 11: every (feature, neuron) contribution, target vs chosen subcomponent,
    with the Pearson correlation (pooled) and the diagonal.

    ``target`` / ``spd`` are one array each, or one array per layer (lists of equal length): the
    layers are then coloured apart with a legend ("First MLP", ...), as in the paper's 2- and
    3-layer figures.
    """
    per_layer = isinstance(target, (list, tuple))
    targets = list(target) if per_layer else [target]
    spds = list(spd) if per_layer else [spd]
    if len(targets) != len(spds):
        raise ValueError(f"{len(targets)} target layers but {len(spds)} subcomponent layers")
    xs = [np.asarray(t, np.float64).ravel() for t in targets]
    ys = [np.asarray(s, np.float64).ravel() for s in spds]
    x, y = np.concatenate(xs), np.concatenate(ys)
    r = float(np.corrcoef(x, y)[0, 1])
    fig = Figure(figsize=(6, 6), layout="constrained")
    ax = fig.add_subplot()
    lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
    pad = 0.05 * (hi - lo)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", ls="--", alpha=0.6,
            label="y=x")
    colors = ("blue", "red", "green", "purple", "orange")
    ordinals = ("First", "Second", "Third", "Fourth", "Fifth")
    for i, (xi, yi) in enumerate(zip(xs, ys)):
        label = f"{ordinals[i]} MLP" if i < len(ordinals) else f"MLP {i + 1}"
        ax.scatter(xi, yi, s=8, color=colors[i % len(colors)], alpha=0.3, linewidths=0,
                   label=label)
    if len(xs) > 1:
        ax.legend(loc="lower right")
    ax.text(0.05, 0.95, f"Correlation: {r:.3f}", transform=ax.transAxes, va="top",
            bbox={"boxstyle": "round", "facecolor": "wheat", "alpha": 0.5})
    ax.set_xlabel("Target Model Neuron Contribution")
    ax.set_ylabel("Subcomponent Neuron Contribution (Max Subcomponent)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _save(fig, path, dpi)
