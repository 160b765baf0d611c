"""SPD on TMS targets: sites, data, and the paper's evaluation (MMCS, ML2R, CI patterns, figures).

Sites: ``linear1`` and ``linear2`` (tied: ``linear2`` = ``linear1``ᵀ, one factor pair, two CI
functions) and, for +ID variants, the frozen identity ``hidden_0``. All sites share ``config.C``.
"""

from __future__ import annotations

import pathlib

import numpy as np

from spdjax import evaluation, figures
from spdjax.data import sparse_features
from spdjax.decomposition import decompose
from spdjax.experiment import Experiment
from spdjax.target_cache import default_cache_dir
from spdjax.tms import TMS_TIES, get_tms_config, load_or_train_target, tms_target

# A subcomponent counts as "present" when its rank-one matrix has at least this Frobenius norm;
# the identity's subcomponents have norm ~1 each, unused ones decay towards 0.
NORM_THRESHOLD = 0.1


def build(config) -> Experiment:
    cfg = get_tms_config(config.variant)
    cache_dir = config.target_cache_dir or default_cache_dir()
    target_params = load_or_train_target(cfg, config.target_seed, cache_dir)
    target = tms_target(cfg)
    hidden = [n for n in target.sites if n.startswith("hidden_")]
    sites = {"linear1": config.C, **{n: config.C for n in hidden}, "linear2": config.C}
    decomp = decompose(target, sites, ties=TMS_TIES, ci_fn=config.ci_fn,
                       ci_hidden=tuple(config.ci_hidden), sigmoid=config.sigmoid,
                       tie_mode=config.tie_mode)

    def make_batch_fn(size):
        return lambda key: sparse_features(key, size, cfg.n_features,
                                           feature_probability=cfg.feature_probability)

    def evaluate(params, figures_dir: pathlib.Path) -> dict:
        return evaluate_tms(decomp, params, target_params, cfg, figures_dir)

    return Experiment(target, target_params, decomp, make_batch_fn(config.batch_size),
                      make_batch_fn(config.eval_batch_size), evaluate)


def solution_warnings(summary: dict, cfg) -> list[str]:
    """Human-readable departures from the paper's solution (empty when the run found it).

    The paper's solution has one subcomponent per feature on ``linear1``/``linear2``, ``n_hidden``
    on an identity layer, and the one-hot CI pattern at tol 0.2. Entries off only at the stricter
    tol 0.1 (``ci_errors.total`` but not ``total_0p2``) get a note of their own, not a failure.
    Some initialisations end in a local minimum where one subcomponent carries two features
    (RESULTS.md, "Seed sensitivity"); the run then completes normally, so it is flagged here
    rather than left to the table.
    """
    notes = []
    for site, n in summary["n_subcomponents_above_norm_0.1"].items():
        hidden = site.startswith("hidden_")
        expected = cfg.n_hidden if hidden else cfg.n_features
        if n != expected:
            unit = "hidden dimension" if hidden else "feature"
            notes.append(f"{site}: {n} subcomponents with norm > {NORM_THRESHOLD}, expected "
                         f"{expected} (one per {unit})")
    errors = summary["ci_errors"]
    if errors.get("total_0p2", errors["total"]):
        notes.append(f"{errors['total']} one-hot CI entries off the paper's pattern at tol 0.1, "
                     f"{errors.get('total_0p2', errors['total'])} at tol 0.2 (ci_errors)")
    if notes:
        notes.append("this seed did not find the paper's solution; a local minimum that some "
                     "initialisations reach (RESULTS.md, 'Seed sensitivity'): "
                     "try another --config.seed")
    elif errors["total"]:
        # Off only at tol 0.1 (e.g. a dense identity column peaking at CI 0.89 < 0.9): the
        # structure is right; reported, not called a failure.
        notes.append(f"{errors['total']} one-hot CI entries within 0.1-0.2 of the paper's "
                     "pattern (borderline, none off at tol 0.2; ci_errors)")
    return notes


def evaluate_tms(decomp, params, target_params, cfg, figures_dir: pathlib.Path) -> dict:
    """MMCS/ML2R on linear1, one-hot CI patterns and their error counts, and the figures."""
    W = np.asarray(target_params["linear1"]["kernel"])
    V, U = (np.asarray(a) for a in decomp.factors(params, "linear1"))
    mm = evaluation.mmcs_ml2r(W, V, U)
    out = {k: mm[k] for k in ("mmcs", "mmcs_std", "ml2r", "ml2r_std")}

    ci = evaluation.one_hot_ci(decomp, params, target_params, cfg.n_features)
    hidden = [n for n in decomp.site_names if n.startswith("hidden_")]
    lower = {n: c.lower for n, c in ci.items()}
    errors = evaluation.ci_solution_errors(
        lower, identity={"linear*": cfg.n_features}, dense={"hidden_*": cfg.n_hidden}
    )
    out["ci_errors"] = {k: int(v) for k, v in errors.items()}
    # The dense identity columns' peak CI: what decides a borderline count at tol 0.1.
    out["ci_dense_peaks"] = {n: evaluation.dense_ci_peaks(lower[n], cfg.n_hidden) for n in hidden}
    norms = {}
    for n in decomp.site_names:
        Vs, Us = (np.asarray(a) for a in decomp.factors(params, n))
        norms[n] = int(np.sum(evaluation.subcomponent_norms(Vs, Us) > NORM_THRESHOLD))
    out["n_subcomponents_above_norm_0.1"] = norms
    out["warnings"] = solution_warnings(out, cfg)

    figures_dir.mkdir(parents=True, exist_ok=True)
    figures.plot_tms_vectors(W, figures_dir / "target.png")
    figures.plot_tms_combined(W, V, U, figures_dir / "combined_diagram.png")
    for n in hidden:
        Vh, Uh = (np.asarray(a) for a in decomp.factors(params, n))
        figures.plot_hidden_layer_components(
            np.asarray(target_params[n]["kernel"]), Vh, Uh, figures_dir / f"{n}_components.png"
        )
    permuted = evaluation.permuted_ci(lower, dense_patterns=("hidden_*",))
    figures.plot_ci_heatmaps(permuted, figures_dir / "ci_lower_leaky.png", cmap="Blues",
                             title="Causal importance (lower leaky) - one-hot inputs of 0.75")
    upper = evaluation.permuted_ci({n: c.upper for n, c in ci.items()},
                                   dense_patterns=("hidden_*",))
    figures.plot_ci_heatmaps(upper, figures_dir / "ci_upper_leaky.png", cmap="Reds",
                             title="Causal importance (upper leaky) - one-hot inputs of 0.75")
    figures.plot_max_cosine(mm["max_cos"], figures_dir / "max_cosine.png")
    return out


__all__ = ["build", "evaluate_tms"]
