"""ResidMLP SPD: neuron contributions vs hand loops, CI permutations, tiny runs of every variant."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from spdjax.config import files as configs
from spdjax.analysis import ci_patterns
from spdjax.analysis import metrics
from spdjax.families import resid_mlp
from spdjax.families.resid_mlp import model as rm
from spdjax.config.runs import train_and_evaluate


def load_config(variant, overrides=None):
    return configs.load(f"resid_mlp:{variant}", overrides)


def test_neuron_contributions_match_a_hand_loop():
    rng = np.random.default_rng(0)
    F, D, N, C = 5, 7, 3, 4
    W_E, W_in, W_out = rng.normal(size=(F, D)), rng.normal(size=(D, N)), rng.normal(size=(N, D))
    got = metrics.neuron_contributions(W_E, W_in, W_out)
    for f in range(F):
        for n in range(N):
            into = sum(W_E[f, d] * W_in[d, n] for d in range(D))  # W_E[f] through neuron n's input
            back = sum(W_out[n, d] * W_E[f, d] for d in range(D))  # neuron n read off as feature f
            np.testing.assert_allclose(got[f, n], into * back, rtol=1e-12)

    V, U = rng.normal(size=(D, C)), rng.normal(size=(C, N))
    spd, chosen = metrics.subcomponent_neuron_contributions(W_E, V, U, W_out)
    for f in range(F):
        per_c = [metrics.neuron_contributions(W_E, np.outer(V[:, c], U[c]), W_out)[f]
                 for c in range(C)]
        best = int(np.argmax([p.max() for p in per_c]))
        assert chosen[f] == best
        np.testing.assert_allclose(spd[f], per_c[best], rtol=1e-10)


def test_one_subcomponent_per_feature_reproduces_the_target_contributions():
    """W_in split into rank-one pieces that each carry exactly one feature: the chosen piece of
    feature f has f's target contribution (the paper's ideal 1-layer result, r = 1)."""
    rng = np.random.default_rng(1)
    F, D, N = 4, 4, 3
    W_E = np.eye(F, D)  # orthonormal embedding: feature f reads row f of W_in only
    W_in, W_out = rng.normal(size=(D, N)), rng.normal(size=(N, D))
    V, U = np.eye(D), W_in  # piece c = e_c W_in[c]: the part of W_in that feature c uses
    target = metrics.neuron_contributions(W_E, W_in, W_out)
    spd, chosen = metrics.subcomponent_neuron_contributions(W_E, V, U, W_out)
    np.testing.assert_array_equal(chosen, np.arange(F))
    np.testing.assert_allclose(spd, target, rtol=1e-12)
    assert metrics.pearson_r(target, spd) == pytest.approx(1.0)


def test_pearson_r_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="same size"):
        metrics.pearson_r(np.zeros(3), np.zeros(4))


def test_resid_ci_permutation_identity_for_w_in_and_mass_for_w_out():
    rng = np.random.default_rng(2)
    F, C = 6, 9
    mlp_in = np.zeros((F, C))
    cols = rng.permutation(C)[:F]
    mlp_in[np.arange(F), cols] = 1.0  # one component per feature, shuffled
    mlp_out = np.zeros((F, C))
    dense = rng.permutation(C)[:3]
    mlp_out[:, dense] = [1.0, 0.9, 0.8]  # three always-on components of different mass
    permuted = ci_patterns.permuted_ci({"layers_0/mlp_in": mlp_in, "layers_0/mlp_out": mlp_out},
                                       dense_sites=("layers_0/mlp_out",))
    np.testing.assert_array_equal(permuted["layers_0/mlp_in"][:, :F], np.eye(F))
    np.testing.assert_array_equal(permuted["layers_0/mlp_out"][0, :4], [1.0, 0.9, 0.8, 0.0])
    errors = ci_patterns.ci_solution_errors(
        {"layers_0/mlp_in": mlp_in, "layers_0/mlp_out": mlp_out},
        identity={"layers_0/mlp_in": F}, dense={"layers_0/mlp_out": 3})["per_site"]
    assert errors["layers_0/mlp_in"] == 0 and errors["layers_0/mlp_out"] == 1  # 0.8 < 1 - 0.1


def test_configs_carry_the_paper_hyperparameters():
    expected = {"1": (100, 30_000, 2e-3, 1e-5, (16,)), "2": (400, 50_000, 1e-3, 2e-5, (16,)),
                "3": (500, 100_000, 1e-3, 5e-6, (128,))}
    for variant, (C, steps, lr, coeff, hidden) in expected.items():
        c = load_config(variant)
        assert (c.C, c.steps, c.lr, c.losses.importance_minimality.coeff, tuple(c.ci_hidden)) == (
            C, steps, lr, coeff, hidden)
        assert c.losses.importance_minimality.pnorm == 2.0 and c.lr_schedule == "constant"
        assert c.batch_size == 2048 and c.experiment == "resid_mlp"
    with pytest.raises(ValueError, match="Unknown ResidMLP variant '4'"):
        load_config("4")


def test_every_variant_config_is_valid():
    from spdjax.config.runs import validate

    for variant in ("1", "2", "3"):
        validate(load_config(variant))


# 1 layer runs end to end in tests/test_regression.py; 2 layers take the same code paths as 3.
@pytest.mark.slow  # ~15 s (full-size 3-layer model): run with -m slow
@pytest.mark.parametrize("variant", ["3"])
def test_tiny_run_of_every_variant(variant, tmp_path, monkeypatch):
    # An untrained target at the variant's full size (training is tested in test_resid_mlp.py).
    def untrained(cfg, seed, cache_dir):
        assert cfg.steps == 5 and seed == 0
        return rm.init_resid_mlp_params(jax.random.key(seed), cfg)

    # The family holds the target loader it was built with: swap in a family using ``untrained``.
    monkeypatch.setattr(resid_mlp, "FAMILY",
                        dataclasses.replace(resid_mlp.FAMILY, load_target_params=untrained))
    # C 110 (>= the 100/102 features) instead of 100/400/500 keeps the run cheap; the variant's
    # sites, layers and data are what this test is about.
    config = load_config(variant, {"steps": 6, "batch_size": 32, "eval_batch_size": 256,
                                   "log_every": 3, "checkpoint_every": 6, "target_steps": 5,
                                   "C": 110})
    summary = train_and_evaluate(config, tmp_path)
    n_layers = int(variant)
    sites = [f"layers_{i}/{m}" for i in range(n_layers) for m in ("mlp_in", "mlp_out")]
    assert sorted(summary["alive"]) == sorted(sites) and summary["steps"] == 6
    assert set(summary["ci_errors"]) == {"total", "loose_total", "per_site"}
    assert set(summary["ci_errors"]["per_site"]) == set(sites)
    assert set(summary["contribution_r"]) == {"all", *(f"layers_{i}" for i in range(n_layers))}
    assert all(-1 <= r <= 1 for r in summary["contribution_r"].values())
    assert np.isfinite(summary["loss"]["stochastic_recon"])
    figs = {p.name for p in (tmp_path / "figures").iterdir()}
    assert {"neuron_contribution_pairs.png", "ci_upper_leaky.png", "ci_lower_leaky.png",
            *(f"neuron_contributions_layer{i}.png" for i in range(n_layers))} <= figs
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 6
