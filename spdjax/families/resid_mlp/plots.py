"""ResidMLP figures as in the SPD paper (Figs 6-7, 10-13): neuron contributions of the first
features (target vs chosen subcomponent), the contribution scatter, and the set a finished run
draws (:func:`plot_run`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from spdjax.analysis import ci_patterns
from spdjax.analysis.metrics import one_hot_ci
from spdjax.analysis.plots import PathLike, plot_ci_heatmaps, save_figure
from spdjax.families.resid_mlp.evaluation import contributions
from spdjax.families.resid_mlp.model import ResidMLPConfig, site_roles

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
    return save_figure(fig, path, dpi)


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
    return save_figure(fig, path, dpi)


def plot_run(decomp, params, target_params, cfg: ResidMLPConfig, figures_dir: Path) -> list[Path]:
    """Every ResidMLP figure of a trained decomposition, into ``figures_dir``."""
    contrib = contributions(decomp, params, target_params, cfg)
    paths = [plot_neuron_contributions(c["target"], c["spd"], c["chosen"],
                                       figures_dir / f"neuron_contributions_layer{i}.png")
             for i, c in contrib.items()]
    paths.append(plot_contribution_scatter(
        [c["target"] for c in contrib.values()],
        [c["spd"] for c in contrib.values()],
        figures_dir / "neuron_contribution_pairs.png",
        title=f"{cfg.n_features} input features, {cfg.n_layers} "
              f"layer{'s' if cfg.n_layers > 1 else ''}",
    ))
    if decomp.causal_importance is None:  # no CI to draw (APD)
        return paths
    ci = one_hot_ci(decomp, params, target_params, cfg.n_features)
    dense = [n for n, role in site_roles(cfg).items() if role == "dense"]
    titles = [f"Layer {n.split('/')[0].split('_')[1]} - W_{n.split('_')[-1]}" for n in ci]
    for kind, cmap in (("lower", "Blues"), ("upper", "Reds")):
        permuted = ci_patterns.permuted_ci({n: getattr(c, kind) for n, c in ci.items()},
                                           dense_sites=dense)
        paths.append(plot_ci_heatmaps(
            permuted, figures_dir / f"ci_{kind}_leaky.png", cmap=cmap, site_titles=titles,
            title=f"Causal importance ({kind} leaky) - one-hot inputs of 0.75"))
    return paths
