"""VPD's minimality and locality terms (spdjax.losses.minimality, .locality, delta_l2), each
against a float64 NumPy formula written out here; the gamma schedule; the EMA state across two
training steps; frequency terms refused with microbatches; bad options refused."""

import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import spdjax
from spdjax import losses
from spdjax.config.base import base_config
from spdjax.losses import minimality
from spdjax.losses.adversarial import ADVERSARY
from spdjax.methods import adversary, spd

from helpers import two_site_target

B = 32
SITES = {"a": 7, "b": 5}


def jitted(fn, **options):
    return jax.jit(functools.partial(fn, **options))


@pytest.fixture(scope="module")
def setup():
    target, tp = two_site_target(d_in=5, d_hidden=6, d_out=4)
    d = spdjax.decompose(target, SITES, ci_hidden=(4,))
    params = jax.jit(d.init)(jax.random.key(0), tp)
    make = jax.jit(lambda p, x, sf: spdjax.make_context(d, tp, p, x, sf))
    # inputs of scale 2: the upper CI then has values at 0, in (0, 1) and above 1
    xs = [jax.random.normal(jax.random.key(i + 1), (B, 5)) * 2.0 for i in range(2)]
    return d, tp, params, xs, make


def np_upper(ctx):
    return {n: np.asarray(c.upper, np.float64).reshape(-1, c.upper.shape[-1])
            for n, c in ctx.ci.items()}


def np_anneal(frac, initial, start, final, end):
    if final is None or start >= 1.0:
        return initial
    if frac < start:
        return initial
    if frac >= end:
        return final
    return initial + (final - initial) * (frac - start) / (end - start)


def np_phi(c, gamma, normalize_at_one=False):
    phi = c ** 2 / (c ** 2 + gamma ** 2)
    return (1 + gamma ** 2) * phi if normalize_at_one else phi


# ---------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("start,final,end", [(0.0, 0.01, 1.0), (0.2, 0.1, 0.6), (0.5, 0.3, 0.5),
                                             (1.0, 0.01, 1.0), (0.0, None, 1.0)])
def test_gamma_schedule_at_step_fractions(start, final, end):
    fracs = np.array([0.0, 0.1, 0.2, 0.25, 0.4, 0.5, 0.6, 0.9, 1.0], np.float32)
    got = jax.jit(jax.vmap(lambda f: losses.annealed_gamma(f, 1.0, start, final, end)))(fracs)
    want = [np_anneal(float(f), 1.0, start, final, end) for f in fracs]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_gamma_schedule_vpd_values():
    # VPD's smooth-L0 schedule: 1.0 -> 0.01 linearly over the whole run
    got = [float(losses.annealed_gamma(f, 1.0, 0.0, 0.01, 1.0)) for f in (0.0, 0.5, 1.0)]
    np.testing.assert_allclose(got, [1.0, 0.505, 0.01], rtol=1e-6)


# --------------------------------------------------------------------- smooth-L0 imp-min


@pytest.mark.parametrize("weight,beta", [(1.0, 0.0), (16.0, 0.0), (0.0, 0.0), (4.0, 0.5)])
def test_smooth_l0_answer_weight_against_numpy(setup, weight, beta):
    """Sequence CI [B, T, C]: the last position's penalty counts ``answer_weight`` times."""
    d, tp, params, xs, make = setup
    T = 6
    ctx = make(params, xs[0].reshape(4, 8, 5)[:, :T], 0.0)
    got = jitted(losses.smooth_l0_importance_minimality, gamma=0.5, beta=beta,
                 answer_weight=weight)(params, ctx, None)
    want = 0.0
    for c in ctx.ci.values():
        phi = np_phi(np.asarray(c.upper, np.float64), 0.5)  # [4, T, C]
        assert phi.shape[:2] == (4, T)
        phi[:, -1] *= weight
        S = phi.reshape(-1, phi.shape[-1]).sum(0)
        M = S / (4 * T)
        want += M.sum() + beta * (M * np.log2(1 + S)).sum()
    np.testing.assert_allclose(float(got), want, rtol=2e-5)
    with pytest.raises(ValueError, match="answer_weight=2.0 weights the last sequence position"):
        losses.smooth_l0_importance_minimality(params, make(params, xs[0], 0.0), gamma=0.5,
                                               answer_weight=2.0)


