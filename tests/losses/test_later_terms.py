"""The terms of the later reference implementation (goodfire-ai/spd): delta component, subset
routing, PGD masks, frequency minimality, hidden-activation reconstruction."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from spdjax import losses
from spdjax.core import routing
from spdjax.losses import adversarial
from spdjax.core.masks import SiteMask, sample_masks

from helpers import two_site_target

B = 64


def jitted(fn, **options):
    """``fn(params, ctx, key)`` with its options bound, compiled (eager dispatch is slow)."""
    return jax.jit(functools.partial(fn, **options))


@pytest.fixture(scope="module")
def setup():
    target, tp = two_site_target(d_in=5, d_hidden=6, d_out=4)
    d = spdjax.decompose(target, {"a": 7, "b": 5}, ci_hidden=(4,))
    params = jax.jit(d.init)(jax.random.key(0), tp)
    x = jax.random.normal(jax.random.key(1), (B, 5))
    ctx = jax.jit(lambda p, x: spdjax.make_context(d, tp, p, x))(params, x)
    return d, tp, params, x, ctx


def test_delta_component_restores_the_target(setup):
    d, tp, params, x, ctx = setup
    ones = {n: SiteMask(component=jnp.ones((B, d.C[n])), delta=jnp.ones((B,))) for n in "ab"}
    # Every mask 1, the delta's too: V U + (W - V U) = W, the target exactly.
    forward = jax.jit(lambda p, masks: d.forward(tp, p, x, masks))
    np.testing.assert_allclose(forward(params, ones), ctx.target_out, rtol=1e-5, atol=1e-5)
    # Component masks 0, delta 1: each site applies only the residual W - V U.
    zeros = {n: SiteMask(component=jnp.zeros((B, d.C[n])), delta=jnp.ones((B,))) for n in "ab"}
    res = {n: np.asarray(tp[n]["kernel"]) - np.asarray(d.component_weight(params, n))
           for n in "ab"}
    h = np.maximum(np.asarray(x) @ res["a"] + np.asarray(tp["a"]["bias"]), 0)
    np.testing.assert_allclose(forward(params, zeros), h @ res["b"], rtol=1e-4, atol=1e-5)
    # The delta is differentiable in the factors: with every mask 1 the output no longer
    # depends on them, so their gradient through the output vanishes.
    grads = jax.jit(jax.grad(lambda p: jnp.sum(forward(p, ones))))(params)["components"]
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-4


def test_routing_false_keeps_the_target_output_there(setup):
    d, tp, params, x, ctx = setup
    routed = jnp.arange(B) % 2 == 0
    masks = {n: SiteMask(component=jnp.zeros((B, d.C[n])), routing=routed) for n in "ab"}
    out = d.forward(tp, params, x, masks)
    np.testing.assert_allclose(out[~routed], ctx.target_out[~routed], rtol=1e-6)
    np.testing.assert_allclose(out[routed], d.forward(tp, params, x, {
        n: jnp.zeros((B, d.C[n])) for n in "ab"})[routed], rtol=1e-6)


def test_uniform_k_routes_a_uniform_number_of_sites_and_always_one():
    mask = routing.uniform_k(jax.random.key(0), 4, (20_000,))
    k = np.asarray(mask.sum(0))
    assert k.min() == 1 and k.max() == 4
    np.testing.assert_allclose(np.bincount(k)[1:] / k.size, 0.25, atol=0.02)
    np.testing.assert_allclose(np.asarray(mask.mean(1)), 0.625, atol=0.02)  # E[k] / n per site


def test_subset_routing_of_every_site_is_the_full_stochastic_loss(setup):
    _, _, params, _, ctx = setup
    key = jax.random.key(3)
    full = jitted(losses.stochastic_recon, n_samples=2, delta=True)(params, ctx, key)
    for router in ("all", spdjax.static_probability(1.0)):
        sub = jitted(losses.stochastic_recon_subset, n_samples=2, delta=True,
                     router=router)(params, ctx, key)
        np.testing.assert_allclose(sub, full, rtol=1e-6)
    none = jitted(losses.stochastic_recon_subset, router="static_probability",
                  routing_p=0.0)(params, ctx, key)
    assert float(none) == 0.0  # no site routed: the target itself
    partial = jitted(losses.stochastic_recon_subset, n_samples=2, delta=True)(params, ctx, key)
    assert 0.0 < float(partial) < float(full)


def test_pgd_masks_stay_in_g_to_1_and_beat_random_masks(setup):
    d, tp, params, x, ctx = setup
    key = jax.random.key(5)
    masks = jax.jit(lambda p, c, k: adversarial.pgd_masks(
        p, c, k, ["a", "b"], n_steps=5, step_size=0.1, delta=True))(params, ctx, key)
    for n, m in masks.items():
        g = np.asarray(ctx.ci[n].lower)
        assert (np.asarray(m.component) >= g - 1e-6).all() and (np.asarray(m.component) <= 1).all()
        assert m.delta.shape == (B,) and ((m.delta >= 0) & (m.delta <= 1)).all()
    random = jitted(losses.stochastic_recon, n_samples=20, delta=True)(params, ctx, key)
    for scope in adversarial.SCOPES:
        pgd = jitted(losses.pgd_recon, n_steps=5, step_size=0.1, scope=scope,
                     delta=True)(params, ctx, key)
        assert float(pgd) > 1.5 * float(random), (scope, float(pgd), float(random))
    shared = jax.jit(lambda p, c, k: adversarial.pgd_sources(
        p, c, k, ["a"], n_steps=1, step_size=1.0, scope="shared_across_batch"))(params, ctx, key)
    assert shared["a"].shape == (1, d.C["a"])
    assert set(np.unique(np.asarray(shared["a"]))) <= {0.0, 1.0}  # one step of 1: binary


def test_pgd_sources_get_no_gradient_in_the_final_loss(setup):
    d, tp, params, x, _ = setup
    key = jax.random.key(6)
    opts = dict(n_steps=3, step_size=0.2)

    def pgd(p):
        return losses.pgd_recon(p, spdjax.make_context(d, tp, p, x), key, **opts)

    ctx0 = jax.jit(lambda p: spdjax.make_context(d, tp, p, x))(params)
    sources = jax.jit(lambda p, c: adversarial.pgd_sources(p, c, key, ["a", "b"], **opts))(
        params, ctx0)

    def fixed_sources(p):
        ctx = spdjax.make_context(d, tp, p, x)
        lower = {n: c.lower for n, c in ctx.ci.items()}
        out = d.forward(tp, p, x, adversarial.masks_from_sources(sources, lower))
        return jnp.mean((out - ctx.target_out) ** 2)

    (v_pgd, g_pgd), (v_fixed, g_fixed) = (jax.jit(jax.value_and_grad(f))(params)
                                          for f in (pgd, fixed_sources))
    np.testing.assert_allclose(v_pgd, v_fixed, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
                 g_pgd, g_fixed)


def test_pgd_subset_and_layerwise_run_and_are_bounded_by_the_full_one(setup):
    _, _, params, _, ctx = setup
    key = jax.random.key(7)
    full, sub, layer = (jitted(fn, n_steps=2, step_size=0.5)(params, ctx, key) for fn in (
        losses.pgd_recon, losses.pgd_recon_subset, losses.pgd_recon_layerwise))
    assert 0 < float(sub) < float(full) and 0 < float(layer) < float(full)


def test_frequency_minimality_against_numpy(setup):
    _, _, params, _, ctx = setup
    expected_freq, expected_imp = 0.0, 0.0
    for c in ctx.ci.values():
        a = (np.asarray(c.upper, np.float64) + 1e-12) ** 1.5
        mean, total = a.mean(0), a.sum(0)
        expected_freq += np.sum(mean * np.log2(1 + total))
        expected_imp += np.sum(mean + 0.3 * mean * np.log2(1 + total))
    np.testing.assert_allclose(losses.frequency_minimality(params, ctx, pnorm=1.5),
                               expected_freq, rtol=1e-5)
    np.testing.assert_allclose(losses.importance_minimality(params, ctx, pnorm=1.5, beta=0.3),
                               expected_imp, rtol=1e-5)


def test_hidden_acts_recon_against_numpy(setup):
    d, tp, params, x, ctx = setup
    key = jax.random.key(8)
    masks = jax.jit(sample_masks)(jax.random.split(key, 1)[0],
                                  {n: c.lower for n, c in ctx.ci.items()})
    V, U = (np.asarray(params["components"]["a"][k]) for k in "VU")
    h = ((np.asarray(x) @ V) * np.asarray(masks["a"])) @ U + np.asarray(tp["a"]["bias"])
    h = np.maximum(h, 0)
    clean = np.asarray(ctx.site_inputs["b"])
    expected = np.sum((h - clean) ** 2) / (x.size + clean.size)  # site a's input: 0, counted
    np.testing.assert_allclose(jax.jit(losses.stochastic_hidden_acts_recon)(params, ctx, key),
                               expected, rtol=1e-4)


def test_binomial_ci_input_noise_against_numpy(setup):
    d, _, params, _, ctx = setup
    key = jax.random.key(5)
    noisy = d.causal_importance(params, ctx.site_inputs, lower_noise=0.05, key=key)
    for i, n in enumerate(d.site_names):
        pre = np.asarray(ctx.ci[n].pre)
        u = np.asarray(jax.random.uniform(jax.random.fold_in(key, i), pre.shape))
        # sigma_lo sees 1.05 r - 0.05 u (goodfire-ai/spd's quirk); sigma_up and the
        # pre-activation are untouched.
        np.testing.assert_allclose(noisy[n].lower, d.sigmoid.lower(1.05 * pre - 0.05 * u),
                                   rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(noisy[n].upper, ctx.ci[n].upper, rtol=1e-6, atol=1e-7)
        assert not np.allclose(noisy[n].lower, ctx.ci[n].lower)
    with pytest.raises(ValueError, match="lower_noise needs a PRNG key"):
        d.causal_importance(params, ctx.site_inputs, lower_noise=0.05)
    with pytest.raises(ValueError, match=r"ci_lower_noise must be a number in \[0, 1\)"):
        spdjax.methods.spd.objective(d, [], ci_lower_noise=-0.1)


@pytest.mark.parametrize("name, options, match", [
    ("pgd_recon", {"scope": "global"}, "scope must be one of"),
    ("pgd_recon", {"n_steps": -1}, "n_steps must be an integer >= 0"),
    ("pgd_recon_subset", {"router": "everything"}, "Unknown router 'everything'"),
    ("stochastic_recon_subset", {"routing_p": 0.5}, "applies only to router 'static_prob"),
    ("stochastic_recon_subset", {"router": "static_probability"}, "needs its probability"),
    ("stochastic_recon", {"delta": 1}, "delta must be true or false"),
    ("importance_minimality", {"pnorm": 1.0, "beta": -1}, "beta must be a finite number >= 0"),
])
def test_bad_options_fail_when_bound(name, options, match):
    with pytest.raises(ValueError, match=match):
        spdjax.term(name, 1.0, **options)


def test_a_user_term_option_named_like_a_builtin_one_is_not_checked_with_its_meaning():
    """Checks belong to the term that declares them: a user term's ``init`` takes any value,
    while PGD's ``init`` still must be one of PGD's inits."""
    def warm_start(params, ctx, key, *, init):
        del params, ctx, key
        return jnp.asarray(0.0)

    for value in ("anything", 3, None, {"scale": 2.0}):
        assert spdjax.term(warm_start, 1.0, init=value).options == {"init": value}
    with pytest.raises(ValueError, match=r"Loss 'pgd_recon': init must be one of "
                                         r"\('random', 'ones', 'zeroes'\), got 'anything'"):
        spdjax.term("pgd_recon", 1.0, init="anything")


def test_a_user_term_declares_its_own_option_checks():
    @losses.options(scale=losses.checks.positive_finite)
    def weight_norm(params, ctx, key, *, scale=1.0):
        del ctx, key
        return scale * sum(jnp.sum(v ** 2) for v in jax.tree.leaves(params))

    assert spdjax.term(weight_norm, 1.0, scale=2.0).options == {"scale": 2.0}
    with pytest.raises(ValueError, match=r"Loss 'weight_norm': scale must be a finite number > 0, "
                                         r"got -1"):
        spdjax.term(weight_norm, 1.0, scale=-1)
    with pytest.raises(ValueError, match="Loss 'weight_norm': bad options"):
        spdjax.term(weight_norm, 1.0, scal=2.0)
    with pytest.raises(TypeError, match=r"declares checks for \['scal'\]"):
        losses.options(scal=losses.checks.positive_finite)(weight_norm)


def test_a_later_reference_run_trains_and_reports_its_eval_terms():
    from spdjax.training import loop

    config = spdjax.config.load("tms:5-2+head", {
        "steps": 4, "log_every": 2, "batch_size": 64, "eval_batch_size": 128, "figures": False,
        "grad_clip_norm_components": 0.01, "grad_clip_norm_ci": 0.1, "ci_lower_noise": 0.05,
        "losses.stochastic_recon.sampling": "binomial"})
    run = spdjax.setup(config)
    loop.train(run)
    summary = loop.evaluate(run)
    assert sorted(summary["eval_loss"]) == ["pgd_recon", "stochastic_hidden_acts_recon"]
    assert summary["eval_loss"]["pgd_recon"] > summary["loss"]["stochastic_recon"] > 0
    assert set(summary["ci_l0_at_0.01"]) == {"linear1", "linear2"}
    assert all(summary["ci_l0_at_0.01"][n] >= summary["ci_l0"][n] for n in ("linear1", "linear2"))
    # The config's noise reaches the run's objective: same key, noise 0 gives another loss.
    from spdjax.losses import terms_from_config

    params, batch, key = run.state.params, run.experiment.batch_fn(jax.random.key(3)), \
        jax.random.key(4)
    objective = jax.jit(run.method.objective)  # eager dispatch of the whole objective is slow
    noisy = objective(params, run.target_params, batch, key, 0.5)[0]
    clean = jax.jit(spdjax.spd_objective(run.method.decomposition, terms_from_config(
        config.losses.to_dict())))(params, run.target_params, batch, key, 0.5)[0]
    again = objective(params, run.target_params, batch, key, 0.5)[0]
    assert noisy == again and abs(float(noisy) - float(clean)) > 1e-9 * abs(float(clean))


def test_gradient_clipping_per_group():
    from spdjax.methods.spd import clip_groups

    grads = {"components": {"a": {"V": jnp.full((3, 2), 10.0)}}, "ci": {"a": jnp.ones(4)}}
    clipped, _ = clip_groups({"components": 1.0}).update(grads, None)
    assert float(jnp.linalg.norm(clipped["components"]["a"]["V"])) == pytest.approx(1.0, 1e-5)
    np.testing.assert_array_equal(clipped["ci"]["a"], grads["ci"]["a"])  # not clipped


def test_the_adversary_optimizer_ascends_and_clips():
    from spdjax.methods.adversary import ascend_in_unit_box

    tx = ascend_in_unit_box(learning_rate=0.3)
    params = jnp.array([0.5, 0.9, 0.1])
    updates, _ = tx.update(jnp.array([1.0, 1.0, -1.0]), tx.init(params), params)
    np.testing.assert_allclose(params + updates, [0.8, 1.0, 0.0], atol=1e-6)  # up the gradient
