"""Adversarial (PGD) reconstruction: masks chosen to do the most damage (the PGD losses of the
later reference implementation, goodfire-ai/spd).

Instead of drawing the mask sources ``s`` at random, PGD starts from ``init`` and takes
``n_steps`` signed-gradient *ascent* steps of ``step_size`` on the reconstruction loss, clipping
``s`` to [0, 1]. The masks are ``m = g + (1 - g) * s`` (so they stay in [g, 1]); with
``delta=True`` a last source channel is the delta component's mask. The final loss is
differentiable in the components and the CI functions but not in the sources (the ascent sees
them as constants: no second-order terms).

``scope="unique_per_datapoint"`` gives every position its own sources; ``"shared_across_batch"``
one source vector for the whole batch. Under ``jit`` with a sharded batch the loss is a mean
over the global batch, so a shared source's gradient is already the all-reduced one and the
signed step is the same on every device.

Three terms, as the reference: :func:`pgd_recon` (every site masked), :func:`pgd_recon_subset`
(a routed subset per position, routing drawn once per batch) and :func:`pgd_recon_layerwise`
(each site alone, with its own sources; averaged over sites). Persistent PGD, whose sources
persist across steps, is :mod:`spdjax.losses.persistent_pgd`; its state lives in the adversary
slot ``params["adversary"]`` and is updated through :func:`assign_state`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from spdjax.losses.context import Context
from spdjax.losses.divergences import DIVERGENCES, Divergence, mse
from spdjax.losses.checks import (boolean, nonnegative_int, one_of, optional_probability,
                                   options, positive_finite, router_and_probability)
from spdjax.losses.recon import DIVERGENCE_OPTION, ROUTING_STREAM, output_divergence
from spdjax.core.masks import SiteMask
from spdjax.core.routing import Router, make_router, route

Array = jax.Array
INITS = ("random", "ones", "zeroes")
SCOPES = ("unique_per_datapoint", "shared_across_batch")
# The options every PGD term checks when bound (spdjax.losses.term).
STEP_OPTIONS = {"n_steps": nonnegative_int, "step_size": positive_finite, "delta": boolean,
                **DIVERGENCE_OPTION}
PGD_OPTIONS = {**STEP_OPTIONS, "init": one_of(INITS), "scope": one_of(SCOPES)}


def _check(n_steps, step_size, init, scope) -> None:
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 0:
        raise ValueError(f"PGD: n_steps must be an integer >= 0, got {n_steps!r}.")
    if not step_size > 0:
        raise ValueError(f"PGD: step_size must be > 0, got {step_size!r}.")
    if init not in INITS:
        raise ValueError(f"PGD: unknown init {init!r}; expected one of {INITS}.")
    if scope not in SCOPES:
        raise ValueError(f"PGD: unknown scope {scope!r}; expected one of {SCOPES}.")


def _initial_sources(key, lower: dict, init: str, scope: str, delta: bool) -> dict:
    sources = {}
    for i, (name, g) in enumerate(lower.items()):
        lead = g.shape[:-1] if scope == "unique_per_datapoint" else (1,) * (g.ndim - 1)
        shape = (*lead, g.shape[-1] + int(delta))
        if init == "random":
            sources[name] = jax.random.uniform(jax.random.fold_in(key, i), shape, g.dtype)
        else:
            sources[name] = jnp.full(shape, 1.0 if init == "ones" else 0.0, g.dtype)
    return sources


def masks_from_sources(sources: dict, lower: dict, routing: dict | None = None,
                       delta: bool = False) -> dict:
    """``{site: SiteMask}`` with ``m = g + (1 - g) * s`` (and the delta channel ``s[..., C]``)."""
    masks = {}
    for name, g in lower.items():
        s = sources[name]
        C = g.shape[-1]
        masks[name] = SiteMask(component=g + (1.0 - g) * s[..., :C],
                               delta=s[..., C] if delta else None,
                               routing=None if routing is None else routing[name])
    return masks


def pgd_sources(params, ctx: Context, key, sites: Sequence[str], *, n_steps: int,
                step_size: float, init: str = "random", scope: str = "unique_per_datapoint",
                delta: bool = False, routing: dict | None = None,
                divergence: Divergence = mse, sources: dict | None = None) -> dict:
    """The adversarial sources ``{site: s}`` for ``sites`` (the others keep the target weights)
    after ``n_steps`` of signed ascent, as constants (``stop_gradient``); ``sources``: where the
    ascent starts (e.g. an earlier call's result, to continue it) instead of ``init``."""
    _check(n_steps, step_size, init, scope)
    divergence = DIVERGENCES.resolve(divergence)
    lower = {n: ctx.ci[n].lower for n in sites}
    const_params, const_lower = jax.lax.stop_gradient((params, lower))

    def loss(sources):
        return output_divergence(const_params, ctx,
                                 masks_from_sources(sources, const_lower, routing, delta),
                                 divergence)

    def ascend(sources, _):
        grads = jax.grad(loss)(sources)
        return jax.tree.map(lambda s, d: jnp.clip(s + step_size * jnp.sign(d), 0.0, 1.0),
                            sources, grads), None

    if sources is None:
        sources = _initial_sources(key, lower, init, scope, delta)
    sources, _ = jax.lax.scan(ascend, sources, None, length=n_steps)
    return jax.lax.stop_gradient(sources)


def pgd_masks(params, ctx: Context, key, sites: Sequence[str], *, delta: bool = False,
              routing: dict | None = None, **pgd) -> dict:
    """The adversarial masks ``{site: SiteMask}`` (:func:`pgd_sources` into
    :func:`masks_from_sources`): differentiable in the CI, not in the sources."""
    sources = pgd_sources(params, ctx, key, sites, delta=delta, routing=routing, **pgd)
    return masks_from_sources(sources, {n: ctx.ci[n].lower for n in sites}, routing, delta)


def _pgd_loss(params, ctx, key, sites, routing, divergence, **pgd) -> Array:
    masks = pgd_masks(params, ctx, key, sites, routing=routing, divergence=divergence, **pgd)
    return output_divergence(params, ctx, masks, divergence)


@options(**PGD_OPTIONS)
def pgd_recon(params, ctx: Context, key, *, n_steps: int = 1, step_size: float = 1.0,
              init: str = "random", scope: str = "unique_per_datapoint", delta: bool = False,
              divergence: Divergence = mse) -> Array:
    """D(f(x | all sites masked adversarially), f(x)) (reference ``PGDReconLoss``)."""
    return _pgd_loss(params, ctx, key, list(ctx.ci), None, divergence, n_steps=n_steps,
                     step_size=step_size, init=init, scope=scope, delta=delta)


@options(router_and_probability, **PGD_OPTIONS, routing_p=optional_probability)
def pgd_recon_subset(params, ctx: Context, key, *, n_steps: int = 1, step_size: float = 1.0,
                     init: str = "random", scope: str = "unique_per_datapoint",
                     delta: bool = False, router: str | Router = "uniform_k",
                     routing_p: float | None = None, divergence: Divergence = mse) -> Array:
    """As :func:`pgd_recon` on a routed subset of sites per position (``PGDReconSubsetLoss``)."""
    sites = list(ctx.ci)
    leading = ctx.ci[sites[0]].lower.shape[:-1]
    routing = route(jax.random.fold_in(key, ROUTING_STREAM), make_router(router, routing_p),
                    sites, leading)
    return _pgd_loss(params, ctx, key, sites, routing, divergence, n_steps=n_steps,
                     step_size=step_size, init=init, scope=scope, delta=delta)


@options(**PGD_OPTIONS)
def pgd_recon_layerwise(params, ctx: Context, key, *, n_steps: int = 1, step_size: float = 1.0,
                        init: str = "random", scope: str = "unique_per_datapoint",
                        delta: bool = False, divergence: Divergence = mse) -> Array:
    """(1/L) sum_l: site l alone masked adversarially, with its own sources
    (``PGDReconLayerwiseLoss``)."""
    return jnp.mean(jnp.stack([
        _pgd_loss(params, ctx, jax.random.fold_in(key, i), [name], None, divergence,
                  n_steps=n_steps, step_size=step_size, init=init, scope=scope, delta=delta)
        for i, name in enumerate(ctx.ci)]))


# -- the adversary slot --------------------------------------------------------------------
ADVERSARY = "adversary"  # params[ADVERSARY][term name]: a stateful term's state


@jax.custom_vjp
def assign_state(state: Any, new: Any) -> Array:
    """0, with gradient ``state - new`` for ``state`` (and none for ``new``), whatever the
    term's coefficient: how a loss term hands its next state to the optimizer.

    Descending that gradient with ``optax.sgd(1.0)`` (the term's ``adversary_optimizer``, see
    :mod:`spdjax.methods.adversary`) sets ``state`` to ``new``. ``new`` should be a constant
    (``jax.lax.stop_gradient``) with ``state``'s structure, shapes and float dtypes.
    """
    del state, new
    return jnp.zeros((), jnp.float32)


def _assign_fwd(state, new):
    return jnp.zeros((), jnp.float32), (state, new)


def _assign_bwd(residuals, cotangent):
    del cotangent  # the update is the new state itself, not scaled by the term's weight
    state, new = residuals
    return jax.tree.map(lambda s, n: s - n, state, new), jax.tree.map(jnp.zeros_like, new)


assign_state.defvjp(_assign_fwd, _assign_bwd)