@pytest.mark.parametrize("beta,normalize_at_one", [(0.0, False), (0.5, False), (0.2, True)])
def test_smooth_l0_against_numpy(setup, beta, normalize_at_one):
    d, tp, params, xs, make = setup
    opts = dict(gamma=1.0, gamma_anneal_start_frac=0.0, gamma_anneal_final_gamma=0.05,
                gamma_anneal_end_frac=0.8, beta=beta, normalize_at_one=normalize_at_one)
    for frac in (0.0, 0.3, 0.9):
        ctx = make(params, xs[0], frac)
        got = jitted(losses.smooth_l0_importance_minimality, **opts)(params, ctx, None)
        gamma = np_anneal(frac, 1.0, 0.0, 0.05, 0.8)
        want = 0.0
        for c in np_upper(ctx).values():
            S = np_phi(c, gamma, normalize_at_one).sum(0)
            M = S / c.shape[0]
            want += M.sum() + beta * (M * np.log2(1 + S)).sum()
        np.testing.assert_allclose(float(got), want, rtol=2e-5)


def test_smooth_l0_under_vmap_over_step_fractions(setup):
    d, tp, params, xs, make = setup
    ctx = make(params, xs[0], 0.0)
    fn = functools.partial(losses.smooth_l0_importance_minimality, gamma=1.0, beta=0.3,
                           gamma_anneal_start_frac=0.0, gamma_anneal_final_gamma=0.1)
    fracs = jnp.array([0.0, 0.5, 1.0])
    got = jax.jit(jax.vmap(lambda f: fn(params, ctx.replace(step_frac=f), None)))(fracs)
    single = jax.jit(lambda f: fn(params, ctx.replace(step_frac=f), None))  # one at a time
    for f, g in zip(fracs, got):
        np.testing.assert_allclose(float(g), float(single(f)), rtol=1e-6)


# --------------------------------------------------------------- nested frequency minimality


def np_nested(ctx, a, gamma=None, pnorm=None, eps=1e-12):
    total = 0.0
    for c in np_upper(ctx).values():
        phi = np_phi(c, gamma) if gamma is not None else (c + eps) ** pnorm
        f = phi.mean(0)
        total += (f * np.log2(1 + a * f)).sum()
    return total


@pytest.mark.parametrize("penalty", [dict(gamma=0.3), dict(pnorm=0.9)])
def test_nested_frequency_against_numpy(setup, penalty):
    d, tp, params, xs, make = setup
    ctx = make(params, xs[0], 0.4)
    for a in (1, 1000, 65_536):
        got = jitted(losses.nested_frequency_minimality, reference_datapoint_count=a,
                     **penalty)(params, ctx, None)
        np.testing.assert_allclose(float(got), np_nested(ctx, a, **penalty), rtol=2e-5)


def test_nested_frequency_at_batch_count_is_the_fused_beta_part(setup):
    # a' = B T: the paper's (1/BT) sum phi log2(1 + S), the beta part of the fused term
    d, tp, params, xs, make = setup
    ctx = make(params, xs[0], 0.0)
    nested = losses.nested_frequency_minimality(params, ctx, reference_datapoint_count=B,
                                                gamma=0.5)
    fused = (losses.smooth_l0_importance_minimality(params, ctx, gamma=0.5, beta=1.0)
             - losses.smooth_l0_importance_minimality(params, ctx, gamma=0.5))
    np.testing.assert_allclose(float(nested), float(fused), rtol=1e-5)


# ---------------------------------------------------------------------------- the EMA


def test_ema_state_after_two_steps_is_the_numpy_ema(setup):
    d, tp, params, xs, make = setup
    h, a = 3.0, 1000
    penalty = dict(gamma=0.3)
    terms = [losses.term("faithfulness", 1.0),
             losses.term("nested_frequency_minimality_ema", 0.37, reference_datapoint_count=a,
                         ema_halflife_steps=h, **penalty)]
    total = losses.total_loss(terms)
    params = {**params, ADVERSARY: adversary.init_adversary(d, terms, jax.random.key(5))}
    opt = adversary.with_adversary(optax.adam(1e-3), adversary.term_optimizers(terms))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x):
        def loss(p):
            ctx = spdjax.make_context(d, tp, p, x)
            return total(p, ctx, jax.random.key(0))

        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    decay = 2.0 ** (-1.0 / h)
    ema = {n: np.zeros(C) for n, C in SITES.items()}
    for i, x in enumerate(xs):
        # f of this step's batch, from the params the step starts from
        f = {n: np_phi(c, 0.3).mean(0)
             for n, c in np_upper(make(params, x, 0.0)).items()}
        params, opt_state, metrics = step(params, opt_state, x)
        ema = {n: decay * ema[n] + (1 - decay) * f[n] for n in SITES}
        f_hat = {n: ema[n] / (1 - decay ** (i + 1)) for n in SITES}
        want_value = sum((f_hat[n] * np.log2(1 + a * f_hat[n])).sum() for n in SITES)
        np.testing.assert_allclose(float(metrics["nested_frequency_minimality_ema"]),
                                   want_value, rtol=2e-5)
        state = params[ADVERSARY]["nested_frequency_minimality_ema"]
        for n in SITES:
            np.testing.assert_allclose(np.asarray(state["ema"][n]), ema[n], rtol=2e-5,
                                       atol=1e-7)
        assert float(state["count"]) == i + 1


