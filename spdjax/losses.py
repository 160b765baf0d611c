"""SPD loss terms as pure functions with one signature, and their weighted total.

Every loss is ``loss(params, ctx, key, **options) -> scalar``. ``ctx`` (:class:`Context`, from
:func:`make_context`) carries what a step computes once: the batch, the clean target output, each
site's clean input and the causal importances. Because the CI in ``ctx`` is a function of
``params``, build ``ctx`` *inside* the function you differentiate.

Normalisations follow the reference (spec section 3): every reconstruction loss is the divergence
``D`` averaged over mask samples (and over sites, for layerwise losses); ``D = "mse"`` is the mean
over all output elements, ``D = "kl"`` is KL(target || pred) summed over the last axis and
averaged over the leading ones. Faithfulness is the squared error per target weight, pooled over
sites (a tied site counts separately). Importance minimality is summed over sites and components
and averaged over examples.
"""

from __future__ import annotations

import inspect
import zlib
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp

from spdjax.decomposition import CausalImportance, Decomposition
from spdjax.masks import get_sampler, sample_masks

Array = jax.Array


@flax.struct.dataclass
class Context:
    """What one step computes once and every loss term reads."""

    decomposition: Decomposition = flax.struct.field(pytree_node=False)
    target_params: Any
    batch: Any
    target_out: Array
    site_inputs: dict[str, Array]
    ci: dict[str, CausalImportance]
    step_frac: Array  # step / total steps, in [0, 1]; used by p-annealing


def make_context(
    decomposition: Decomposition, target_params: Any, params: dict, batch: Any, step_frac=0.0
) -> Context:
    """Clean target forward (output and site inputs) and causal importances for ``batch``."""
    target_out, site_inputs = decomposition.clean_forward(target_params, batch)
    target_out = jax.lax.stop_gradient(target_out)
    site_inputs = jax.lax.stop_gradient(site_inputs)
    ci = decomposition.causal_importance(params, site_inputs)
    return Context(
        decomposition=decomposition,
        target_params=target_params,
        batch=batch,
        target_out=target_out,
        site_inputs=site_inputs,
        ci=ci,
        step_frac=jnp.asarray(step_frac, jnp.float32),
    )


# ------------------------------------------------------------------------------- divergences


def mse(pred: Array, target: Array) -> Array:
    """Mean squared error over all elements."""
    return jnp.mean((pred - target) ** 2)


def kl(pred: Array, target: Array) -> Array:
    """KL(softmax(target) || softmax(pred)) summed over the last axis, mean over the rest."""
    logp_t = jax.nn.log_softmax(target, axis=-1)
    logq = jax.nn.log_softmax(pred, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(logp_t) * (logp_t - logq), axis=-1))


DIVERGENCES: dict[str, Callable[[Array, Array], Array]] = {"mse": mse, "kl": kl}


def get_divergence(name: str):
    if name not in DIVERGENCES:
        raise ValueError(f"Unknown output divergence {name!r}; expected one of {sorted(DIVERGENCES)}.")
    return DIVERGENCES[name]


# ------------------------------------------------------------------------------------ losses


def faithfulness(params, ctx: Context, key=None) -> Array:
    """sum_l ||W_l - V_l U_l||_F^2 / sum_l numel(W_l)  (paper eq. L_faithfulness)."""
    d = ctx.decomposition
    sq, n = 0.0, 0
    for name in d.site_names:
        W = d.site(name).weight(ctx.target_params)
        sq = sq + jnp.sum((W - d.component_weight(params, name)) ** 2)
        n += W.size
    return sq / n


def _recon(params, ctx: Context, masks: Mapping[str, Array | None], divergence: str) -> Array:
    d = ctx.decomposition
    out = d.forward(ctx.target_params, params, ctx.batch, masks)
    return get_divergence(divergence)(out, ctx.target_out)


def _layerwise(params, ctx, masks, divergence):
    return jnp.mean(
        jnp.stack([_recon(params, ctx, {n: masks[n]}, divergence) for n in masks])
    )


def _over_mask_samples(fn, params, ctx, key, n_samples, sampling, divergence):
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
    lower = {n: c.lower for n, c in ctx.ci.items()}

    def one(k):
        return fn(params, ctx, sample_masks(k, lower, sampling=sampling), divergence)

    return jnp.mean(jax.vmap(one)(jax.random.split(key, n_samples)))


def stochastic_recon(
    params, ctx: Context, key, *, n_samples: int = 1, sampling: str = "continuous",
    divergence: str = "mse",
) -> Array:
    """(1/S) sum_s D(f(x | all sites masked with m^(s)), f(x))."""
    return _over_mask_samples(_recon, params, ctx, key, n_samples, sampling, divergence)


