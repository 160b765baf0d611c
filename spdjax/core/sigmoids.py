"""Hard sigmoids that turn raw causal-importance outputs into CI values.

Every sigmoid type is a :class:`SigmoidPair` value ``(lower, upper)``:
  * ``lower`` makes the values used for masks (stochastic, CI-masked, L0, plots);
  * ``upper`` makes the values penalised by importance minimality.

Registered types (:data:`SIGMOIDS`; SPD paper, appendix "Avoiding dead gradients with leaky hard
sigmoids"; the later reference implementation, goodfire-ai/spd, for the clamped one):
  ``leaky_hard``          paper: lower is leaky in the forward (0.01 x for x <= 0), upper-leaky
                          for imp-min.
  ``leaky_hard_clamped``  later reference: lower is clamped to [0, 1] in the forward, with a
                          one-sided leaky custom gradient below 0; upper as above.
  ``leaky_hard_clamped_uncapped``  ours: lower as ``leaky_hard_clamped``; upper ``max(x, 0)``
                          without a cap, so imp-min keeps its full slope where the lower
                          sigmoid passes none (pre-activations above 1).
  ``hard``                clamp to [0, 1] for both roles.
  ``upper_leaky_hard``    upper-leaky for both roles.
  ``logistic``            the logistic sigmoid for both roles.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from spdjax.core.registry import Registry

# Slope of the leaky parts, below 0 (lower) and above 1 (upper): 0.01 everywhere in the paper.
LEAK = 0.01

Array = jax.Array


def lower_leaky_hard(x: Array) -> Array:
    """Paper lower-leaky hard sigmoid: 0.01 x for x <= 0, x on [0, 1], 1 above."""
    return jnp.where(x <= 0, LEAK * x, jnp.minimum(x, 1.0))


def upper_leaky_hard(x: Array) -> Array:
    """Upper-leaky hard sigmoid: 0 for x <= 0, x on [0, 1], 1 + 0.01 (x - 1) above."""
    return jnp.where(x <= 0, 0.0, jnp.where(x <= 1, x, 1.0 + LEAK * (x - 1.0)))


def upper_uncapped(x: Array) -> Array:
    """0 for x <= 0, x above: the upper sigmoid without its cap at 1. A CI pre-activation far
    above 1 costs importance minimality in proportion, so it can be brought back to where the
    lower sigmoid (and with it the reconstruction) sees it again."""
    return jnp.maximum(x, 0.0)


def hard(x: Array) -> Array:
    """Hard sigmoid: clamp to [0, 1]."""
    return jnp.clip(x, 0.0, 1.0)


@jax.custom_vjp
def lower_leaky_hard_clamped(x: Array) -> Array:
    """Clamped [0, 1] forward; backward leaks 0.01 below 0 only for a negative cotangent.

    A negative cotangent means the loss falls as x rises, so a "dead" CI value below zero can
    still be pushed back up; it is never pushed further down (reference PR #234).
    """
    return jnp.clip(x, 0.0, 1.0)


def _clamped_fwd(x):
    return jnp.clip(x, 0.0, 1.0), x


def _clamped_bwd(x, g):
    below = jnp.where(g < 0, LEAK * g, 0.0)
    inside = jnp.where(x <= 1, g, 0.0)
    return (jnp.where(x <= 0, below, inside),)


lower_leaky_hard_clamped.defvjp(_clamped_fwd, _clamped_bwd)


class SigmoidPair(NamedTuple):
    """A sigmoid type: ``lower`` for masks and L0, ``upper`` for importance minimality.

    Any pair of elementwise functions ``[..., C] -> [..., C]`` works, e.g.
    ``SigmoidPair(jax.nn.sigmoid, jax.nn.sigmoid)``.
    """

    lower: Callable[[Array], Array]
    upper: Callable[[Array], Array]


SIGMOIDS: Registry[SigmoidPair] = Registry("sigmoid type", {
    "leaky_hard": SigmoidPair(lower_leaky_hard, upper_leaky_hard),
    "leaky_hard_clamped": SigmoidPair(lower_leaky_hard_clamped, upper_leaky_hard),
    "leaky_hard_clamped_uncapped": SigmoidPair(lower_leaky_hard_clamped, upper_uncapped),
    "hard": SigmoidPair(hard, hard),
    "upper_leaky_hard": SigmoidPair(upper_leaky_hard, upper_leaky_hard),
    "logistic": SigmoidPair(jax.nn.sigmoid, jax.nn.sigmoid),
})
