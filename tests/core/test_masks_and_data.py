import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from spdjax.core.masks import sample_masks


def test_continuous_masks_are_uniform_between_g_and_1():
    g = jnp.broadcast_to(jnp.array([0.0, 0.3, 0.9, 1.0]), (50_000, 4))
    m = np.asarray(sample_masks(jax.random.key(0), {"s": g})["s"])
    assert m.shape == g.shape
    # m = g + (1 - g) u with u ~ U[0,1): the mean is g + (1-g)/2, the variance (1-g)^2/12.
    gv = np.array([0.0, 0.3, 0.9, 1.0])
    np.testing.assert_allclose(m.mean(0), gv + (1 - gv) / 2, atol=4e-3)
    np.testing.assert_allclose(m.var(0), (1 - gv) ** 2 / 12, atol=2e-3)
    assert (m >= g).all() and (m <= 1).all()
    u = (m[:, 0] - 0.0) / 1.0  # g = 0: m is u itself
    hist, _ = np.histogram(u, bins=10, range=(0, 1))
    np.testing.assert_allclose(hist / len(u), 0.1, atol=0.01)


def test_binomial_masks_take_g_or_1_with_half_probability():
    g = jnp.full((40_000, 3), 0.25)
    m = np.asarray(sample_masks(jax.random.key(1), {"s": g}, sampling="binomial")["s"])
    assert set(np.unique(m).round(6)) == {0.25, 1.0}
    np.testing.assert_allclose((m == 1.0).mean(), 0.5, atol=0.01)


def test_masks_are_independent_across_sites_and_keys():
    g = {"a": jnp.zeros((1000, 5)), "b": jnp.zeros((1000, 5))}
    m1 = sample_masks(jax.random.key(0), g)
    m2 = sample_masks(jax.random.key(1), g)
    assert abs(np.corrcoef(np.ravel(m1["a"]), np.ravel(m1["b"]))[0, 1]) < 0.05
    assert abs(np.corrcoef(np.ravel(m1["a"]), np.ravel(m2["a"]))[0, 1]) < 0.05
    # Same key, same masks: no global RNG anywhere.
    np.testing.assert_array_equal(m1["a"], sample_masks(jax.random.key(0), g)["a"])


def test_mask_source_carries_no_gradient_but_g_does():
    def f(g):
        return jnp.sum(sample_masks(jax.random.key(0), {"s": g})["s"])

    g = jnp.full((3, 2), 0.5)
    s = (sample_masks(jax.random.key(0), {"s": g})["s"] - 0.5) / 0.5
    np.testing.assert_allclose(jax.grad(f)(g), 1.0 - s, rtol=1e-5)


def test_masks_work_for_batch_by_sequence_leading_dims():
    g = jnp.zeros((4, 7, 3))
    assert sample_masks(jax.random.key(0), {"s": g})["s"].shape == (4, 7, 3)


def test_unknown_sampling_is_rejected():
    with pytest.raises(ValueError, match="Unknown mask sampling 'gauss'"):
        sample_masks(jax.random.key(0), {"s": jnp.zeros((2, 2))}, sampling="gauss")


def test_sparse_features_statistics():
    x = np.asarray(spdjax.sparse_features(jax.random.key(0), 200_000, 5, feature_probability=0.05))
    assert x.shape == (200_000, 5)
    np.testing.assert_allclose((x > 0).mean(), 0.05, atol=2e-3)
    active = x[x > 0]
    assert active.min() >= 0 and active.max() < 1
    np.testing.assert_allclose(active.mean(), 0.5, atol=0.01)


def test_sparse_features_signed_range_and_exactly_n():
    x = np.asarray(spdjax.sparse_features(
        jax.random.key(1), (100, 3), 20, mode="exactly_n_active", n_active=2,
        value_range=(-1.0, 1.0)))
    assert x.shape == (100, 3, 20)
    assert ((x != 0).sum(-1) == 2).all()
    assert x.min() >= -1 and x.max() < 1 and x.min() < -0.5


def test_sparse_features_bad_input():
    with pytest.raises(ValueError, match="Unknown data mode"):
        spdjax.sparse_features(jax.random.key(0), 4, 3, mode="dense")
    with pytest.raises(ValueError, match="n_active must be in"):
        spdjax.sparse_features(jax.random.key(0), 4, 3, mode="exactly_n_active", n_active=5)
