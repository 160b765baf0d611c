"""The paper's evaluation of SPD on TMS: MMCS/ML2R, one-hot CI patterns, subcomponent counts.

Site roles come from :func:`spdjax.families.tms.model.site_roles`: ``linear1``/``linear2``
should have one subcomponent per feature (identity CI pattern), a +ID layer ``n_hidden`` dense
ones. Figures: :mod:`spdjax.families.tms.plots`.
"""

from __future__ import annotations

import numpy as np

from spdjax.analysis import ci_patterns, metrics
from spdjax.families.tms.model import TMSConfig, site_roles

# The paper's recipe trains 40k steps; a shorter run is not expected to have found its solution.
PAPER_STEPS = 40_000
# A subcomponent counts as "present" when its rank-one matrix has at least this Frobenius norm;
# the identity's subcomponents have norm ~1 each, unused ones decay towards 0.
NORM_THRESHOLD = 0.1


def solution_warnings(summary: dict, cfg: TMSConfig, steps: int | None = None) -> list[str]:
    """Human-readable departures from the paper's solution (empty when the run found it).

    The paper's solution has one subcomponent per feature on ``linear1``/``linear2``, ``n_hidden``
    on an identity layer, and the one-hot CI pattern at tol 0.2. Entries off only at the stricter
    tol 0.1 (``ci_errors.total`` but not ``loose_total``) get a note of their own, not a failure.
    Some initialisations end in a local minimum where one subcomponent carries two features
    (RESULTS.md, "Seed sensitivity"); the run then completes normally, so it is flagged here
    rather than left to the table.
    """
    notes = []
    roles = site_roles(cfg)
    for site, n in summary["subcomponents_above_norm"].items():
        identity = roles[site] == "identity"
        expected = cfg.n_hidden if identity else cfg.n_features
        if n != expected:
            unit = "hidden dimension" if identity else "feature"
            notes.append(f"{site}: {n} subcomponents with norm > {NORM_THRESHOLD}, expected "
                         f"{expected} (one per {unit})")
    errors = summary["ci_errors"]
    if errors["loose_total"]:
        notes.append(f"{errors['total']} one-hot CI entries off the paper's pattern at tol 0.1, "
                     f"{errors['loose_total']} at tol 0.2 (ci_errors)")
    if notes and steps is not None and steps < PAPER_STEPS:
        notes.append(f"the run trained {steps} steps, fewer than the paper's {PAPER_STEPS}: "
                     "not expected to have found the paper's solution yet")
    elif notes:
        notes.append("this seed did not find the paper's solution; a local minimum that some "
                     "initialisations reach (RESULTS.md, 'Seed sensitivity'): "
                     "try another --config.seed")
    elif errors["total"]:
        # Off only at tol 0.1 (e.g. a dense identity column peaking at CI 0.89 < 0.9): the
        # structure is right; reported, not called a failure.
        notes.append(f"{errors['total']} one-hot CI entries within 0.1-0.2 of the paper's "
                     "pattern (borderline, none off at tol 0.2; ci_errors)")
    return notes


def evaluate(decomp, params, target_params, cfg: TMSConfig, *, steps: int | None = None) -> dict:
    """MMCS/ML2R on linear1, one-hot CI pattern errors and peaks, subcomponents per site, and
    the warnings (``steps``: how long the params trained, for the warnings' advice)."""
    W = np.asarray(target_params["linear1"]["kernel"])
    mm = metrics.mmcs_ml2r_components(W, decomp.component_weights(params, "linear1"))
    out = {k: mm[k] for k in ("mmcs", "mmcs_std", "ml2r", "ml2r_std")}
    if decomp.causal_importance is None:  # no CI function (APD): components by norm
        norms = np.linalg.norm(np.asarray(decomp.component_weights(params, "linear1")),
                               axis=(1, 2))
        out["norm_threshold"] = NORM_THRESHOLD
        out["components_above_norm"] = int(np.sum(norms > NORM_THRESHOLD))
        out["warnings"] = []
        return out

    roles = site_roles(cfg)
    identity_sites = [n for n, role in roles.items() if role == "identity"]
    lower = {n: c.lower for n, c in
             metrics.one_hot_ci(decomp, params, target_params, cfg.n_features).items()}
    errors = ci_patterns.ci_solution_errors(
        lower, identity={n: cfg.n_features for n, r in roles.items() if r == "features"},
        dense={n: cfg.n_hidden for n in identity_sites})
    out["ci_errors"] = errors
    # The dense identity columns' peak CI: what decides a borderline count at tol 0.1.
    out["ci_dense_peaks"] = {n: ci_patterns.dense_ci_peaks(lower[n], cfg.n_hidden)
                             for n in identity_sites}
    norms = {}
    for n in decomp.site_names:
        Vs, Us = (np.asarray(a) for a in decomp.factors(params, n))
        norms[n] = int(np.sum(metrics.subcomponent_norms(Vs, Us) > NORM_THRESHOLD))
    out["norm_threshold"] = NORM_THRESHOLD
    out["subcomponents_above_norm"] = norms
    out["warnings"] = solution_warnings(out, cfg, steps)
    return out
