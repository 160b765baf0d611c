"""TMS figures as in the SPD paper (Figs 2-5): target feature vectors, the combined diagram of
the target and its largest subcomponents, the +ID hidden layer's subcomponents, and the set a
finished run draws (:func:`plot_run`).

Layout: ``W (n_features, n_hidden)`` is ``linear1``'s weight in Flax layout (row ``f`` is the
hidden-space vector of feature ``f``); ``V (n_features, C)``, ``U (C, n_hidden)`` are its factors;
``P[c, f, :] = V[f, c] U[c, :]`` is row ``f`` of subcomponent ``c``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from spdjax.analysis import ci_patterns
from spdjax.analysis.metrics import mmcs_ml2r, mmcs_ml2r_components, one_hot_ci, subnet_tensor
from spdjax.analysis.plots import (PathLike, heatmap, plot_ci_heatmaps, plot_max_cosine,
                                   save_figure, sym_colorbar)
from spdjax.families.tms.model import TMSConfig, site_roles

# Reference plotting defaults (tms/plotting.py PlotConfig).
SUBNET_NORM_THRESHOLD = 0.017  # min Σ_f |P[c, f]| for a TMS subcomponent to get its own panel
HIDDEN_NORM_THRESHOLD = 0.009  # min Frobenius norm for a hidden-layer subcomponent panel
PANEL_BG = "#f6f6f6"


def feature_colors(n: int) -> np.ndarray:
    """``[n, 4]`` RGBA colours, one per feature (viridis), shared by every TMS figure."""
    from matplotlib import colormaps

    return colormaps["viridis"](np.linspace(0, 1, n))


def draw_vectors(ax: Axes, vecs: np.ndarray, colors: np.ndarray, lim: float) -> None:
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


def significant_subnets(
    V: Any, U: Any, *, threshold: float = SUBNET_NORM_THRESHOLD, max_components: int | None = None
) -> np.ndarray:
    """Indices of the subcomponents to draw: ``Σ_f |P[c, f]| > threshold``, largest first."""
    return significant_components(subnet_tensor(V, U), threshold, max_components)


def significant_components(P: np.ndarray, threshold: float,
                           max_components: int | None) -> np.ndarray:
    """Indices of the subcomponents of ``P [C, n_features, n_hidden]`` whose summed row norms
    exceed ``threshold``, largest first, at most ``max_components`` (None: all)."""
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
        draw_vectors(ax, W, feature_colors(W.shape[0]), lim)
    else:
        fig = Figure(figsize=(4.4, 3.6))
        ax = fig.add_subplot()
        gram = W @ W.T
        im = heatmap(ax, gram, float(np.abs(gram).max()) or 1.0)
        fig.colorbar(im, ax=ax)
        ax.set_xlabel("Feature")
        ax.set_ylabel("Feature")
        title = f"{title}: $W W^T$"
    ax.set_title(title, pad=10)
    return save_figure(fig, path, dpi)


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
    return plot_tms_components(W, subnet_tensor(V, U), path, threshold=threshold,
                               max_components=max_components, network=network, dpi=dpi)


def plot_tms_components(W: Any, P: Any, path: PathLike, *,
                        threshold: float = SUBNET_NORM_THRESHOLD, max_components: int | None = 12,
                        network: bool = True, dpi: int = 150, label: str = "Subcomponent") -> Path:
    """:func:`plot_tms_combined` of any components ``P (C, n_features, n_hidden)`` (APD's:
    ``label="Component"``)."""
    W, P = np.asarray(W, dtype=np.float64), np.asarray(P, dtype=np.float64)
    keep = significant_components(P, threshold, max_components)
    mats = [W, P.sum(axis=0)] + [P[c] for c in keep]
    titles = ["Target model", "Sum of components"] + [f"{label} {c}" for c in keep]
    n = len(mats)
    if W.shape[1] == 2:
        rows = 2 if network else 1
        fig = Figure(figsize=(2.6 * n, 2.6 * rows + (0.6 if network else 0.0)))
        axs = fig.subplots(rows, n, squeeze=False, gridspec_kw={"hspace": 0.05})
        colors = feature_colors(W.shape[0])
        lim = 1.15 * max(float(np.abs(W).max()), 1e-6)
        w_max = max(float(np.abs(np.stack(mats)).max()), 1e-12)
        for i, (m, t) in enumerate(zip(mats, titles)):
            draw_vectors(axs[0, i], m, colors, lim)
            axs[0, i].set_title(t, pad=10)
            if network:
                _draw_network(axs[1, i], m, w_max, labels=i == 0)
    else:
        fig = Figure(figsize=(1.9 * n + 0.6, 0.12 * W.shape[0] + 1.2))
        axs = fig.subplots(1, n, squeeze=False)
        vmax = max(float(np.abs(np.stack(mats)).max()), 1e-12)
        for i, (m, t) in enumerate(zip(mats, titles)):
            heatmap(axs[0, i], m, vmax)
            axs[0, i].set_title(t, fontsize="small")
        axs[0, 0].set_ylabel("Input feature")
        axs[0, 0].set_xlabel("Hidden dim")
        sym_colorbar(fig, vmax, "bwr", "Weight")
    return save_figure(fig, path, dpi)


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
        heatmap(ax, m, vmax)
        ax.set_title(t, pad=10)
    sym_colorbar(fig, vmax, "bwr", "Weight magnitude")
    return save_figure(fig, path, dpi)



def plot_run(decomp, params, target_params, cfg: TMSConfig, figures_dir: Path) -> list[Path]:
    """Every TMS figure of a trained decomposition, into ``figures_dir``."""
    W = np.asarray(target_params["linear1"]["kernel"])
    if decomp.causal_importance is None:  # no CI function (APD): its components
        P = np.asarray(decomp.component_weights(params, "linear1"))
        return [plot_tms_vectors(W, figures_dir / "target.png"),
                plot_tms_components(W, P, figures_dir / "combined_diagram.png",
                                    label="Component"),
                plot_max_cosine(mmcs_ml2r_components(W, P)["max_cos"],
                                figures_dir / "max_cosine.png")]
    V, U = (np.asarray(a) for a in decomp.factors(params, "linear1"))
    identity = [n for n, role in site_roles(cfg).items() if role == "identity"]
    paths = [plot_tms_vectors(W, figures_dir / "target.png"),
             plot_tms_combined(W, V, U, figures_dir / "combined_diagram.png")]
    for n in identity:
        Vh, Uh = (np.asarray(a) for a in decomp.factors(params, n))
        paths.append(plot_hidden_layer_components(np.asarray(target_params[n]["kernel"]), Vh, Uh,
                                                  figures_dir / f"{n}_components.png"))
    ci = one_hot_ci(decomp, params, target_params, cfg.n_features)
    for kind, cmap in (("lower", "Blues"), ("upper", "Reds")):
        permuted = ci_patterns.permuted_ci({n: getattr(c, kind) for n, c in ci.items()},
                                           dense_sites=identity)
        paths.append(plot_ci_heatmaps(
            permuted, figures_dir / f"ci_{kind}_leaky.png", cmap=cmap,
            title=f"Causal importance ({kind} leaky) - one-hot inputs of 0.75"))
    paths.append(plot_max_cosine(mmcs_ml2r(W, V, U)["max_cos"], figures_dir / "max_cosine.png"))
    return paths
