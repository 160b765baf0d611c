"""APD and SPD side by side on one TMS target: one figure, one row per method.

    python -m benchmarks.reproduce.apd_vs_spd --spd=workdir/table1/5-2_seed0 \\
        --apd=workdir/table1/5-2+apd_seed0 --out=benchmarks/results/apd_vs_spd_5-2.png

Each row draws the target's feature vectors, the sum of the method's components and each
component (``linear1`` slice, largest first), with the method's MMCS and ML2R in the row title;
both runs must decompose the same target (checked). Wider models (e.g. 40-10) get each
feature's best component as a heatmap beside the target and every feature's cosine and L2
ratio (:func:`plot_features`). The runs are made by
``benchmarks.reproduce.tms_table1`` (``--variants=5-2,5-2+apd``).
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
from matplotlib.figure import Figure

import spdjax
from spdjax.analysis.metrics import mmcs_ml2r_components
from spdjax.analysis.plots import save_figure
from spdjax.families.tms.plots import draw_vectors, feature_colors, significant_components


def components(run) -> np.ndarray:
    return np.asarray(run.decomposition.component_weights(run.params, "linear1"), np.float64)


def plot(runs: dict[str, object], path: pathlib.Path, *, max_components: int = 6) -> pathlib.Path:
    """One row per ``{label: loaded run}``: target, sum, components (n_hidden = 2); wider
    models: :func:`plot_features`."""
    targets = [np.asarray(r.target_params["linear1"]["kernel"]) for r in runs.values()]
    if any(not np.array_equal(t, targets[0]) for t in targets):
        raise ValueError("The runs decompose different targets; compare runs of one target.")
    W = targets[0].astype(np.float64)
    if W.shape[1] != 2:
        return plot_features(runs, W, path)
    cols = 2 + max_components
    fig = Figure(figsize=(2.2 * cols, 2.5 * len(runs)))
    axs = fig.subplots(len(runs), cols, squeeze=False)
    colors, lim = feature_colors(W.shape[0]), 1.15 * float(np.abs(W).max())
    for row, (label, run) in zip(axs, runs.items()):
        P = components(run)
        mm = mmcs_ml2r_components(W, P)
        keep = significant_components(P, 0.1, max_components)
        panels = [(W, f"{label}: target"),
                  (P.sum(0), f"sum (MMCS {mm['mmcs']:.4f}, ML2R {mm['ml2r']:.3f})")]
        panels += [(P[c], f"component {c}") for c in keep]
        for ax, (m, title) in zip(row, panels):
            draw_vectors(ax, m, colors, lim)
            ax.set_title(title, fontsize=9)
        for ax in row[len(panels):]:
            ax.axis("off")
    fig.suptitle("TMS: components of each method (linear1), largest first")
    return save_figure(fig, path, 150)


def plot_features(runs: dict[str, object], W: np.ndarray, path: pathlib.Path) -> pathlib.Path:
    """For n_hidden > 2 (e.g. 40-10): per method, each feature's best-matching component (its
    ``linear1`` row for that feature) as a ``[hidden, features]`` heatmap beside the target's
    ``W^T``, and below, every feature's cosine and L2 ratio (ML2R < 1: shrinkage)."""
    n = len(runs)
    fig = Figure(figsize=(4.2 * (n + 1), 6.4))
    grid = fig.add_gridspec(2, n + 1, height_ratios=(1.0, 0.8))
    lim = float(np.abs(W).max())
    heat = dict(cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(W.T, **heat)
    ax.set(title="target W (features ->)", ylabel="hidden")
    feats = np.arange(W.shape[0])
    half = (n + 1) // 2 + 1
    ax_cos, ax_l2 = fig.add_subplot(grid[1, :half]), fig.add_subplot(grid[1, half:])
    for i, (label, run) in enumerate(runs.items()):
        P = components(run)
        mm = mmcs_ml2r_components(W, P)
        chosen = P[mm["argmax"], feats]  # [features, hidden]
        ax = fig.add_subplot(grid[0, i + 1])
        ax.imshow(chosen.T, **heat)
        ax.set_title(f"{label}: best component per feature\nMMCS {mm['mmcs']:.4f}, ML2R "
                     f"{mm['ml2r']:.3f} ± {mm['ml2r_std']:.3f}", fontsize=9)
        for axis, key in ((ax_cos, "max_cos"), (ax_l2, "l2_ratio")):
            axis.plot(feats, mm[key], "o", ms=4, label=label, alpha=0.8)
    ax_cos.set(xlabel="feature", ylabel="cosine with the target's vector")
    ax_l2.set(xlabel="feature", ylabel="L2 ratio (component / target)")
    for axis in (ax_cos, ax_l2):
        axis.axhline(1.0, color="0.5", lw=0.8)
        axis.legend(fontsize=8)
    fig.suptitle(f"TMS {W.shape[0]}-{W.shape[1]}: each feature's best component, per method")
    return save_figure(fig, path, 150)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spd", required=True, help="workdir of an SPD run")
    parser.add_argument("--apd", required=True, help="workdir of an APD run of the same target")
    parser.add_argument("--out", default="benchmarks/results/apd_vs_spd.png")
    args = parser.parse_args(argv)
    runs = {"SPD": spdjax.load(args.spd), "APD": spdjax.load(args.apd)}
    print(plot(runs, pathlib.Path(args.out)))


if __name__ == "__main__":
    main()
