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

Array = jax.Array


def _continuous(key, shape, dtype):
    return jax.random.uniform(key, shape, dtype)


def _binomial(key, shape, dtype):
    return jax.random.bernoulli(key, 0.5, shape).astype(dtype)


MASK_SAMPLERS: dict[str, Callable] = {"continuous": _continuous, "binomial": _binomial}


def get_sampler(name: str) -> Callable:
    if name not in MASK_SAMPLERS:
        raise ValueError(f"Unknown mask sampling {name!r}; expected one of {sorted(MASK_SAMPLERS)}.")
    return MASK_SAMPLERS[name]


def sample_masks(
    key: Array, ci_lower: Mapping[str, Array], *, sampling: str = "continuous"
) -> dict[str, Array]:
    """One stochastic mask per site, each with the shape of that site's CI ``[..., C]``."""
    draw = get_sampler(sampling)
    masks = {}
    for i, (name, g) in enumerate(ci_lower.items()):
        s = jax.lax.stop_gradient(draw(jax.random.fold_in(key, i), g.shape, g.dtype))
        masks[name] = g + (1.0 - g) * s
    return masks
