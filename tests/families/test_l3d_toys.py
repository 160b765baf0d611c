"""The L3D paper's toy models: data without all-zero samples (higher-rank: whole groups), the
TMCS recovery of A and the higher-rank group recovery on planted decompositions, and the
higher-rank config's run."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.reproduce import l3d_reproduce
from spdjax.families.l3d_toys import evaluation, model


def test_nonzero_sparse_has_no_empty_rows_and_the_conditional_rate():
    x = np.asarray(model.nonzero_sparse(jax.random.key(0), 40_000, 5, 0.05))
    assert x.any(axis=1).all()
    # Given at least one active of 5 at p = 0.05: each feature active with p / (1 - 0.95^5).
    np.testing.assert_allclose(x.mean(axis=0), 0.05 / (1 - 0.95**5), rtol=0.06)


def test_tmcs_recovery_of_a_planted_decomposition_is_exact():
    rng = np.random.default_rng(0)
    A = rng.uniform(0, 3, (10, 10))
    # Component c: input feature c through hidden unit c % 5 to outputs A[c] (any scale, sign).
    W_in = np.zeros((10, 10, 5))
    W_out = np.zeros((10, 5, 10))
    for c in range(10):
        s = rng.uniform(0.5, 2.0) * rng.choice([-1, 1])
        W_in[c, c, c % 5] = s
        W_out[c, c % 5] = A[c] * 0.7 / s
    view = types.SimpleNamespace(component_weights=lambda p, n: {"linear1": W_in,
                                                                  "linear2": W_out}[n])
    rec = evaluation.tmcs_recovery(view, None, {"task": {"A": jnp.asarray(A)}})
    assert rec["a_r2"] > 0.999999 and rec["features_covered"] == 10


def test_tms_mmcs_abs_ignores_the_arbitrary_sign_of_directions():
    cfg = model.VARIANTS["tms-5-2"]
    params, _ = model.init_params(jax.random.key(0), cfg)
    W = np.asarray(params["linear1"]["kernel"])
    # Component c: feature c's row of W, negated (an L3D direction may point either way).
    P1 = np.zeros((5, 5, 2))
    for c in range(5):
        P1[c, c] = -W[c]
    comps = {"linear1": P1, "linear2": np.zeros((5, 2, 5))}
    view = types.SimpleNamespace(site_names=("linear1", "linear2"),
                                 component_weights=lambda p, n: jnp.asarray(comps[n]))
    out = evaluation.evaluate(view, None, params, cfg)
    assert out["mmcs_abs"] > 0.999999 and out["mmcs"] < 1e-6


@pytest.mark.slow  # ~20 s; op-by-op sampling is slow; guards the committed results' data
def test_jitted_sample_batch_draws_the_same_bits_as_op_by_op():
    # The committed results' fixed training sets were drawn before sample_batch was jitted.
    key = jax.random.fold_in(jax.random.key(0), 0x13D)
    for cfg in (model.VARIANTS[v] for v in ("tms-5-2", "tmcs", "x2")):
        with jax.disable_jit():
            eager = np.asarray(model.sample_batch(cfg, key, 256))
        np.testing.assert_array_equal(np.asarray(model.sample_batch(cfg, key, 256)), eager)


def test_high_rank_groups_are_always_co_active_and_never_all_zero():
    cfg = model.VARIANTS["high-rank"]
    assert (cfg.n_features, cfg.n_hidden, cfg.n_outputs, cfg.n_groups) == (30, 10, 30, 6)
    x = np.asarray(model.sample_batch(cfg, jax.random.key(1), 20_000))
    active = (x > 0).reshape(len(x), cfg.n_groups, cfg.group_size)
    np.testing.assert_array_equal(active.all(axis=2), active.any(axis=2))
    assert active.any(axis=(1, 2)).all()
    # Each group active with p = 0.05 given at least one of the 6 is.
    np.testing.assert_allclose(active[:, :, 0].mean(axis=0), 0.05 / (1 - 0.95**6), rtol=0.08)


def test_a_toy_whose_features_do_not_fill_its_groups_is_refused():
    with pytest.raises(ValueError, match=r"n_features \(28\) must be a multiple of its group "
                       r"size 5"):
        model.ToyConfig("high-rank", 28, 10, 28)
    with pytest.raises(ValueError, match="Unknown L3D toy kind 'tmcz'"):
        model.ToyConfig("tmcz", 10, 5, 10)


def _group_view(W_in):
    W_out = np.zeros((W_in.shape[0], 10, 30))
    return types.SimpleNamespace(
        site_names=("linear1", "linear2"),
        component_weights=lambda p, n: jnp.asarray({"linear1": W_in, "linear2": W_out}[n]))


def test_group_recovery_of_a_planted_decomposition_and_of_a_wrong_one():
    rng = np.random.default_rng(0)
    # Components 0-5 each read group c (any rank-5 map of its inputs), 6-9 are dead and read
    # a mixture (left out when their use is 0).
    W_in = np.zeros((10, 30, 10))
    for c in range(6):
        W_in[c, 5 * c:5 * c + 5] = rng.normal(size=(5, 10))
    W_in[6:] = rng.normal(size=(4, 30, 10))
    use = np.array([0.1] * 6 + [0.0] * 4)
    rec = evaluation.group_recovery(W_in, 5, use=use)
    assert rec["groups_recovered"] == 6 and rec["groups_single"] == 6
    assert rec["components_counted"] == 6 and rec["component_groups"][:6] == list(range(6))
    np.testing.assert_allclose(rec["group_best_share"], 1.0)
    # Wrong: each component's weight split evenly between two groups.
    wrong = np.zeros((6, 30, 10))
    for c in range(6):
        wrong[c, 5 * c:5 * c + 5] = 1.0
        wrong[c, 5 * ((c + 1) % 6):5 * ((c + 1) % 6) + 5] = 1.0
    bad = evaluation.group_recovery(wrong, 5)
    assert bad["groups_recovered"] == 0
    np.testing.assert_allclose(bad["component_group_share"], 0.5)
    # Two components on group 0 and none on 1..5: recovered 1, but not by one component.
    twice = evaluation.group_recovery(np.stack([W_in[0], 2 * W_in[0]]), 5)
    assert twice["group_components"] == [2, 0, 0, 0, 0, 0] and twice["groups_single"] == 0
    with pytest.raises(ValueError, match="one entry per component"):
        evaluation.group_recovery(W_in, 5, use=use[:3])


def test_the_family_evaluation_reports_the_groups_of_a_high_rank_decomposition():
    cfg = model.VARIANTS["high-rank"]
    params, frozen = model.init_params(jax.random.key(0), cfg)
    W_in = np.zeros((6, 30, 10))
    for c in range(6):
        W_in[c, 5 * c:5 * c + 5] = np.asarray(params["linear1"]["kernel"])[5 * c:5 * c + 5]
    out = evaluation.evaluate(_group_view(W_in), None, {**params, **frozen}, cfg)
    assert out["groups_recovered"] == 6 and out["groups_single"] == 6
    assert out["component_groups"] == list(range(6))


def test_the_high_rank_config_trains_a_few_steps_at_the_rank_asked_for(tmp_path):
    import spdjax
    from spdjax.training import loop

    config = spdjax.config.load("l3d:high-rank", {
        "l3d.rank": 5, "C": 5, "steps": 4, "log_every": 4, "checkpoint_every": 4,
        "eval_batch_size": 64, "l3d.n_samples": 64, "l3d.dense_steps": 2, "figures": False})
    assert (config.C, config.l3d.rank, config.l3d.n_samples) == (5, 5, 64)
    # An untrained target (the recipe's init) keeps the test to the decomposition's cost.
    cfg = model.VARIANTS["high-rank"]
    trainable, frozen = model.init_params(jax.random.key(0), cfg)
    run = spdjax.setup(config, tmp_path / "run", target_params={**trainable, **frozen})
    weight = run.method.decomposition.tensors(run.params["decode"])["linear1"]["weight"]
    loop.train(run)
    assert run.step == 4 and weight.shape == (30, 10, 5)
    summary = run.experiment.evaluate(run.method.decomposition, run.state.params)
    figure = l3d_reproduce.plot(run, "high-rank", tmp_path / "high-rank.png",
                                {"use_fraction": [0.2, 0.0, 0.1, 0.3, 0.05]})
    loop.close(run)
    assert len(summary["component_groups"]) == 5 and 0 <= summary["groups_recovered"] <= 5
    assert figure.stat().st_size > 0


def test_the_reproduction_names_add_only_the_settings_given():
    assert l3d_reproduce.names("tmcs", 2, "reference_mse") == (
        "tmcs_reference_mse_seed2", "l3d_tmcs_reference_mse_seed2")
    assert l3d_reproduce.names("high-rank", 0, "reference_mse", rank=5, C=6) == (
        "high-rank_C6_rank5_reference_mse_seed0", "l3d_high-rank_C6_rank5_reference_mse")
