"""Reconstruction losses: the target's output against the output with components masked in.

Every term is ``loss(params, ctx, key, **options) -> scalar``: the divergence ``D``
(:mod:`spdjax.losses.divergences`) averaged over ``n_samples`` stochastic mask draws (and over
sites, for the layerwise terms, where every other site keeps the target weight). Masks come from
:func:`spdjax.core.masks.sample_masks` with an explicit key; each draw uses its own split of it.

Options of the later reference implementation (goodfire-ai/spd): ``delta=True`` adds the delta
component
``W - V U`` with its own ``U[0, 1)`` mask to the stochastic terms (never to the CI-masked ones);
:func:`stochastic_recon_subset` routes a random subset of sites per position
(:mod:`spdjax.core.routing`); :func:`stochastic_hidden_acts_recon` compares the sites' inputs
instead of the output.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from spdjax.losses.context import Context
from spdjax.losses.divergences import DIVERGENCES, Divergence, mse
from spdjax.losses.checks import (boolean, named, optional_probability, options, positive_int,
                                   router_and_probability)
from spdjax.core.masks import (SAMPLERS, MaskSampler, SiteMask, continuous, sample_masks,
                               with_routing)
from spdjax.core.routing import Router, make_router, route
from spdjax.core.target import dense_input

Array = jax.Array
ROUTING_STREAM = 0x7FFFFFF0  # fold_in index of a mask draw's routing key (sites use 0, 1, ...)
# The options every stochastic term checks when bound (spdjax.losses.term).
SAMPLING_OPTIONS = {"n_samples": positive_int, "sampling": named(SAMPLERS), "delta": boolean}
DIVERGENCE_OPTION = {"divergence": named(DIVERGENCES)}


def output_divergence(params, ctx: Context, masks: Mapping[str, Array | SiteMask | None],
                      divergence: str | Divergence = mse) -> Array:
    """``D(f(x | masks), f(x))``: the divergence of the masked forward's output from the
    target's, the quantity every reconstruction and PGD term reduces.

    With the decomposition's ``output_chunk`` = k > 0 (:func:`~spdjax.core.decomposition.
    decompose`, config ``output_chunk``) the batch is cut into chunks of k rows: each chunk's
    masked forward and divergence run in turn (``lax.map``), rematerialised
    (``jax.checkpoint``), so the forward and the backward hold one chunk's activations and
    output (e.g. ``[k, seq, vocab]`` logits), never the whole batch's. A last, smaller chunk
    takes the rows left over (k need not divide the batch). The chunks' values are averaged
    weighted by their rows: the unchunked value for a divergence that is a mean over examples
    (``mse``, ``kl``, ``ce``, and any mean over the leading axes), to float rounding.

    Every leaf of the batch, of the target output and of the masks whose leading axis is the
    batch's is cut; a mask leaf with leading axis 1 (a source shared across the batch) is
    broadcast to every chunk; any other leading size is a ``ValueError``.
    """
    fn = DIVERGENCES.resolve(divergence)
    decomposition = ctx.decomposition

    def one(batch, target_out, chunk_masks):
        out = decomposition.forward(ctx.target_params, params, batch, chunk_masks)
        return fn(out, target_out)

    k = decomposition.output_chunk
    rows = _batch_rows(ctx.target_out)
    if not k or k >= rows:
        return one(ctx.batch, ctx.target_out, masks)
    tree = (ctx.batch, ctx.target_out, masks)
    leaves, treedef = jax.tree.flatten(tree)
    cut = [_cuts(leaf, rows) for leaf in leaves]
    n, rest = divmod(rows, k)

    def on(parts):  # the chunk's leaves, the shared ones as they are
        it = iter(parts)
        return one(*jax.tree.unflatten(treedef, [next(it) if c else leaf
                                                 for leaf, c in zip(leaves, cut)]))

    chunked = [leaf[:n * k].reshape(n, k, *leaf.shape[1:])
               for leaf, c in zip(leaves, cut) if c]
    # Rematerialised: the backward pass keeps one chunk's activations, not the batch's.
    total = k * jnp.sum(jax.lax.map(jax.checkpoint(on), chunked))
    if rest:
        total = total + rest * jax.checkpoint(on)([leaf[n * k:] for leaf, c in zip(leaves, cut)
                                                   if c])
    return total / rows


def _batch_rows(target_out) -> int:
    leaves = jax.tree.leaves(target_out)
    if not leaves or leaves[0].ndim == 0:
        raise ValueError("output_chunk: the target output has no batch axis to cut into chunks "
                         f"(its leaves: {[getattr(a, 'shape', a) for a in leaves]}).")
    return leaves[0].shape[0]


def _cuts(leaf, rows: int) -> bool:
    """Whether a leaf is cut along its leading (batch) axis or shared by every chunk."""
    if jnp.ndim(leaf) and leaf.shape[0] == rows:
        return True
    if jnp.ndim(leaf) == 0 or leaf.shape[0] == 1:
        return False
    raise ValueError(f"output_chunk: an input of the masked forward has shape "
                     f"{tuple(leaf.shape)}, whose leading axis is neither the batch's ({rows} "
                     "rows) nor 1 (shared by every example); the batch, target output and masks "
                     "must lead with the batch axis.")


def _recon(params, ctx: Context, masks: Mapping[str, Array | None], divergence) -> Array:
    return output_divergence(params, ctx, masks, divergence)


def _layerwise(params, ctx, masks, divergence):
    return jnp.mean(
        jnp.stack([_recon(params, ctx, {n: masks[n]}, divergence) for n in masks])
    )


def _over_mask_samples(fn, params, ctx, key, n_samples, sampling, divergence, delta=False,
                       router: Router | None = None, sample_chunk: int | None = None):
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
    if sample_chunk is not None and not 1 <= sample_chunk <= n_samples:
        raise ValueError(f"sample_chunk must be in [1, n_samples={n_samples}] or None, got "
                         f"{sample_chunk}.")
    lower = {n: c.lower for n, c in ctx.ci.items()}
    sampling = SAMPLERS.resolve(sampling)

    def one(k):
        masks = sample_masks(k, lower, sampling=sampling, delta=delta)
        if router is not None:
            leading = next(iter(lower.values())).shape[:-1]
            masks = with_routing(masks, route(jax.random.fold_in(k, ROUTING_STREAM), router,
                                              list(lower), leading))
        return fn(params, ctx, masks, divergence)

    keys = jax.random.split(key, n_samples)
    if sample_chunk is None or sample_chunk == n_samples:
        return jnp.mean(jax.vmap(one)(keys))
    # Rematerialised: the backward pass keeps one chunk's activations, not all S draws'.
    return jnp.mean(jax.lax.map(jax.checkpoint(one), keys, batch_size=sample_chunk))


@options(**SAMPLING_OPTIONS, **DIVERGENCE_OPTION)
def stochastic_recon(
    params, ctx: Context, key, *, n_samples: int = 1, sampling: MaskSampler = continuous,
    divergence: Divergence = mse, delta: bool = False, sample_chunk: int | None = None,
) -> Array:
    """(1/S) sum_s D(f(x | all sites masked with m^(s)), f(x)).

    ``sample_chunk=k`` evaluates the S mask draws k at a time (``lax.map``) instead of all at
    once (``vmap``): peak memory ~ k/S of the full batch x positions x vocabulary x S, same value.
    """
    return _over_mask_samples(_recon, params, ctx, key, n_samples, sampling, divergence, delta,
                              sample_chunk=sample_chunk)


@options(**SAMPLING_OPTIONS, **DIVERGENCE_OPTION)
def stochastic_recon_layerwise(
    params, ctx: Context, key, *, n_samples: int = 1, sampling: MaskSampler = continuous,
    divergence: Divergence = mse, delta: bool = False, sample_chunk: int | None = None,
) -> Array:
    """(1/(L S)) sum_s sum_l D(f(x | only site l masked with m_l^(s)), f(x)); ``sample_chunk``
    as in :func:`stochastic_recon`."""
    return _over_mask_samples(_layerwise, params, ctx, key, n_samples, sampling, divergence,
                              delta, sample_chunk=sample_chunk)


@options(router_and_probability, **SAMPLING_OPTIONS, **DIVERGENCE_OPTION,
         routing_p=optional_probability)
def stochastic_recon_subset(
    params, ctx: Context, key, *, n_samples: int = 1, sampling: MaskSampler = continuous,
    divergence: Divergence = mse, delta: bool = False, router: str | Router = "uniform_k",
    routing_p: float | None = None, sample_chunk: int | None = None,
) -> Array:
    """(1/S) sum_s D(f(x | a routed subset of sites masked with m^(s) per position), f(x)).

    Each position replaces the sites its routing mask picks (``router``, :mod:`spdjax.core.routing`;
    ``"static_probability"`` with ``routing_p``); the others keep their target output. The
    component masks are the ones :func:`stochastic_recon` draws from the same key.
    ``sample_chunk`` as in :func:`stochastic_recon`.
    """
    return _over_mask_samples(_recon, params, ctx, key, n_samples, sampling, divergence, delta,
                              make_router(router, routing_p), sample_chunk)


def _hidden_acts(params, ctx: Context, masks, divergence) -> Array:
    del divergence  # a squared error on the site inputs, as the reference
    _, inputs = ctx.decomposition.forward(ctx.target_params, params, ctx.batch, masks,
                                          with_inputs=True)
    clean = {n: dense_input(x).astype(jnp.float32) for n, x in ctx.site_inputs.items()}
    sq = sum(jnp.sum((dense_input(inputs[n]).astype(jnp.float32) - x) ** 2)
             for n, x in clean.items())
    return sq / sum(x.size for x in clean.values())


@options(**SAMPLING_OPTIONS)
def stochastic_hidden_acts_recon(
    params, ctx: Context, key, *, n_samples: int = 1, sampling: MaskSampler = continuous,
    delta: bool = False,
) -> Array:
    """sum_l ||x_l(masked) - x_l(clean)||^2 / sum_l numel(x_l): how far every site's input moves
    when all sites are masked with stochastic masks (goodfire-ai/spd's hidden-activation
    reconstruction; the first site's input never
    moves but counts in the denominator)."""
    return _over_mask_samples(_hidden_acts, params, ctx, key, n_samples, sampling, None, delta)


@options(**DIVERGENCE_OPTION)
def ci_masked_recon(params, ctx: Context, key=None, *, divergence: Divergence = mse) -> Array:
    """D(f(x | all sites masked with m = g), f(x))."""
    return _recon(params, ctx, {n: c.lower for n, c in ctx.ci.items()}, divergence)


@options(**DIVERGENCE_OPTION)
def ci_masked_recon_layerwise(
    params, ctx: Context, key=None, *, divergence: Divergence = mse
) -> Array:
    """(1/L) sum_l D(f(x | only site l masked with m = g), f(x))."""
    return _layerwise(params, ctx, {n: c.lower for n, c in ctx.ci.items()}, divergence)


@options(**DIVERGENCE_OPTION)
def unmasked_recon(params, ctx: Context, key=None, *, divergence: Divergence = mse) -> Array:
    """D(f(x | every site replaced by the plain component sum V U), f(x))."""
    return _recon(params, ctx, {n: None for n in ctx.ci}, divergence)
