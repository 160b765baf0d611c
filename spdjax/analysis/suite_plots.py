"""Figures of the evaluation suite (:mod:`spdjax.analysis.suite`), drawn from its summary
dict (``summary.json``'s ``suite``), so ``python -m spdjax.cli.plot`` can redraw them:

* ``suite_ci_histograms.png``: the CI values of each site (fraction per bin, log scale);
* ``suite_mean_ci.png``: mean CI per subcomponent of each site, sorted, with VPD's alive line;
* ``suite_masking_losses.png``: the output loss under each masking (log scale);
* ``suite_pgd_ladder.png``: the output loss under PGD vs the number of steps.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Mapping

import numpy as np
from matplotlib.figure import Figure

from spdjax.analysis.plots import save_figure


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def plot_ci_histograms(suite: Mapping[str, Any], path, *, dpi: int = 120) -> pathlib.Path:
    """One panel per site: the fraction of CI values in each bin of [0, 1] (log y)."""
    hist = suite["ci_histogram"]
    edges = np.asarray(hist["edges"])
    sites = [k for k in hist if k != "edges"]
    rows, cols = _grid(len(sites))
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, site in zip(axes, sites):
        frac = np.asarray(hist[site], float)
        ax.bar(edges[:-1], np.where(frac > 0, frac, np.nan), width=np.diff(edges), align="edge")
        ax.set_yscale("log")
        ax.set_title(site, fontsize=8)
        ax.set_xlabel("CI")
    for ax in axes[len(sites):]:
        ax.set_axis_off()
    return save_figure(fig, path, dpi)


def plot_mean_ci(suite: Mapping[str, Any], path, *, dpi: int = 120) -> pathlib.Path:
    """Mean CI per subcomponent of each site, sorted descending (log y), with the alive
    threshold (mean CI > 1e-6) as a dashed line."""
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.subplots()
    floor = suite["alive_mean_ci_threshold"]
    for site, mean in suite["mean_ci"].items():
        m = np.sort(np.asarray(mean, float))[::-1]
        ax.plot(np.arange(m.size), np.maximum(m, floor / 10), lw=1.2,
                label=f"{site} ({suite['alive_mean_ci'][site]} alive)")
    ax.axhline(floor, ls="--", c="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("subcomponent (sorted)")
    ax.set_ylabel("mean CI")
    ax.legend(fontsize=6)
    return save_figure(fig, path, dpi)


def plot_masking_losses(suite: Mapping[str, Any], path, *, dpi: int = 120) -> pathlib.Path:
    """The output loss under each masking (bars, log y)."""
    loss = suite["loss"]
    fig = Figure(figsize=(1.0 + 0.6 * len(loss), 3.4), layout="constrained")
    ax = fig.subplots()
    values = np.asarray(list(loss.values()), float)
    ax.bar(range(len(loss)), np.where(values > 0, values, np.nan))
    ax.set_xticks(range(len(loss)), list(loss), rotation=45, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel(suite["divergence"])
    return save_figure(fig, path, dpi)


def plot_pgd_ladder(suite: Mapping[str, Any], path, *, dpi: int = 120) -> pathlib.Path:
    """The output loss under PGD masks vs the number of PGD steps (log-log), with the
    stochastic and zero-ablation losses for scale."""
    rungs = sorted(suite["pgd"].items(), key=lambda kv: int(kv[0]))  # JSON sorts "160" < "20"
    steps = np.asarray([int(n) for n, _ in rungs])
    values = np.asarray([v for _, v in rungs], float)
    fig = Figure(figsize=(4.5, 3.4), layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, values, "o-", label="PGD")
    for name, style in (("stochastic", ":"), ("zero", "--")):
        if name in suite["loss"]:
            ax.axhline(suite["loss"][name], ls=style, c="gray", lw=0.8, label=name)
    ax.set_xscale("log")
    ax.set_xticks(steps, [str(n) for n in steps], minor=False)  # the rungs, not 2x10^1 ...
    ax.set_xticks([], minor=True)
    ax.set_yscale("log")
    ax.set_xlabel("PGD steps")
    ax.set_ylabel(suite["divergence"])
    ax.legend(fontsize=7)
    return save_figure(fig, path, dpi)


def plot_suite(suite: Mapping[str, Any] | None, figures_dir) -> list[pathlib.Path]:
    """Every figure of the suite into ``figures_dir`` (none when ``suite`` is None)."""
    if not suite:
        return []
    d = pathlib.Path(figures_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = [plot_masking_losses(suite, d / "suite_masking_losses.png")]
    if "ci_histogram" in suite:  # APD's suite has no CI
        paths += [plot_ci_histograms(suite, d / "suite_ci_histograms.png"),
                  plot_mean_ci(suite, d / "suite_mean_ci.png")]
    if suite.get("pgd"):
        paths.append(plot_pgd_ladder(suite, d / "suite_pgd_ladder.png"))
    return paths
