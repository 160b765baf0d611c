"""Stochastic masks ``m = g + (1 - g) * s`` from explicit PRNG keys.

``s`` is drawn per example (any leading dims), per component and per site:
  ``continuous``  s ~ U[0, 1)          (paper)
  ``binomial``    s ~ Bernoulli(1/2)   (s in {0, 1})
The source ``s`` carries no gradient; ``g`` does (the reparametrisation of the paper).
Site ``i`` (in decomposition order) uses ``fold_in(key, i)``, so a site's masks do not change when
other sites are added, and draws use the global shape, so they do not depend on the device count.

A site's mask is an array ``[..., C]`` or, for the later reference's extras, a :class:`SiteMask`:
the component mask plus a delta-component mask ``[...]`` (the weight ``W - V U`` as one more
channel, ``U[0, 1)`` per position) and a routing mask ``[...]`` (where False the site keeps its
target output; both as in goodfire-ai/spd).
"""

from __future__ import annotations

from typing import Callable, Mapping

import flax.struct
import jax

from spdjax.core.registry import Registry

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


@flax.struct.dataclass
class SiteMask:
    """One site's masks: ``component`` ``[..., C]`` (None: all ones), ``delta`` ``[...]`` (None:
    no delta component) and ``routing`` ``[...]`` bool (None: the components everywhere)."""

    component: Array | None = None
    delta: Array | None = None
    routing: Array | None = None


def sample_masks(
    key: Array, ci_lower: Mapping[str, Array], *, sampling: str | MaskSampler = continuous,
    delta: bool = False,
) -> dict[str, Array | SiteMask]:
    """One stochastic mask per site, each with the shape of that site's CI ``[..., C]``.

    ``sampling`` is a :data:`MaskSampler` (or, for convenience, a name in :data:`SAMPLERS`).
    ``delta=True`` adds a delta-component mask ``U[0, 1)`` per position (always continuous, as
    the reference) and returns :class:`SiteMask` values.
    """
    draw = SAMPLERS.resolve(sampling)
    masks = {}
    for i, (name, g) in enumerate(ci_lower.items()):
        k = jax.random.fold_in(key, i)
        s = jax.lax.stop_gradient(draw(k, g.shape, g.dtype))
        masks[name] = g + (1.0 - g) * s
        if delta:
            m_delta = jax.random.uniform(jax.random.fold_in(k, 1), g.shape[:-1], g.dtype)
            masks[name] = SiteMask(component=masks[name], delta=m_delta)
    return masks


def with_routing(masks: Mapping[str, Array | SiteMask | None],
                 routing: Mapping[str, Array]) -> dict[str, SiteMask]:
    """``masks`` with each site's routing mask ``[...]`` (bool) set."""
    out = {}
    for name, m in masks.items():
        m = m if isinstance(m, SiteMask) else SiteMask(component=m)
        out[name] = m.replace(routing=routing[name])
    return out
