"""The paper's evaluation of SPD on ResidMLP: CI patterns and neuron contributions.

What the paper shows, and what :func:`evaluate` measures (figures:
:mod:`spdjax.families.resid_mlp.plots`):
  * each ``W_in`` subcomponent is important for exactly one feature (IdentityCIError on
    ``mlp_in``, one-hot inputs of 0.75, lower-leaky CI, tol 0.1);
  * ``W_out`` is one dense block of ``d_mlp`` always-important subcomponents (dense error, k =
    ``d_mlp``);
  * the chosen ``W_in`` subcomponent of each feature uses the target's neurons with the target's
    weights (neuron contributions, Pearson r per layer and pooled over layers).
"""

from __future__ import annotations

import numpy as np

from spdjax.analysis import ci_patterns, metrics
from spdjax.families.resid_mlp.model import ResidMLPConfig, site_roles


def contributions(decomp, params, target_params, cfg) -> dict[int, dict[str, np.ndarray]]:
    """Per layer: target and chosen-subcomponent neuron contributions ``(n_features, d_mlp)``."""
    W_E = np.asarray(target_params["W_E"])
    out = {}
    for i in range(cfg.n_layers):
        layer = target_params[f"layers_{i}"]
        W_out_sum = np.asarray(decomp.component_weight(params, f"layers_{i}/mlp_out"))
        if decomp.rank_one:  # rank-one subcomponents (SPD)
            V_in, U_in = decomp.factors(params, f"layers_{i}/mlp_in")
            spd, chosen = metrics.subcomponent_neuron_contributions(W_E, V_in, U_in, W_out_sum)
        else:  # higher-rank components (APD): each one's mlp_in slice
            spd, chosen = metrics.component_neuron_contributions(
                W_E, decomp.component_weights(params, f"layers_{i}/mlp_in"), W_out_sum)
        target = metrics.neuron_contributions(W_E, layer["mlp_in"]["kernel"],
                                                 layer["mlp_out"]["kernel"])
        out[i] = {"target": target, "spd": spd, "chosen": chosen}
    return out


def evaluate(decomp, params, target_params, cfg: ResidMLPConfig, *,
             steps: int | None = None) -> dict:
    """CI-pattern errors (identity on ``mlp_in``, dense on ``mlp_out``) and neuron-contribution
    correlations per layer and pooled (``steps`` is not used: no warnings here)."""
    out: dict = {}
    if decomp.causal_importance is not None:  # CI patterns (APD has no CI)
        roles = site_roles(cfg)
        lower = {n: c.lower for n, c in
                 metrics.one_hot_ci(decomp, params, target_params, cfg.n_features).items()}
        out["ci_errors"] = ci_patterns.ci_solution_errors(
            lower, identity={n: cfg.n_features for n, r in roles.items() if r == "features"},
            dense={n: cfg.d_mlp for n, r in roles.items() if r == "dense"})

    contrib = contributions(decomp, params, target_params, cfg)
    out["contribution_r"] = {
        f"layers_{i}": metrics.pearson_r(c["target"], c["spd"]) for i, c in contrib.items()
    }
    out["contribution_r"]["all"] = metrics.pearson_r(
        np.concatenate([c["target"].ravel() for c in contrib.values()]),
        np.concatenate([c["spd"].ravel() for c in contrib.values()]),
    )
    # Distinct chosen subcomponents per layer: the paper's 1-layer result is n_features of them.
    out["distinct_chosen_subcomponents"] = {
        f"layers_{i}": int(np.unique(c["chosen"]).size) for i, c in contrib.items()
    }
    return out
