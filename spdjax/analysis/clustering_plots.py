"""The figure of a clustering (:mod:`spdjax.analysis.clustering`): description length against
merge iteration per seed (the chosen iteration marked), the distance between seeds against
iteration, the cluster sizes at the chosen iteration, and the first seed's co-activation matrix
(Jaccard index of the live subcomponents' firings) reordered by its clusters."""

from __future__ import annotations

import pathlib

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
import numpy as np

from spdjax.analysis.clustering import Clustering


def jaccard(cooc: np.ndarray) -> np.ndarray:
    """``|i and j| / |i or j|`` from co-firing counts (diagonal: counts); 0 where neither
    fires."""
    c = cooc.astype(np.float64)
    d = np.diag(c)
    union = d[:, None] + d[None, :] - c
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, c / np.where(union > 0, union, 1), 0.0)


def plot_clustering(result: Clustering, path, *, title: str = "") -> pathlib.Path:
    """Writes the 2 x 2 figure to ``path`` (PNG) and returns it."""
    fig = Figure(figsize=(12, 10))
    ax = fig.subplots(2, 2)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, (seed, h) in enumerate(result.histories.items()):
        t = h.resolve(result.iteration)
        col = colors[n % len(colors)]
        ax[0, 0].plot(np.arange(h.n_iters + 1), h.mdl, color=col, lw=1,
                      label=f"seed {seed}: {h.k(t)} clusters at iteration {t}")
        ax[0, 0].plot([t], [h.mdl[t]], "o", color=col)
        sizes = np.bincount(h.labels(t)[h.live])
        top = max(int(sizes.max(initial=1)), 1)
        ax[1, 0].hist(sizes, bins=np.arange(1, top + 2) - 0.5, histtype="step", color=col,
                      lw=1.5, label=f"seed {seed}")
    ax[0, 0].set(xlabel="merge iteration", ylabel="description length (bits / example)",
                 title="MDL against merges (dot: chosen iteration)")
    ax[0, 0].legend(fontsize=8)
    ax[1, 0].set(xlabel="cluster size (subcomponents)", ylabel="clusters", yscale="log",
                 title="cluster sizes at the chosen iteration")
    ax[1, 0].legend(fontsize=8)

    its, curve = result.distance_curve()
    if len(its):
        ax[0, 1].plot(its, curve, "k-")
        D = result.distances()
        mask = ~np.eye(len(D), dtype=bool)
        ax[0, 1].set_title("distance between seeds at one iteration (mean over pairs)\n"
                           f"at the chosen iterations: mean {D[mask].mean():.3f}, max "
                           f"{D[mask].max():.3f}", fontsize=10)
    else:
        ax[0, 1].set_title("one seed: no distance")
    ax[0, 1].set(xlabel="merge iteration", ylabel="permutation-invariant Hamming distance",
                 ylim=(0, 1))

    seed, h = next(iter(result.histories.items()))
    a = ax[1, 1]
    if h.cooc is not None and h.live.any():
        lab = h.labels(result.iteration)
        live = np.flatnonzero(h.live)
        sizes = np.bincount(lab[live])
        # big clusters first, members in index order inside a cluster
        order = live[np.lexsort((live, lab[live], -sizes[lab[live]]))]
        J = jaccard(h.cooc[np.ix_(order, order)])
        im = a.imshow(J, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        fig.colorbar(im, ax=a, fraction=0.046, pad=0.04, label="Jaccard index of firings")
        start = 0
        for g in dict.fromkeys(lab[order]):  # clusters in display order
            n = int(sizes[g])
            if n > 1:
                a.add_patch(Rectangle((start - 0.5, start - 0.5), n, n, fill=False,
                                      ec="r", lw=0.8))
            start += n
        a.set(title=f"seed {seed}: co-activation of the {len(live)} live subcomponents,\n"
                    "ordered by cluster, largest first (red boxes: clusters of 2 or more)",
              xlabel="subcomponent (reordered)", ylabel="subcomponent (reordered)")
    else:
        a.set_title("co-activation not kept (C too large)")
        a.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
