"""Stochastic masks ``m = g + (1 - g) * s`` from explicit PRNG keys.

``s`` is drawn per example (any leading dims), per component and per site:
  ``continuous``  s ~ U[0, 1)          (paper)
  ``binomial``    s ~ Bernoulli(1/2)   (s in {0, 1})
The source ``s`` carries no gradient; ``g`` does (the reparametrisation of the paper).
Site ``i`` (in decomposition order) uses ``fold_in(key, i)``, so a site's masks do not change when
other sites are added, and draws use the global shape, so they do not depend on the device count.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax

from spdjax.registry import Registry

Array = jax.Array


def continuous(key, shape, dtype):
    """``s ~ U[0, 1)`` (paper)."""
    return jax.random.uniform(key, shape, dtype)


def binomial(key, shape, dtype):
    """``s ~ Bernoulli(1/2)`` (later reference)."""
    return jax.random.bernoulli(key, 0.5, shape).astype(dtype)


# A sampler is ``(key, shape, dtype) -> s`` with values in [0, 1].
MaskSampler = Callable[[Array, tuple, object], Array]
SAMPLERS: Registry[MaskSampler] = Registry(
    "mask sampling", {"continuous": continuous, "binomial": binomial}
)


def sample_masks(
    key: Array, ci_lower: Mapping[str, Array], *, sampling: str | MaskSampler = continuous
) -> dict[str, Array]:
    """One stochastic mask per site, each with the shape of that site's CI ``[..., C]``.

    ``sampling`` is a :data:`MaskSampler` (or, for convenience, a name in :data:`SAMPLERS`).
    """
    draw = SAMPLERS.resolve(sampling)
    masks = {}
    for i, (name, g) in enumerate(ci_lower.items()):
        s = jax.lax.stop_gradient(draw(jax.random.fold_in(key, i), g.shape, g.dtype))
        masks[name] = g + (1.0 - g) * s
    return masks