def test_ema_first_step_value_and_gradient_are_the_batch_terms(setup):
    # at the first step the debiased EMA is the batch's f: the value and the CI gradient are
    # the batch term's (so a coefficient transfers between the two)
    d, tp, params, xs, make = setup
    opts = dict(reference_datapoint_count=500, gamma=0.3)
    params = {**params, ADVERSARY: {"ema_term": minimality.ema_init(d)}}

    def batch(p):
        return losses.nested_frequency_minimality(p, spdjax.make_context(d, tp, p, xs[0]),
                                                  **opts)

    def ema(p):
        return losses.nested_frequency_minimality_ema(
            p, spdjax.make_context(d, tp, p, xs[0]), ema_halflife_steps=50.0,
            term_name="ema_term", **opts)

    vb, gb = jax.jit(jax.value_and_grad(batch))(params)
    ve, ge = jax.jit(jax.value_and_grad(ema))(params)
    np.testing.assert_allclose(float(ve), float(vb), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(gb["ci"]), jax.tree.leaves(ge["ci"])):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-8)
    # the state's gradient is state - new, whatever the coefficient (here 1 and 0.01)
    g_small = jax.jit(jax.grad(lambda p: 0.01 * ema(p)))(params)[ADVERSARY]["ema_term"]
    np.testing.assert_allclose(np.asarray(g_small["count"]), -1.0)
    np.testing.assert_allclose(np.asarray(g_small["ema"]["a"]),
                               np.asarray(ge[ADVERSARY]["ema_term"]["ema"]["a"]), rtol=1e-6)


def test_ema_halflife_extremes_stay_finite():
    freqs = {"a": jnp.full((7,), 0.2)}
    for h in (1e-3, 1.0, 1e6):
        value, new = minimality.ema_frequency_penalty(freqs, {"a": jnp.zeros(7)},
                                                      jnp.float32(0.0), h, 100)
        np.testing.assert_allclose(np.asarray(new["a"]) / -math.expm1(-math.log(2) / h), 0.2,
                                   rtol=1e-3)
        assert np.isfinite(float(value))


# ----------------------------------------------------------------- nonlinearity locality


def np_fractions(vectors, heads):
    sq = vectors.astype(np.float64) ** 2
    if heads is not None:
        sq = sq.reshape(sq.shape[0], heads, -1).sum(-1)
    tot = sq.sum(-1, keepdims=True)
    return np.where(tot > 0, sq / np.where(tot > 0, tot, 1), 0.0)


def np_locality(d, params, units, t, weights=None, normalize_at_one=False):
    sums, counts = {}, {}
    for site, (side, heads, kind, mult) in units.items():
        V, U = (np.asarray(m, np.float64) for m in d.factors(params, site))
        f = np_fractions(U if side == "output" else V.T, heads)
        n = f.shape[1]
        c = (f / (f + t / n)).sum(-1) * ((1 + t / n) if normalize_at_one else 1.0) * mult
        sums[kind] = sums.get(kind, 0.0) + c.sum()
        counts[kind] = counts.get(kind, 0) + c.shape[0]
    weights = weights or {k: 1.0 for k in sums}
    return sum(weights[k] * sums[k] / counts[k] for k in sums if weights.get(k) is not None)


UNITS = {"a": "output", "b": {"side": "input", "heads": 2, "multiplicity": 2}}
NP_UNITS = {"a": ("output", None, "neuron", 1), "b": ("input", 2, "attention_head", 2)}


