"""The L3D paper's toy models: data without all-zero samples, and the TMCS recovery of A on a
planted decomposition."""

import types

import jax
import jax.numpy as jnp
import numpy as np

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


def test_jitted_sample_batch_draws_the_same_bits_as_op_by_op():
    # The committed results' fixed training sets were drawn before sample_batch was jitted.
    key = jax.random.fold_in(jax.random.key(0), 0x13D)
    for cfg in model.VARIANTS.values():
        with jax.disable_jit():
            eager = np.asarray(model.sample_batch(cfg, key, 256))
        np.testing.assert_array_equal(np.asarray(model.sample_batch(cfg, key, 256)), eager)
