"""SPD on ResidMLP targets: sites, data, and the paper's evaluation (CI patterns, contributions).

Sites: ``layers_<i>/mlp_in`` and ``layers_<i>/mlp_out`` of every layer, all with ``config.C``.
``W_E`` / ``W_U = W_Eᵀ`` are frozen and not decomposed. The SPD data is the target's input
distribution (features ``U[-1, 1)`` active with probability 0.01), fresh every step.

What the paper shows, and what :func:`evaluate_resid` measures:
  * each ``W_in`` subcomponent is important for exactly one feature (IdentityCIError on
    ``mlp_in``, one-hot inputs of 0.75, lower-leaky CI, tol 0.1);
  * ``W_out`` is one dense block of ``d_mlp`` always-important subcomponents (dense error, k =
    ``d_mlp``);
  * the chosen ``W_in`` subcomponent of each feature uses the target's neurons with the target's
    weights (neuron contributions, Pearson r per layer and pooled over layers).
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from spdjax import evaluation, figures
from spdjax.data import sparse_features
from spdjax.decomposition import decompose
from spdjax.experiment import Experiment
from spdjax.target_cache import default_cache_dir
from spdjax.resid_mlp import get_resid_config, load_or_train_target, resid_mlp_target


def build(config) -> Experiment:
    cfg = get_resid_config(config.variant)
    if config.target_steps:
        cfg = dataclasses.replace(cfg, steps=config.target_steps)
    cache_dir = config.target_cache_dir or default_cache_dir()
    target_params = load_or_train_target(cfg, config.target_seed, cache_dir)
    target = resid_mlp_target(cfg)
    sites = {"layers_*/mlp_in": config.C, "layers_*/mlp_out": config.C}
    decomp = decompose(target, sites, ci_fn=config.ci_fn, ci_hidden=tuple(config.ci_hidden),
                       sigmoid=config.sigmoid)

    def make_batch_fn(size):
        return lambda key: sparse_features(key, size, cfg.n_features,
                                           feature_probability=cfg.feature_probability,
                                           value_range=cfg.value_range)

    def evaluate(params, figures_dir: pathlib.Path) -> dict:
        return evaluate_resid(decomp, params, target_params, cfg, figures_dir)

    return Experiment(target, target_params, decomp, make_batch_fn(config.batch_size),
                      make_batch_fn(config.eval_batch_size), evaluate)


def contributions(decomp, params, target_params, cfg) -> dict[int, dict[str, np.ndarray]]:
    """Per layer: target and chosen-subcomponent neuron contributions ``(n_features, d_mlp)``."""
    W_E = np.asarray(target_params["W_E"])
    out = {}
    for i in range(cfg.n_layers):
        layer = target_params[f"layers_{i}"]
        V_in, U_in = decomp.factors(params, f"layers_{i}/mlp_in")
        W_out_sum = np.asarray(decomp.component_weight(params, f"layers_{i}/mlp_out"))
        spd, chosen = evaluation.subcomponent_neuron_contributions(W_E, V_in, U_in, W_out_sum)
        target = evaluation.neuron_contributions(W_E, layer["mlp_in"]["kernel"],
                                                 layer["mlp_out"]["kernel"])
        out[i] = {"target": target, "spd": spd, "chosen": chosen}
    return out


def evaluate_resid(decomp, params, target_params, cfg, figures_dir: pathlib.Path) -> dict:
    """CI-pattern errors, neuron-contribution correlations, and the paper's figures."""
    ci = evaluation.one_hot_ci(decomp, params, target_params, cfg.n_features)
    lower = {n: c.lower for n, c in ci.items()}
    errors = evaluation.ci_solution_errors(
        lower, identity={"*/mlp_in": cfg.n_features}, dense={"*/mlp_out": cfg.d_mlp}
    )
    out: dict = {"ci_errors": {k: int(v) for k, v in errors.items()}}

    contrib = contributions(decomp, params, target_params, cfg)
    out["contribution_r"] = {
        f"layers_{i}": evaluation.pearson_r(c["target"], c["spd"]) for i, c in contrib.items()
    }
    out["contribution_r"]["all"] = evaluation.pearson_r(
        np.concatenate([c["target"].ravel() for c in contrib.values()]),
        np.concatenate([c["spd"].ravel() for c in contrib.values()]),
    )
    # Distinct chosen subcomponents per layer: the paper's 1-layer result is n_features of them.
    out["distinct_chosen_subcomponents"] = {
        f"layers_{i}": int(np.unique(c["chosen"]).size) for i, c in contrib.items()
    }

    figures_dir.mkdir(parents=True, exist_ok=True)
    for i, c in contrib.items():
        figures.plot_neuron_contributions(c["target"], c["spd"], c["chosen"],
                                          figures_dir / f"neuron_contributions_layer{i}.png")
    figures.plot_contribution_scatter(
        [c["target"] for c in contrib.values()],
        [c["spd"] for c in contrib.values()],
        figures_dir / "neuron_contribution_pairs.png",
        title=f"{cfg.n_features} input features, {cfg.n_layers} "
              f"layer{'s' if cfg.n_layers > 1 else ''}",
    )
    titles = [f"Layer {n.split('/')[0].split('_')[1]} - W_{n.split('_')[-1]}" for n in lower]
    for kind, cmap in (("lower", "Blues"), ("upper", "Reds")):
        permuted = evaluation.permuted_ci({n: getattr(c, kind) for n, c in ci.items()},
                                          dense_patterns=("*/mlp_out",))
        figures.plot_ci_heatmaps(permuted, figures_dir / f"ci_{kind}_leaky.png", cmap=cmap,
                                 site_titles=titles,
                                 title=f"Causal importance ({kind} leaky) - one-hot inputs of 0.75")
    return out


__all__ = ["build", "contributions", "evaluate_resid"]