@pytest.mark.parametrize("normalize_at_one", [False, True])
def test_nonlinearity_locality_against_numpy(setup, normalize_at_one):
    d, tp, params, xs, make = setup
    opts = dict(units=UNITS, relative_threshold=4.0, relative_threshold_anneal_start_frac=0.0,
                relative_threshold_anneal_final=0.5, normalize_at_one=normalize_at_one,
                kind_coefficients={"neuron": 1.0, "attention_head": 0.3})
    for frac in (0.0, 0.5):
        ctx = make(params, xs[0], frac)
        got = jitted(losses.nonlinearity_locality, **opts)(params, ctx, None)
        want = np_locality(d, params, NP_UNITS, np_anneal(frac, 4.0, 0.0, 0.5, 1.0),
                           {"neuron": 1.0, "attention_head": 0.3}, normalize_at_one)
        np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # a kind weighted None is left out
    got = jitted(losses.nonlinearity_locality, units=UNITS, relative_threshold=1.0,
                 kind_coefficients={"neuron": None, "attention_head": 2.0})(params, ctx, None)
    want = np_locality(d, params, {"b": NP_UNITS["b"]}, 1.0, {"attention_head": 2.0})
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_locality_one_unit_counts_one_and_zero_vectors_zero(setup):
    d, tp, params, xs, make = setup
    ctx = make(params, xs[0], 0.0)
    U = np.zeros((7, 6), np.float32)
    U[np.arange(6), np.arange(6)] = np.linspace(1e-20, 3.0, 6)  # row 6 stays 0
    p = {**params, "components": {**params["components"],
                                  "a": {**params["components"]["a"], "U": jnp.asarray(U)}}}
    fn = functools.partial(losses.nonlinearity_locality, units={"a": "output"},
                           relative_threshold=2.0, normalize_at_one=True)
    value, grads = jax.jit(jax.value_and_grad(lambda q: fn(q, ctx)))(p)
    np.testing.assert_allclose(float(value), 6 / 7, rtol=1e-5)  # 6 one-unit rows, 1 zero
    grads = grads["components"]["a"]["U"]
    assert np.all(np.isfinite(np.asarray(grads)))


def test_locality_vmapped_over_params_and_unknown_sites(setup):
    d, tp, params, xs, make = setup
    ctx = make(params, xs[0], 0.0)
    fn = functools.partial(losses.nonlinearity_locality, units=UNITS, relative_threshold=1.0)
    stacked = jax.tree.map(lambda x: jnp.stack([x, 2.0 * x]), params)
    got = jax.jit(jax.vmap(lambda p: fn(p, ctx)))(stacked)
    np.testing.assert_allclose(np.asarray(got), float(jax.jit(fn)(params, ctx)),
                               rtol=1e-5)  # scale-free
    with pytest.raises(ValueError, match="not decomposed"):
        losses.nonlinearity_locality(params, ctx, units={"c": "input"}, relative_threshold=1.0)
    with pytest.raises(ValueError, match="not divisible"):
        losses.nonlinearity_locality(params, ctx, units={"a": {"side": "output", "heads": 4}},
                                     relative_threshold=1.0)


# ------------------------------------------------------------------------------- Delta-L2


def test_delta_l2_against_numpy(setup):
    d, tp, params, xs, make = setup
    ctx = make(params, xs[0], 0.0)
    deltas, Ws = {}, {}
    for n in SITES:
        Ws[n] = np.asarray(d.site(n).weight(tp), np.float64)
        V, U = (np.asarray(m, np.float64) for m in d.factors(params, n))
        deltas[n] = Ws[n] - V @ U
    mse = sum((x ** 2).sum() for x in deltas.values()) / sum(w.size for w in Ws.values())
    rel = np.mean([(deltas[n] ** 2).sum() / (Ws[n] ** 2).sum() for n in SITES])
    np.testing.assert_allclose(float(jitted(losses.delta_l2)(params, ctx, None)), mse, rtol=1e-5)
    np.testing.assert_allclose(float(jitted(losses.faithfulness)(params, ctx, None)), mse,
                               rtol=1e-5)
    np.testing.assert_allclose(
        float(jitted(losses.delta_l2, normalization="relative")(params, ctx, None)), rel,
        rtol=1e-5)


# ---------------------------------------------------------------- microbatches refused


def _config(losses_, microbatches):
    c = base_config("tms", "5-2")
    c.losses = ml_collections.ConfigDict({"faithfulness": {"coeff": 1.0}, **losses_})
    c.microbatches = microbatches
    return c


COUPLED = {
    "importance_minimality": {"coeff": 1e-3, "pnorm": 1.0, "beta": 0.5},
    "frequency_minimality": {"coeff": 1e-3, "pnorm": 1.0},
    "smooth_l0_importance_minimality": {"coeff": 1e-3, "gamma": 1.0, "beta": 0.5},
    "nested_frequency_minimality": {"coeff": 1e-4, "gamma": 1.0,
                                    "reference_datapoint_count": 4096},
    "nested_frequency_minimality_ema": {"coeff": 1e-4, "gamma": 1.0, "ema_halflife_steps": 200,
                                        "reference_datapoint_count": 4096},
}


