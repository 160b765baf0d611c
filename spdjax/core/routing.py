"""Routers: which sites use their components at each position (the later reference
implementation, goodfire-ai/spd).

A router is ``router(key, n_sites, leading_shape) -> bool [n_sites, *leading_shape]``; a site
gives its component output where its entry is True and its target output elsewhere (see
:class:`spdjax.core.masks.SiteMask`). Subset losses (:mod:`spdjax.losses.recon`,
:mod:`spdjax.losses.adversarial`) draw one routing mask per mask sample.

  ``uniform_k``            per position, k ~ U{1..n_sites}, then k sites chosen uniformly
                           (reference ``uniform_k_subset``; at least one site is always routed)
  ``all``                  every site everywhere (the full stochastic loss)
  :func:`static_probability`  each (site, position) independently with probability ``p``
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from spdjax.core.registry import Registry

Array = jax.Array
Router = Callable[[Array, int, tuple], Array]


def uniform_k(key: Array, n_sites: int, leading_shape: tuple) -> Array:
    """k ~ U{1..n} per position, then the k sites of lowest rank under i.i.d. uniforms (a
    uniformly random k-subset), as the reference's ``UniformKSubsetRouter``."""
    k_key, perm_key = jax.random.split(key)
    k = jax.random.randint(k_key, leading_shape, 1, n_sites + 1)
    u = jax.random.uniform(perm_key, (n_sites, *leading_shape))
    rank = jnp.argsort(jnp.argsort(u, axis=0), axis=0)
    return rank < k[None]


def all_sites(key: Array, n_sites: int, leading_shape: tuple) -> Array:
    """Every site at every position (the routing of the full stochastic loss)."""
    del key
    return jnp.ones((n_sites, *leading_shape), bool)


def static_probability(p: float) -> Router:
    """A router that routes each (site, position) independently with probability ``p``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"static_probability: p must be in [0, 1], got {p!r}.")

    def router(key: Array, n_sites: int, leading_shape: tuple) -> Array:
        return jax.random.bernoulli(key, p, (n_sites, *leading_shape))

    router.__name__ = f"static_probability({p:g})"
    return router


ROUTERS: Registry[Router] = Registry("router", {"uniform_k": uniform_k, "all": all_sites})


def make_router(router: str | Router, p: float | None = None) -> Router:
    """A :data:`Router` from a value, a name in :data:`ROUTERS`, or ``"static_probability"``
    with its ``p`` (the config form: ``router="static_probability", routing_p=0.5``)."""
    if router == "static_probability":
        if p is None:
            raise ValueError("router 'static_probability' needs its probability (routing_p).")
        return static_probability(p)
    if p is not None:
        raise ValueError(f"routing_p={p!r} applies only to router 'static_probability', not "
                         f"{router!r}.")
    if isinstance(router, str) and router not in ROUTERS:
        raise ValueError(f"Unknown router {router!r}; expected one of "
                         f"{sorted(ROUTERS) + ['static_probability']}.")
    return ROUTERS.resolve(router)


def route(key: Array, router: Router, site_names: Sequence[str],
          leading_shape: tuple) -> Mapping[str, Array]:
    """``{site: bool [*leading_shape]}`` drawn by ``router``."""
    mask = router(key, len(site_names), tuple(leading_shape))
    return {name: mask[i] for i, name in enumerate(site_names)}
