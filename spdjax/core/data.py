"""Toy data as pure functions of a PRNG key, generated on device.

Sparse features (SPD paper, appendix "Training details and hyperparameters"): values ``U[lo, hi)``,
and either each feature active
independently with probability ``feature_probability`` (``at_least_zero_active``; all-zero rows
allowed) or exactly ``n_active`` distinct features active (``exactly_n_active``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

DATA_MODES = ("at_least_zero_active", "exactly_n_active")


def sparse_features(
    key: Array,
    batch_shape: int | tuple[int, ...],
    n_features: int,
    *,
    feature_probability: float = 0.05,
    value_range: tuple[float, float] = (0.0, 1.0),
    mode: str = "at_least_zero_active",
    n_active: int = 1,
) -> Array:
    """A batch ``[*batch_shape, n_features]`` of sparse feature vectors."""
    if mode not in DATA_MODES:
        raise ValueError(f"Unknown data mode {mode!r}; expected one of {DATA_MODES}.")
    batch_shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
    shape = batch_shape + (n_features,)
    kv, ka = jax.random.split(key)
    lo, hi = value_range
    values = jax.random.uniform(kv, shape, minval=lo, maxval=hi)
    if mode == "at_least_zero_active":
        if not 0.0 <= feature_probability <= 1.0:
            raise ValueError(f"feature_probability must be in [0, 1], got {feature_probability}.")
        active = jax.random.bernoulli(ka, feature_probability, shape)
    else:
        if not 1 <= n_active <= n_features:
            raise ValueError(f"n_active must be in [1, {n_features}], got {n_active}.")
        ranks = jnp.argsort(jnp.argsort(jax.random.uniform(ka, shape), axis=-1), axis=-1)
        active = ranks < n_active
    return jnp.where(active, values, 0.0)