@pytest.mark.parametrize("name", sorted(COUPLED))
def test_batch_frequency_terms_refused_with_microbatches(name):
    with pytest.raises(ValueError, match=r"log2\(1 \+ S_c\).*microbatches=2"):
        spd.check_config(_config({name: COUPLED[name]}, 2))
    spd.check_config(_config({name: COUPLED[name]}, 1))


def test_terms_without_a_batch_sum_accept_microbatches():
    spd.check_config(_config({
        "importance_minimality": {"coeff": 1e-3, "pnorm": 1.0, "beta": 0.0},
        "smooth_l0_importance_minimality": {"coeff": 1e-3, "gamma": 1.0},
        "nonlinearity_locality": {"coeff": 1e-3, "units": {"linear1": "output"},
                                  "relative_threshold": 4.0},
        "delta_l2": {"coeff": 1e7}}, 2))


# ---------------------------------------------------------------------- bad options refused


@pytest.mark.parametrize("name,opts,match", [
    ("smooth_l0_importance_minimality", dict(gamma=0.0), "gamma must be a finite number > 0"),
    ("smooth_l0_importance_minimality", dict(gamma=1.0, beta=-1.0), "beta must be"),
    ("smooth_l0_importance_minimality",
     dict(gamma=1.0, gamma_anneal_start_frac=0.6, gamma_anneal_end_frac=0.2,
          gamma_anneal_final_gamma=0.1), "gamma_anneal_end_frac"),
    ("smooth_l0_importance_minimality", dict(gamma=1.0, gamma_anneal_end_frac=1.5),
     "fraction of training"),
    ("smooth_l0_importance_minimality", dict(gamma=1.0, gamma_anneal_final_gamma=0.0),
     "None or a number > 0"),
    ("smooth_l0_importance_minimality", dict(pnorm=1.0), "bad options"),
    ("importance_minimality", dict(pnorm=1.0, p_anneal_start_frac=0.5, p_anneal_end_frac=0.1),
     "p_anneal_end_frac"),
    ("nested_frequency_minimality", dict(reference_datapoint_count=10, gamma=1.0, pnorm=1.0),
     "exactly one per-value penalty"),
    ("nested_frequency_minimality", dict(reference_datapoint_count=10),
     "exactly one per-value penalty"),
    ("nested_frequency_minimality", dict(reference_datapoint_count=0, gamma=1.0),
     "integer >= 1"),
    ("nested_frequency_minimality", dict(reference_datapoint_count=1.5, gamma=1.0),
     "integer >= 1"),
    ("nested_frequency_minimality", dict(gamma=1.0), "bad options"),
    ("nested_frequency_minimality_ema",
     dict(reference_datapoint_count=10, gamma=1.0, ema_halflife_steps=0), "number of steps"),
    ("nested_frequency_minimality_ema",
     dict(reference_datapoint_count=10, gamma=1.0, ema_halflife_steps=2e6), "number of steps"),
    ("nonlinearity_locality", dict(units={"a": "inputs"}, relative_threshold=1.0), "side"),
    ("nonlinearity_locality", dict(units={"a": {"side": "input", "heads": 0}},
                                   relative_threshold=1.0), "heads"),
    ("nonlinearity_locality", dict(units={}, relative_threshold=1.0), "non-empty"),
    ("nonlinearity_locality", dict(units={"a": "input"}, relative_threshold=-1.0),
     "relative_threshold must be"),
    ("nonlinearity_locality", dict(units={"a": "input"}, relative_threshold=1.0,
                                   kind_coefficients={"attention_head": 1.0}), "no entry"),
    ("nonlinearity_locality", dict(units={"a": "input"}, relative_threshold=1.0,
                                   kind_coefficients={"neuron": None}), "every unit kind"),
    ("delta_l2", dict(normalization="l1"), "normalization must be one of"),
])
def test_bad_options_refused(name, opts, match):
    with pytest.raises(ValueError, match=match):
        losses.term(name, 1.0, **opts)


def test_the_guides_example_binds():
    # docs/guides/losses.md, "VPD's minimality and locality terms": its code runs as written
    guide = pathlib.Path(__file__).resolve().parents[2] / "docs" / "guides" / "losses.md"
    section = guide.read_text().split("## VPD's minimality and locality terms", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(code, scope)
    assert [t.name for t in scope["terms"]] == list(scope["vpd_minimality"])
