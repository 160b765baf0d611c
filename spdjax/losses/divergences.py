"""Output divergences ``D(pred, target) -> scalar`` used by every reconstruction loss.

``mse`` is the mean over all output elements; ``kl`` is KL(target || pred) of the softmaxes,
summed over the last axis (the vocabulary) and averaged over the leading ones (batch, positions;
as the later reference implementation, goodfire-ai/spd); ``ce`` is the cross-entropy of the
prediction against the target's softmax as soft labels, ``kl`` plus the target's entropy (same
gradient, an absolute scale). Any function with this signature can be passed where a divergence
is expected.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from spdjax.core.registry import Registry

Array = jax.Array
Divergence = Callable[[Array, Array], Array]


def mse(pred: Array, target: Array) -> Array:
    """Mean squared error over all elements."""
    return jnp.mean((pred - target) ** 2)


def kl(pred: Array, target: Array) -> Array:
    """KL(softmax(target) || softmax(pred)) summed over the last axis, mean over the rest.

    Entries the target gives probability 0 (e.g. a ``-inf`` logit) contribute 0, as
    ``0 log 0 = 0`` in torch's ``kl_div``, with a finite gradient.
    """
    logp_t = jax.nn.log_softmax(target, axis=-1)
    logq = jax.nn.log_softmax(pred, axis=-1)
    p_t = jnp.exp(logp_t)
    # Both logs are zeroed off the support (not the product): 0 * -inf would be NaN in the
    # value, and its gradient NaN even behind an outer where.
    on = p_t > 0
    return jnp.mean(jnp.sum(p_t * (jnp.where(on, logp_t, 0.0) - jnp.where(on, logq, 0.0)),
                            axis=-1))


def ce(pred: Array, target: Array) -> Array:
    """-sum softmax(target) * log_softmax(pred) over the last axis, mean over the rest."""
    p_t = jax.nn.softmax(target, axis=-1)
    return jnp.mean(-jnp.sum(p_t * jax.nn.log_softmax(pred, axis=-1), axis=-1))


DIVERGENCES: Registry[Divergence] = Registry("output divergence",
                                             {"mse": mse, "kl": kl, "ce": ce})