def stochastic_recon_layerwise(
    params, ctx: Context, key, *, n_samples: int = 1, sampling: str = "continuous",
    divergence: str = "mse",
) -> Array:
    """(1/(L S)) sum_s sum_l D(f(x | only site l masked with m_l^(s)), f(x))."""
    return _over_mask_samples(_layerwise, params, ctx, key, n_samples, sampling, divergence)


def ci_masked_recon(params, ctx: Context, key=None, *, divergence: str = "mse") -> Array:
    """D(f(x | all sites masked with m = g), f(x))."""
    return _recon(params, ctx, {n: c.lower for n, c in ctx.ci.items()}, divergence)


def ci_masked_recon_layerwise(params, ctx: Context, key=None, *, divergence: str = "mse") -> Array:
    """(1/L) sum_l D(f(x | only site l masked with m = g), f(x))."""
    return _layerwise(params, ctx, {n: c.lower for n, c in ctx.ci.items()}, divergence)


def unmasked_recon(params, ctx: Context, key=None, *, divergence: str = "mse") -> Array:
    """D(f(x | every site replaced by the plain component sum V U), f(x))."""
    return _recon(params, ctx, {n: None for n in ctx.ci}, divergence)


def annealed_p(step_frac, pnorm, start_frac=1.0, final_p=None, end_frac=1.0):
    """p for importance minimality: pnorm until start_frac, linear to final_p at end_frac."""
    if final_p is None or start_frac >= 1.0:
        return jnp.asarray(pnorm, jnp.float32)
    span = max(end_frac - start_frac, 1e-12)
    t = jnp.clip((step_frac - start_frac) / span, 0.0, 1.0)
    return pnorm + (final_p - pnorm) * t


def importance_minimality(
    params, ctx: Context, key=None, *, pnorm: float, p_anneal_start_frac: float = 1.0,
    p_anneal_final_p: float | None = None, p_anneal_end_frac: float = 1.0, eps: float = 1e-12,
) -> Array:
    """sum_l sum_c mean_examples (sigma_up(gamma_c^l) + eps)^p   (paper eq. L_imp-min).

    ``eps`` (1e-12, as in the later reference) keeps the gradient finite for p < 1 at zero CI.
    """
    p = annealed_p(ctx.step_frac, pnorm, p_anneal_start_frac, p_anneal_final_p, p_anneal_end_frac)
    total = 0.0
    for c in ctx.ci.values():
        per_component = jnp.mean(
            ((c.upper + eps) ** p).reshape(-1, c.upper.shape[-1]), axis=0
        )
        total = total + jnp.sum(per_component)
    return total


LOSSES: dict[str, Callable[..., Array]] = {
    "faithfulness": faithfulness,
    "stochastic_recon": stochastic_recon,
    "stochastic_recon_layerwise": stochastic_recon_layerwise,
    "importance_minimality": importance_minimality,
    "ci_masked_recon": ci_masked_recon,
    "ci_masked_recon_layerwise": ci_masked_recon_layerwise,
    "unmasked_recon": unmasked_recon,
}


def get_loss(name: str) -> Callable[..., Array]:
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; expected one of {sorted(LOSSES)}.")
    return LOSSES[name]


def term_key(key: Array, name: str) -> Array:
    """A key per loss term that depends only on the term's name (so terms draw independently)."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def make_total_loss(loss_config: Mapping[str, Mapping[str, Any]]):
    """Builds ``total(params, ctx, key) -> (scalar, {name: term})`` from a config dict.

    ``loss_config`` maps a loss name to ``{"coeff": float, **options}``; e.g.
    ``{"faithfulness": {"coeff": 1.0}, "importance_minimality": {"coeff": 3e-3, "pnorm": 1.0}}``.
    Unknown names, missing coeffs and unknown or missing options fail here, not mid-run.
    """
    if not loss_config:
        raise ValueError("The loss config is empty: name at least one loss term with a coeff.")
    terms = []
    for name, opts in loss_config.items():
        fn = get_loss(name)
        opts = dict(opts)
        if "coeff" not in opts:
            raise ValueError(f"Loss {name!r} needs a 'coeff'; got options {sorted(opts)}.")
        coeff = float(opts.pop("coeff"))
        try:
            inspect.signature(fn).bind(None, None, None, **opts)
        except TypeError as e:
            allowed = [
                p.name for p in inspect.signature(fn).parameters.values()
                if p.kind == inspect.Parameter.KEYWORD_ONLY
            ]
            raise ValueError(f"Loss {name!r}: bad options {sorted(opts)} ({e}); allowed: {allowed}.")
        if "sampling" in opts:
            get_sampler(opts["sampling"])
        if "divergence" in opts:
            get_divergence(opts["divergence"])
        terms.append((name, coeff, fn, opts))

    def total(params, ctx: Context, key):
        values = {name: fn(params, ctx, term_key(key, name), **opts) for name, _, fn, opts in terms}
        return sum(coeff * values[name] for name, coeff, _, _ in terms), values

    return total
