"""Loss terms on the parameters and the causal importances: faithfulness (and VPD's Delta-L2),
importance and frequency minimality.

Same signature as every loss term, ``loss(params, ctx, key, **options) -> scalar`` (the key is
unused here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spdjax.losses.context import Context
from spdjax.losses.checks import (nonnegative, nonnegative_finite, one_of, optional_positive,
                                   options, positive_finite)
from spdjax.losses.minimality import anneal_order, fraction, linear_anneal

Array = jax.Array


def faithfulness(params, ctx: Context, key=None) -> Array:
    """sum_l ||W_l - V_l U_l||_F^2 / sum_l numel(W_l)  (paper eq. L_faithfulness).

    A tied site counts separately (as the reference, which sums over its two Parameters).
    """
    d = ctx.decomposition
    sq, n = 0.0, 0
    for name in d.site_names:
        W = d.site(name).weight(ctx.target_params)
        sq = sq + jnp.sum((W - d.component_weight(params, name)) ** 2)
        n += W.size
    return sq / n


@options(normalization=one_of(("mse", "relative")))
def delta_l2(params, ctx: Context, key=None, *, normalization: str = "mse") -> Array:
    """VPD's Delta-L2 on the delta components ``Delta_l = W_l - sum_c U_c V_c^T``.

    ``"mse"`` (default): ``sum_l ||Delta_l||_F^2 / N``, N the number of decomposed parameters
    (VPD paper, appendix "Delta-L2 penalty"; the same value as :func:`faithfulness`).
    ``"relative"``: ``mean_l ||Delta_l||_F^2 / ||W_l||_F^2``, each matrix relative to its own
    size (the VPD library's faithfulness loss), so small matrices are not drowned by large ones.
    A tied site counts separately, as in :func:`faithfulness`. Returns a scalar.
    """
    del key
    if normalization == "mse":
        return faithfulness(params, ctx)
    d = ctx.decomposition
    total = 0.0
    for name in d.site_names:
        W = d.site(name).weight(ctx.target_params)
        total = total + (jnp.sum((W - d.component_weight(params, name)) ** 2)
                         / jnp.sum(W ** 2))
    return total / len(d.site_names)


def annealed_p(step_frac, pnorm, start_frac=1.0, final_p=None, end_frac=1.0):
    """p for importance minimality: pnorm until start_frac, linear to final_p at end_frac
    (:func:`spdjax.losses.minimality.linear_anneal`)."""
    return linear_anneal(step_frac, pnorm, start_frac, final_p, end_frac)


def _minimality(ctx: Context, p, eps: float, plain: float, frequency: float) -> Array:
    """sum_l sum_c (plain * M_c + frequency * M_c * log2(1 + S_c)) with ``M_c`` the mean and
    ``S_c`` the sum over examples of ``(sigma_up(gamma_c) + eps)^p``."""
    total = 0.0
    for c in ctx.ci.values():
        powered = ((c.upper + eps) ** p).reshape(-1, c.upper.shape[-1])
        mean = jnp.mean(powered, axis=0)
        per_component = mean if plain == 1.0 else plain * mean
        if frequency:
            per_component = per_component + frequency * mean * jnp.log2(
                1.0 + jnp.sum(powered, axis=0))
        total = total + jnp.sum(per_component)
    return total


@options(anneal_order("p"), pnorm=positive_finite, p_anneal_final_p=optional_positive,
         p_anneal_start_frac=fraction, p_anneal_end_frac=fraction, eps=nonnegative,
         beta=nonnegative_finite)
def importance_minimality(
    params, ctx: Context, key=None, *, pnorm: float, p_anneal_start_frac: float = 1.0,
    p_anneal_final_p: float | None = None, p_anneal_end_frac: float = 1.0, eps: float = 1e-12,
    beta: float = 0.0,
) -> Array:
    """sum_l sum_c mean_examples (sigma_up(gamma_c^l) + eps)^p   (paper eq. L_imp-min).

    ``eps`` (1e-12, as in the later reference) keeps the gradient finite for p < 1 at zero CI.
    ``beta > 0`` adds the later reference implementation's frequency term (goodfire-ai/spd):
    ``beta * M_c * log2(1 + S_c)`` per component, ``M_c``/``S_c`` the mean/sum over the batch
    (the global batch under ``jit``, so the reference's ``world_size`` scaling is not needed).
    ``S_c`` must be the whole batch's: SPD refuses ``beta > 0`` with ``microbatches > 1``.
    """
    if not pnorm > 0:
        raise ValueError(f"importance_minimality: pnorm must be > 0, got {pnorm!r}.")
    p = annealed_p(ctx.step_frac, pnorm, p_anneal_start_frac, p_anneal_final_p, p_anneal_end_frac)
    return _minimality(ctx, p, eps, 1.0, beta)


@options(anneal_order("p"), pnorm=positive_finite, p_anneal_final_p=optional_positive,
         p_anneal_start_frac=fraction, p_anneal_end_frac=fraction, eps=nonnegative)
def frequency_minimality(
    params, ctx: Context, key=None, *, pnorm: float, p_anneal_start_frac: float = 1.0,
    p_anneal_final_p: float | None = None, p_anneal_end_frac: float = 1.0, eps: float = 1e-12,
) -> Array:
    """sum_l sum_c M_c * log2(1 + S_c): VPD's frequency minimality as a term of its own coefficient
    (slightly superlinear in how often a subcomponent fires; the ``beta`` part of
    :func:`importance_minimality`)."""
    if not pnorm > 0:
        raise ValueError(f"frequency_minimality: pnorm must be > 0, got {pnorm!r}.")
    p = annealed_p(ctx.step_frac, pnorm, p_anneal_start_frac, p_anneal_final_p, p_anneal_end_frac)
    return _minimality(ctx, p, eps, 0.0, 1.0)


# The log2(1 + S_c) of a batch sum: a microbatch would see its own chunk's S_c (see
# spdjax.losses.minimality.couples_examples).
importance_minimality.couples_examples = lambda beta=0.0, **_: beta > 0
frequency_minimality.couples_examples = lambda **_: True
