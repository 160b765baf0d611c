import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from spdjax.core import sigmoids

from helpers import np_lower, np_upper

# Points away from the kinks at 0 and 1, where finite differences are valid.
POINTS = jnp.array([-2.0, -0.3, 0.2, 0.5, 0.9, 1.4, 3.0])


def test_paper_forward_values():
    x = np.array([-2.0, -0.3, 0.0, 0.2, 1.0, 1.4])
    np.testing.assert_allclose(sigmoids.lower_leaky_hard(jnp.asarray(x)), np_lower(x), rtol=1e-6)
    np.testing.assert_allclose(sigmoids.upper_leaky_hard(jnp.asarray(x)), np_upper(x), rtol=1e-6)
    np.testing.assert_allclose(sigmoids.lower_leaky_hard(jnp.float32(-2.0)), -0.02, rtol=1e-6)
    np.testing.assert_allclose(sigmoids.upper_leaky_hard(jnp.float32(3.0)), 1.02, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(sigmoids.SIGMOIDS))
def test_check_grads_away_from_kinks(name):
    pair = sigmoids.SIGMOIDS.get(name)
    upper_points = POINTS
    # The clamped lower sigmoid's custom gradient is deliberately not the true one below 0.
    lower_points = POINTS[POINTS > 0] if name.startswith("leaky_hard_clamped") else POINTS
    check_grads(pair.lower, (lower_points,), order=1, modes=["rev"], eps=1e-3)
    check_grads(pair.upper, (upper_points,), order=1, modes=["rev"], eps=1e-3)


def test_clamped_forward_and_one_sided_gradient():
    f = sigmoids.lower_leaky_hard_clamped
    x = jnp.array([-1.0, -1.0, 0.5, 2.0, 2.0])
    np.testing.assert_allclose(f(x), [0.0, 0.0, 0.5, 1.0, 1.0])
    cot = jnp.array([-1.0, 1.0, 3.0, -1.0, 1.0])
    _, vjp = jax.vjp(f, x)
    (g,) = vjp(cot)
    # below 0: leaks 0.01 only for a negative cotangent; inside: passes; above 1: zero.
    np.testing.assert_allclose(g, [-0.01, 0.0, 3.0, 0.0, 0.0], rtol=1e-6)


def test_uncapped_upper_keeps_its_slope_above_one():
    pair = sigmoids.SIGMOIDS.get("leaky_hard_clamped_uncapped")
    x = jnp.array([-1.5, 0.25, 0.75, 2.5])
    np.testing.assert_allclose(pair.upper(x), [0.0, 0.25, 0.75, 2.5])
    np.testing.assert_allclose(jax.vmap(jax.grad(pair.upper))(x), [0.0, 1.0, 1.0, 1.0])
    assert pair.lower is sigmoids.lower_leaky_hard_clamped


def test_paper_lower_gradient_is_leaky_autodiff():
    g = jax.vmap(jax.grad(sigmoids.lower_leaky_hard))(jnp.array([-1.0, 0.5, 2.0]))
    np.testing.assert_allclose(g, [0.01, 1.0, 0.0], rtol=1e-6)


def test_unknown_sigmoid_name():
    with pytest.raises(ValueError, match="Unknown sigmoid type 'leaky'.*leaky_hard"):
        sigmoids.SIGMOIDS.get("leaky")
