"""Reconstruction losses: the target's output against the output with components masked in.

Every term is ``loss(params, ctx, key, **options) -> scalar``: the divergence ``D``
(:mod:`spdjax.losses.divergences`) averaged over ``n_samples`` stochastic mask draws (and over
sites, for the layerwise terms, where every other site keeps the target weight). Masks come from
:func:`spdjax.masks.sample_masks` with an explicit key; each draw uses its own split of it.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from spdjax.losses.context import Context
from spdjax.losses.divergences import DIVERGENCES, Divergence, mse
from spdjax.masks import SAMPLERS, MaskSampler, continuous, sample_masks

Array = jax.Array


def _recon(params, ctx: Context, masks: Mapping[str, Array | None], divergence) -> Array:
    out = ctx.decomposition.forward(ctx.target_params, params, ctx.batch, masks)
    return DIVERGENCES.resolve(divergence)(out, ctx.target_out)


def _layerwise(params, ctx, masks, divergence):
    return jnp.mean(
        jnp.stack([_recon(params, ctx, {n: masks[n]}, divergence) for n in masks])
    )


def _over_mask_samples(fn, params, ctx, key, n_samples, sampling, divergence):
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
    lower = {n: c.lower for n, c in ctx.ci.items()}
    sampling = SAMPLERS.resolve(sampling)

    def one(k):
        return fn(params, ctx, sample_masks(k, lower, sampling=sampling), divergence)

    return jnp.mean(jax.vmap(one)(jax.random.split(key, n_samples)))


def stochastic_recon(
    params, ctx: Context, key, *, n_samples: int = 1, sampling: MaskSampler = continuous,
    divergence: Divergence = mse,
) -> Array:
    """(1/S) sum_s D(f(x | all sites masked with m^(s)), f(x))."""
    return _over_mask_samples(_recon, params, ctx, key, n_samples, sampling, divergence)


def stochastic_recon_layerwise(
    params, ctx: Context, key, *, n_samples: int = 1, sampling: MaskSampler = continuous,
    divergence: Divergence = mse,
) -> Array:
    """(1/(L S)) sum_s sum_l D(f(x | only site l masked with m_l^(s)), f(x))."""
    return _over_mask_samples(_layerwise, params, ctx, key, n_samples, sampling, divergence)


def ci_masked_recon(params, ctx: Context, key=None, *, divergence: Divergence = mse) -> Array:
    """D(f(x | all sites masked with m = g), f(x))."""
    return _recon(params, ctx, {n: c.lower for n, c in ctx.ci.items()}, divergence)


def ci_masked_recon_layerwise(
    params, ctx: Context, key=None, *, divergence: Divergence = mse
) -> Array:
    """(1/L) sum_l D(f(x | only site l masked with m = g), f(x))."""
    return _layerwise(params, ctx, {n: c.lower for n, c in ctx.ci.items()}, divergence)


def unmasked_recon(params, ctx: Context, key=None, *, divergence: Divergence = mse) -> Array:
    """D(f(x | every site replaced by the plain component sum V U), f(x))."""
    return _recon(params, ctx, {n: None for n in ctx.ci}, divergence)
