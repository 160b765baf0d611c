"""Every loss term against a NumPy computation on a tiny two-site model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from spdjax import losses
from spdjax.core.masks import sample_masks

from helpers import np_lower, np_mlp_ci, np_upper, two_site_target

B = 6


@pytest.fixture(scope="module")
def setup():
    target, tp = two_site_target()
    d = spdjax.decompose(target, {"a": 5, "b": 3}, ci_hidden=(4,))
    params = jax.jit(d.init)(jax.random.key(0), tp)  # compiled: eager dispatch is slow
    x = jax.random.normal(jax.random.key(1), (B, 3))
    ctx = jax.jit(lambda p, x: spdjax.make_context(d, tp, p, x))(params, x)
    npp = jax.tree.map(np.asarray, params)
    return d, tp, params, x, ctx, npp


def np_forward(tp, npp, x, masks):
    """NumPy forward: sites in ``masks`` use components (mask None = all ones)."""
    x = np.asarray(x)
    Wa, ba, Wb = (np.asarray(tp["a"]["kernel"]), np.asarray(tp["a"]["bias"]),
                  np.asarray(tp["b"]["kernel"]))
    Va, Ua = npp["components"]["a"]["V"], npp["components"]["a"]["U"]
    Vb, Ub = npp["components"]["b"]["V"], npp["components"]["b"]["U"]
    if "a" in masks:
        m = 1.0 if masks["a"] is None else masks["a"]
        h = ((x @ Va) * m) @ Ua + ba
    else:
        h = x @ Wa + ba
    h = np.maximum(h, 0)
    if "b" in masks:
        m = 1.0 if masks["b"] is None else masks["b"]
        return ((h @ Vb) * m) @ Ub
    return h @ Wb


def np_ci(tp, npp, x):
    x = np.asarray(x)
    h_a = np.maximum(x @ np.asarray(tp["a"]["kernel"]) + np.asarray(tp["a"]["bias"]), 0)
    pre = {
        "a": np_mlp_ci(npp["ci"]["a"], x @ npp["components"]["a"]["V"]),
        "b": np_mlp_ci(npp["ci"]["b"], h_a @ npp["components"]["b"]["V"]),
    }
    return pre


def test_causal_importance_matches_numpy(setup):
    d, tp, params, x, ctx, npp = setup
    pre = np_ci(tp, npp, x)
    for n in ("a", "b"):
        np.testing.assert_allclose(ctx.ci[n].pre, pre[n], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ctx.ci[n].lower, np_lower(pre[n]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ctx.ci[n].upper, np_upper(pre[n]), rtol=1e-5, atol=1e-6)


def test_faithfulness(setup):
    d, tp, params, x, ctx, npp = setup
    sq = n = 0
    for s, key in (("a", "a"), ("b", "b")):
        W = np.asarray(tp[key]["kernel"])
        sq += np.sum((W - npp["components"][s]["V"] @ npp["components"][s]["U"]) ** 2)
        n += W.size
    np.testing.assert_allclose(jax.jit(losses.faithfulness)(params, ctx, None), sq / n, rtol=1e-5)


def test_unmasked_and_ci_masked(setup):
    d, tp, params, x, ctx, npp = setup
    y = np.asarray(ctx.target_out)
    pre = np_ci(tp, npp, x)
    g = {n: np_lower(pre[n]) for n in pre}
    want_unmasked = np.mean((np_forward(tp, npp, x, {"a": None, "b": None}) - y) ** 2)
    want_ci = np.mean((np_forward(tp, npp, x, g) - y) ** 2)
    want_ci_lw = np.mean([np.mean((np_forward(tp, npp, x, {n: g[n]}) - y) ** 2) for n in g])
    np.testing.assert_allclose(losses.unmasked_recon(params, ctx), want_unmasked, rtol=1e-5)
    np.testing.assert_allclose(losses.ci_masked_recon(params, ctx), want_ci, rtol=1e-5)
    np.testing.assert_allclose(losses.ci_masked_recon_layerwise(params, ctx), want_ci_lw, rtol=1e-5)


@pytest.mark.parametrize("n_samples", [1, 3])
def test_stochastic_recon_and_layerwise(setup, n_samples):
    d, tp, params, x, ctx, npp = setup
    y = np.asarray(ctx.target_out)
    key = jax.random.key(7)
    lower = {n: c.lower for n, c in ctx.ci.items()}
    masks = [jax.tree.map(np.asarray, jax.jit(sample_masks)(k, lower))
             for k in jax.random.split(key, n_samples)]
    want = np.mean([np.mean((np_forward(tp, npp, x, m) - y) ** 2) for m in masks])
    want_lw = np.mean([np.mean((np_forward(tp, npp, x, {n: m[n]}) - y) ** 2)
                       for m in masks for n in m])
    got = jax.jit(lambda p, c, k: losses.stochastic_recon(p, c, k, n_samples=n_samples))(
        params, ctx, key)
    got_lw = jax.jit(lambda p, c, k: losses.stochastic_recon_layerwise(
        p, c, k, n_samples=n_samples))(params, ctx, key)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_lw, want_lw, rtol=1e-5)


def test_stochastic_recon_with_full_importance_equals_unmasked(setup):
    # With g = 1 every mask is 1 whatever the draw: stochastic recon = unmasked recon.
    d, tp, params, x, ctx, npp = setup
    params = jax.tree.map(lambda a: a, params)
    for n in params["ci"]:
        params["ci"][n][-1]["b"] = params["ci"][n][-1]["b"] + 100.0
    ctx1 = jax.jit(lambda p: spdjax.make_context(d, tp, p, x))(params)
    np.testing.assert_allclose(
        jax.jit(lambda p, c, k: losses.stochastic_recon(p, c, k, sampling="binomial"))(
            params, ctx1, jax.random.key(3)),
        jax.jit(losses.unmasked_recon)(params, ctx1), rtol=1e-6)


@pytest.mark.parametrize("pnorm", [1.0, 2.0, 0.5])
def test_importance_minimality(setup, pnorm):
    d, tp, params, x, ctx, npp = setup
    pre = np_ci(tp, npp, x)
    want = sum(np.sum(np.mean((np_upper(pre[n]) + 1e-12) ** pnorm, axis=0)) for n in pre)
    got = losses.importance_minimality(params, ctx, None, pnorm=pnorm)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_importance_minimality_p_annealing(setup):
    d, tp, params, x, ctx, npp = setup
    pre = np_ci(tp, npp, x)

    def want(p):
        return sum(np.sum(np.mean((np_upper(pre[n]) + 1e-12) ** p, axis=0)) for n in pre)

    opts = dict(pnorm=2.0, p_anneal_start_frac=0.5, p_anneal_final_p=1.0, p_anneal_end_frac=0.9)
    for frac, p in ((0.0, 2.0), (0.5, 2.0), (0.7, 1.5), (0.9, 1.0), (1.0, 1.0)):
        got = losses.importance_minimality(params, ctx.replace(step_frac=jnp.float32(frac)), None,
                                           **opts)
        np.testing.assert_allclose(got, want(p), rtol=1e-5, err_msg=f"frac={frac}")


def test_kl_divergence_against_numpy():
    rng = np.random.default_rng(0)
    pred, tgt = rng.normal(size=(4, 3, 7)), rng.normal(size=(4, 3, 7))

    def logsm(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    want = np.mean(np.sum(np.exp(logsm(tgt)) * (logsm(tgt) - logsm(pred)), -1))
    got = losses.kl(jnp.asarray(pred, jnp.float32), jnp.asarray(tgt, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_kl_divergence_is_finite_for_minus_inf_target_logits():
    # torch's kl_div takes 0 log 0 = 0: a -inf target logit (a masked-out token) contributes 0.
    rng = np.random.default_rng(1)
    pred, tgt = rng.normal(size=(4, 3, 7)), rng.normal(size=(4, 3, 7))
    tgt[0, 1, 2] = tgt[2, :, 5] = tgt[3, 0, :6] = -np.inf

    def logsm(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    p, logq = np.exp(logsm(tgt)), logsm(pred)
    with np.errstate(divide="ignore"):
        d = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)) - logq, 0.0)  # 0 log 0 = 0
    kl_rows = np.sum(p * d, -1, keepdims=True)
    n = kl_rows.size
    pred_j, tgt_j = jnp.asarray(pred, jnp.float32), jnp.asarray(tgt, jnp.float32)
    got = jax.jit(losses.kl)(pred_j, tgt_j)
    np.testing.assert_allclose(got, np.mean(kl_rows), rtol=1e-5)
    # Gradients: d/dpred = (q - p) / n; d/dtarget = p (d - KL_row) / n, 0 where p = 0.
    g_pred, g_tgt = jax.jit(jax.grad(losses.kl, argnums=(0, 1)))(pred_j, tgt_j)
    np.testing.assert_allclose(g_pred, (np.exp(logq) - p) / n, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(g_tgt, p * (d - kl_rows) / n, rtol=1e-4, atol=1e-7)
    # Finite logits give the same value as before the -inf entries were handled.
    finite = np.where(np.isinf(tgt), -3.0, tgt)
    want = np.mean(np.sum(np.exp(logsm(finite)) * (logsm(finite) - logq), -1))
    np.testing.assert_allclose(losses.kl(pred_j, jnp.asarray(finite, jnp.float32)), want,
                               rtol=1e-5)


def test_total_loss_weights_terms_and_draws_independent_masks(setup):
    d, tp, params, x, ctx, npp = setup
    cfg = {"faithfulness": {"coeff": 2.0},
           "stochastic_recon": {"coeff": 0.5},
           "stochastic_recon_layerwise": {"coeff": 1.0},
           "importance_minimality": {"coeff": 0.1, "pnorm": 1.0}}
    total_fn = spdjax.make_total_loss(cfg)
    key = jax.random.key(0)
    total, terms = jax.jit(total_fn)(params, ctx, key)
    np.testing.assert_allclose(
        total, 2 * terms["faithfulness"] + 0.5 * terms["stochastic_recon"]
        + terms["stochastic_recon_layerwise"] + 0.1 * terms["importance_minimality"], rtol=1e-6)
    # Each term gets its own key: the stochastic terms differ from a shared-key evaluation.
    same_key = losses.stochastic_recon(params, ctx, key)
    assert not np.isclose(terms["stochastic_recon"], same_key)
    np.testing.assert_allclose(
        terms["stochastic_recon"],
        losses.stochastic_recon(params, ctx, losses.term_key(key, "stochastic_recon")), rtol=1e-6)


def test_a_loss_used_twice_through_an_instance_label(setup):
    """``<loss>@<label>``: the same loss again with its own options, value and PRNG stream."""
    d, tp, params, x, ctx, npp = setup
    cfg = {"stochastic_recon": {"coeff": 1.0},
           "stochastic_recon@ce": {"coeff": 0.25, "divergence": "ce", "n_samples": 2}}
    key = jax.random.key(3)
    total, terms = jax.jit(spdjax.make_total_loss(cfg))(params, ctx, key)
    want_ce = losses.stochastic_recon(params, ctx, losses.term_key(key, "stochastic_recon@ce"),
                                      divergence="ce", n_samples=2)
    np.testing.assert_allclose(terms["stochastic_recon@ce"], want_ce, rtol=1e-6)
    np.testing.assert_allclose(
        terms["stochastic_recon"],
        losses.stochastic_recon(params, ctx, losses.term_key(key, "stochastic_recon")), rtol=1e-6)
    np.testing.assert_allclose(total, terms["stochastic_recon"] + 0.25 * want_ce, rtol=1e-6)
    assert not np.isclose(terms["stochastic_recon@ce"], terms["stochastic_recon"])


@pytest.mark.parametrize("cfg, msg", [
    ({"stochastic_recn": {"coeff": 1.0}}, "Unknown loss 'stochastic_recn'"),
    ({"stochastic_recn@x": {"coeff": 1.0}}, "Unknown loss 'stochastic_recn'"),
    ({"stochastic_recon@": {"coeff": 1.0}}, "instance label after '@'"),
    ({"stochastic_recon@a-b": {"coeff": 1.0}}, "instance label after '@'"),
    ({"stochastic_recon@x": {"coeff": 1.0, "n_sample": 2}},
     "Loss 'stochastic_recon@x': bad options"),
    ({"faithfulness": {}}, "needs a 'coeff'"),
    ({"importance_minimality": {"coeff": 1.0}}, "bad options"),
    ({"stochastic_recon": {"coeff": 1.0, "n_sample": 2}}, "bad options.*n_sample"),
    ({}, "empty"),
])
def test_total_loss_config_errors(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        spdjax.make_total_loss(cfg)


def test_unknown_divergence(setup):
    d, tp, params, x, ctx, npp = setup
    with pytest.raises(ValueError, match="Unknown output divergence 'l1'"):
        losses.unmasked_recon(params, ctx, divergence="l1")


def test_layerwise_recon_reuses_the_clean_prefix():
    """Replacing site k leaves everything before it equal to the clean forward: the compiled
    layerwise term must pay only for each site's components and the layers after it, not replay
    the prefix (XLA's common-subexpression pass merges it with the clean forward; this test
    fails if a change ever defeats that)."""
    L, d, C, batch = 6, 128, 4, 256
    names = [f"l{i}" for i in range(L)]

    def fn(p, x, hooks):
        for n in names:
            x = jnp.tanh(hooks(n, x, lambda a, n=n: a @ p[n]))
        return x

    sites = [spdjax.Site(n, "linear", d, d, spdjax.weight_at((n,))) for n in names]
    rng = np.random.default_rng(0)
    tp = {n: jnp.asarray(rng.normal(size=(d, d)) / np.sqrt(d), jnp.float32) for n in names}
    dec = spdjax.decompose(spdjax.from_function(fn, sites), {"l*": C}, ci_hidden=(2,))
    params = dec.init(jax.random.key(0), tp)
    x = jax.random.normal(jax.random.key(1), (batch, d))

    def flops(with_layerwise):
        def loss(p):
            ctx = spdjax.make_context(dec, tp, p, x)
            return losses.ci_masked_recon_layerwise(p, ctx) if with_layerwise else (
                jnp.sum(ctx.target_out) + sum(jnp.sum(c.lower) for c in ctx.ci.values()))
        cost = jax.jit(jax.value_and_grad(loss)).lower(params).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    layer = 2 * batch * d * d  # one target layer's matmul, forward
    added = (flops(True) - flops(False)) / layer
    suffix_fwd = L * (L - 1) / 2  # layers after each replaced site: 5 + 4 + ... + 0
    # Forward: the suffixes; backward: the suffixes' input gradients (the same again); the
    # components' own matmuls are ~C/d of a layer each. A replayed prefix would add another
    # L (L - 1) / 2 = 15 layers.
    assert 2 * suffix_fwd - 1 <= added <= 2 * suffix_fwd + 3, added
